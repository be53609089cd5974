"""Random streams for tensor-parallel regions (dropout inside sharded layers).

megatron-core keeps a named "model-parallel" generator, seeded differently on
each tensor-parallel rank, and forks into it in sharded regions (for example
around the whole block under sequence parallelism). Its tracker stores CUDA
generator states only; on CPU we install a tracker with the same interface
over the CPU generator, so the same layers run on both.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel import random as megatron_random

# megatron-core's offset between the data-parallel and tensor-parallel seeds.
_TP_SEED_OFFSET = 2718


class CPURNGStatesTracker(megatron_random.CudaRNGStatesTracker):
    def add(self, name: str, seed: int) -> None:
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self._is_initialized = True
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = megatron_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise KeyError(f"rng state {name} is not added")
        outside = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outside)


def seed_model_parallel_rng(seed: int, device: torch.device) -> None:
    if device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return
    tracker = CPURNGStatesTracker()
    tracker.add(
        megatron_random._MODEL_PARALLEL_RNG_TRACKER_NAME,
        seed + _TP_SEED_OFFSET + parallel_state.get_tensor_model_parallel_rank(),
    )
    megatron_random._CUDA_RNG_STATE_TRACKER = tracker
    megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
