"""Asynchronous checkpoints (`trainer.async_checkpoint=true`): the step stalls only for a copy.

DeepSpeed writes a checkpoint through its engine's `checkpoint_engine.save(state,
path)`. `BackgroundWriter` takes that place (`parallel.engine.Engine.wrap_checkpoint_writes`): `save` copies the state into CPU
memory and returns, and a thread writes the copies and fsyncs them while
training goes on. DeepSpeed's own collectives (barriers, tag check) still run
in the training thread, in the same order on every rank.

Atomicity is kept: the checkpoint stays `step_NNNNNNN.partial/` until every
rank reports its writes done through the per-step all-reduce of
`preemption.SaveTriggers`; only then does rank 0 write the manifest and rename
it into place (`PendingSave.commit`).
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import torch

from pretrain.checkpoint.files import fsync_tree


def snapshot(value):
    """A copy of `value` that training can no longer change: tensors copied to CPU memory."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return type(value)((k, snapshot(v)) for k, v in value.items())
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(snapshot(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v) for v in value)
    return copy.deepcopy(value)


class BackgroundWriter:
    """Stands in for a DeepSpeed engine's checkpoint engine (everything but `save` is the
    original's)."""

    def __init__(self, inner):
        self.inner = inner
        self.queued: list[tuple[object, str]] = []
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def save(self, state_dict, path: str) -> None:
        self.queued.append((snapshot(state_dict), str(path)))

    def start(self, directory: Path) -> None:
        """Writes what was queued, then flushes `directory` to disk, in a thread."""
        jobs, self.queued = self.queued, []

        def write() -> None:
            try:
                for state, path in jobs:
                    self.inner.save(state, path)
                fsync_tree(directory)
            except BaseException as err:  # reported by wait()
                self.error = err

        self.thread = threading.Thread(target=write, name="checkpoint-writer", daemon=True)
        self.thread.start()

    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise RuntimeError(f"writing a checkpoint failed: {error}") from error
