"""Continued pretraining: start a run from exported or Hugging Face Llama weights.

`trainer.init_from` names a Hugging Face Llama directory (config.json and
model.safetensors, or a sharded model.safetensors.index.json; Qwen3 for a model
with `model.qk_norm`), or one safetensors file with either Hugging Face names
or this project's (`consolidated.safetensors` from `pretrain-export`). The
weights are loaded into the freshly built model of whatever layout the run
uses, before the first step; the optimizer and the schedule start fresh, at
step 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common.typed_config import ConfigError
from data_pipeline.tokenizer import Tokenizer
from parallel.config import ParallelConfig
from pretrain.model.config import ModelConfig
from pretrain.hf.format import FormatError, check_weights, config_mismatch, from_hf

KEY = "trainer.init_from"


def _hf_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise ConfigError(f"{KEY}={directory}: no config.json (expected a Hugging Face Llama or Qwen3 directory "
                          "or a .safetensors file)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{KEY}={directory}: config.json unreadable ({err})") from None


def check_source(source: str, cfg: ModelConfig) -> None:
    """Cheap checks made before anything is built: the source exists and fits `model.*`."""
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"{KEY}={source}: no such file or directory")
    if path.is_dir():
        mismatch = config_mismatch(_hf_config(path), cfg)
        if mismatch:
            raise ConfigError(f"{KEY}={source}: config.json {mismatch}")
    elif path.suffix != ".safetensors":
        raise ConfigError(f"{KEY}={source}: expected a Hugging Face directory or a .safetensors file")


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise ConfigError(f"{KEY}={directory}: no model.safetensors or model.safetensors.index.json")


def read_weights(source: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The single-process weights (fp32, this project's names) of an init_from source."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_source(source, cfg)
    path = Path(source)
    files = _safetensors_files(path) if path.is_dir() else [path]
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors |= load_file(file)
        except (SafetensorError, OSError) as err:
            raise ConfigError(f"{KEY}={source}: {file.name} unreadable ({err})") from None
    tensors = {name: t.float() for name, t in tensors.items()}
    try:
        if "embedding.weight" in tensors:  # this project's names
            check_weights(tensors, cfg, f"{KEY}={source}")
            return tensors
        return from_hf(tensors, cfg, f"{KEY}={source}")
    except FormatError as err:
        raise ConfigError(str(err)) from None


def check_tokenizer(source: str, tokenizer: Tokenizer | None) -> None:
    """Refuses a run whose tokenizer differs from the one saved beside the weights."""
    saved = Path(source) / "tokenizer.model" if Path(source).is_dir() else None
    if saved is None or not saved.is_file() or tokenizer is None:
        return
    if saved.read_bytes() != tokenizer.model_bytes:
        raise ConfigError(f"{KEY}={source}: its tokenizer.model differs from the run's tokenizer "
                          f"({tokenizer.path}); set data.tokenizer.model={saved}")


def init_from(engine, source: str, cfg: ModelConfig, parallel: ParallelConfig, tokenizer: Tokenizer | None,
              vocab_size: int, say=print) -> None:
    """Loads `source` into DeepSpeed `engine`'s model (any layout); the optimizer state stays
    fresh. `tokenizer` and its `vocab_size` are the run's."""
    from megatron.core import parallel_state

    from parallel.engine_state import canonical_parameters, write_state

    if parallel.zero_stage == 3 or parallel.precision == "fp16":
        raise ConfigError(f"{KEY}={source} with parallel.zero_stage={parallel.zero_stage}, "
                          f"parallel.precision={parallel.precision}: expected ZeRO stage 0-2 and fp32 or bf16")
    check_tokenizer(source, tokenizer)
    weights = read_weights(source, cfg)
    rows = weights["embedding.weight"].shape[0]
    if rows < vocab_size:
        raise ConfigError(f"{KEY}={source}: {rows} embedding rows for a tokenizer of {vocab_size} pieces")
    named = canonical_parameters(engine.module, cfg.num_layers)
    write_state(engine, named, weights.__getitem__, None, 0,
                parallel_state.get_tensor_model_parallel_rank(), parallel.tensor)
    say(f"initialised {len(weights)} weights from {source}")
