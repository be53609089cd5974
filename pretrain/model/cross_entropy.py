"""Cross entropy over vocabulary-parallel logits, with the log-sum-exp that z-loss needs.

megatron-core's `vocab_parallel_cross_entropy` returns the loss only. z-loss
(`model.z_loss_multiplier`, PaLM's auxiliary term) penalises the square of each
token's log-sum-exp over the whole vocabulary, which under tensor parallelism
is spread over the ranks' logit shards. This function computes both in the same
pass and with the same all-reduces (maximum, then sum of exponentials and
target logit), so TP=2 gives the loss and gradients of one process, and the
logits are read once and their softmax kept for backward, as megatron-core does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


class _CrossEntropyAndLogSumExp(torch.autograd.Function):
    """(cross entropy [s, b], log-sum-exp [s, b]) of fp32 logit shards [s, b, v/tp]; both differentiable.

    d(cross entropy)/d(logits) = softmax - one-hot and d(lse)/d(logits) = softmax,
    so backward needs only the softmax of this rank's shard and the targets it holds.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor):
        group = parallel_state.get_tensor_model_parallel_group()
        world = parallel_state.get_tensor_model_parallel_world_size()
        vocab = logits.shape[-1]
        first = parallel_state.get_tensor_model_parallel_rank() * vocab
        top = logits.amax(dim=-1)
        if world > 1:
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        local = target - first
        mine = (local >= 0) & (local < vocab)
        local = local.clamp(0, vocab - 1)
        exps = (logits - top.unsqueeze(-1)).exp_()
        target_logit = logits.gather(-1, local.unsqueeze(-1)).squeeze(-1) * mine
        sums = torch.stack([exps.sum(-1), target_logit])
        if world > 1:
            dist.all_reduce(sums, group=group)
        sum_exp, target_logit = sums
        lse = sum_exp.log() + top
        softmax = exps.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, mine)
        return lse - target_logit, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        softmax, local, mine = ctx.saved_tensors
        scale = grad_loss + grad_lse  # both outputs are used, so neither gradient is None
        grad = softmax.mul_(scale.unsqueeze(-1))
        grad.scatter_add_(-1, local.unsqueeze(-1), -(grad_loss * mine).unsqueeze(-1))
        return grad, None


def cross_entropy_and_logsumexp(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross entropy and log-sum-exp [s, b] of logit shards [s, b, v/tp] against
    global vocabulary ids [s, b], in fp32, without gathering the shards."""
    return _CrossEntropyAndLogSumExp.apply(logits.float(), target)
