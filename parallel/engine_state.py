"""Writing full weights and Adam moments into a DeepSpeed engine of any layout.

Layout-independent state comes in under canonical parameter names (the
single-process model's) with full shapes. Each rank cuts its tensor-parallel
shard (`parallel.sharding`) and puts it wherever its engine keeps it:

- plain fp32 without ZeRO: the module's parameters and the torch optimizer's
  per-parameter state;
- mixed precision without ZeRO (DeepSpeed's unfused optimizer): the module's
  low-precision parameters, the fp32 master copies and their optimizer state;
- ZeRO stages 1 and 2 (and DeepSpeed's bf16 optimizer): the module's
  parameters on every rank, and of the fp32 masters and moments only the
  fragment of each parameter that this data-parallel rank owns, found through
  the `_hp_mapping` DeepSpeed links to every parameter.

Vocabulary-sized weights may have a different number of padding rows in the
new layout (the padding depends on the tensor-parallel size): rows the source
has are copied, further padding rows keep their current values (moments zero).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from parallel import sharding

VOCAB_WEIGHTS = ("embedding.weight", "output_layer.weight")
MOMENTS = ("exp_avg", "exp_avg_sq")


def canonical_name(local: str, pipelined: bool, num_layers: int) -> str:
    """The single-process name of a parameter of `LlamaModel` or of a pipeline stage.

    Pipeline stages register layer k as child "k": 0 is the embedding,
    1..num_layers the transformer layers, num_layers + 1 the head. A tied
    embedding is DeepSpeed's `tied_modules.<key>` on the first and last
    stage; both copies are the one-process `embedding.*`.
    """
    if not pipelined:
        return local
    if local.startswith("tied_modules."):
        return local.split(".", 2)[2]
    index, rest = local.split(".", 1)
    index = int(index)
    if 1 <= index <= num_layers:
        return f"decoder.layers.{index - 1}.{rest.removeprefix('layer.')}"
    if rest.startswith("final_layernorm"):
        return f"decoder.{rest}"
    return rest


def canonical_parameters(module: torch.nn.Module, num_layers: int) -> list[tuple[str, torch.nn.Parameter]]:
    from deepspeed.pipe import PipelineModule
    from megatron.core import parallel_state

    pipelined = isinstance(module, PipelineModule)
    named = [(canonical_name(n, pipelined, num_layers), p) for n, p in module.named_parameters()]
    offset = sharding.expert_offset([n for n, _ in named], parallel_state.get_expert_model_parallel_rank())
    return [(sharding.global_expert_name(n, offset), p) for n, p in named]


def local_piece(name: str, full: torch.Tensor, current: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's shard of `full`, shaped like `current` (the parameter it replaces)."""
    if name.endswith(VOCAB_WEIGHTS) and full.shape[0] != current.shape[0] * tp_size:
        piece = current.detach().clone()
        start = tp_rank * current.shape[0]
        rows = max(0, min(current.shape[0], full.shape[0] - start))
        piece[:rows] = full[start:start + rows].to(piece.dtype)
        return piece
    piece = sharding.shard(name, full, tp_rank, tp_size)
    if piece.shape != current.shape:
        raise ValueError(f"{name}: shard of shape {tuple(piece.shape)} for a parameter of shape "
                         f"{tuple(current.shape)}")
    return piece


def _adam_state(like: torch.Tensor, step: int) -> dict:
    return {"step": torch.tensor(float(step), dtype=torch.float32),
            "exp_avg": torch.zeros_like(like), "exp_avg_sq": torch.zeros_like(like)}


def _kind(optimizer) -> str:
    if getattr(optimizer, "fp16_groups", None) is not None and getattr(optimizer, "fp32_groups", None) is not None \
            and isinstance(optimizer.fp32_groups[0], list):
        return "fp32_copies"  # DeepSpeed's unfused mixed-precision optimizer
    if type(optimizer).__name__ in ("DeepSpeedZeroOptimizer", "BF16_Optimizer"):
        return "partitioned"
    if isinstance(optimizer, torch.optim.Optimizer) and not hasattr(optimizer, "optimizer"):
        return "plain"
    raise NotImplementedError(f"loading resharded state into {type(optimizer).__name__} is not supported "
                              "(supported: fp32 or bf16 with ZeRO stage 0, 1 or 2)")


@torch.no_grad()
def write_state(
    engine,
    named: Iterable[tuple[str, torch.nn.Parameter]],
    weight: Callable[[str], torch.Tensor],
    moment: Callable[[str, str], torch.Tensor] | None,
    step: int,
    tp_rank: int,
    tp_size: int,
) -> None:
    """Sets every parameter of `engine` to `weight(name)` (full, fp32).

    With `moment(name, key)` the Adam moments are set too, with `step` steps
    taken; without, the optimizer state starts fresh.
    """
    named = list(named)
    names = {id(p): n for n, p in named}
    optimizer = engine.optimizer
    kind = _kind(optimizer)

    def pieces(name: str, param: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        value = local_piece(name, weight(name), param, tp_rank, tp_size).float()
        if moment is None:
            return value, {}
        zeros = torch.zeros(param.shape, dtype=torch.float32)
        return value, {k: local_piece(name, moment(name, k), zeros, tp_rank, tp_size) for k in MOMENTS}

    if kind == "plain":
        optimizer.state.clear()
        for name, param in named:
            value, moments = pieces(name, param)
            param.copy_(value)
            if moment is not None:
                optimizer.state[param] = _adam_state(param, step) | moments
    elif kind == "fp32_copies":
        optimizer.optimizer.state.clear()
        for lp_group, hp_group in zip(optimizer.fp16_groups, optimizer.fp32_groups):
            for lp, hp in zip(lp_group, hp_group):
                value, moments = pieces(names[id(lp)], lp)
                hp.copy_(value)
                lp.copy_(value.to(lp.dtype))
                if moment is not None:
                    optimizer.optimizer.state[hp] = _adam_state(hp, step) | moments
    else:
        base = optimizer.optimizer
        base.state.clear()
        flats = [group["params"][0] if group["params"] else None for group in base.param_groups]
        if moment is not None:
            for flat in flats:
                if flat is not None:
                    base.state[flat] = _adam_state(flat, step)
        for name, param in named:
            value, moments = pieces(name, param)
            param.copy_(value.to(param.dtype))  # every rank holds every low-precision parameter
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None:
                continue  # no fragment of this parameter in this rank's partition
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            mapping.hp_fragment.copy_(value.flatten().narrow(0, lp.start, lp.numel))
            for key, full in moments.items():
                flat_state = base.state[flats[mapping.param_group_index]][key]
                flat_state.narrow(0, hp.start, hp.numel).copy_(full.flatten().narrow(0, lp.start, lp.numel))
        # DeepSpeed links each parameter's view of the moments at its next step.
        if hasattr(optimizer, "_hp_optimizer_states_linked"):
            optimizer._hp_optimizer_states_linked = False


def set_learning_rate_state(engine, scheduler_state: dict | None) -> None:
    """Restores the schedule's position and puts its current rate into the optimizer."""
    scheduler = engine.lr_scheduler
    if scheduler is None or scheduler_state is None:
        return
    scheduler.load_state_dict(scheduler_state)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
