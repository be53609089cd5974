"""`pretrain-export`: a checkpoint of any parallel layout as safetensors and a Hugging Face model.

    pretrain-export runs/default exported/
    pretrain-export runs/default/checkpoints/step_0000300 exported/ --dtype bf16 --force

The output directory holds

- `consolidated.safetensors`: the single-process weights under this project's
  names, with the training config and step in its metadata;
- a Hugging Face Llama directory (Qwen3 for a model with `model.qk_norm`, see
  `pretrain.hf.format`): `config.json`, `generation_config.json`,
  `model.safetensors` (q/k/v and gate/up unpacked), and the run's SentencePiece
  model as `tokenizer.model` with `tokenizer_config.json` and
  `special_tokens_map.json`, so that `AutoModelForCausalLM` and
  `AutoTokenizer` load it.

Everything is written into a temporary directory beside the output, which is
renamed into place at the end: an interrupted export leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import NoReturn

import torch

from common import errors
from common.paths import file_above

CONSOLIDATED = "consolidated.safetensors"
HF_WEIGHTS = "model.safetensors"


class TokenizerCopyError(errors.UserError, ValueError):
    """The tokenizer.model a checkpoint carries cannot be used; the message names the file."""


def fail(message: str) -> NoReturn:
    errors.fail("pretrain-export", message)


def _tokenizer_files(tokenizer, max_seq_len: int) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json for the SentencePiece model.

    Training appends EOS to every document and adds no BOS, so neither is
    added when encoding; the special pieces are named as the model names them.
    """
    sp = tokenizer.sp
    special = {}
    for key, index in (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()),
                       ("eos_token", sp.eos_id()), ("pad_token", sp.pad_id())):
        if 0 <= index < sp.get_piece_size():
            special[key] = sp.id_to_piece(index)
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "legacy": False,
        "add_prefix_space": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_seq_len,
        "sp_model_kwargs": {},
        **special,
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def _special_ids(tokenizer) -> dict:
    if tokenizer is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    sp = tokenizer.sp
    return {key: (index if index >= 0 else None) for key, index in
            (("bos_token_id", sp.bos_id()), ("eos_token_id", sp.eos_id()), ("pad_token_id", sp.pad_id()))}


def write_export(checkpoint, tokenizer, directory: Path, dtype: torch.dtype) -> None:
    """Writes every export file of `checkpoint` into `directory` (which exists and is empty)."""
    from safetensors.torch import save_file

    from pretrain.hf.format import check_weights, hf_config, to_hf

    weights = {name: t.to(dtype).contiguous() for name, t in checkpoint.state_dict.items()
               if isinstance(t, torch.Tensor) and not name.endswith("_extra_state")}
    padded_vocab = check_weights(weights, checkpoint.model, str(checkpoint.path))
    metadata = {"format": "pt", "config": json.dumps(checkpoint.train_config),
                "step": str(checkpoint.step), "source": str(checkpoint.path)}
    save_file(weights, directory / CONSOLIDATED, metadata=metadata)
    save_file(to_hf(weights, checkpoint.model), directory / HF_WEIGHTS, metadata={"format": "pt"})

    special = _special_ids(tokenizer)
    files = {
        "config.json": hf_config(checkpoint.model, padded_vocab, dtype, special),
        "generation_config.json": {k: v for k, v in special.items() if k != "pad_token_id"},
    }
    if tokenizer is not None:
        (directory / "tokenizer.model").write_bytes(tokenizer.model_bytes)
        files |= _tokenizer_files(tokenizer, checkpoint.model.max_seq_len)
    for name, content in files.items():
        (directory / name).write_text(json.dumps(content, indent=2) + "\n")
    for file in directory.iterdir():  # safetensors writes owner-only files; an export is for sharing
        file.chmod(0o644)


def install(staging: Path, out_dir: Path) -> None:
    """Moves the finished `staging` directory to `out_dir`, replacing what --force allowed."""
    if out_dir.exists():
        aside = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
        os.replace(out_dir, aside)
        os.replace(staging, out_dir)
        shutil.rmtree(aside)
    else:
        os.replace(staging, out_dir)


