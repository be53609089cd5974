"""Resuming a checkpoint under another parallel layout (TP, PP, CP, DP, ZeRO stage, precision).

DeepSpeed reloads a checkpoint only into the layout that wrote it. When the
layout saved with a checkpoint (its config and DeepSpeed's `dp_world_size`)
differs from the run's, the checkpoint is read into a layout-independent
state instead: per canonical parameter name, the full fp32 master weight and
both Adam moments, gathered over the tensor-parallel shards
(`parallel.sharding`), the pipeline stages and the data-parallel partitions
of ZeRO stages 1 and 2. Every rank then puts its share into its own engine
(`parallel.engine_state`), and the schedule, DeepSpeed's counters and the
client state (step, loader position) are restored as a plain resume would.

The loader's position is a global sample count, so after a data-parallel
change the run continues from the same global sample.

Supported sources: fp32 or bf16 with ZeRO stage 0, 1 or 2, any TP x PP,
tied embeddings included (both pipeline copies are the one `embedding.weight`).
ZeRO stage 3 and fp16 (loss-scaler state) are refused with one line.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from parallel import sharding
from parallel.engine_state import MOMENTS, canonical_name
from pretrain.checkpoint.consolidate import CheckpointError, LAYER_FILE, _first_states, _load
from pretrain.checkpoint.files import RunDirError


@dataclass(frozen=True)
class Layout:
    tensor: int
    pipeline: int
    data: int  # DeepSpeed's data-parallel size: the ranks averaging gradients (data x context)
    zero_stage: int
    precision: str
    context: int = 1
    expert: int = 1

    def __str__(self) -> str:
        context = f" CP={self.context}" if self.context > 1 else ""
        expert = f" EP={self.expert}" if self.expert > 1 else ""
        return (f"TP={self.tensor} PP={self.pipeline}{context} DP={self.data // self.context}{expert} "
                f"ZeRO-{self.zero_stage} {self.precision}")


def saved_layout(first: dict, path: Path) -> Layout:
    config = first.get("config")
    if not isinstance(config, dict) or "parallel" not in config:
        raise CheckpointError(f"{path}: no training config saved with it")
    p = config["parallel"]
    return Layout(p.get("tensor", 1), p.get("pipeline", 1), int(first.get("dp_world_size", 1)),
                  p.get("zero_stage", 0), p.get("precision", "fp32"), p.get("context", 1), p.get("expert", 1))


def read_first_states(path: Path) -> dict:
    first_file = _first_states(path)
    if first_file is None:
        raise CheckpointError(f"{path}: no model states (mp_rank_00_model_states.pt)")
    return _load(first_file)


@dataclass
class TrainingState:
    """A checkpoint's trainable state, independent of the layout that wrote it."""

    weights: dict[str, torch.Tensor]  # fp32 masters, canonical names, full shapes
    moments: dict[str, dict[str, torch.Tensor]]  # "exp_avg" / "exp_avg_sq" -> name -> full tensor
    step: int  # Adam steps taken
    first: dict  # the first model-states file: schedule, counters, client state


def _local_names(module: dict[str, torch.Tensor]) -> list[tuple[str, tuple]]:
    """(name, shape) of a rank's parameters in registration order, megatron's extra state left out."""
    return [(n, tuple(t.shape)) for n, t in module.items()
            if isinstance(t, torch.Tensor) and not n.endswith("_extra_state")]


def _split(names: list[tuple[str, tuple]]) -> tuple[list[str], list[str]]:
    """The optimizer's two parameter groups: decayed matrices, and the rest (`pretrain.training.optim`)."""
    decay = [n for n, shape in names if len(shape) >= 2 and "embedding" not in n]
    return decay, [n for n, shape in names if not (len(shape) >= 2 and "embedding" not in n)]


def _optimizer_order(names: list[tuple[str, tuple]]) -> list[str]:
    """Parameter order of the optimizer's state: decayed matrices, then the rest."""
    decay, rest = _split(names)
    return decay + rest


def _tied(first: dict) -> bool:
    """Whether the checkpoint's model ties its output layer to the embedding."""
    return bool(((first.get("config") or {}).get("model") or {}).get("tie_embeddings", False))


# A tied embedding's name in a pipeline engine (`parallel.pipeline.TIED_EMBEDDING`), on both
# the first and the last stage; its weights are saved once, in pipeline layer 0's file.
TIED_EMBEDDING = "tied_modules.embedding.embedding.weight"
LAYER0_EMBEDDING = "0.embedding.weight"


