"""Process groups: torch.distributed start-up and megatron-core's `parallel_state`.

The same code path runs for one process and for N ranks under torchrun or the
deepspeed launcher: with no launcher variables present we start a one-rank
group on a free local port.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from common.net import free_port
from parallel.cluster_env import detect as detect_cluster

if TYPE_CHECKING:
    from parallel.config import ParallelConfig


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    local_rank: int
    tensor: int
    pipeline: int
    data: int  # replicas that read different samples: world / (tensor x pipeline x context)
    device: torch.device
    context: int = 1  # ranks that split each sequence (they read the same samples)
    expert: int = 1  # ranks that split each MoE layer's experts (taken from data x context)

    @property
    def tp_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    @property
    def pp_rank(self) -> int:
        return parallel_state.get_pipeline_model_parallel_rank()

    @property
    def dp_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    @property
    def gradient_replicas(self) -> int:
        """Ranks that hold the same weights and average their gradients: data x context."""
        return self.data * self.context

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda: no CUDA device is visible")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        return torch.device("cuda", detect_cluster().local_rank)
    return torch.device("cpu")


def init_layout_groups(parallel: "ParallelConfig", device: torch.device) -> Topology:
    """`init_process_groups` for the `parallel` section of a config."""
    return init_process_groups(parallel.tensor, parallel.pipeline, device, parallel.context, parallel.expert)


def init_process_groups(tensor: int, pipeline: int, device: torch.device, context: int = 1,
                        expert: int = 1) -> Topology:
    """Starts torch.distributed (if needed) and megatron-core's TP/CP/DP/PP/EP groups.

    Rank order is megatron-core's default: tensor fastest, then context, then
    data, then pipeline. DeepSpeed's pipeline topology (tensor, data, pipeline)
    agrees when its data axis is context x data (`Topology.gradient_replicas`).
    """
    if not dist.is_initialized():
        # torch reads env://: set it from whichever launcher started us (torchrun,
        # deepspeed, srun, mpirun), or for a plain call, a world of one on a free port.
        cluster = detect_cluster()
        os.environ.update(cluster.as_environ())
        if cluster.master_port is None:
            os.environ["MASTER_PORT"] = str(free_port())
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(minutes=int(os.environ.get("PRETRAIN_DIST_TIMEOUT_MIN", 30))),
        )
    # DeepSpeed's communication layer adopts the group torch started; pipeline
    # modules use it while they are built, before deepspeed.initialize.
    import deepspeed

    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    world_size = dist.get_world_size()
    if parallel_state.model_parallel_is_initialized() and (
        parallel_state.get_tensor_model_parallel_world_size() != tensor
        or parallel_state.get_pipeline_model_parallel_world_size() != pipeline
        or parallel_state.get_context_parallel_world_size() != context
        or parallel_state.get_expert_model_parallel_world_size() != expert
    ):
        parallel_state.destroy_model_parallel()  # a new layout in the same world
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor,
            pipeline_model_parallel_size=pipeline,
            context_parallel_size=context,
            expert_model_parallel_size=expert,
            create_gloo_process_groups=device.type == "cuda",
        )
    return Topology(
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        tensor=tensor,
        pipeline=pipeline,
        data=world_size // (tensor * pipeline * context),
        device=device,
        context=context,
        expert=expert,
    )


def data_parallel_mean(value: torch.Tensor, replicas: int) -> float:
    """The mean of `value` over the ranks that average gradients with this one (data x
    context parallel: `Topology.gradient_replicas`), as a float. A context-parallel rank's
    loss is its share of the sequence's (`parallel.context`), so the mean is the whole loss."""
    value = value.detach().float().clone()
    if replicas > 1:
        dist.all_reduce(value, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        value /= replicas
    return value.item()


def destroy_process_groups() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class MegatronMPU:
    """megatron-core's groups in the shape DeepSpeed's `mpu=` argument expects.

    DeepSpeed's "data parallel" group is the one it averages gradients and
    partitions ZeRO states over: with context parallelism that is data x context,
    since every context-parallel rank holds all the weights and a part of the loss.
    """

    get_model_parallel_group = staticmethod(parallel_state.get_model_parallel_group)

    @staticmethod
    def get_data_parallel_group():
        return parallel_state.get_data_parallel_group(with_context_parallel=True)

    @staticmethod
    def get_data_parallel_rank() -> int:
        return parallel_state.get_data_parallel_rank(with_context_parallel=True)

    @staticmethod
    def get_data_parallel_world_size() -> int:
        return parallel_state.get_data_parallel_world_size(with_context_parallel=True)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_world_size = staticmethod(
        parallel_state.get_tensor_model_parallel_world_size
    )
    get_tensor_model_parallel_src_rank = staticmethod(
        parallel_state.get_tensor_model_parallel_src_rank
    )
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(
        parallel_state.get_pipeline_model_parallel_world_size
    )

    @staticmethod
    def get_model_parallel_rank() -> int:
        return dist.get_rank(group=parallel_state.get_model_parallel_group())

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return dist.get_world_size(group=parallel_state.get_model_parallel_group())
