"""Checkpoint contents and the run directory's rules.

A checkpoint is a DeepSpeed checkpoint (model and optimizer shards of every
rank) whose client state carries the trainer's own state: step, consumed
samples and tokens, the loader state and the config it was written with.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

CHECKPOINTS = "checkpoints"
LATEST = "latest"  # DeepSpeed's pointer file to the newest tag


class RunDirError(RuntimeError):
    pass


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    path = checkpoint_root(run_dir) / tag
    return path if path.is_dir() else None


def resolve_resume(run_dir: str, resume: str) -> Path | None:
    """Which checkpoint to start from, refusing to start over a finished run's checkpoints."""
    existing = latest_checkpoint(run_dir)
    if resume == "never":
        if existing is not None:
            raise RunDirError(
                f"trainer.run_dir={run_dir} already holds checkpoint {existing.name}; "
                "pass trainer.resume=auto to continue it or choose another trainer.run_dir"
            )
        return None
    if resume == "auto":
        return existing
    path = Path(resume)
    if not (path / "mp_rank_00_model_states.pt").is_file() and not any(path.glob("*model_states.pt")):
        raise RunDirError(f"trainer.resume={resume}: not a checkpoint directory (no model states)")
    return path


def save(engine, run_dir: str, step: int, client_state: dict) -> Path:
    root = checkpoint_root(run_dir)
    engine.save_checkpoint(str(root), tag=tag_for(step), client_state=client_state)
    return root / tag_for(step)


def load(engine, path: Path) -> dict:
    """Loads engine state from checkpoint directory `path`; returns the client state."""
    loaded, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    if loaded is None:
        raise RunDirError(f"{path}: DeepSpeed could not load this checkpoint")
    return client_state


def write_run_file(run_dir: str, name: str, data: bytes) -> Path:
    """Writes a file into the run directory atomically (rank 0 only)."""
    target = Path(run_dir) / name
    if dist.is_initialized() and dist.get_rank() != 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target

