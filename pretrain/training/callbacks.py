"""What happens around a training step: evaluation, logging and checkpointing.

Each callback decides its own interval, so the loop in `trainer.py` only calls
`on_train_start`, `on_step_end` and `on_train_end`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import uuid
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import torch

from pretrain.checkpoint.files import files as checkpoint

if TYPE_CHECKING:
    from pretrain.config import Config
    from pretrain.training.preemption import SaveTriggers
    from pretrain.training.trainer import Trainer


class Callback:
    def on_train_start(self, trainer: "Trainer") -> None: ...

    def on_step_end(self, trainer: "Trainer", metrics: dict) -> None: ...

    def on_train_end(self, trainer: "Trainer") -> None: ...


# --- metric sinks ---------------------------------------------------------------------------

class MetricsFile(Callback):
    """Appends every logged record to `metrics.jsonl` in the run directory (rank 0).

    Three kinds of record, each with an integer `step`: a training step
    (`loss`, `lr`, `grad_norm`, `step_time`, `tokens_per_s`, `tflops`, `mfu`
    when a peak is known, `loss_scale` under fp16, `consumed_tokens`,
    `memory_bytes`, `skipped_steps`), an evaluation (`valid/loss`, `valid/ppl`) and a checkpoint
    (`checkpoint/step`, `checkpoint/path`).
    """

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
    """Weights & Biases: online when a key is configured, offline files otherwise.

    The run id is kept in the run directory, so a resumed training run
    continues the same W&B run instead of starting a new one. Steps redone
    after resuming from an earlier checkpoint are already in the W&B history;
    W&B keeps the first values, which a bit-exact resume reproduces anyway.
    """

    def __init__(self, run_dir: str, project: str, name: str | None, mode: str, config: dict):
        import wandb

        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        id_file = Path(run_dir) / "wandb_run_id"
        # W&B's own style of id (8 lowercase letters and digits), made here because
        # wandb's helper for it has moved between releases.
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        if mode != "disabled":
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


class TensorBoardSink(Callback):
    """TensorBoard event files in `<run_dir>/tensorboard`: numbers as scalars, the rest as text."""

    def __init__(self, run_dir: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), flush_secs=30)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")

    def log(self, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            if key == "step":
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
            else:
                self.writer.add_text(key, str(value), step)

    def on_train_end(self, trainer):
        self.writer.close()


def build_sinks(cfg: "Config") -> list[Callback]:
    """The logging rank's sinks: metrics.jsonl always, plus the configured logger."""
    run_dir, logger = cfg.trainer.run_dir, cfg.logger
    sinks: list[Callback] = [MetricsFile(run_dir)]
    if logger.kind == "wandb":
        sinks.append(WandbSink(run_dir, logger.project, logger.name, logger.mode, dataclasses.asdict(cfg)))
    elif logger.kind == "tensorboard":
        sinks.append(TensorBoardSink(run_dir, dataclasses.asdict(cfg)))
    return sinks


def loss_scale(engine) -> dict[str, float]:
    """fp16's dynamic loss scale; bf16 and fp32 have none, so nothing is reported for them."""
    if not engine.fp16_enabled():
        return {}
    scale = getattr(engine.optimizer, "loss_scale", None)
    return {} if scale is None else {"loss_scale": float(scale)}


# --- console --------------------------------------------------------------------------------

