"""Refusing an update once its gradient norm is known, before the optimizer applies it.

On every path DeepSpeed (or our loop) computes the step's global gradient norm,
for clipping, before the torch optimizer applies the update, and DeepSpeed
already knows how to refuse an update: when its optimizer's `overflow` is set
after the step, the engine counts a skipped step and leaves the learning-rate
schedule alone (`skip_nonfinite_updates` gives the plain fp32 path the same).
`refuse_updates` adds a test at that moment: the torch optimizer's `step` first
asks `refuse(gradient norm)`, and True refuses the update exactly as a
non-finite one is refused.

Where the norm is read, path by path:

- DeepSpeed's mixed-precision and ZeRO optimizers (bf16, fp16, ZeRO 1-3) clear
  `overflow`, compute the norm into `_global_grad_norm`, then call the torch
  optimizer (once per parameter group under ZeRO); what they do after it
  (copying the unchanged master weights back, clearing gradients) is harmless.
- The plain fp32 path hands DeepSpeed the torch optimizer itself: the loop's
  clipping (`step.train_step`) or the pipeline engine's (`engine.keep_clipped_norm`)
  leaves the norm in the engine's `_global_grad_norm` before the step. The loop
  sets `overflow` at every step; without it (the pipeline engine) the test does.

An unknown norm (no clipping, so nothing measured it) refuses nothing.
"""

from __future__ import annotations

from typing import Callable

import torch


def refuse_updates(deepspeed_engine, refuse: Callable[[float], bool], loop_sets_overflow: bool) -> None:
    """Makes every update of `deepspeed_engine` ask `refuse(gradient norm)` first."""
    optimizer = deepspeed_engine.optimizer
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):  # a DeepSpeed wrapper: it clears `overflow` itself
        target, resets = inner, False

        def norm():
            return optimizer._global_grad_norm
    else:
        target, resets = optimizer, not loop_sets_overflow
        if not hasattr(optimizer, "overflow"):
            optimizer.overflow = False

        def norm():
            return deepspeed_engine._global_grad_norm
    step = target.step

    def step_unless_refused(*args, **kwargs):
        if resets:
            optimizer.overflow = False
        if optimizer.overflow:
            # Refused already (the later parameter groups of a ZeRO step), or not finite
            # (the loop's flag, which its own guarded step obeys too).
            return None
        value = norm()
        if value is not None and refuse(float(value)):
            optimizer.overflow = True
            return None
        return step(*args, **kwargs)

    target.step = step_unless_refused
