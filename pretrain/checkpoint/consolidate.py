"""One process's view of a checkpoint written under any parallel layout.

DeepSpeed writes one model file per tensor-parallel rank
(`mp_rank_XX_model_states.pt`, the weights under "module"), or, under
pipeline parallelism, one file per pipeline layer and tensor-parallel rank
(`layer_XX-model_YY-model_states.pt`). `load_checkpoint` turns either into
the single-process `LlamaModel` state dict, so evaluation, generation and
export run in one process whatever layout trained the model.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from data_pipeline.tokenizer import Tokenizer, TokenizerError
from parallel import sharding
from parallel.engine_state import canonical_name
from common.errors import UserError
from common.typed_config import ConfigError, from_dict
from pretrain.model.config import ModelConfig

MODEL_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt")
LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt")


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing or unusable; the message names the path."""


@dataclass
class Checkpoint:
    path: Path  # the checkpoint directory (checkpoints/step_NNNNNNN)
    run_dir: Path | None  # the run directory holding it, when laid out as `pretrain` writes
    step: int | None
    model: ModelConfig
    train_config: dict  # the whole training config as saved with the checkpoint
    state_dict: dict[str, torch.Tensor]  # single-process names and full shapes
    tokenizer_hash: str | None

    @property
    def padded_vocab_size(self) -> int:
        return self.state_dict["embedding.weight"].shape[0]


