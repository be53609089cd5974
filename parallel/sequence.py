"""Sequence-parallel communication that allocates on the tensors' own device.

megatron-core 0.16's sequence-parallel paths allocate their buffers with
`device=torch.cuda.current_device()`: the all-gather and reduce-scatter
helpers of `tensor_parallel/mappings.py` (`_gather_along_first_dim`,
`_reduce_scatter_along_first_dim`, used by `scatter_to_sequence_parallel_region`
in backward and `reduce_scatter_to_sequence_parallel_region`), the
`GlobalMemoryBuffer` (`parallel_state.get_global_memory_buffer`) that
`LinearWithGradAccumulationAndAsyncCommunication` gathers its input into, and
that function's `sub_grad_input` for the reduce-scattered input gradient. The
functions here do the same communication with `torch.empty(..., device=x.device)`,
so they run over gloo on CPU and unchanged over NCCL on GPU.

Sequence-parallel activations are [s / tp, b, h]: split along the first dimension.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_gather_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    out = torch.empty((x.shape[0] * size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _divisible_world_size(x: torch.Tensor, group) -> int:
    size = dist.get_world_size(group)
    if x.shape[0] % size:
        raise ValueError(f"sequence length {x.shape[0]} is not divisible by the tensor-parallel size {size}")
    return size


def _reduce_scatter_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    size = _divisible_world_size(x, group)
    out = torch.empty((x.shape[0] // size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


def _split_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    size = _divisible_world_size(x, group)
    return x.chunk(size, dim=0)[dist.get_rank(group)].contiguous()


class _GatherGradients(torch.autograd.Function):
    """Sequence slices whose gradients the backward pass gathers back to the full sequence."""

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_first_dim(grad, ctx.group), None


class ScatterToSequenceParallel(_GatherGradients):
    """Full sequence → this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_first_dim(x, group)


class ReduceScatterToSequenceParallel(_GatherGradients):
    """Partial sums of the full sequence → this rank's slice of their sum (row-parallel output)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_first_dim(x, group)


class GatherFromSequenceParallel(torch.autograd.Function):
    """This rank's slice → the full sequence; backward sums the ranks' gradients and
    keeps this rank's slice (each rank's gradient is partial, e.g. over a vocabulary slice)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_first_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_first_dim(grad, ctx.group), None


class SequenceParallelLinear(torch.autograd.Function):
    """Column-parallel matmul on a sequence-parallel input: y = gather(x) W^T (+ b).

    Like megatron-core, only the local slice is saved for the backward pass,
    which gathers it again for the weight gradient and reduce-scatters the
    input gradient back to sequence slices.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.has_bias = group, bias is not None
        out = torch.matmul(_all_gather_first_dim(x, group), weight.t())
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        full_x = _all_gather_first_dim(x, ctx.group)
        grad_input = _reduce_scatter_first_dim(grad_out.matmul(weight), ctx.group)
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_weight = grad_2d.t().matmul(full_x.reshape(-1, full_x.shape[-1]))
        grad_bias = grad_2d.sum(dim=0) if ctx.has_bias else None
        return grad_input, grad_weight, grad_bias, None


def scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    return ScatterToSequenceParallel.apply(x, group)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    return ReduceScatterToSequenceParallel.apply(x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    return GatherFromSequenceParallel.apply(x, group)


def sequence_parallel_linear(x, weight, bias, group) -> torch.Tensor:
    return SequenceParallelLinear.apply(x, weight, bias, group)
