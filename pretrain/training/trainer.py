"""The training loop and its state.

`Trainer.fit` is the whole loop: take a step, hand the metrics to the
callbacks. The trainer is given everything it drives (data, engine,
checkpointer, callbacks) by `build.build_trainer`; it builds nothing itself.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from data_pipeline.training_data import TrainingData
from parallel.engine import Engine
from parallel.groups import Topology, data_parallel_mean
from pretrain.checkpoint import files
from pretrain.checkpoint.checkpointer import CheckpointContents, Checkpointer
from pretrain.config import Config
from pretrain.training import faults
from pretrain.training.callback import Callback
from pretrain.training.flops import FlopsMeter
from pretrain.training.guard import BadStepGuard
from pretrain.training.spikes import Spike, SpikeDetector


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    consumed_tokens: int = 0
    valid_history: list = field(default_factory=list)  # (step, loss)
    last_checkpoint_step: int = -1
    train_seconds: float = 0.0
    skipped_steps: int = 0  # updates refused: non-finite gradients, an fp16 overflow, a spike (action skip)


class Trainer:
    """Runs `cfg.trainer.train_steps` optimizer steps of `engine` on `train_loader`.

    `callbacks` run around every step (evaluation, progress, checkpointing, ...);
    `sinks` are the callbacks that also receive every logged record (this
    rank's: only the logging rank has any).
    """

    def __init__(self, cfg: Config, topology: Topology, data: TrainingData, engine: Engine,
                 checkpointer: Checkpointer, train_loader: Iterator[dict], valid_batches: list[dict],
                 callbacks: list[Callback], sinks: list[Callback], flops: FlopsMeter, guard: BadStepGuard,
                 num_params: int, after_update: Callable[[], dict] | None = None):
        self.cfg, self.topology, self.data = cfg, topology, data
        # Model upkeep after every step, returning its metrics (mixture-of-experts balancing).
        self.after_update = after_update or dict
        self.device = topology.device
        self.engine, self.checkpointer = engine, checkpointer
        self.train_loader, self.valid_batches = train_loader, valid_batches
        self.callbacks, self.sinks = callbacks, sinks
        self.flops, self.guard, self.num_params = flops, guard, num_params
        self.spikes = SpikeDetector(cfg.trainer.spike)  # its windows are saved with the checkpoints
        if cfg.trainer.spike.action == "skip":
            engine.refuse_updates(self.spikes.refuses)
        self.state = TrainState()
        self.tokens_per_step = cfg.trainer.global_batch_size * cfg.data.seq_len
        self.stop_requested = False  # set on SIGTERM, once the checkpoint is saved

    # --- the loop ---------------------------------------------------------------------------

    def fit(self) -> TrainState:
        for callback in self.callbacks:
            callback.on_train_start(self)
        while self.state.step < self.cfg.trainer.train_steps:
            start = time.perf_counter()
            result = self.engine.train_step(self.train_loader)
            loss = self.data_parallel_mean(result.loss)  # also waits for the step to finish
            step_time = time.perf_counter() - start
            self.state.step += 1
            self.state.skipped_steps += int(result.skipped)
            self.state.consumed_tokens += self.tokens_per_step
            self.state.train_seconds += step_time
            metrics = {
                "step": self.state.step,
                "loss": loss,
                "lr": self.engine.lr(),
                "grad_norm": result.grad_norm,
                "step_time": step_time,
                "tokens_per_s": self.tokens_per_step / step_time,
                **self.flops(self.tokens_per_step, step_time),  # tflops, mfu
                **self.engine.loss_scale(),
                "consumed_tokens": self.state.consumed_tokens,
                "memory_bytes": memory_bytes(self.device),
                "skipped_steps": self.state.skipped_steps,
                **self.after_update(),
            }
            self.log(metrics)
            if self.guard.check(self.state.step, loss, result.grad_norm, result.skipped) == "rollback":
                self.rollback(self.guard.reason)
                continue
            spike = self.spikes.check(self.state.step, loss, result.grad_norm, result.skipped)
            if spike is not None and self.handle_spike(spike) == "rollback":
                continue
            for callback in self.callbacks:
                callback.on_step_end(self, metrics)
            faults.kill_if("kill_after_step", self.state.step, self.topology.rank)
            if self.stop_requested:
                break
        # Preempted: the checkpoint is written; evaluating now would only delay the exit.
        for callback in self.sinks if self.stop_requested else self.callbacks:
            callback.on_train_end(self)
        return self.state

    def handle_spike(self, spike: Spike) -> str:
        """Records a spike and rolls back when asked to; returns the action taken."""
        no_checkpoint = spike.action == "rollback" and not self.checkpointer.has_checkpoint()
        if no_checkpoint:
            spike.action = "log"
        self.log(spike.record())
        self.print(spike.describe() + (" (no checkpoint to roll back to yet)" if no_checkpoint else ""))
        if spike.action == "rollback":
            self.rollback(f"step {spike.step}: a spike ({', '.join(spike.zscores)}; trainer.spike.action=rollback)")
        return spike.action

    # --- what the callbacks use -------------------------------------------------------------

    def evaluate(self) -> float:
        return self.data_parallel_mean(self.engine.eval_loss(self.valid_batches))

    def data_parallel_mean(self, value: torch.Tensor) -> float:
        return data_parallel_mean(value, self.topology.gradient_replicas)

    def log(self, record: dict) -> None:
        for sink in self.sinks:
            sink.log(record)

    def print(self, *args) -> None:
        if self.topology.is_logging_rank:
            print(*args, flush=True)

    # --- checkpoints: what they hold of the trainer --------------------------------------------

    def save_checkpoint(self, reason: str = "") -> Path:
        path = self.checkpointer.save(self.state.step, self.checkpoint_contents(), reason)
        self.state.last_checkpoint_step = self.state.step
        return path

    def checkpoint_contents(self) -> CheckpointContents:
        """The trainer and loader state, the config, and the files a resumed run needs: the
        tokenizer, and the W&B run id so that a resumed run continues the same W&B run."""
        tokenizer = self.data.tokenizer
        wandb_run_id = files.wandb_run_id(self.cfg.trainer.run_dir)  # written by the W&B sink
        client_state = {
            "trainer": dataclasses.asdict(self.state) | {"last_checkpoint_step": self.state.step},
            "loader": self.train_loader.state_dict(),
            "config": dataclasses.asdict(self.cfg),
            "spikes": self.spikes.state_dict(),
            "tokenizer_hash": tokenizer.hash if tokenizer else None,
            "wandb_run_id": wandb_run_id,
        }
        extra = {}
        if tokenizer is not None:
            extra[files.TOKENIZER_FILE] = tokenizer.model_bytes
        if wandb_run_id:
            extra[files.WANDB_ID_FILE] = wandb_run_id.encode()
        return CheckpointContents(client_state, extra)

    def load_checkpoint(self, path: Path) -> None:
        self.restore(path, self.checkpointer.load(path))
        self.print(f"resumed from {path} at step {self.state.step}")

    def restore(self, path: Path, client_state: dict) -> None:
        """The trainer and loader state of a loaded checkpoint, after checking its tokenizer."""
        saved_hash, tokenizer = client_state.get("tokenizer_hash"), self.data.tokenizer
        if saved_hash and tokenizer and saved_hash != tokenizer.hash:
            raise files.RunDirError(f"{path}: written with tokenizer {saved_hash[:12]}, but the data uses "
                                    f"{tokenizer.hash[:12]}")
        self.state = TrainState(**client_state["trainer"])
        self.train_loader.load_state_dict(client_state["loader"])
        self.spikes.load_state_dict(client_state.get("spikes"))

    def rollback(self, reason: str) -> None:
        """Back to the newest checkpoint, with the loader kept where it is: the data that
        led to the bad steps is skipped, since replaying it would repeat them exactly."""
        position = self.train_loader.state_dict()
        path, client_state = self.checkpointer.rollback(reason, self.state.step)
        self.restore(path, client_state)
        self.print(f"resumed from {path} at step {self.state.step}")
        self.train_loader.load_state_dict(position)
        self.log({"step": self.state.step, "rollback/to_step": self.state.step})

    def summary(self) -> str:
        s, t = self.state, self.cfg.trainer
        (first_step, first), (last_step, last) = s.valid_history[0], s.valid_history[-1]
        tokens_per_s = s.consumed_tokens / s.train_seconds if s.train_seconds else 0.0
        return "\n".join([
            "── summary " + "─" * 50,
            f"model             {self.cfg.model.name}, {self.num_params / 1e6:.2f}M parameters",
            f"steps             {s.step}",
            f"tokens            {s.consumed_tokens:,}",
            f"throughput        {tokens_per_s:,.0f} tokens/s",
            f"validation loss   {first:.4f} (step {first_step}) → {last:.4f} (step {last_step}), "
            f"ppl {math.exp(min(last, 50)):.2f}",
            f"run directory     {t.run_dir}",
            f"checkpoint        {files.latest_checkpoint(t.run_dir)}",
            f"config            {Path(t.run_dir) / 'config.yaml'}",
            f"metrics           {Path(t.run_dir) / 'metrics.jsonl'}",
        ])


def memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except ImportError:  # pragma: no cover - non-POSIX
        return 0
