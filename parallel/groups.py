"""Process groups: torch.distributed start-up and megatron-core's `parallel_state`.

The same code path runs for one process and for N ranks under torchrun or the
deepspeed launcher: with no launcher variables present we start a one-rank
group on a free local port.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from common.net import free_port
from parallel.cluster_env import detect as detect_cluster


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    local_rank: int
    tensor: int
    pipeline: int
    data: int
    device: torch.device

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


def init_process_groups(tensor: int, pipeline: int, device: torch.device) -> Topology:
    """Starts torch.distributed (if needed) and megatron-core's TP/PP/DP groups.

    Rank order is megatron-core's default: tensor fastest, then data, then
    pipeline, which is also what DeepSpeed's pipeline topology uses.
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
    ):
        parallel_state.destroy_model_parallel()  # a new layout in the same world
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor,
            pipeline_model_parallel_size=pipeline,
            create_gloo_process_groups=device.type == "cuda",
        )
    return Topology(
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        tensor=tensor,
        pipeline=pipeline,
        data=world_size // (tensor * pipeline),
        device=device,
    )


def data_parallel_mean(value: torch.Tensor, data_parallel: int) -> float:
    """The mean of `value` over the data-parallel replicas (this rank's group), as a float."""
    value = value.detach().float().clone()
    if data_parallel > 1:
        dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
        value /= data_parallel
    return value.item()


def destroy_process_groups() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class MegatronMPU:
    """megatron-core's groups in the shape DeepSpeed's `mpu=` argument expects."""

    get_model_parallel_group = staticmethod(parallel_state.get_model_parallel_group)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
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