def _pipeline_stages(directory: Path, tp_rank: int, group_sizes: list[list[int]],
                     tied: bool = False) -> list[list[tuple[str, tuple]]]:
    """Each stage's (local name, shape) list, the stages cut where their optimizer's counts say.

    A tied embedding's copy on the last stage comes first in its parameters
    (DeepSpeed registers tied modules before the layers); it is named as
    layer 0's weight, which holds the same values.
    """
    layers = []
    for p in sorted(directory.iterdir()):
        if (m := LAYER_FILE.fullmatch(p.name)) and int(m.group(2)) == tp_rank:
            index = int(m.group(1))
            layers.append([(f"{index}.{n}", s) for n, s in _local_names(_load(p))])
    stages, position = [], 0
    for number, sizes in enumerate(group_sizes):
        stage: list[tuple[str, tuple]] = []
        if tied and number == len(group_sizes) - 1 and number > 0:
            stage = [item for item in layers[0] if item[0] == LAYER0_EMBEDDING]
        while (counts := [len(x) for x in _split(stage)]) != sizes:
            if position == len(layers) or sum(counts) > sum(sizes):
                raise CheckpointError(f"{directory}: pipeline layer files do not match the optimizer states")
            stage += layers[position]
            position += 1
        stages.append(stage)
    return stages


def _zero0_rank(states: dict, names: list[tuple[str, tuple]], module: dict | None, precision: str):
    """Masters, moments and step of one model-parallel rank's torch optimizer (no ZeRO)."""
    optimizer = states["optimizer"]
    if precision != "fp32":  # DeepSpeed's unfused mixed-precision optimizer: fp32 copies kept beside
        masters = [t for group in optimizer["fp32_groups"] for t in group]
        optimizer = optimizer["optimizer_state_dict"]
    order = _optimizer_order(names)
    if precision == "fp32":
        masters = [module[n] for n in order]
    ids = [i for group in optimizer["param_groups"] for i in group["params"]]
    weights, moments, step = {}, defaultdict(dict), 0
    for name, index, master in zip(order, ids, masters, strict=True):
        state = optimizer["state"].get(index, {})
        weights[name] = master.float()
        for key in MOMENTS:
            moments[key][name] = state.get(key, torch.zeros_like(master)).float()
        step = max(step, int(state.get("step", 0)))
    return weights, moments, step


def _zero12_rank(directory: Path, mp_rank: int, data: int, shapes: dict[str, tuple]):
    """Masters, moments and step of one model-parallel rank, joined over its ZeRO partitions."""
    pieces: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    step = 0
    for dp_rank in range(data):
        files = list(directory.glob(f"*zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_optim_states.pt"))
        if len(files) != 1:
            raise CheckpointError(f"{directory}: optimizer states of data-parallel rank {dp_rank}, "
                                  f"model-parallel rank {mp_rank} missing")
        sd = _load(files[0])["optimizer_state_dict"]
        base = sd["base_optimizer_state"]
        for group, mapping in enumerate(sd["param_slice_mappings"]):
            flats = {"fp32": sd["single_partition_of_fp32_groups"][group]}
            state = base["state"].get(group, {})
            step = max(step, int(state.get("step", 0)))
            for key in MOMENTS:
                flats[key] = state.get(key, torch.zeros_like(flats["fp32"]))
            for name, fragment in mapping.items():
                for key, flat in flats.items():
                    pieces[name][key].append(flat.narrow(0, fragment.start, fragment.numel))
    weights, moments = {}, defaultdict(dict)
    for name, parts in pieces.items():
        joined = {key: torch.cat(p).float().view(shapes[name]) for key, p in parts.items()}
        weights[name] = joined["fp32"]
        for key in MOMENTS:
            moments[key][name] = joined[key]
    return weights, moments, step


def read_training_state(path: Path, num_layers: int) -> TrainingState:
    """Gathers a checkpoint of any supported layout into one `TrainingState`."""
    first = read_first_states(path)
    layout = saved_layout(first, path)
    if layout.zero_stage == 3 or layout.precision == "fp16":
        raise CheckpointError(f"{path}: written with {layout}; a layout change is supported for fp32 and "
                              "bf16 with ZeRO stage 0, 1 or 2 (resume with the layout that wrote it)")
    tp_shards: dict[str, list] = defaultdict(lambda: [None] * layout.tensor)
    step = 0
    for mp_rank in range(layout.tensor * layout.pipeline):
        pp_rank, tp_rank = divmod(mp_rank, layout.tensor)
        states = first if mp_rank == 0 else _load(_model_states(path, mp_rank))
        if layout.pipeline == 1:
            module = states["module"]
            names = _local_names(module)
        else:
            names = _stage_names(path, layout, pp_rank, tp_rank, _tied(first))
            # Only fp32 without ZeRO keeps no separate masters: they are the weights themselves.
            masters_are_weights = layout.zero_stage == 0 and layout.precision == "fp32"
            module = _stage_weights(path, tp_rank, names) if masters_are_weights else None
        if layout.zero_stage == 0:
            weights, moments, rank_step = _zero0_rank(states, names, module, layout.precision)
        else:
            weights, moments, rank_step = _zero12_rank(path, mp_rank, layout.data, dict(names))
        step = max(step, rank_step)
        for local, value in weights.items():
            name = canonical_name(local, layout.pipeline > 1, num_layers)
            tp_shards[name][tp_rank] = (value, moments["exp_avg"][local], moments["exp_avg_sq"][local])
    full_weights, full_moments = {}, {key: {} for key in MOMENTS}
    for name, shards in tp_shards.items():
        if any(s is None for s in shards):
            raise CheckpointError(f"{path}: {name} missing on some tensor-parallel rank")
        full_weights[name] = sharding.gather(name, [s[0] for s in shards])
        for k, key in enumerate(MOMENTS, start=1):
            full_moments[key][name] = sharding.gather(name, [s[k] for s in shards])
    return TrainingState(full_weights, full_moments, step, first)