def consolidate(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Full weights from tensor-parallel state dicts given in rank order.

    Column-parallel weights (q/k/v, fc1, output layer) and the vocabulary-
    parallel embedding are concatenated along dim 0, row-parallel ones
    (attention output, fc2) along dim 1. The fused q/k/v weight needs nothing
    more: megatron-core lays it out per query group ([q heads, k, v] for each
    group) and every rank holds whole groups. SwiGLU's fc1 does: each rank
    holds [its gate rows; its up rows], so the gates are gathered first, then
    the ups. Norm weights are replicated and taken from rank 0.
    """
    full = {}
    for name, value in shards[0].items():
        if isinstance(value, torch.Tensor):
            full[name] = sharding.gather(name, [shard[name] for shard in shards])
        else:  # megatron-core's `_extra_state` entries
            full[name] = value
    return full


# The first rank's model-state file: its plain name, or its name under ZeRO stage 3.
_FIRST_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def _first_states(directory: Path) -> Path | None:
    return next((directory / n for n in _FIRST_STATES if (directory / n).is_file()), None)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, given it or a run directory (its newest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run or checkpoint directory")
    if _first_states(path):
        return path
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        try:
            name = latest.read_text().strip()
        except UnicodeDecodeError:
            raise CheckpointError(f"{latest}: not a checkpoint name (not UTF-8 text)") from None
        checkpoint = path / "checkpoints" / name
        if _first_states(checkpoint):
            return checkpoint
        raise CheckpointError(f"{latest}: names {checkpoint.name}, which holds no model states")
    raise CheckpointError(
        f"{path}: neither a checkpoint directory (no mp_rank_00_model_states.pt) "
        "nor a run directory (no checkpoints/latest)"
    )


def _load(file: Path) -> dict:
    # mmap: optimizer states in the same file are never read into memory.
    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:
        # Some DeepSpeed optimizer states pickle Python objects (e.g. the fp16
        # loss scaler); these files are the run's own outputs.
        pass
    except Exception as err:
        raise CheckpointError(f"{file}: unreadable ({err or type(err).__name__})") from None
    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{file}: unreadable ({err or type(err).__name__})") from None


def _tensor_parallel_shards(directory: Path, first: dict) -> list[dict]:
    files = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := MODEL_FILE.fullmatch(p.name)))
    if [rank for rank, _ in files] != list(range(len(files))):
        raise CheckpointError(f"{directory}: model files of tensor-parallel ranks {[r for r, _ in files]}; "
                              "expected 0..N-1")
    return [first["module"]] + [_load(p)["module"] for _, p in files[1:]]


def _pipeline_shards(directory: Path, num_layers: int) -> list[dict]:
    """Per tensor-parallel rank, the pipeline layers' weights under single-process names.

    Pipeline layer 0 is the embedding, 1..num_layers the transformer layers
    (their weights under `layer.`), and the last the final norm and output layer.
    """
    shards: dict[int, dict] = {}
    for p in sorted(directory.iterdir()):
        if not (m := LAYER_FILE.fullmatch(p.name)):
            continue
        index, tp_rank = int(m.group(1)), int(m.group(2))
        shard = shards.setdefault(tp_rank, {})
        for name, value in _load(p).items():
            shard[canonical_name(f"{index}.{name}", True, num_layers)] = value
    if not shards:
        raise CheckpointError(f"{directory}: no model weights (neither 'module' nor layer_XX files)")
    if sorted(shards) != list(range(len(shards))):
        raise CheckpointError(f"{directory}: layer files of tensor-parallel ranks {sorted(shards)}; "
                              "expected 0..N-1")
    return [shards[rank] for rank in range(len(shards))]


def _add_expert_parallel_weights(directory: Path, shards: list[dict]) -> None:
    """Under expert parallelism the model files hold the first expert-parallel rank's experts
    only; every rank's are in its expert file (`parallel.expert`), under one-process names."""
    from parallel.expert import EXPERT_WEIGHTS_FILE

    files = [(int(m.group(1)), p) for p in sorted(directory.iterdir())
             if (m := EXPERT_WEIGHTS_FILE.fullmatch(p.name))]
    if not files:
        raise CheckpointError(f"{directory}: written with parallel.expert > 1 but holds no expert weight files "
                              "(experts_tp_XX_pp_XX_ep_XX.pt)")
    for tensor_rank, file in files:
        if tensor_rank >= len(shards):
            raise CheckpointError(f"{file}: tensor-parallel rank {tensor_rank}, but the model files have "
                                  f"{len(shards)}")
        shard = shards[tensor_rank]
        for name, value in _load(file).items():
            shard[name] = value
            # megatron-core's linears save an (empty) extra state beside their weight
            shard.setdefault(name.removesuffix("weight") + "_extra_state", None)


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = None) -> Checkpoint:
    """The single-process model weights and training config of a checkpoint or run directory."""
    directory = find_checkpoint(path)
    first_file = _first_states(directory)
    first = _load(first_file)
    config = first.get("config")
    if not isinstance(config, dict) or "model" not in config:
        raise CheckpointError(f"{first_file}: no training config saved with it")
    try:
        model = from_dict(ModelConfig, config["model"], "model.")
    except ConfigError as err:
        raise CheckpointError(f"{directory}: saved config: {err}") from None

    if first.get("module") is not None:
        shards = _tensor_parallel_shards(directory, first)
    else:
        shards = _pipeline_shards(directory, model.num_layers)
    if any(isinstance(v, torch.Tensor) and v.numel() == 0 for shard in shards for v in shard.values()):
        # ZeRO stage 3 keeps the weights only in the optimizer partitions.
        if len(shards) > 1:
            raise CheckpointError(
                f"{directory}: ZeRO stage 3 with tensor parallelism; consolidate each tensor-parallel "
                "rank with DeepSpeed's zero_to_fp32.py first"
            )
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            gathered = get_fp32_state_dict_from_zero_checkpoint(str(directory.parent), tag=directory.name)
        except Exception as err:  # DeepSpeed raises assorted errors for missing or partial files
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CheckpointError(
                f"{directory}: ZeRO stage 3 weights could not be gathered from the optimizer "
                f"partitions ({reason})"
            ) from None
        shards = [dict(gathered)]
    if config.get("parallel", {}).get("expert", 1) > 1:
        _add_expert_parallel_weights(directory, shards)
    state_dict = consolidate(shards)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in state_dict.items()}

    run_dir = directory.parent.parent if directory.parent.name == "checkpoints" else None
    trainer_state = first.get("trainer") or {}
    return Checkpoint(
        path=directory,
        run_dir=run_dir,
        step=trainer_state.get("step"),
        model=model,
        train_config=config,
        state_dict=state_dict,
        tokenizer_hash=first.get("tokenizer_hash"),
    )


def load_tokenizer(checkpoint: Checkpoint, override: str | None = None) -> Tokenizer:
    """The run's SentencePiece model (saved in the run directory), or `override`.

    Refuses a tokenizer other than the one the checkpoint was trained with:
    its ids would mean different pieces.
    """
    if override:
        path = Path(override)
    elif checkpoint.run_dir is not None:
        path = checkpoint.run_dir / "tokenizer.model"
    else:
        raise CheckpointError(f"{checkpoint.path}: not inside a run directory; pass --tokenizer")
    if not path.is_file():
        raise CheckpointError(f"{path}: tokenizer model not found")
    try:
        tokenizer = Tokenizer(path)
    except TokenizerError as err:  # a file that is no SentencePiece model
        raise CheckpointError(str(err)) from None
    if checkpoint.tokenizer_hash and tokenizer.hash != checkpoint.tokenizer_hash:
        raise CheckpointError(
            f"{path}: tokenizer {tokenizer.hash[:12]}, but {checkpoint.path} was trained with "
            f"{checkpoint.tokenizer_hash[:12]}"
        )
    return tokenizer
