"""Each rank's random streams, saved with every checkpoint so a resume draws the same numbers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from common.errors import first_line
from pretrain.checkpoint.files import COMPLETE, RunDirError, rng_file


def capture_rng_state() -> dict:
    """This process's random streams: Python, NumPy, torch (CPU, CUDA) and megatron-core's
    model-parallel stream, which differs per tensor-parallel rank."""
    from megatron.core.tensor_parallel import random as megatron_random

    tracker = megatron_random.get_cuda_rng_tracker()
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "model_parallel": tracker.get_states() if tracker.is_initialized() else None,
    }


def restore_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import random as megatron_random

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("model_parallel") is not None:
        megatron_random.get_cuda_rng_tracker().set_states(state["model_parallel"])


def load_rng_state(path: Path, rank: int, world_size: int) -> dict | None:
    """This rank's saved streams; None when the checkpoint was written by another number of
    ranks (a resume into a new layout), where rank r's streams are not this rank's."""
    manifest = json.loads((path / COMPLETE).read_text()) if (path / COMPLETE).is_file() else {}
    file = path / rng_file(rank)
    if manifest.get("world_size") != world_size or not file.is_file():
        return None
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # torch reports a damaged file as pickle, zip or runtime errors
        raise RunDirError(f"{file}: cannot load this random-state file ({type(err).__name__}: "
                          f"{first_line(err)}); the checkpoint is damaged") from None
