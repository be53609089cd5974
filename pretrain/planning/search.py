"""Layouts for a model on a cluster: each one's peak memory and step time, the fastest that fits,
and the smallest change that makes a layout fit.

A layout is the tensor, pipeline, context and data-parallel sizes, the ZeRO
stage, the micro-batch, recomputation and sequence parallelism; the global
batch and everything else stay as configured. Only layouts the trainer accepts
are candidates (`Config.validate_world`, `ParallelConfig`'s rules such as ZeRO
0-1 under a pipeline, and context parallelism's: the sequence and each tensor
rank's heads divisible by it, its key-value groups dividing or divided by it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

from common.typed_config import ConfigError
from pretrain.config import Config
from pretrain.planning.cluster import ClusterConfig
from pretrain.planning.peak import RankPlan, plan_ranks
from pretrain.planning.step_time import StepTime, TimePlan, plan_time

MICRO_BATCHES = (1, 2, 4, 8, 16)
RECOMPUTE = ("none", "selective", "full")

PART_NAMES = {
    "compute": "compute", "recompute": "recomputation", "tensor_comm": "tensor-parallel communication",
    "context_comm": "context-parallel all-to-all", "pipeline_bubble": "pipeline bubble", "pipeline_comm": "pipeline sends", "data_comm": "gradient reduction",
    "optimizer": "optimizer step", "overhead": "host overhead",
}


@dataclass
class Plan:
    """A layout's predictions."""

    cfg: Config
    ranks: list[RankPlan]
    time: TimePlan

    @property
    def peak(self) -> int:
        return max(r.peak for r in self.ranks)

    @property
    def activations(self) -> int:
        return max(r.activations.total for r in self.ranks)

    def fits(self, memory: int) -> bool:
        return self.peak <= memory

    def layout(self) -> str:
        """The layout as the overrides that select it."""
        p, t = self.cfg.parallel, self.cfg.trainer
        text = (f"parallel.tensor={p.tensor} parallel.pipeline={p.pipeline} parallel.context={p.context} "
                f"parallel.zero_stage={p.zero_stage} "
                f"trainer.micro_batch_size={t.micro_batch_size} "
                f"parallel.activation_checkpointing={p.activation_checkpointing}")
        return text + (" parallel.sequence_parallel=true" if p.sequence_parallel else "")


def evaluate(cfg: Config, cluster: ClusterConfig, world_size: int, vocab_size: int | None = None) -> Plan:
    """Peak memory per rank and step time; a ConfigError if the trainer would refuse the layout."""
    cfg.validate_world(world_size)
    return Plan(cfg, plan_ranks(cfg, world_size, vocab_size, cluster.device),
                plan_time(cfg, cluster, world_size, vocab_size))


def with_layout(cfg: Config, **changes) -> Config:
    """`cfg` with parallel.* and trainer.micro_batch_size changed (validated as a config would be)."""
    trainer = {k: v for k, v in changes.items() if k == "micro_batch_size"}
    parallel = {k: v for k, v in changes.items() if k != "micro_batch_size"}
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **parallel),
                               trainer=dataclasses.replace(cfg.trainer, **trainer))


def _powers_of_two(limit: int) -> list[int]:
    return [2 ** i for i in range(limit.bit_length()) if 2 ** i <= limit]


def context_sizes(cfg: Config, tensor: int, limit: int) -> list[int]:
    """Context-parallel sizes up to `limit` that split this model's sequence and heads
    (`Config._check_context_split`), powers of two."""
    m = cfg.model
    heads, groups = m.num_attention_heads // tensor, m.query_groups // tensor
    return [cp for cp in _powers_of_two(limit)
            if cfg.data.seq_len % cp == 0 and heads % cp == 0 and (groups % cp == 0 or cp % groups == 0)]