def check_complete(path: Path) -> None:
    """Refuses a checkpoint whose save was interrupted: its manifest is missing or disagrees."""
    from pretrain.checkpoint.files import COMPLETE, PARTIAL, RunDirError, read_manifest
    from pretrain.checkpoint.consolidate import CheckpointError

    if path.name.endswith(PARTIAL):
        raise CheckpointError(f"{path}: incomplete checkpoint (its save was interrupted)")
    if (path / COMPLETE).is_file():
        try:
            read_manifest(path)
        except RunDirError as err:
            raise CheckpointError(str(err)) from None


def export(source: str | os.PathLike, out_dir: str | os.PathLike, *, force: bool = False,
           dtype: torch.dtype = torch.float32, tokenizer_path: str | None = None) -> Path:
    """Exports the checkpoint (or a run directory's newest) to `out_dir`; returns it.

    Raises CheckpointError / FormatError / TokenizerCopyError / FileExistsError with one-line messages.
    """
    from pretrain.checkpoint.consolidate import CheckpointError, find_checkpoint, load_checkpoint, load_tokenizer
    from pretrain.hf.format import FormatError, moe_refusal

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is not a directory")
    below = file_above(out_dir)
    if below is not None:
        raise FileExistsError(f"{out_dir}: lies below the file {below}; expected a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"{out_dir}: exists and is not empty; pass --force to replace it")
    check_complete(find_checkpoint(source))  # a missing or partial checkpoint fails before anything is read
    checkpoint = load_checkpoint(source)
    refusal = moe_refusal(checkpoint.model)
    if refusal:
        raise FormatError(f"{checkpoint.path}: {refusal}")
    beside = checkpoint.path / "tokenizer.model"  # checkpoints carry a copy of the run's tokenizer
    in_run_dir = checkpoint.run_dir is not None and (checkpoint.run_dir / "tokenizer.model").is_file()
    tokenizer = None  # no tokenizer anywhere: weights only, said below
    if tokenizer_path:
        tokenizer = load_tokenizer(checkpoint, tokenizer_path)
    elif beside.is_file():
        try:
            tokenizer = load_tokenizer(checkpoint, str(beside))
        except CheckpointError as err:
            raise TokenizerCopyError(f"{beside}: the checkpoint's copy of the tokenizer is unusable "
                                     f"({errors.first_line(err).removeprefix(f'{beside}: ')}); "
                                     "pass --tokenizer with the run's SentencePiece model") from None
    elif in_run_dir:
        tokenizer = load_tokenizer(checkpoint)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write_export(checkpoint, tokenizer, staging, dtype)
        install(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if tokenizer is None:
        print(f"pretrain-export: note: no tokenizer.model in {checkpoint.path} or a run directory around it; "
              "no tokenizer files were written (pass --tokenizer)", file=sys.stderr, flush=True)
    return out_dir


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pretrain-export", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  pretrain-export runs/default exported/          # newest checkpoint of the run, any layout\n"
               "  pretrain-export runs/default/checkpoints/step_0000300 exported/ --dtype bf16 --force")
    parser.add_argument("checkpoint", help="a run directory (its newest checkpoint) or a checkpoint directory")
    parser.add_argument("out_dir", help="the directory to write (must not exist or be empty)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty out_dir")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="the type of the weights written (default: fp32)")
    parser.add_argument("--tokenizer", help="SentencePiece model (default: the run directory's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    from pretrain.checkpoint.consolidate import CheckpointError
    from pretrain.hf.format import FormatError

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        out_dir = export(args.checkpoint, args.out_dir, force=args.force, dtype=dtype,
                         tokenizer_path=args.tokenizer)
    except (CheckpointError, FormatError, TokenizerCopyError, FileExistsError, FileNotFoundError) as err:
        fail(str(err))
    print(f"exported {args.checkpoint} to {out_dir}", flush=True)
    return out_dir


def cli() -> None:
    main()


if __name__ == "__main__":
    cli()
