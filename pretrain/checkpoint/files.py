"""The checkpoint format on disk: names, manifests, atomic commits, retention, run-directory files.

A checkpoint `checkpoints/step_NNNNNNN/` holds the DeepSpeed engine state of
every rank (its client state carries the trainer and loader state, the config,
the tokenizer hash and the W&B run id), one RNG-state file per rank, a copy of
the tokenizer model and of the W&B run id, and a `COMPLETE` manifest.

A save (`checkpointer.Checkpointer`) writes everything into
`step_NNNNNNN.partial/`; once every rank has written and fsynced its files,
rank 0 writes the manifest (the size of every
file), renames the directory into place and moves the `latest` pointer. Only
directories with a manifest are ever resumed from, so a save killed half way
leaves the previous checkpoint in charge; the next successful save removes
the leftovers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch.distributed as dist

from common.errors import UserError, first_line
from common.paths import file_above

CHECKPOINTS = "checkpoints"
LATEST = "latest"  # the tag of the newest complete checkpoint, for tools that read a pointer
COMPLETE = "COMPLETE"  # manifest written last: its presence makes a checkpoint resumable
PARTIAL = ".partial"  # suffix of a checkpoint being written
REPLACED = ".replaced"  # suffix of a complete checkpoint being replaced by one of the same step
TOKENIZER_FILE = "tokenizer.model"
WANDB_ID_FILE = "wandb_run_id"
STEP_DIR = re.compile(r"step_(\d+)")
LEFTOVER_DIR = re.compile(r"step_\d+(\.partial|\.replaced)?")

# Model settings a checkpoint's weights are shaped by; a resume must match them.
SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
              "ffn_hidden_size", "tie_embeddings", "qk_norm")
MOE_SHAPE_KEYS = ("num_experts", "expert_ffn_hidden_size", "shared_expert_ffn_hidden_size", "first_dense_layers")


class RunDirError(UserError, RuntimeError):
    """A run directory or checkpoint cannot be used; the message names the path."""


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def rng_file(rank: int) -> str:
    return f"rng_state_rank{rank:05d}.pt"


def check_run_dir(run_dir: str | os.PathLike) -> None:
    """Refuses a `trainer.run_dir` that cannot become a directory: one that is a file (or a
    broken symbolic link), or that lies below one. Writes nothing; a missing directory is fine."""
    path = Path(run_dir)
    if not path.is_dir() and (path.exists() or path.is_symlink()):
        what = "file" if path.exists() else "broken symbolic link"
        raise RunDirError(f"trainer.run_dir={run_dir}: a {what}, expected a directory")
    place = file_above(path)
    if place is not None:
        what = "file" if place.exists() else "broken symbolic link"
        raise RunDirError(f"trainer.run_dir={run_dir}: lies below the {what} {place}; expected a directory")


# --- finding checkpoints --------------------------------------------------------------------

def complete_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint with a manifest, oldest first; the directory is scanned,
    so a stale or missing `latest` pointer does not matter."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.fullmatch(p.name)) and (p / COMPLETE).is_file()]
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def read_manifest(path: Path) -> dict:
    """The manifest of a complete checkpoint, after checking every file it lists is whole."""
    marker = path / COMPLETE
    if not marker.is_file():
        raise RunDirError(f"{path}: incomplete checkpoint (no {COMPLETE} manifest; its save was interrupted)")
    try:
        manifest = json.loads(marker.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise RunDirError(f"{marker}: unreadable checkpoint manifest") from None
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            raise RunDirError(f"{file}: missing from checkpoint {path.name} (its manifest lists it)")
        if file.stat().st_size != size:
            raise RunDirError(f"{file}: {file.stat().st_size} bytes, the checkpoint manifest says {size} "
                              "(corrupt or truncated)")
    return manifest


def check_model_shape(path: Path, manifest: dict, model) -> None:
    """Refuses a checkpoint whose weights were shaped by other model settings than `model`'s."""
    saved = manifest.get("model") or {}
    for key in SHAPE_KEYS:
        if key in saved and saved[key] != getattr(model, key):
            raise RunDirError(f"{path}: written for model.{key}={saved[key]}, but the config has "
                              f"model.{key}={getattr(model, key)}")
    saved_moe = saved.get("moe") or {}
    for key in MOE_SHAPE_KEYS:  # a mixture-of-experts checkpoint resumed as dense, or the reverse
        value, default = getattr(model.moe, key), getattr(type(model.moe)(), key)
        if saved_moe.get(key, default) != value:
            raise RunDirError(f"{path}: written for model.moe.{key}={saved_moe.get(key, default)}, but the "
                              f"config has model.moe.{key}={value}")


def check_tokenizer(path: Path, tokenizer) -> None:
    """Refuses a checkpoint written with another tokenizer than the data's, from the copy
    of the tokenizer it holds (checked before anything is built or written)."""
    saved = path / TOKENIZER_FILE
    if tokenizer is None or not saved.is_file():
        return
    saved_hash = hashlib.sha256(saved.read_bytes()).hexdigest()
    if saved_hash != tokenizer.hash:
        raise RunDirError(f"{path}: written with tokenizer {saved_hash[:12]}, but the data uses "
                          f"{tokenizer.hash[:12]}")


