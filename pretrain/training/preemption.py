"""When to checkpoint: every N steps, every T minutes, and on SIGUSR1 / SIGTERM.

A signal handler only raises a flag; the flags of all ranks are combined by
one small all-reduce (MAX) at every step boundary, so every rank saves at the
same step even when a signal reached only some of them (a scheduler that
signals one node, a user who signals one process).

- SIGUSR1: save a checkpoint at the next step boundary and keep training.
- SIGTERM: save a checkpoint at the next step boundary, then exit with
  `common.errors.EXIT_PREEMPTED` (75) so that a job script or scheduler requeues
  the job; the requeued run resumes from that checkpoint.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Decision:
    save: bool
    stop: bool
    reason: str
    written: bool = True  # no rank is still writing a background checkpoint


class SaveTriggers:
    """Decides, identically on every rank, whether this step ends with a checkpoint."""

    def __init__(self, interval_steps: int, interval_minutes: float, device: torch.device):
        self.interval_steps = interval_steps
        self.interval_seconds = interval_minutes * 60.0
        self.device = device
        # SIGUSR1s received and served: a count, not a flag, so that a signal landing
        # while `decide` runs is served at the next step instead of being cleared.
        self.save_requests = 0
        self.saves_served = 0
        self.stop_requested = False  # SIGTERM
        self.last_save = time.monotonic()
        self.previous_handlers: dict[int, object] = {}

    # Handlers run between bytecodes of the main thread: they only set flags.
    def _on_usr1(self, signum, frame) -> None:
        self.save_requests += 1

    def _on_term(self, signum, frame) -> None:
        self.stop_requested = True

    def install(self) -> None:
        """Takes over SIGUSR1 and SIGTERM (main thread only; elsewhere signals keep their default)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in ((signal.SIGUSR1, self._on_usr1), (signal.SIGTERM, self._on_term)):
            self.previous_handlers[signum] = signal.signal(signum, handler)

    def uninstall(self) -> None:
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        self.previous_handlers.clear()

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def decide(self, step: int, writing: bool = False) -> Decision:
        """One all-reduce of [SIGUSR1, SIGTERM, time due, still writing] over all ranks, then
        the rules."""
        due = self.interval_seconds > 0 and time.monotonic() - self.last_save >= self.interval_seconds
        requests = self.save_requests
        flags = torch.tensor([requests > self.saves_served, self.stop_requested, due, writing],
                             dtype=torch.int32, device=self.device)
        self.saves_served = requests  # served by this step's save
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        usr1, term, due, writing = (bool(v) for v in flags.tolist())
        if term:
            return Decision(True, True, "SIGTERM", not writing)
        if usr1:
            return Decision(True, False, "SIGUSR1", not writing)
        if due:
            return Decision(True, False, f"{self.interval_seconds / 60:g} minutes", not writing)
        if self.interval_steps and step % self.interval_steps == 0:
            return Decision(True, False, "interval", not writing)
        return Decision(False, False, "", not writing)
