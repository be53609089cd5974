"""The output layer and the cross entropy fused, chunk by chunk, with the gradients taken on the way forward.

Unfused, the vocabulary projection writes the logits of every token
([tokens, vocabulary / tp] in fp32: 34 MB for the default model's micro-batch),
the loss reads them back twice, and backward writes a gradient of the same size
that two more matrix products read again. Here the tokens go through in chunks
small enough for their logits to stay in cache. For each chunk: its logits, the
log-sum-exp, the loss, d(loss)/d(logits) = softmax − one-hot, and from that the
chunk's input gradient and its share of the weight gradient, before the next
chunk starts. Backward only scales the stored gradients by the incoming one.

That is why the loss arrives reduced: each token's gradient must be known when
its chunk is done, so each token's weight in the mean (the loss mask over the
number of tokens counted) comes in with the labels.

Under tensor parallelism every rank holds a slice of the vocabulary. The
per-token maximum, sum of exponentials and target logit are all-reduced over
the tensor-parallel group chunk by chunk. The input gradient each rank computes
is its slice's part; the function that brought the input into the
tensor-parallel region (a copy, or the sequence-parallel gather) sums them in
backward, as it does for megatron-core's column-parallel linear.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Logits per chunk, in bytes: small enough to stay in a CPU core's cache share
# (measured best at 256 tokens x 4096 entries on the development machine). Each
# chunk's logits are laid out [vocabulary, tokens]: for those shapes, two threads
# made the three products (logits, input and weight gradients) in 104 ms per
# micro-batch of 2048 tokens, against 116 ms as [tokens, vocabulary]; the forward
# product alone took 36 ms against 44.
CPU_CHUNK_BYTES = 4 << 20


def chunk_tokens(device: torch.device, vocab_per_rank: int) -> int | None:
    """Tokens per chunk for `device`, or None for the unfused path.

    CUDA keeps the unfused path: its throughput was measured with it, and a
    GPU reads the full logits at a speed where chunking buys memory, not time.
    """
    if device.type != "cpu":
        return None
    return max(1, CPU_CHUNK_BYTES // (4 * vocab_per_rank))


class ChunkedOutputLoss(torch.autograd.Function):
    """sum_t token_weights[t] * cross_entropy(hidden[t] @ weight.T, labels[t]), in chunks.

    hidden [tokens, h], weight [vocabulary / tp, h], labels [tokens] (global
    vocabulary ids), token_weights [tokens] fp32. Returns an fp32 scalar. With `z_loss` > 0,
    adds sum_t token_weights[t] * z_loss * logsumexp(logits[t])^2 (z-loss).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weights, chunk: int, group, want_grads: bool, z_loss: float = 0.0):
        world = 1 if group is None else dist.get_world_size(group)
        vocab = weight.shape[0]
        first = 0 if world == 1 else dist.get_rank(group) * vocab
        # The gradients stay in fp32 until backward has scaled them: cast to fp16 before
        # the loss scale is applied, the small ones would underflow to zero.
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if want_grads else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grads else None
        weight32 = weight.float() if want_grads else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            x, y = hidden[start:start + chunk], labels[start:start + chunk]
            w = token_weights[start:start + chunk]
            # [vocabulary, tokens] (see CPU_CHUNK_BYTES), in the weights' precision, as unfused.
            logits = torch.mm(weight, x.t()).float()
            local = y - first
            mine = (local >= 0) & (local < vocab)
            local = local.clamp(0, vocab - 1)[None, :]
            target = logits.gather(0, local).squeeze(0) * mine
            top = logits.amax(0)
            if world > 1:
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            exps = logits.sub_(top).exp_()  # in place: the logits are not needed again
            sums = torch.stack([exps.sum(0), target])
            if world > 1:
                dist.all_reduce(sums, group=group)
            sum_exp, target = sums
            lse = sum_exp.log() + top
            loss += ((lse - target) * w).sum()
            if z_loss:
                loss += (z_loss * lse.square() * w).sum()
            if not want_grads:
                continue
            # d(weighted loss)/d(logits) = w * (softmax - one-hot), in place over the exponentials;
            # z-loss adds w * 2 * z_loss * lse * softmax.
            grad = exps.mul_((w * (1 + 2 * z_loss * lse) if z_loss else w) / sum_exp)
            grad.scatter_add_(0, local, -(w * mine)[None, :])
            torch.mm(grad.t(), weight32, out=grad_hidden[start:start + chunk])
            grad_weight.addmm_(grad, x.float())
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return ((grad_hidden * grad_loss).to(hidden_dtype), (grad_weight * grad_loss).to(weight_dtype),
                None, None, None, None, None, None)


def token_weights(labels: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """Each token's weight in the masked mean loss (mask / number of tokens counted), fp32."""
    if loss_mask is None:
        return torch.full(labels.shape, 1.0 / labels.numel(), dtype=torch.float32, device=labels.device)
    mask = loss_mask.to(torch.float32)
    return mask / mask.sum().clamp(min=1)


@torch.compiler.disable  # a Python loop of in-place kernels: runs eagerly after a compiled decoder
def chunked_output_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        weights: torch.Tensor, chunk: int, group, z_loss: float = 0.0) -> torch.Tensor:
    """The weighted cross entropy of `hidden` [..., h] against `labels` [...] (same leading shape),
    plus the weighted z-loss when `z_loss` > 0."""
    want_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return ChunkedOutputLoss.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                   weights.reshape(-1), chunk, group, want_grads, z_loss)