def layouts(cfg: Config, cluster: ClusterConfig, world_size: int) -> Iterator[Config]:
    """Every layout the trainer accepts for this world: tensor parallelism inside a node."""
    for tensor in _powers_of_two(min(cluster.devices_per_node, world_size)):
        if cfg.model.query_groups % tensor:
            continue
        for context in context_sizes(cfg, tensor, world_size // tensor):
            for pipeline in range(1, cfg.model.num_layers + 1):
                if world_size % (tensor * context * pipeline):
                    continue
                yield from _layouts_of(cfg, world_size, tensor, context, pipeline)


def _layouts_of(cfg: Config, world_size: int, tensor: int, context: int, pipeline: int) -> Iterator[Config]:
    """The layouts with these model-parallel sizes: ZeRO stage, micro-batch, recomputation and
    sequence parallelism."""
    for zero in (0, 1) if pipeline > 1 else (0, 1, 2, 3):
        for micro in MICRO_BATCHES:
            for recompute in RECOMPUTE:
                for sequence_parallel in (False, True) if tensor > 1 else (False,):
                    try:
                        candidate = with_layout(
                            cfg, tensor=tensor, pipeline=pipeline, context=context, zero_stage=zero,
                            micro_batch_size=micro, activation_checkpointing=recompute,
                            sequence_parallel=sequence_parallel, offload_optimizer=False)
                        candidate.validate_world(world_size)
                    except ConfigError:
                        continue
                    yield candidate


def search(cfg: Config, cluster: ClusterConfig, world_size: int, memory: int,
           vocab_size: int | None = None) -> tuple[list[Plan], Plan | None]:
    """(layouts that fit, fastest first; the layout that needs the least memory, when none fits)."""
    fitting, smallest = [], None
    for candidate in layouts(cfg, cluster, world_size):
        plan = evaluate(candidate, cluster, world_size, vocab_size)
        if plan.fits(memory):
            fitting.append(plan)
        elif smallest is None or plan.peak < smallest.peak:
            smallest = plan
    fitting.sort(key=lambda plan: plan.time.step.total)
    return fitting, (None if fitting else smallest)


def changes_that_fit(plan: Plan, cluster: ClusterConfig, world_size: int, memory: int,
                     vocab_size: int | None = None) -> list[tuple[str, Plan]]:
    """Single changes to `plan`'s layout that make it fit, the fastest first: recomputation,
    a smaller micro-batch, a higher ZeRO stage, or twice the tensor, pipeline or context size."""
    cfg, p = plan.cfg, plan.cfg.parallel
    options = [("parallel.activation_checkpointing", r, {"activation_checkpointing": r})
               for r in RECOMPUTE[RECOMPUTE.index(p.activation_checkpointing) + 1:]]
    micro = cfg.trainer.micro_batch_size
    options += [("trainer.micro_batch_size", m, {"micro_batch_size": m}) for m in _powers_of_two(micro - 1)]
    options += [("parallel.zero_stage", z, {"zero_stage": z}) for z in range(p.zero_stage + 1, 4)]
    options += [("parallel.tensor", p.tensor * 2, {"tensor": p.tensor * 2}),
                ("parallel.pipeline", p.pipeline * 2, {"pipeline": p.pipeline * 2}),
                ("parallel.context", p.context * 2, {"context": p.context * 2})]
    if p.tensor > 1 and not p.sequence_parallel:
        options.append(("parallel.sequence_parallel", "true", {"sequence_parallel": True}))
    found = []
    for key, value, change in options:
        try:
            changed = evaluate(with_layout(cfg, **change), cluster, world_size, vocab_size)
        except ConfigError:
            continue
        if changed.fits(memory):
            found.append((f"{key}={value}", changed))
    return sorted(found, key=lambda item: item[1].time.step.total)


def why_slower(best: StepTime, other: StepTime) -> str:
    """The parts of `other`'s step that cost the most time over `best`'s."""
    extra = sorted(((getattr(other, k) - getattr(best, k), k) for k in PART_NAMES), reverse=True)
    reasons = [f"+{seconds / best.total:.0%} {PART_NAMES[k]}" for seconds, k in extra[:2]
               if seconds > 0.005 * best.total]
    return ", ".join(reasons) or "within 1% of the fastest"
