"""The parallel section of the config (`parallel.*`): layout, ZeRO, precision, recomputation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.typed_config import require


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    # Context parallelism: every sequence split over this many ranks (parallel.context).
    context: int = 1
    # Expert parallelism: each MoE layer's experts split over this many ranks of the
    # data-parallel group (parallel.expert; `parallel/expert.py`).
    expert: int = 1
    zero_stage: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    sequence_parallel: bool = False
    # How pipeline stages are cut: equal numbers of transformer layers, or of parameters.
    pipeline_partition: Literal["uniform", "parameters"] = "uniform"
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    # ZeRO-Offload: fp32 master weights, gradients and Adam moments in host memory,
    # updated by DeepSpeed's CPU Adam (a C++ op built on first use).
    offload_optimizer: bool = False
    # fp16's dynamic loss scale (needs zero_stage >= 1): it starts at 2**fp16_initial_scale_power;
    # every overflowing step is skipped, and from the fp16_hysteresis-th overflow on each one
    # halves the scale; fp16_loss_scale_window steps without an overflow double it.
    fp16_initial_scale_power: int = 16
    fp16_loss_scale_window: int = 1000
    fp16_hysteresis: int = 2

    def __post_init__(self) -> None:
        require(self.tensor >= 1, f"parallel.tensor={self.tensor}: expected >= 1")
        require(0 <= self.fp16_initial_scale_power <= 64,
                f"parallel.fp16_initial_scale_power={self.fp16_initial_scale_power}: expected 0 to 64")
        for key in ("fp16_loss_scale_window", "fp16_hysteresis"):
            require(getattr(self, key) >= 1, f"parallel.{key}={getattr(self, key)}: expected >= 1")
        require(not (self.offload_optimizer and self.zero_stage == 0),
                "parallel.offload_optimizer=true: expected parallel.zero_stage >= 1 "
                "(DeepSpeed offloads ZeRO's optimizer partitions)")
        require(self.pipeline >= 1, f"parallel.pipeline={self.pipeline}: expected >= 1")
        require(self.context >= 1, f"parallel.context={self.context}: expected >= 1")
        require(self.expert >= 1, f"parallel.expert={self.expert}: expected >= 1")
        # Each expert-parallel rank's experts live only there: ZeRO's per-rank optimizer files
        # are what keep their fp32 weights and Adam moments in a checkpoint, and ZeRO-3
        # does not partition DeepSpeed's expert parameter groups.
        require(self.expert == 1 or self.zero_stage in (1, 2),
                f"parallel.zero_stage={self.zero_stage} with parallel.expert={self.expert}: expected "
                "parallel.zero_stage 1 or 2 (each rank's experts are checkpointed by ZeRO's per-rank "
                "optimizer states; ZeRO-3 does not partition expert parameter groups)")
        require(self.zero_stage in (0, 1, 2, 3),
                f"parallel.zero_stage={self.zero_stage}: expected 0, 1, 2 or 3")
        require(not (self.pipeline > 1 and self.zero_stage > 1),
                f"parallel.zero_stage={self.zero_stage} with parallel.pipeline={self.pipeline}: "
                "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only")
        require(not (self.pipeline > 1 and self.precision == "bf16" and self.zero_stage == 0),
                f"parallel.precision=bf16 with parallel.pipeline={self.pipeline}: expected "
                "parallel.zero_stage=1 (DeepSpeed's pipeline engine reloads bf16 optimizer "
                "state only under ZeRO)")
        require(not (self.sequence_parallel and self.tensor == 1),
                "parallel.sequence_parallel=true: expected parallel.tensor > 1")
