"""How each full weight of the model is split over tensor-parallel ranks.

One table of rules serves three jobs: initialising any layout with the same
weights as one process, resharding checkpoints between layouts, and gathering
a consolidated model for export.

Parameter names are the single-process `LlamaModel`'s (`decoder.layers.3.mlp.
linear_fc1.weight`); pipeline stages translate their local names to these.
"""

from __future__ import annotations

import re

import torch

# Row split (dim 0): column-parallel outputs and the vocabulary-parallel embedding.
_DIM0 = ("embedding.weight", "output_layer.weight", "self_attention.linear_qkv.weight")
# Column split (dim 1): row-parallel inputs.
_DIM1 = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight", "shared_experts.linear_fc2.weight")
# SwiGLU's fc1 holds [gate; up]; each rank holds its slice of both halves, in
# that order, because the layer splits its local output into two halves.
_GATED = ("mlp.linear_fc1.weight", "shared_experts.linear_fc1.weight")
# Each expert of a mixture-of-experts layer is a SwiGLU MLP split the same way
# (`mlp.experts.local_experts.<e>.linear_fc1.weight`); its router is replicated.
_EXPERT = re.compile(r"\.experts\.local_experts\.\d+\.linear_fc([12])\.weight$")
_LOCAL_EXPERT = re.compile(r"\.experts\.local_experts\.(\d+)\.")


def expert_offset(names, expert_rank: int) -> int:
    """Under expert parallelism (`parallel.expert`) each rank builds experts 0..L-1 of every
    MoE layer, which are the layer's experts expert_rank x L to expert_rank x L + L - 1: the
    number to add to the local index in `names` (a MoE layer's parameter names, or more)."""
    local = {int(m.group(1)) for name in names if (m := _LOCAL_EXPERT.search(name))}
    return expert_rank * len(local)


def global_expert_name(name: str, offset: int) -> str:
    """The one-process name of a parameter whose expert index is local (`expert_offset`)."""
    if not offset:
        return name
    return _LOCAL_EXPERT.sub(lambda m: f".experts.local_experts.{int(m.group(1)) + offset}.", name)


def split_rule(name: str) -> str:
    """'dim0', 'dim1', 'gated' or 'replicated' for a canonical parameter name."""
    expert = _EXPERT.search(name)
    if expert:
        return "gated" if expert.group(1) == "1" else "dim1"
    if name.endswith(_GATED):
        return "gated"
    if name.endswith(_DIM0):
        return "dim0"
    if name.endswith(_DIM1):
        return "dim1"
    return "replicated"


def shard(name: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This rank's piece of a full weight."""
    rule = split_rule(name)
    if size == 1 or rule == "replicated":
        return full
    if rule == "gated":
        gate, up = full.chunk(2, dim=0)
        return torch.cat((gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]), dim=0)
    return full.chunk(size, dim=0 if rule == "dim0" else 1)[rank]


def gather(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full weight from every rank's piece, in rank order (inverse of `shard`)."""
    rule = split_rule(name)
    if len(shards) == 1 or rule == "replicated":
        return shards[0]
    if rule == "gated":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=0 if rule == "dim0" else 1)


def full_shape(name: str, local_shape: torch.Size, size: int) -> torch.Size:
    rule = split_rule(name)
    if size == 1 or rule == "replicated":
        return local_shape
    shape = list(local_shape)
    shape[1 if rule == "dim1" else 0] *= size
    return torch.Size(shape)
