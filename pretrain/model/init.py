"""Weight initialisation that does not depend on the parallel layout.

Each full weight is drawn from a generator seeded by (seed, parameter name),
then cut to this rank's shard. A model therefore starts from the same weights
on one process, under tensor or pipeline parallelism, and after resharding,
which is what makes losses comparable across layouts.
"""

from __future__ import annotations

import hashlib
import math

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from parallel import sharding
from pretrain.model.config import ModelConfig


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def init_std(name: str, std: float, num_layers: int) -> float | None:
    """Normal std for a weight, or None for norm weights (initialised to one).

    Projections that write into the residual stream are scaled by
    1/sqrt(2 * layers), as in GPT-2 and megatron-core.
    """
    if name.endswith("layernorm.weight"):
        return None
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return std / math.sqrt(2.0 * num_layers)
    return std


@torch.no_grad()
def initialize(
    named_parameters,
    *,
    seed: int,
    std: float,
    num_layers: int,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> None:
    """Initialises `(canonical name, parameter)` pairs in place.

    Also marks sharded weights the way megatron-core's own initialisation
    would (`tensor_model_parallel`, `partition_dim`): gradient-norm and
    checkpoint code use the marks to count each shard once.
    """
    for name, param in named_parameters:
        rule = sharding.split_rule(name)
        if rule != "replicated" and not hasattr(param, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(param, tp_size > 1, 1 if rule == "dim1" else 0, 1)
        scale = init_std(name, std, num_layers)
        if scale is None:
            param.fill_(1.0)
            continue
        shape = sharding.full_shape(name, param.shape, tp_size)
        full = torch.randn(shape, generator=_generator(seed, name)) * scale
        param.copy_(sharding.shard(name, full, tp_rank, tp_size))


def initialize_local(named_parameters, cfg: ModelConfig, seed: int) -> None:
    """`initialize` with the model's std and this process's tensor-parallel rank; under expert
    parallelism each local expert is drawn as the one-process expert it is."""
    named_parameters = list(named_parameters)
    offset = sharding.expert_offset([n for n, _ in named_parameters],
                                    parallel_state.get_expert_model_parallel_rank())
    initialize(
        [(sharding.global_expert_name(n, offset), p) for n, p in named_parameters],
        seed=seed,
        std=cfg.init_std,
        num_layers=cfg.num_layers,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
    )