class ConsoleProgress(Callback):
    """Training progress with an ETA on the logging rank.

    On a terminal: one bar, redrawn in place every step, with other output
    scrolling above it. Otherwise (a pipe, a log file): a plain line every
    `interval` steps.
    """

    BAR_WIDTH = 20
    REDRAW_SECONDS = 0.1  # fast steps would otherwise spend their time on the terminal

    def __init__(self, interval: int):
        self.interval = interval
        self.step_times: deque[float] = deque(maxlen=50)  # recent steps: the ETA follows speed changes
        self.live: LiveLine | None = None
        self.last_draw = 0.0

    def on_train_start(self, trainer):
        if trainer.topology.is_logging_rank and sys.stdout.isatty():
            self.live = LiveLine(sys.stdout)
            sys.stdout = self.live

    def on_step_end(self, trainer, metrics):
        if not trainer.topology.is_logging_rank:
            return
        step, total = metrics["step"], trainer.cfg.trainer.train_steps
        self.step_times.append(metrics["step_time"])
        eta = format_seconds(sum(self.step_times) / len(self.step_times) * (total - step))
        if self.live is not None:
            now = time.monotonic()
            if now - self.last_draw >= self.REDRAW_SECONDS or step == total:
                self.last_draw = now
                filled = round(self.BAR_WIDTH * step / total)
                bar = "█" * filled + "░" * (self.BAR_WIDTH - filled)
                self.live.show(
                    f"step {step}/{total} {bar} {100 * step / total:3.0f}%  loss {metrics['loss']:.4f}  "
                    f"{metrics['tokens_per_s']:,.0f} tok/s  ETA {eta}"
                )
        elif step % self.interval == 0 or step == total:
            trainer.print(
                f"step {step:>6}/{total}  loss {metrics['loss']:.4f}  "
                f"lr {metrics['lr']:.2e}  grad_norm {metrics['grad_norm']:.3f}  "
                f"{metrics['tokens_per_s']:,.0f} tok/s  {metrics['step_time'] * 1000:.0f} ms/step  ETA {eta}"
            )

    def on_train_end(self, trainer):
        if self.live is not None:
            sys.stdout = self.live.close()
            self.live = None


class LiveLine:
    """A terminal stream that keeps one status line at the bottom.

    Everything else written to it (validation results, checkpoint messages)
    first erases the status line, then the line is drawn again below it.
    """

    CLEAR = "\r\x1b[K"  # carriage return, erase to end of line

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.line = ""
        self.shown = False
        self.mid_line = False  # someone else's line is half written: do not draw over it

    def show(self, line: str) -> None:
        self.line = line
        if not self.mid_line:
            self.stream.write(self.CLEAR + line)
            self.stream.flush()
            self.shown = True

    def write(self, text: str) -> int:
        if self.shown and text:
            self.stream.write(self.CLEAR)
            self.shown = False
        written = self.stream.write(text)
        if text:
            self.mid_line = not text.endswith("\n")
            if not self.mid_line and self.line:
                self.show(self.line)
        return written

    def close(self) -> TextIO:
        """Leaves the last status line on screen; returns the wrapped stream."""
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
        return self.stream

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def __getattr__(self, name: str):  # fileno, encoding, ... of the terminal
        return getattr(self.stream, name)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


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
    """Saves when the triggers (steps, minutes, SIGUSR1, SIGTERM) say so, and at the end.

    Every rank asks the triggers at every step (one small all-reduce), so all
    ranks save at the same step; after a SIGTERM save the loop stops.
    """

    def __init__(self, triggers: "SaveTriggers"):
        self.triggers = triggers

    def on_train_start(self, trainer):
        self.triggers.saved()  # minutes count from the start of training

    def on_step_end(self, trainer, metrics):
        writer = trainer.writer
        decision = self.triggers.decide(metrics["step"], writing=writer is not None and writer.busy())
        if decision.written:  # every rank has its background checkpoint on disk
            trainer.finish_pending_save()
        if decision.save and trainer.state.last_checkpoint_step != trainer.state.step:
            trainer.save_checkpoint(decision.reason)
        if decision.stop and trainer.state.step < trainer.cfg.trainer.train_steps:
            trainer.finish_pending_save()
            trainer.stop_requested = True  # at the last step there is nothing left to requeue

    def on_train_end(self, trainer):
        if trainer.state.last_checkpoint_step != trainer.state.step:
            trainer.save_checkpoint()
        trainer.finish_pending_save()


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
