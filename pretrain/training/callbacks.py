"""What happens around a training step: evaluation, progress and checkpointing.

Each callback decides its own interval, so the loop in `trainer.py` only calls
`on_train_start`, `on_step_end` and `on_train_end`. A run's callbacks are
named in `trainer.callbacks` (see `build.CALLBACKS`); code that builds a
trainer itself can pass any list.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from typing import TYPE_CHECKING, TextIO

from pretrain.training.callback import Callback


if TYPE_CHECKING:
    from pretrain.training.preemption import SaveTriggers
    from pretrain.training.trainer import Trainer


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
    `save_at_end=False` leaves the final save out (a benchmark that runs the
    loop in chunks).
    """

    def __init__(self, triggers: "SaveTriggers", save_at_end: bool = True):
        self.triggers = triggers
        self.save_at_end = save_at_end

    def on_train_start(self, trainer):
        self.triggers.saved()  # minutes count from the start of training

    def save(self, trainer: "Trainer", reason: str = "") -> None:
        trainer.save_checkpoint(reason)
        self.triggers.saved()

    def on_step_end(self, trainer, metrics):
        checkpointer = trainer.checkpointer
        decision = self.triggers.decide(metrics["step"], writing=checkpointer.writing())
        if decision.written:  # every rank has its background checkpoint on disk
            checkpointer.commit_pending(trainer.state.step)
        if decision.save and trainer.state.last_checkpoint_step != trainer.state.step:
            self.save(trainer, decision.reason)
        if decision.stop and trainer.state.step < trainer.cfg.trainer.train_steps:
            checkpointer.commit_pending(trainer.state.step)
            trainer.stop_requested = True  # at the last step there is nothing left to requeue

    def on_train_end(self, trainer):
        if not self.save_at_end:
            return
        if trainer.state.last_checkpoint_step != trainer.state.step:
            self.save(trainer)
        trainer.checkpointer.commit_pending(trainer.state.step)
