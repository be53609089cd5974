"""The memory a run's config will need on each rank, predicted without allocating anything.

The model's parameters are counted piece by piece (embedding, layers, head),
cut into pipeline stages as DeepSpeed cuts them, and each stage's count goes
through `parallel.memory_plan.rank_memory` for the bytes its ZeRO stage,
precision and offloading allocate.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

from common.typed_config import ConfigError
from parallel.memory_plan import RankMemory, rank_memory
from pretrain.config import Config, ModelConfig


# --- parameters per piece of the model, as one tensor-parallel rank holds them ----------------

def embedding_params(m: ModelConfig, padded_vocab: int, tensor: int) -> int:
    return padded_vocab // tensor * m.hidden_size


def layer_params(m: ModelConfig, tensor: int, index: int = 0) -> int:
    """Layer `index`'s parameters on one tensor-parallel rank. A mixture-of-experts layer holds
    every expert, each split over the tensor ranks like the dense MLP, and a replicated router."""
    h, f, kv = m.hidden_size, m.ffn_hidden_size, m.query_groups * m.head_dim
    attention = h * (h + 2 * kv) + h * h  # qkv, proj
    if not m.is_moe_layer(index):
        return (attention + 3 * h * f) // tensor + 2 * h  # fc1 (gate and up), fc2; the norms replicated
    moe = m.moe
    experts = 3 * h * (m.expert_ffn_hidden_size * moe.num_experts + moe.shared_expert_ffn_hidden_size)
    return (attention + experts) // tensor + h * moe.num_experts + 2 * h


def head_params(m: ModelConfig, padded_vocab: int, tensor: int) -> int:
    output = 0 if m.tie_embeddings else padded_vocab // tensor * m.hidden_size
    return m.hidden_size + output  # final norm + output layer


def _pipeline_pieces(cfg: Config, padded_vocab: int) -> tuple[list[int], list[int]]:
    """Parameters of each piece of the pipeline (embedding, layers, head[, tied head]) on one
    tensor-parallel rank, and where DeepSpeed cuts them into stages (`bounds[s]:bounds[s + 1]`)."""
    m, p = cfg.model, cfg.parallel
    embedding = embedding_params(m, padded_vocab, p.tensor)
    pieces = ([embedding]
              + [layer_params(m, p.tensor, i) for i in range(m.num_layers)]
              + [head_params(m, padded_vocab, p.tensor)])
    if p.pipeline == 1:
        return pieces, [0, len(pieces)]
    if m.tie_embeddings:
        # The head's use of the tied embedding is a pipeline layer of its own: the
        # last stage holds a second copy of the weight (and its gradient and states).
        pieces.append(embedding)
    # The same cut as `pretrain.model.pipeline_stages.build_pipeline` asks DeepSpeed for.
    if p.pipeline_partition == "uniform":
        weights = [0] + [1] * m.num_layers + [0] * (len(pieces) - m.num_layers - 1)
    else:
        weights = pieces
    return pieces, _partition_balanced(tuple(weights), p.pipeline)


@functools.lru_cache(maxsize=1024)
def _partition_balanced(weights: tuple[int, ...], parts: int) -> list[int]:
    """DeepSpeed's cut, remembered: it searches, and a layout search asks for the same cuts often."""
    # DeepSpeed's first import warns that it found no GPU: planning needs none.
    logger, quiet = logging.getLogger("DeepSpeed"), (lambda record: record.levelno >= logging.ERROR)
    logger.addFilter(quiet)
    try:
        from deepspeed.runtime.utils import partition_balanced
    finally:
        logger.removeFilter(quiet)

    return partition_balanced(weights=list(weights), num_parts=parts)


def stage_params(cfg: Config, padded_vocab: int) -> list[int]:
    """Parameters on one tensor-parallel rank of each pipeline stage."""
    pieces, bounds = _pipeline_pieces(cfg, padded_vocab)
    return [sum(pieces[bounds[s]:bounds[s + 1]]) for s in range(len(bounds) - 1)]


def stage_layers(cfg: Config, padded_vocab: int) -> list[int]:
    """Transformer layers on each pipeline stage (pieces 1 to num_layers)."""
    _, bounds = _pipeline_pieces(cfg, padded_vocab)
    layers = range(1, cfg.model.num_layers + 1)
    return [sum(1 for i in layers if bounds[s] <= i < bounds[s + 1]) for s in range(len(bounds) - 1)]


# --- a run's ranks -------------------------------------------------------------------------

def layout_data_parallel(cfg: Config, world_size: int) -> int:
    """The data-parallel size, the replicas that read different samples: world / (tensor x
    pipeline x context), after the layout checks a run makes (the batch sizes aside: memory
    does not depend on them)."""
    p = cfg.parallel
    model_parallel = p.tensor * p.pipeline * p.context
    if world_size % model_parallel:
        axes = "parallel.tensor x parallel.pipeline" + (" x parallel.context" if p.context > 1 else "")
        raise ConfigError(f"world size {world_size}: expected a multiple of {axes} = {model_parallel}")
    data_parallel = world_size // model_parallel
    batch = dataclasses.replace(cfg.trainer, micro_batch_size=1, global_batch_size=data_parallel)
    return dataclasses.replace(cfg, trainer=batch).validate_world(world_size)


def gradient_replicas(cfg: Config, world_size: int) -> int:
    """Ranks that hold the same weights, average their gradients and share ZeRO's partitions:
    data x context (a context-parallel rank holds all the weights: parallel.groups.MegatronMPU)."""
    return layout_data_parallel(cfg, world_size) * cfg.parallel.context


def plan_memory(cfg: Config, world_size: int, vocab_size: int | None = None) -> list[tuple[str, int, RankMemory]]:
    """(rank kind, number of such ranks, bytes per rank) for every kind of rank.

    Ranks differ only by pipeline stage; stages holding the same parameters
    share a row. `vocab_size` defaults to the model's, else the tokenizer's.
    """
    replicas = gradient_replicas(cfg, world_size)
    vocab = vocab_size or cfg.model.vocab_size or cfg.data.tokenizer.vocab_size
    padded_vocab = cfg.model.padded_vocab_size(vocab, cfg.parallel.tensor)
    per_stage = stage_params(cfg, padded_vocab)
    ranks_per_stage = cfg.parallel.tensor * replicas
    rows: list[tuple[str, int, RankMemory]] = []
    if len(per_stage) == 1:
        return [("every rank", world_size, rank_memory(per_stage[0], cfg.parallel, replicas))]
    start = 0
    for stage in range(1, len(per_stage) + 1):
        if stage == len(per_stage) or per_stage[stage] != per_stage[start]:
            name = f"pipeline stage {start}" if stage - start == 1 else f"pipeline stages {start}-{stage - 1}"
            rows.append((name, ranks_per_stage * (stage - start),
                         rank_memory(per_stage[start], cfg.parallel, replicas)))
            start = stage
    return rows


def predict_rank(cfg: Config, world_size: int, pipeline_rank: int, vocab_size: int) -> RankMemory:
    """The prediction for one rank, given its pipeline stage."""
    padded_vocab = cfg.model.padded_vocab_size(vocab_size, cfg.parallel.tensor)
    return rank_memory(stage_params(cfg, padded_vocab)[pipeline_rank], cfg.parallel,
                       gradient_replicas(cfg, world_size))
