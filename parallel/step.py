"""One optimizer step and one evaluation pass on a DeepSpeed engine (plain or pipeline)."""

from __future__ import annotations

import math
from typing import Iterator

import torch
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.utils import clip_grad_norm_

from parallel.context import ContextSplit
from parallel.groups import MegatronMPU


def _to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (batch["tokens"].to(device, non_blocking=True),
            batch["labels"].to(device, non_blocking=True))


# Optional per-token inputs a batch may carry (the end-of-document options).
_MODEL_EXTRAS = ("document_starts", "position_ids")


def _extras(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: batch[k].to(device, non_blocking=True) for k in _MODEL_EXTRAS if k in batch}


def _loss_mask(batch: dict, device: torch.device) -> torch.Tensor | None:
    mask = batch.get("loss_mask")
    return None if mask is None else mask.to(device, non_blocking=True)


def _pipeline_micro_batch(batch: dict, device: torch.device, context: ContextSplit | None) -> tuple:
    """(inputs, labels) as DeepSpeed's pipeline engine takes them: the first stage gets the
    inputs, the loss function the labels. With the end-of-document options (or a context-
    parallel slice) the inputs are (tokens, position ids, document starts), passed from
    stage to stage, and the labels (labels, loss mask[, loss weight]). The starts go last:
    DeepSpeed sends its "attention mask", the last input, as a boolean. Without attention
    cut at documents they mark no start (over the whole sequence: attention sees all of it)."""
    tokens, labels = _to_device(batch, device)
    if "position_ids" not in batch:
        return tokens, labels
    extras = _extras(batch, device)
    starts = extras.get("document_starts")
    if starts is None:
        b, s = batch["position_ids"].shape
        starts = torch.zeros(b, s * (context.size if context else 1), dtype=torch.bool, device=device)
    mask = _loss_mask(batch, device)
    if mask is None:
        mask = torch.ones_like(labels, dtype=torch.float)
    weight = () if "loss_weight" not in batch else (torch.tensor(batch["loss_weight"], device=device),)
    return (tokens, extras["position_ids"], starts), (labels, mask, *weight)


def skip_nonfinite_updates(optimizer) -> None:
    """Makes `optimizer.step()` a no-op while `optimizer.overflow` is set.

    DeepSpeed's mixed-precision and ZeRO optimizers refuse an update whose
    gradients overflowed; the plain torch optimizer of the fp32 path has no such
    check. DeepSpeed reads `optimizer.overflow` after the step: when it is set,
    it skips the learning-rate schedule and counts a skipped step, as it does
    for its own optimizers. `train_step` sets (or clears) the flag at every
    accumulation boundary, when the norm it clips by is not finite.
    """
    if getattr(optimizer, "_skips_nonfinite", False):
        return
    optimizer.overflow = False
    step = optimizer.step

    def guarded_step(*args, **kwargs):
        if optimizer.overflow:
            return None
        return step(*args, **kwargs)

    optimizer.step = guarded_step
    optimizer._skips_nonfinite = True


def _this_ranks_part(batches: Iterator[dict], context: ContextSplit | None) -> Iterator[dict]:
    """The batches as this rank sees them: under context parallelism, its slice of each."""
    return batches if context is None else map(context.split, batches)


def _model_loss(engine, batch: dict, device: torch.device) -> torch.Tensor:
    """The mean loss of a (plain engine's) micro-batch; a context-parallel slice's is weighted
    by its share of the sequence (`parallel.context`)."""
    loss = engine(*_to_device(batch, device), **_extras(batch, device),
                  loss_mask=_loss_mask(batch, device), reduction="mean")
    return loss * batch["loss_weight"] if "loss_weight" in batch else loss


def train_step(
    engine, batches: Iterator[dict], device: torch.device, clip: float = 0.0,
    context: ContextSplit | None = None,
) -> tuple[torch.Tensor, float]:
    """One optimizer step over gradient_accumulation_steps micro-batches.

    Returns the mean loss and the gradient norm before clipping. `clip` > 0
    clips here (see `parallel.engine.clips_in_loop`); otherwise DeepSpeed clips.
    Under context parallelism each rank trains on its slice of every sequence.
    """
    steps = engine.gradient_accumulation_steps()
    batches = _this_ranks_part(batches, context)
    if isinstance(engine, PipelineEngine):
        # Every stage draws the step's micro-batches, so all ranks' loaders
        # stay in step; only the first and last stage use them.
        micro_batches = [_pipeline_micro_batch(next(batches), device, context) for _ in range(steps)]
        loss = engine.train_batch(data_iter=iter(micro_batches))
        grad_norm = engine.get_global_grad_norm()
        return loss.detach(), float(grad_norm if grad_norm is not None else float("nan"))

    total = torch.zeros((), device=device)
    grad_norm = None
    for _ in range(steps):
        loss = _model_loss(engine, next(batches), device)
        engine.backward(loss)  # DeepSpeed divides by the accumulation steps
        if clip > 0 and engine.is_gradient_accumulation_boundary():
            grad_norm = clip_grad_norm_(engine.module.parameters(), clip, mpu=MegatronMPU)
            engine._global_grad_norm = grad_norm  # where DeepSpeed's clipping leaves it (parallel.refuse)
            if hasattr(engine.optimizer, "overflow"):
                # A non-finite norm skips the update, as DeepSpeed skips an fp16
                # overflow (see skip_nonfinite_updates).
                engine.optimizer.overflow = not math.isfinite(float(grad_norm))
        engine.step()  # steps the optimizer only at the accumulation boundary
        total += loss.detach()
    if grad_norm is None:
        grad_norm = engine.get_global_grad_norm()
    return total / steps, float(grad_norm if grad_norm is not None else float("nan"))


@torch.no_grad()
def eval_loss(engine, batches: list[dict], device: torch.device,
              context: ContextSplit | None = None) -> torch.Tensor:
    """Mean loss over `batches` (this rank's share), without updating anything."""
    batches = list(_this_ranks_part(batches, context))
    if isinstance(engine, PipelineEngine):
        micro_batches = [_pipeline_micro_batch(b, device, context) for b in batches]
        return engine.eval_batch(iter(micro_batches), num_micro_batches=len(micro_batches))
    engine.eval()
    total = torch.zeros((), device=device)
    for batch in batches:
        total += _model_loss(engine, batch, device).float()
    engine.train()
    return total / len(batches)
