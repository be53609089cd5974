"""The NaN guard: skip non-finite updates, roll back or abort when they persist.

(Finite loss and gradient-norm spikes are `spikes.SpikeDetector`'s business.)

A step whose gradient norm is not finite must not reach the weights. DeepSpeed's
own mixed-precision and ZeRO optimizers already refuse such a step (the
"overflow" they detect for fp16 loss scaling): no update, gradients zeroed,
no learning-rate step, `engine.skipped_steps` counted. The plain fp32 path
hands DeepSpeed a torch optimizer that has no such check, so
`parallel.step.skip_nonfinite_updates` gives it the same `overflow` flag; the
step sets it when the norm it clips by is not finite. Either way a skip is counted once,
by DeepSpeed, and reported as `skipped_steps`.

A non-finite loss always comes with non-finite gradients (its gradient is
non-finite too), and the gradient norm is reduced over all ranks, so every
rank reaches the same verdict. More than `max_bad_steps` bad steps in a row
either roll the run back to its newest checkpoint, with the data that led
there skipped (replaying it would reproduce the same steps exactly), or
abort. Under fp16 a gradient overflow is the loss scaler's business, not a
bad step; only a non-finite loss counts there.
"""

from __future__ import annotations

import math
from typing import Literal

from common.errors import TrainingDiverged


class BadStepGuard:
    def __init__(self, max_bad_steps: int, on_bad_steps: Literal["rollback", "abort"], fp16: bool):
        self.max_bad_steps = max_bad_steps
        self.on_bad_steps = on_bad_steps
        self.fp16 = fp16
        self.in_a_row = 0
        self.reason = ""  # why the last rollback was asked for

    def check(self, step: int, loss: float, grad_norm: float, skipped: bool) -> Literal["ok", "bad", "rollback"]:
        """The verdict on a finished step; raises TrainingDiverged when the run must abort."""
        bad = not math.isfinite(loss) or (not self.fp16 and not math.isfinite(grad_norm))
        if not bad:
            self.in_a_row = 0
            return "ok"
        self.in_a_row += 1
        # An update made from non-finite gradients has spoiled the weights: no waiting.
        spoiled = not skipped and not math.isfinite(grad_norm)
        if not spoiled and self.in_a_row <= self.max_bad_steps:
            return "bad"
        why = (f"step {step}: an update with gradient norm {grad_norm} reached the weights" if spoiled else
               f"step {step}: {self.in_a_row} steps in a row with a non-finite loss or gradient norm "
               f"(trainer.max_bad_steps={self.max_bad_steps})")
        if self.on_bad_steps == "abort":
            raise TrainingDiverged(f"{why}; aborting (trainer.on_bad_steps=abort)")
        self.in_a_row = 0
        self.reason = why
        return "rollback"