def resolve_resume(run_dir: str, resume: str, model=None) -> Path | None:
    """Which checkpoint to start from, refusing to start over a run's checkpoints.

    `auto` takes the newest complete checkpoint (none: a fresh start), `never`
    refuses a run directory that has one, anything else is a checkpoint path.
    The chosen checkpoint is checked whole (and against `model`'s shape) before
    anything is built.
    """
    existing = latest_checkpoint(run_dir)
    if resume == "never":
        if existing is not None:
            raise RunDirError(
                f"trainer.run_dir={run_dir} already holds checkpoint {existing.name}; "
                "pass trainer.resume=auto to continue it or choose another trainer.run_dir"
            )
        return None
    if resume == "auto":
        path = existing
        if path is None:
            return None
    else:
        path = Path(resume)
        if not path.is_dir() or not any(path.glob("*model_states.pt")):
            raise RunDirError(f"trainer.resume={resume}: not a checkpoint directory (no model states)")
    manifest = read_manifest(path)
    if model is not None:
        check_model_shape(path, manifest, model)
    return path


# --- saving ---------------------------------------------------------------------------------

def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """Flushes every file under `directory`, and the directories, to disk. Every rank calls
    it: on a shared file system each node flushes what it wrote itself."""
    for parent, _, files in os.walk(directory):
        for name in files:
            fsync_path(Path(parent) / name)
        fsync_path(Path(parent))


def write_atomic(target: Path, data: bytes) -> None:
    """Writes `target` so that it is either absent, the old content or the whole new content."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    fsync_path(target.parent)


def publish(run_dir: str, staging: Path, final: Path, facts: dict, keep_last: int, keep_every: int) -> None:
    """Rank 0, once every rank's files are on disk: commits the checkpoint, then removes
    interrupted saves and applies retention."""
    commit(final.parent, staging, final, facts)
    remove_leftovers(final.parent, keep=final)
    prune(run_dir, keep_last, keep_every, keep=facts["step"])


def commit(root: Path, staging: Path, final: Path, facts: dict) -> None:
    """Rank 0, once every rank's files are on disk: manifest, rename into place, pointer."""
    files = {str(p.relative_to(staging)): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()}
    manifest = {**facts, "files": files, "time": time.time()}
    write_atomic(staging / COMPLETE, json.dumps(manifest, indent=1).encode())
    replaced = None
    if final.exists():  # a checkpoint of the same step, from an earlier branch of the run
        replaced = final.with_name(final.name + REPLACED)
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(staging, final)
    fsync_path(root)
    write_atomic(root / LATEST, final.name.encode())
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def remove_leftovers(root: Path, keep: Path) -> None:
    """Removes checkpoint directories without a manifest: saves that were interrupted."""
    for path in root.iterdir():
        if path != keep and path.is_dir() and LEFTOVER_DIR.fullmatch(path.name) and (
                path.name.endswith((PARTIAL, REPLACED)) or not (path / COMPLETE).is_file()):
            shutil.rmtree(path, ignore_errors=True)


def prune(run_dir: str, keep_last: int, keep_every: int, keep: int) -> list[int]:
    """Applies retention: the newest `keep_last` checkpoints (0: all), every step that is a
    multiple of `keep_every` (0: none), and step `keep` stay. Returns the removed steps."""
    if keep_last <= 0:
        return []
    found = complete_checkpoints(run_dir)
    newest = {step for step, _ in found[-keep_last:]}
    removed = []
    for step, path in found:
        if step in newest or step == keep or (keep_every > 0 and step % keep_every == 0):
            continue
        # The manifest goes first, so a removal cut short leaves a leftover, never a
        # checkpoint that looks complete but is not.
        (path / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(step)
    return removed


# --- loading --------------------------------------------------------------------------------

def load(engine, path: Path) -> dict:
    """Loads engine state from checkpoint directory `path`; returns the client state."""
    try:
        loaded, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    except Exception as err:  # DeepSpeed reports a bad file in many ways
        raise RunDirError(f"{path}: cannot load this checkpoint ({type(err).__name__}: {first_line(err)})") from err
    if loaded is None:
        raise RunDirError(f"{path}: DeepSpeed could not load this checkpoint")
    return client_state


def wandb_run_id(run_dir: str) -> str | None:
    """The W&B run id kept in the run directory (written by the W&B sink), if any."""
    id_file = Path(run_dir) / WANDB_ID_FILE
    return id_file.read_text().strip() if id_file.is_file() else None


def restore_run_files(path: Path, run_dir: str) -> None:
    """Puts the checkpoint's W&B run id into a run directory that has none (rank 0), so a run
    resumed from a copied checkpoint continues the same W&B run."""
    source, target = path / WANDB_ID_FILE, Path(run_dir) / WANDB_ID_FILE
    if source.is_file() and not target.exists():
        write_run_file(run_dir, WANDB_ID_FILE, source.read_bytes())


def write_run_file(run_dir: str, name: str, data: bytes) -> Path:
    """Writes a file into the run directory atomically (rank 0 only)."""
    target = Path(run_dir) / name
    if dist.is_initialized() and dist.get_rank() != 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, data)
    return target
