"""Activation checkpointing that runs on any device.

megatron-core's recompute (`recompute_granularity`) goes through its own
checkpoint function, which saves and restores CUDA RNG state and fails on CPU.
Here `torch.utils.checkpoint` wraps the forward of existing modules in place,
so the model's code and parameter names stay unchanged and pipeline stages
(which hold the same layers) are covered too. The model says which of its
module types each mode recomputes; for the Llama model:

- full: each transformer layer keeps only its input; everything inside is
  recomputed during the backward pass.
- selective: only the core attention (softmax(QK^T)V) is recomputed, the
  part whose activations grow with the square of the sequence when the
  attention kernel stores them.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing to recompute
            return forward(*args, **kwargs)
        # Non-reentrant: keyword arguments and non-tensor outputs pass through,
        # and the CPU (and CUDA) RNG state is restored for the recomputation.
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def apply_activation_checkpointing(model: torch.nn.Module, mode: str,
                                   recomputed: dict[str, type | tuple[type, ...]]) -> int:
    """Wraps the forward of every module of the types `recomputed[mode]` ("full",
    "selective"); returns how many. Mode "none" wraps nothing."""
    if mode == "none":
        return 0
    kind = recomputed[mode]
    wrapped = 0
    for module in model.modules():
        if isinstance(module, kind):
            module.forward = _checkpointed(module.forward)  # an instance attribute: names unchanged
            wrapped += 1
    return wrapped
