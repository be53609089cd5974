"""The checkpointer: one object owns a run's saves (in the foreground or background), their
commit, loading (resharding a checkpoint of another layout) and the rollback to the newest one.

A save writes every rank's files into `step_NNNNNNN.partial/` and commits it
(`files.publish`) once every rank's files are on disk. In the background
(`trainer.async_checkpoint=true`) the files are written by a thread while
training goes on, and the commit waits for `commit_pending`, which the
checkpointing callback calls once every rank reports its writes done.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from common.errors import TrainingDiverged
from parallel.engine import Engine
from parallel.expert import load_expert_weights, save_expert_weights
from pretrain.checkpoint import files, reshard
from pretrain.checkpoint.background_writer import BackgroundWriter
from pretrain.checkpoint.rng_state import capture_rng_state, load_rng_state, restore_rng_state

# A rollback to the same checkpoint more often than this means the run cannot recover.
MAX_ROLLBACKS_PER_CHECKPOINT = 3


@dataclass
class CheckpointContents:
    client_state: dict  # saved inside DeepSpeed's model-states file on every rank
    files: dict[str, bytes] = field(default_factory=dict)  # small files rank 0 puts beside it


@dataclass
class PendingSave:
    """A checkpoint whose files are being written in the background."""

    staging: Path
    final: Path
    facts: dict  # for the manifest


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    """Saves and loads the checkpoints of `run_dir` for this rank's `engine`.

    `layout` is the parallel layout being trained (a checkpoint of another is
    resharded on loading); `model` (the model config, as a dict) goes into each
    manifest. `say` prints on the logging rank, `record` logs a metrics record,
    and `before_commit` runs once every rank's files are written and before the
    manifest is (a fault-injection point for the tests).
    """

    def __init__(self, engine: Engine, run_dir: str, *, rank: int, world_size: int, layout: reshard.Layout,
                 model: dict, num_layers: int, keep_last: int = 0, keep_every: int = 0, background: bool = False,
                 say: Callable[[str], None] = print, record: Callable[[dict], None] = lambda _: None,
                 before_commit: Callable[[int], None] = lambda step: None):
        self.engine = engine
        self.run_dir = run_dir
        self.rank, self.world_size = rank, world_size
        self.layout, self.model, self.num_layers = layout, model, num_layers
        self.keep_last, self.keep_every = keep_last, keep_every
        self.say, self.record, self.before_commit = say, record, before_commit
        self.writer: BackgroundWriter | None = (engine.wrap_checkpoint_writes(BackgroundWriter)
                                                if background else None)
        self.pending: PendingSave | None = None
        self.rollbacks: dict[int, int] = {}  # checkpoint step -> rollbacks to it

    # --- saving -------------------------------------------------------------------------------

    def save(self, step: int, contents: CheckpointContents, reason: str = "") -> Path:
        """Writes the checkpoint of `step` on every rank; returns its final path. Committed
        before returning, or, in the background, by a later `commit_pending`."""
        self.commit_pending(step)  # one checkpoint in flight at a time
        root = files.checkpoint_root(self.run_dir)
        final, staging = root / files.tag_for(step), root / (files.tag_for(step) + files.PARTIAL)
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)  # an earlier save of this step that died
        _barrier()
        # We own the pointer: DeepSpeed's would name a checkpoint before it is complete.
        self.engine.deepspeed.save_checkpoint(str(root), tag=staging.name, client_state=contents.client_state,
                                              save_latest=False)
        write = self.writer.save if self.writer is not None else torch.save
        write(capture_rng_state(), staging / files.rng_file(self.rank))
        if self.layout.expert > 1:
            save_expert_weights(self.engine.module, staging, self.num_layers, write)
        if self.rank == 0:
            for name, data in contents.files.items():
                (staging / name).write_bytes(data)
        facts = {"step": step, "world_size": self.world_size, "model": self.model}
        suffix = f" ({reason})" if reason else ""
        if self.writer is not None:
            self.writer.start(staging)
            self.pending = PendingSave(staging, final, facts)
            self.say(f"step {step:>6}  checkpoint being written to {final}{suffix}")
            return final
        self.before_commit(step)
        _barrier()  # every rank has written
        files.fsync_tree(staging)
        _barrier()  # every rank's files are on disk
        self._publish(staging, final, facts)
        self.say(f"step {step:>6}  checkpoint saved to {final}{suffix}")
        self.record({"step": step, "checkpoint/step": step, "checkpoint/path": str(final)})
        return final

    def writing(self) -> bool:
        """Whether this rank's background writes are still going."""
        return self.writer is not None and self.writer.busy()

    def commit_pending(self, step: int) -> None:
        """Commits the checkpoint being written in the background, once every rank has written
        it (waiting for this rank's writes if they are still going); `step` is the training
        step reached meanwhile, for the log."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        self.writer.wait()  # written and flushed to disk by this rank's thread
        _barrier()  # every rank's files are on disk
        self.before_commit(pending.facts["step"])
        self._publish(pending.staging, pending.final, pending.facts)
        self.say(f"step {step:>6}  checkpoint of step {pending.facts['step']} committed to {pending.final}")
        self.record({"step": step, "checkpoint/step": pending.facts["step"], "checkpoint/path": str(pending.final)})

    def _publish(self, staging: Path, final: Path, facts: dict) -> None:
        if self.rank == 0:
            files.publish(self.run_dir, staging, final, facts, self.keep_last, self.keep_every)
        _barrier()  # the checkpoint is in place for every rank

    # --- loading ------------------------------------------------------------------------------

    def latest(self) -> Path | None:
        return files.latest_checkpoint(self.run_dir)

    def load(self, path: Path) -> dict:
        """Loads checkpoint `path` into the engine, and this rank's random streams; returns the
        client state saved with it. A checkpoint of another parallel layout is resharded
        (DeepSpeed reloads only its own)."""
        if reshard.layout_changed(self.layout, path):
            client_state = reshard.load_resharded(self.engine.deepspeed, path, self.layout, self.num_layers,
                                                  say=self.say)
        else:
            client_state = files.load(self.engine.deepspeed, path)
            if self.layout.expert > 1:
                load_expert_weights(self.engine.module, path, self.num_layers)
        rng = load_rng_state(path, self.rank, self.world_size)
        if rng is not None:  # None: written by another number of ranks
            restore_rng_state(rng)
        return client_state

    def has_checkpoint(self) -> bool:
        """Whether there is a checkpoint to roll back to (committed, or in flight)."""
        return self.pending is not None or self.latest() is not None

    def rollback(self, reason: str, step: int) -> tuple[Path, dict]:
        """Loads the newest checkpoint after bad steps at training step `step`; returns its path
        and client state. Refuses (TrainingDiverged) when there is none, or after too many
        rollbacks to it."""
        self.commit_pending(step)
        path = self.latest()
        if path is None:
            raise TrainingDiverged(f"{reason}; no checkpoint to roll back to")
        saved_step = int(path.name.split("_")[-1])
        self.rollbacks[saved_step] = self.rollbacks.get(saved_step, 0) + 1
        if self.rollbacks[saved_step] > MAX_ROLLBACKS_PER_CHECKPOINT:
            raise TrainingDiverged(f"{reason}; rolled back to {path} {MAX_ROLLBACKS_PER_CHECKPOINT} times "
                                   "already")
        self.say(f"{reason}; rolling back to {path}")
        return path, self.load(path)
