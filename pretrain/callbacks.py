"""What happens around a training step: evaluation, logging and checkpointing.

Each callback decides its own interval, so the loop in `trainer.py` only calls
`on_train_start`, `on_step_end` and `on_train_end`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pretrain import checkpoint

if TYPE_CHECKING:
    from pretrain.trainer import Trainer


class Callback:
    def on_train_start(self, trainer: "Trainer") -> None: ...

    def on_step_end(self, trainer: "Trainer", metrics: dict) -> None: ...

    def on_train_end(self, trainer: "Trainer") -> None: ...


# --- metric sinks ---------------------------------------------------------------------------

class MetricsFile(Callback):
    """Appends every logged record to `metrics.jsonl` in the run directory (rank 0)."""

    def __init__(self, run_dir: str):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = None

    def log(self, record: dict) -> None:
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", buffering=1)
        self.file.write(json.dumps(record) + "\n")

    def on_train_end(self, trainer):
        if self.file is not None:
            self.file.close()
            self.file = None


class WandbSink(Callback):
    """Weights & Biases: online when a key is configured, offline files otherwise."""

    def __init__(self, run_dir: str, project: str, name: str | None, mode: str, config: dict):
        import wandb

        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        id_file = Path(run_dir) / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        checkpoint.write_run_file(run_dir, "wandb_run_id", run_id.encode())
        self.run = wandb.init(
            project=project, name=name, id=run_id, resume="allow", mode=mode,
            dir=run_dir, config=config,
        )

    def log(self, record: dict) -> None:
        values = {k: v for k, v in record.items() if k != "step"}
        self.run.log(values, step=record["step"])

    def on_train_end(self, trainer):
        self.run.finish()


# --- console --------------------------------------------------------------------------------

class ConsoleProgress(Callback):
    def __init__(self, interval: int):
        self.interval = interval

    def on_step_end(self, trainer, metrics):
        step = metrics["step"]
        if step % self.interval == 0 or step == trainer.cfg.trainer.train_steps:
            trainer.print(
                f"step {step:>6}/{trainer.cfg.trainer.train_steps}  loss {metrics['loss']:.4f}  "
                f"lr {metrics['lr']:.2e}  grad_norm {metrics['grad_norm']:.3f}  "
                f"{metrics['tokens_per_s']:,.0f} tok/s  {metrics['step_time'] * 1000:.0f} ms/step"
            )


# --- evaluation -----------------------------------------------------------------------------

class Evaluation(Callback):
    """Validation loss and perplexity on fixed held-out batches, every `interval` steps."""

    def __init__(self, interval: int):
        self.interval = interval

    def run(self, trainer: "Trainer") -> None:
        loss = trainer.evaluate()
        record = {"step": trainer.state.step, "valid/loss": loss, "valid/ppl": math.exp(min(loss, 50))}
        trainer.state.valid_history.append((trainer.state.step, loss))
        trainer.log(record)
        trainer.print(f"step {trainer.state.step:>6}  validation loss {loss:.4f}  ppl {record['valid/ppl']:.2f}")

    def on_train_start(self, trainer):
        if not trainer.state.valid_history:
            self.run(trainer)

    def on_step_end(self, trainer, metrics):
        if self.interval and metrics["step"] % self.interval == 0:
            self.run(trainer)

    def on_train_end(self, trainer):
        if trainer.state.valid_history[-1][0] != trainer.state.step:
            self.run(trainer)


# --- checkpointing --------------------------------------------------------------------------

class Checkpointing(Callback):
    def __init__(self, interval: int):
        self.interval = interval

    def on_step_end(self, trainer, metrics):
        if self.interval and metrics["step"] % self.interval == 0:
            trainer.save_checkpoint()

    def on_train_end(self, trainer):
        if trainer.state.last_checkpoint_step != trainer.state.step:
            trainer.save_checkpoint()


def memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except ImportError:  # pragma: no cover - non-POSIX
        return 0


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
