"""The peak bytes on each rank: parameters, gradients and optimizer states, plus activations.

A rank's peak comes in the backward pass: its weights and optimizer states
(`parameters.py`, checked against what DeepSpeed allocates), what its pipeline
stage keeps for backward for the micro-batches it holds in flight and the
backward pass's working memory (`activations.py`), and the gradients autograd
forms, in the training dtype. Under a pipeline with ZeRO, DeepSpeed reduces
the gradients after the backward pass into a second bucket; under mixed
precision the fp32 copies of the gradients come at the optimizer step. Both
come when the activations are gone, and either may set the peak instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from parallel.memory_plan import DTYPE_BYTES, RankMemory, rank_memory
from pretrain.config import Config
from pretrain.planning.activations import ActivationShape, StageActivations, stage_activations
from pretrain.planning.parameters import layout_data_parallel, stage_layers, stage_params


@dataclass
class RankPlan:
    kind: str  # "every rank", "pipeline stage 0", "pipeline stages 1-2"
    count: int  # ranks of this kind
    states: RankMemory
    activations: StageActivations
    backward_gradients: int  # gradient bytes formed in the backward pass (training dtype)

    host_is_device: bool = False  # a CPU run: what is offloaded to host memory stays in the same memory

    @property
    def peak(self) -> int:
        s, a = self.states, self.activations
        during_backward = a.total + self.backward_gradients
        reducing = self.backward_gradients + a.reduction
        stepping = s.gradients  # the fp32 gradient copies, once the buckets are freed
        return s.parameters + s.optimizer + max(during_backward, reducing, stepping) \
            + (s.offloaded if self.host_is_device else 0)


def activation_shape(cfg: Config, data_parallel: int, padded_vocab: int, device: str) -> ActivationShape:
    """`data_parallel`: the replicas that read different samples (not counting context parallelism)."""
    t = cfg.trainer
    return ActivationShape(
        seq_len=cfg.data.seq_len, micro_batch=t.micro_batch_size,
        micro_batches=max(1, t.global_batch_size // (t.micro_batch_size * data_parallel)),
        padded_vocab=padded_vocab, device=device,
        documents=cfg.data.reset_attention_mask, context=cfg.parallel.context)


def stage_plans(cfg: Config, world_size: int, vocab_size: int | None = None,
                device: str = "cuda") -> list[tuple[RankMemory, StageActivations, int]]:
    """(states, activations, backward gradients) of one rank of each pipeline stage."""
    m, p = cfg.model, cfg.parallel
    data_parallel = layout_data_parallel(cfg, world_size)
    vocab = vocab_size or m.vocab_size or cfg.data.tokenizer.vocab_size
    padded_vocab = m.padded_vocab_size(vocab, p.tensor)
    shape = activation_shape(cfg, data_parallel, padded_vocab, device)
    replicas = data_parallel * p.context  # ZeRO partitions over data x context
    plans = []
    for stage, (params, layers) in enumerate(zip(stage_params(cfg, padded_vocab), stage_layers(cfg, padded_vocab))):
        states = rank_memory(params, p, replicas)
        plans.append((states, stage_activations(m, p, shape, stage, layers),
                      DTYPE_BYTES[p.precision] * params))
    return plans


def plan_ranks(cfg: Config, world_size: int, vocab_size: int | None = None, device: str = "cuda") -> list[RankPlan]:
    """One row per kind of rank; pipeline stages with the same prediction share a row."""
    stages = stage_plans(cfg, world_size, vocab_size, device)
    ranks_per_stage = world_size // len(stages)
    if len(stages) == 1:
        return [RankPlan("every rank", world_size, *stages[0])]
    rows, start = [], 0
    for stage in range(1, len(stages) + 1):
        if stage == len(stages) or stages[stage] != stages[start]:
            name = f"pipeline stage {start}" if stage - start == 1 else f"pipeline stages {start}-{stage - 1}"
            rows.append(RankPlan(name, ranks_per_stage * (stage - start), *stages[start]))
            start = stage
    return rows


def predict_peak(cfg: Config, world_size: int, pipeline_rank: int, vocab_size: int, device: str) -> int:
    """The predicted peak bytes of one rank, given its pipeline stage (on a CPU, offloaded
    optimizer states count: host memory is the device's)."""
    plan = RankPlan("", 1, *stage_plans(cfg, world_size, vocab_size, device)[pipeline_rank],
                    host_is_device=device == "cpu")
    return plan.peak
