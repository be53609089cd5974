"""Expert parallelism (`parallel.expert`): each MoE layer's experts split over ranks.

megatron-core does the model's part. With `expert_model_parallel_size` its
`parallel_state` makes two more groups out of the ranks that hold the same
dense weights (data x context): the expert-parallel group, whose ranks hold
different experts, and the expert-data-parallel group, whose ranks hold the
same ones. Each rank builds num_experts / expert of every MoE layer's experts;
the all-gather token dispatcher gathers the tokens of the whole expert-parallel
group (x the tensor-parallel group), runs them through the local experts and
reduce-scatters the outputs back. The expert weights carry `allreduce=False`.

DeepSpeed's part is the gradients. An expert weight's gradient on a rank
already sums the contributions of every expert-parallel rank's tokens (through
the reduce-scatter's backward), so it must be summed over the
expert-data-parallel group only, and divided by the whole data-parallel size
like every other gradient. DeepSpeed's engine and ZeRO-1/2 optimizers do
exactly that for parameters marked `allreduce=False` with a `group_name`, in
optimizer parameter groups flagged `moe` (`pretrain.training.optim`), once the
engine knows the model has expert layers. It learns that from a DeepSpeed
`MoE` module in the model, which is asked for its groups while the engine is
built. megatron-core's `MoELayer` is not one, so `with_expert_groups` attaches
`ExpertGroups` for the duration of `deepspeed.initialize`: a DeepSpeed `MoE`
without parameters that registers megatron-core's two groups under DeepSpeed's
name for them. ZeRO-1/2's gradient norm then counts each expert once: it sums
every rank's partition over the data-parallel group, and the expert partitions
of the expert-parallel ranks are disjoint.

Checkpoints stay DeepSpeed's plain ones (the engine's MoE checkpoint layout
expects DeepSpeed's own expert modules): each rank's experts' fp32 weights and
Adam moments are in its ZeRO optimizer file, which is why expert parallelism
needs ZeRO 1 or 2, and the module weights are restored from them on loading.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import is_moe_param
from deepspeed.utils import groups
from megatron.core import parallel_state


def group_name(expert: int) -> str:
    """DeepSpeed's name for the groups of an expert-parallel size."""
    return f"ep_size_{expert}"


class ExpertGroups(MoE):
    """Tells DeepSpeed's engine the model has expert-parallel layers, and gives it megatron-core's groups."""

    def __init__(self, expert: int):
        torch.nn.Module.__init__(self)  # DeepSpeed's MoE would build its own gate and experts
        self.ep_size, self.num_experts = expert, None  # the engine only lists num_experts
        self.expert_group_name = group_name(expert)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine while it is built: megatron-core's groups, under DeepSpeed's name."""
        name = self.expert_group_name
        for groups_by_name, ranks_by_name, group in (
                (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS,
                 parallel_state.get_expert_model_parallel_group()),
                (groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
                 parallel_state.get_expert_data_parallel_group())):
            groups_by_name.clear()  # groups of an earlier layout in this process are gone
            ranks_by_name.clear()
            groups_by_name[name] = group
            ranks_by_name[name] = dist.get_process_group_ranks(group)

    def forward(self, *args, **kwargs):
        raise RuntimeError("ExpertGroups only describes the layout to DeepSpeed; it computes nothing")


def mark_expert_parameters(model: torch.nn.Module, expert: int) -> int:
    """Names the expert-data-parallel group of every expert weight (megatron-core marked them
    `allreduce=False`); returns how many there are."""
    marked = 0
    for param in model.parameters():
        if is_moe_param(param):
            param.group_name = group_name(expert)
            marked += 1
    return marked


@contextmanager
def with_expert_groups(model: torch.nn.Module, expert: int):
    """The model as DeepSpeed's engine must see it while it is built under expert parallelism."""
    if expert == 1:
        yield
        return
    model.add_module("expert_groups", ExpertGroups(expert))
    try:
        yield
    finally:
        del model.expert_groups


def settle_engine(engine) -> None:
    """After `deepspeed.initialize`: the ZeRO optimizer keeps its expert groups, while the engine's
    saving and loading take the plain path (its MoE path expects DeepSpeed's own expert modules)."""
    engine.has_moe_layers = False


# --- checkpoints --------------------------------------------------------------------------------
# DeepSpeed's model-states file is written by the first data-parallel rank only, so it holds that
# rank's experts alone; the experts' fp32 weights and moments are in every rank's ZeRO file, but
# ZeRO leaves the module's weights as the model-states file set them. So the first rank of each
# expert-data-parallel group also writes its experts' module weights, under their one-process
# names, and every rank puts its own back after DeepSpeed has loaded.


EXPERT_WEIGHTS_FILE = re.compile(r"experts_tp_(\d+)_pp_(\d+)_ep_(\d+)\.pt")


def expert_weights_file(tensor_rank: int, pipeline_rank: int, expert_rank: int) -> str:
    return f"experts_tp_{tensor_rank:02d}_pp_{pipeline_rank:02d}_ep_{expert_rank:02d}.pt"


def _this_ranks_file() -> str:
    return expert_weights_file(parallel_state.get_tensor_model_parallel_rank(),
                               parallel_state.get_pipeline_model_parallel_rank(),
                               parallel_state.get_expert_model_parallel_rank())


def _expert_parameters(module: torch.nn.Module, num_layers: int) -> dict[str, torch.nn.Parameter]:
    from parallel.engine_state import canonical_parameters

    return {name: p for name, p in canonical_parameters(module, num_layers) if is_moe_param(p)}


def save_expert_weights(module: torch.nn.Module, directory, num_layers: int, write=torch.save) -> None:
    """This rank's experts into `directory`, if it is the first of its expert-data-parallel group."""
    if parallel_state.get_expert_data_parallel_rank() != 0:
        return
    weights = {name: p.detach().to("cpu", copy=True) for name, p in _expert_parameters(module, num_layers).items()}
    write(weights, f"{directory}/{_this_ranks_file()}")


@torch.no_grad()
def load_expert_weights(module: torch.nn.Module, directory, num_layers: int) -> None:
    """This rank's experts from a checkpoint of the same layout (after DeepSpeed's loading)."""
    path = f"{directory}/{_this_ranks_file()}"
    saved = torch.load(path, map_location="cpu", weights_only=True)
    for name, param in _expert_parameters(module, num_layers).items():
        if name not in saved:
            raise RuntimeError(f"{path}: no {name}")
        param.copy_(saved[name])
