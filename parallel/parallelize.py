"""From a model built for this rank to the engine that trains it, in one fixed order.

By the time the model reaches `parallelize`, tensor parallelism is already in
it: megatron-core's layers cut their weights by `parallel_state`, and a
pipeline model holds only this rank's stage. What follows wraps it, and the
order matters:

0. Context parallelism puts each layer's core attention behind the all-to-all
   exchange (`parallel.context`), before checkpointing wraps that attention.
1. Activation checkpointing wraps the forwards of existing modules in place,
   before anything else holds on to those forwards.
2. Sequence parallelism's gradient reduction is hooked onto the weights that
   each tensor-parallel rank sees only a slice of the sequence for.
3. The optimizer is made over the model's parameters, before DeepSpeed
   flattens or partitions them; under expert parallelism the expert weights
   are named to DeepSpeed first, so they get parameter groups of their own.
4. DeepSpeed wraps model and optimizer: data parallelism, ZeRO partitioning,
   mixed precision, the pipeline engine for a pipeline model, and the
   expert-data-parallel reduction of expert gradients (`parallel.expert`).
5. torch.compile comes last, on the engine's module in place, so it traces
   the module as DeepSpeed runs it (ZeRO-3's parameter hooks included).
"""

from __future__ import annotations

from typing import Callable

import torch
from megatron.core import parallel_state

from parallel.activation_checkpointing import apply_activation_checkpointing
from parallel.compile import compile_model
from parallel.config import ParallelConfig
from parallel.context import ContextSplit, distribute_attention
from parallel.engine import Engine, EngineOptions, build_engine, clips_in_loop
from parallel.expert import mark_expert_parameters, settle_engine, with_expert_groups
from parallel.tensor import reduce_sequence_parallel_grads


def parallelize(model: torch.nn.Module, parallel: ParallelConfig, *, options: EngineOptions,
                make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer], scheduler_factory,
                data_parallel: int, device: torch.device, compile_mode: str = "none",
                recomputed: dict[str, type | tuple[type, ...]] | None = None,
                layer_types: tuple[type, ...] = ()) -> Engine:
    """The engine for `model` on this rank. `recomputed` maps the activation-checkpointing
    modes to the module types they recompute, `layer_types` are what compiling by layers
    compiles; both come from the model."""
    if parallel.context > 1:
        distribute_attention(model, parallel_state.get_context_parallel_group())
    # torch.utils.checkpoint around layers or core attention (megatron-core's recompute needs CUDA).
    apply_activation_checkpointing(model, parallel.activation_checkpointing, recomputed or {})
    if parallel.sequence_parallel:
        reduce_sequence_parallel_grads(model)
    if parallel.expert > 1:
        mark_expert_parameters(model, parallel.expert)
    optimizer = make_optimizer(model)
    with with_expert_groups(model, parallel.expert):
        deepspeed_engine = build_engine(model, optimizer, scheduler_factory, parallel, options, data_parallel)
    if parallel.expert > 1:
        settle_engine(deepspeed_engine)
    compile_model(deepspeed_engine.module, compile_mode, layer_types)
    return Engine(deepspeed_engine, device, loop_clip=options.grad_clip if clips_in_loop(parallel) else 0.0,
                  context=ContextSplit.of_this_rank())