def _model_states(path: Path, mp_rank: int) -> Path:
    return path / f"mp_rank_{mp_rank:02d}_model_states.pt"


def _stage_names(path: Path, layout: Layout, pp_rank: int, tp_rank: int,
                 tied: bool = False) -> list[tuple[str, tuple]]:
    """(local name, shape) of the parameters pipeline stage `pp_rank` held."""
    if layout.zero_stage > 0:  # ZeRO's states name their parameters; offer every layer's
        names = [(f"{int(m.group(1))}.{n}", s) for p in sorted(path.iterdir())
                 if (m := LAYER_FILE.fullmatch(p.name)) and int(m.group(2)) == tp_rank
                 for n, s in _local_names(_load(p))]
        return names + [(TIED_EMBEDDING, s) for n, s in names if tied and n == LAYER0_EMBEDDING]
    sizes = []
    for pp in range(layout.pipeline):
        optimizer = _load(_model_states(path, pp * layout.tensor + tp_rank))["optimizer"]
        optimizer = optimizer.get("optimizer_state_dict", optimizer)  # mixed precision wraps it
        sizes.append([len(group["params"]) for group in optimizer["param_groups"]])
    return _pipeline_stages(path, tp_rank, sizes, tied)[pp_rank]


def _stage_weights(path: Path, tp_rank: int, names: list[tuple[str, tuple]]) -> dict[str, torch.Tensor]:
    wanted = {n.split(".", 1)[0] for n, _ in names}
    weights = {}
    for p in sorted(path.iterdir()):
        if (m := LAYER_FILE.fullmatch(p.name)) and int(m.group(2)) == tp_rank and str(int(m.group(1))) in wanted:
            weights |= {f"{int(m.group(1))}.{n}": t for n, t in _load(p).items()}
    return weights


_DS_KEYS = re.compile(r"module|optimizer|lr_scheduler|.*_shapes|shared_params|frozen_param_fragments|"
                      r"buffer_names|data_sampler|random_ltd|sparse_tensor_module_names|ds_config|ds_version|"
                      r"skipped_steps|global_steps|global_samples|dp_world_size|mp_world_size|"
                      r"checkpoint_parallel_dimensions")


def layout_changed(current: Layout, path: Path) -> Layout | None:
    """The checkpoint's layout when it differs from `current`, else None."""
    try:
        saved = saved_layout(read_first_states(path), path)
    except CheckpointError as err:
        raise RunDirError(str(err)) from None
    return saved if saved != current else None


def load_resharded(engine, path: Path, current: Layout, num_layers: int, say=print) -> dict:
    """Loads checkpoint `path` of another layout into DeepSpeed `engine` (trained in layout
    `current`); returns its client state."""
    from megatron.core import parallel_state

    from parallel.engine_state import canonical_parameters, set_learning_rate_state, write_state

    if current.zero_stage == 3 or current.precision == "fp16":
        raise RunDirError(f"{path}: written with {saved_layout(read_first_states(path), path)}; resuming it "
                          f"with ZeRO stage {current.zero_stage} {current.precision} is not supported (a layout "
                          "change needs ZeRO stage 0-2 and fp32 or bf16)")
    saved = saved_layout(read_first_states(path), path)
    if saved.expert > 1 or current.expert > 1:
        raise RunDirError(f"{path}: written with {saved}; resuming it with {current} is not supported (a "
                          "layout change needs parallel.expert=1 on both sides)")
    try:
        state = read_training_state(path, num_layers)
    except CheckpointError as err:
        raise RunDirError(str(err)) from None
    say(f"{path.name} was written with {saved_layout(state.first, path)}; resharding its weights "
        f"and Adam moments (step {state.step}) to {current}")
    named = canonical_parameters(engine.module, num_layers)
    missing = sorted({n for n, _ in named} - set(state.weights))
    if missing:
        raise RunDirError(f"{path}: no weight {missing[0]} for the model being resumed")
    write_state(engine, named, state.weights.__getitem__, lambda name, key: state.moments[key][name], state.step,
                parallel_state.get_tensor_model_parallel_rank(), current.tensor)
    set_learning_rate_state(engine, state.first.get("lr_scheduler"))
    for counter in ("global_steps", "global_samples", "skipped_steps"):
        if counter in state.first:
            setattr(engine, counter, state.first[counter])
    return {k: v for k, v in state.first.items() if not _DS_KEYS.fullmatch(k)}
