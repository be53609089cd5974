"""Tensor-parallel details the DeepSpeed engine does not know about."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def reduce_sequence_parallel_grads(model: torch.nn.Module) -> int:
    """Sums, over the tensor-parallel group, the gradients of weights marked `sequence_parallel`.

    Under sequence parallelism each tensor-parallel rank runs the norms on its
    own slice of the sequence, so their weight gradients are partial sums.
    megatron-core's own DDP wrapper adds them up; under DeepSpeed a gradient
    hook does it, before DeepSpeed accumulates, reduces or partitions the
    gradient (which works for every ZeRO stage). Returns the number of hooks.
    """
    group = parallel_state.get_tensor_model_parallel_group()
    hooked = 0
    for param in model.parameters():
        if getattr(param, "sequence_parallel", False) and param.requires_grad:
            def all_reduce(grad: torch.Tensor) -> torch.Tensor:
                grad = grad.clone()
                dist.all_reduce(grad, group=group)
                return grad

            param.register_hook(all_reduce)
            hooked += 1
    return hooked
