"""Context parallelism (`parallel.context`): every sequence split over a group of ranks.

Each rank of a context-parallel group holds one contiguous 1/cp of every
sequence's tokens through the whole model: embedding, norms, MLPs, the output
layer and the loss see only that slice, so activations shrink by cp. Only
attention needs the whole sequence. It goes through DeepSpeed's Ulysses
`DistributedAttention`: an all-to-all turns queries, keys and values from
[s/cp, b, heads] into [s, b, heads/cp], each rank attends over the whole
sequence for its share of the heads (causal, or cut at document starts: the
starts travel with the batch, whole), and a second all-to-all turns the output
back into the rank's slice.

Why Ulysses rather than ring attention, measured (`bench/long_context.py`,
docs/benchmarks.md): per layer's forward, Ulysses sends (2h + 2h_kv) s b
(cp-1)/cp^2 values off each rank, a ring of key-value slices 2 (cp-1) s b
h_kv / cp. Under grouped-query attention the ring sends less (two thirds of
Ulysses' bytes for the tiny model at cp=2; fewer unless cp > 1 + h/h_kv), and
over gloo its send/recv steps took 0.3-0.5x the time of the four all-to-alls.
But the exchange was 2.5-5% of a cp=2 step either way, and Ulysses keeps
attention one local kernel over the whole sequence: flash attention, or the
per-document path of `pretrain.model.document_attention`, unchanged, with no
online-softmax merging of partial results across document cuts and no
per-step masks of which chunk may see which. That is the reason for it. Its
limit is the head count: the heads of a tensor-parallel rank must divide by
cp (key-value groups are repeated where fewer); past that, or where the
exchange dominates a step, a ring is the next thing to add.

Why contiguous slices rather than mirrored chunks: under Ulysses every rank
computes attention for all positions of its heads, so causal work is already
even; mirrored chunks balance ring attention, where a rank attends only for
its own queries.

The loss: each rank's mean over its own tokens is weighted by cp x (its
counted tokens / the sequence's), so that DeepSpeed's gradient average over
data x context ranks gives the gradient of the whole sequence's mean loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from deepspeed.sequence.layer import DistributedAttention
from megatron.core import parallel_state


@dataclass(frozen=True)
class ContextSplit:
    """Which slice of each sequence this rank holds: `rank` of `size` equal parts."""

    size: int
    rank: int

    @classmethod
    def of_this_rank(cls) -> ContextSplit | None:
        size = parallel_state.get_context_parallel_world_size()
        return cls(size, parallel_state.get_context_parallel_rank()) if size > 1 else None

    def split(self, batch: dict) -> dict:
        """This rank's part of a batch: its slice of tokens, labels, loss mask and position ids
        (made when the batch has none), the document starts whole (attention sees the whole
        sequence), and `loss_weight`, the factor for the mean loss of the slice."""
        tokens = batch["tokens"]
        b, s = tokens.shape
        width = s // self.size
        part = slice(self.rank * width, (self.rank + 1) * width)
        positions = batch.get("position_ids")
        if positions is None:
            positions = torch.arange(s, dtype=torch.long).expand(b, s)
        out = {"tokens": tokens[:, part], "labels": batch["labels"][:, part], "position_ids": positions[:, part]}
        mask = batch.get("loss_mask")
        if mask is not None:
            out["loss_mask"] = mask[:, part]
            counted, total = float(mask[:, part].sum()), float(mask.sum())
        else:
            counted, total = float(b * width), float(b * s)
        if "document_starts" in batch:
            out["document_starts"] = batch["document_starts"]
        out["loss_weight"] = self.size * counted / max(total, 1.0)
        return out


class UlyssesAttention(torch.nn.Module):
    """A layer's core attention over the whole sequence, from and back to this rank's slice.

    Takes and returns megatron-core's core-attention layout: query [s/cp, b, heads, d],
    key and value [s/cp, b, groups, d], output [s/cp, b, heads * d]. Key-value groups
    fewer than cp are repeated first, so that the group of each query head lands on the
    rank that gets the head (megatron-core orders query heads by group).
    """

    def __init__(self, local: torch.nn.Module, group) -> None:
        super().__init__()
        self.local = local
        self.size = torch.distributed.get_world_size(group)
        # DeepSpeed calls back into `_attend` with the exchanged [s, b, heads / cp, d].
        self.exchange = DistributedAttention(self._attend, group, scatter_idx=2, gather_idx=0)

    def _attend(self, query, key, value, *args, **kwargs) -> torch.Tensor:
        seq, batch, heads, head_dim = query.shape
        return self.local(query, key, value, *args, **kwargs).reshape(seq, batch, heads, head_dim)

    def forward(self, query, key, value, attention_mask, **kwargs) -> torch.Tensor:
        seq, batch, heads, head_dim = query.shape
        groups = key.shape[2]
        if groups < self.size:
            key, value = (t.repeat_interleave(self.size // groups, dim=2) for t in (key, value))
        out = self.exchange(query, key, value, 1, None, attention_mask, **kwargs)
        return out.reshape(seq, batch, heads * head_dim)


def distribute_attention(model: torch.nn.Module, group) -> int:
    """Puts every layer's core attention behind the context-parallel exchange over `group`;
    returns how many it wrapped."""
    wrapped = 0
    for module in list(model.modules()):
        core = getattr(module, "core_attention", None)
        if isinstance(core, torch.nn.Module) and not isinstance(core, UlyssesAttention):
            module.core_attention = UlyssesAttention(core, group)
            wrapped += 1
    return wrapped
