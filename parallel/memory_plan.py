"""Predicted bytes of parameters, gradients and optimizer states on a rank, without allocating.

Given the parameters a rank holds, the prediction follows what DeepSpeed 0.19
allocates for each layout (checked against `parallel.memory`'s measurement by
the parity tests), with `w` the bytes of the training dtype and `L` the
parameters this rank holds after the tensor and pipeline split:

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

from dataclasses import dataclass

from parallel.config import ParallelConfig

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


# --- bytes -----------------------------------------------------------------------------------

def rank_memory(local_params: int, p: ParallelConfig, data_parallel: int) -> RankMemory:
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
