"""Predicted bytes of parameters, gradients and optimizer states per rank, without allocating.

The prediction follows what DeepSpeed 0.19 allocates for each layout (checked
against `parallel.memory.measure` by the parity tests), with `w` the bytes of
the training dtype and `L` the parameters this rank holds after the tensor
and pipeline split:

| optimizer path                   | parameters | gradients               | optimizer states |
|----------------------------------|------------|-------------------------|------------------|
| fp32, ZeRO-0 (torch AdamW)       | 4L         | 4L                      | 8L (moments)     |
| bf16/fp16, ZeRO-0                | wL         | wL + 4L (fp32 copies)   | 12L (master + moments) |
| ZeRO-1 and ZeRO-2                | wL         | (w + 4)L / dp           | 12L / dp         |
| ZeRO-3                           | wL / dp    | (w + 4)L / dp + bucket  | 12L / dp         |

The ZeRO-3 bucket is DeepSpeed's flat reduction buffer of `reduce_bucket_size`
elements. With the optimizer offloaded (ZeRO-Offload), the fp32 master
partition, its gradient and the moments (16L / dp) live in host memory;
ZeRO-1/2 also keep a bit16 host staging copy there (wL / dp) and reduce
gradients straight into the host partition.
Activations and weights gathered for compute are working memory, not counted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pretrain.config import Config, ConfigError, ModelConfig

# DeepSpeed's default `zero_optimization.reduce_bucket_size` (elements).
REDUCE_BUCKET_SIZE = 500_000_000
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class RankMemory:
    parameters: int = 0
    gradients: int = 0
    optimizer: int = 0
    offloaded: int = 0  # host memory: optimizer states moved off the device

    @property
    def device_total(self) -> int:
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.device_total + self.offloaded


# --- parameters per piece of the model, as one tensor-parallel rank holds them ----------------

def embedding_params(m: ModelConfig, padded_vocab: int, tensor: int) -> int:
    return padded_vocab // tensor * m.hidden_size


def layer_params(m: ModelConfig, tensor: int) -> int:
    h, f, kv = m.hidden_size, m.ffn_hidden_size, m.query_groups * m.head_dim
    sharded = h * (h + 2 * kv) + h * h + 3 * h * f  # qkv, proj, fc1 (gate and up), fc2
    return sharded // tensor + 2 * h  # the two norms are replicated


def head_params(m: ModelConfig, padded_vocab: int, tensor: int) -> int:
    output = 0 if m.tie_embeddings else padded_vocab // tensor * m.hidden_size
    return m.hidden_size + output  # final norm + output layer


def stage_params(cfg: Config, padded_vocab: int) -> list[int]:
    """Parameters on one tensor-parallel rank of each pipeline stage."""
    m, p = cfg.model, cfg.parallel
    embedding = embedding_params(m, padded_vocab, p.tensor)
    pieces = ([embedding]
              + [layer_params(m, p.tensor)] * m.num_layers
              + [head_params(m, padded_vocab, p.tensor)])
    if p.pipeline == 1:
        return [sum(pieces)]
    if m.tie_embeddings:
        # The head's use of the tied embedding is a pipeline layer of its own: the
        # last stage holds a second copy of the weight (and its gradient and states).
        pieces.append(embedding)
    from deepspeed.runtime.utils import partition_balanced

    # The same cut as `parallel.pipeline.build_pipeline` asks DeepSpeed for.
    if p.pipeline_partition == "uniform":
        weights = [0] + [1] * m.num_layers + [0] * (len(pieces) - m.num_layers - 1)
    else:
        weights = pieces
    bounds = partition_balanced(weights=weights, num_parts=p.pipeline)
    return [sum(pieces[bounds[s]:bounds[s + 1]]) for s in range(p.pipeline)]


# --- bytes -----------------------------------------------------------------------------------

def rank_memory(local_params: int, cfg: Config, data_parallel: int) -> RankMemory:
    p = cfg.parallel
    w, L, dp = DTYPE_BYTES[p.precision], local_params, data_parallel
    if p.zero_stage == 0:
        if p.precision == "fp32":
            return RankMemory(4 * L, 4 * L, 8 * L)
        return RankMemory(w * L, (w + 4) * L, 12 * L)
    partition = -(-L // dp)
    if p.zero_stage == 3:
        parameters, gradients = w * partition, w * partition + w * REDUCE_BUCKET_SIZE
        if p.offload_optimizer:
            return RankMemory(parameters, gradients, 0, 16 * partition)
    else:
        parameters, gradients = w * L, w * partition
        if p.offload_optimizer:
            # Gradients go straight into the host fp32 partition; updated weights
            # come back through a bit16 host staging copy.
            return RankMemory(parameters, 0, 0, (16 + w) * partition)
    return RankMemory(parameters, gradients + 4 * partition, 12 * partition)


def layout_data_parallel(cfg: Config, world_size: int) -> int:
    """The data-parallel size, after the layout checks a run makes (the batch sizes aside:
    memory does not depend on them)."""
    model_parallel = cfg.parallel.tensor * cfg.parallel.pipeline
    if world_size % model_parallel:
        raise ConfigError(f"world size {world_size}: expected a multiple of parallel.tensor x "
                          f"parallel.pipeline = {model_parallel}")
    data_parallel = world_size // model_parallel
    batch = dataclasses.replace(cfg.trainer, micro_batch_size=1, global_batch_size=data_parallel)
    return dataclasses.replace(cfg, trainer=batch).validate_world(world_size)


def plan_memory(cfg: Config, world_size: int, vocab_size: int | None = None) -> list[tuple[str, int, RankMemory]]:
    """(rank kind, number of such ranks, bytes per rank) for every kind of rank.

    Ranks differ only by pipeline stage; stages holding the same parameters
    share a row. `vocab_size` defaults to the model's, else the tokenizer's.
    """
    data_parallel = layout_data_parallel(cfg, world_size)
    vocab = vocab_size or cfg.model.vocab_size or cfg.data.tokenizer.vocab_size
    padded_vocab = cfg.model.padded_vocab_size(vocab, cfg.parallel.tensor)
    per_stage = stage_params(cfg, padded_vocab)
    ranks_per_stage = cfg.parallel.tensor * data_parallel
    rows: list[tuple[str, int, RankMemory]] = []
    if len(per_stage) == 1:
        return [("every rank", world_size, rank_memory(per_stage[0], cfg, data_parallel))]
    start = 0
    for stage in range(1, len(per_stage) + 1):
        if stage == len(per_stage) or per_stage[stage] != per_stage[start]:
            name = f"pipeline stage {start}" if stage - start == 1 else f"pipeline stages {start}-{stage - 1}"
            rows.append((name, ranks_per_stage * (stage - start),
                         rank_memory(per_stage[start], cfg, data_parallel)))
            start = stage
    return rows


def predict_rank(cfg: Config, world_size: int, pipeline_rank: int, vocab_size: int) -> RankMemory:
    """The prediction for one rank, given its pipeline stage."""
    data_parallel = layout_data_parallel(cfg, world_size)
    padded_vocab = cfg.model.padded_vocab_size(vocab_size, cfg.parallel.tensor)
    return rank_memory(stage_params(cfg, padded_vocab)[pipeline_rank], cfg, data_parallel)
