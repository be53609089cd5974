"""`pretrain-eval`: loss and perplexity of a checkpoint on held-out tokens.

    pretrain-eval runs/default --data .cache/data/<dir>/valid
    pretrain-eval runs/default --text notes.txt --json

`--data` takes a token shard prefix (`.bin`/`.idx`) and reads it as training
does: documents packed in order into sequences of seq_len + 1 tokens. With
`--batches` and `--batch-size` equal to the run's `trainer.eval_batches` and
`trainer.micro_batch_size`, it scores exactly the batches the trainer's
validation scored. `--text` tokenizes a text file with the run's tokenizer as
one document. The model is the training `LlamaModel`, in one process, with
the weights of any parallel layout consolidated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from pathlib import Path
from typing import Iterator, NoReturn

import numpy as np
import torch

from common import errors



def fail(message: str) -> NoReturn:
    errors.fail("pretrain-eval", message)


def shard_batches(dataset, batch_size: int, num_batches: int | None) -> Iterator[np.ndarray]:
    """Blocks [b, seq_len + 1] of a packed dataset in order.

    `num_batches` None: every sample once (the last batch may be smaller);
    otherwise exactly that many full batches, wrapping around as the trainer's
    fixed validation batches do.
    """
    if num_batches is None:
        for first in range(0, len(dataset), batch_size):
            yield np.stack([dataset[i] for i in range(first, min(first + batch_size, len(dataset)))])
    else:
        for b in range(num_batches):
            yield np.stack([dataset[b * batch_size + i] for i in range(batch_size)])


def text_batches(tokens: np.ndarray, seq_len: int, batch_size: int) -> Iterator[np.ndarray]:
    """Windows of seq_len + 1 tokens sharing one token (every token after the first is a target once)."""
    full = (len(tokens) - 1) // seq_len
    windows = [tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range(full)]
    for first in range(0, len(windows), batch_size):
        yield np.stack(windows[first:first + batch_size])
    tail = tokens[full * seq_len:]
    if len(tail) > 1:  # the rest, as one shorter sequence
        yield tail[None, :]


@torch.no_grad()
def evaluate(model, batches: Iterator[np.ndarray], device: torch.device) -> tuple[float, int, int]:
    """Mean per-token loss over all targets, the number of targets, and of sequences."""
    total, tokens, sequences = 0.0, 0, 0
    for block in batches:
        block = torch.from_numpy(np.ascontiguousarray(block, dtype=np.int64)).to(device)
        per_token = model(block[:, :-1], block[:, 1:])
        total += per_token.double().sum().item()
        tokens += per_token.numel()
        sequences += block.shape[0]
    return total / tokens, tokens, sequences


def validation_batches(train_config: dict) -> Iterator[np.ndarray]:
    """The fixed held-out batches the trainer evaluated on (data-parallel size 1)."""
    from data_pipeline.dataset import fixed_batches
    from pretrain.config import Config, from_dict
    from data_pipeline.training_data import training_data

    cfg = from_dict(Config, train_config)
    valid = training_data(cfg.data, log=lambda *_: None).valid
    for batch in fixed_batches(valid, cfg.trainer.micro_batch_size, cfg.trainer.eval_batches):
        yield torch.cat([batch["tokens"], batch["labels"][:, -1:]], dim=1).numpy()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pretrain-eval", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  pretrain-eval runs/default --valid                      # the run's own validation batches\n"
               "  pretrain-eval runs/default --data .cache/data/<dir>/valid --batches 8 --batch-size 8\n"
               "  pretrain-eval runs/default/checkpoints/step_0000300 --text notes.txt --json")
    parser.add_argument("checkpoint", help="a run directory (its newest checkpoint) or a checkpoint directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="token shard prefix (PREFIX.bin and PREFIX.idx)")
    source.add_argument("--text", help="a UTF-8 text file, scored as one document")
    source.add_argument("--valid", action="store_true",
                        help="the run's own validation batches, as the trainer evaluates them")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the run's data.seq_len)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default: 8)")
    parser.add_argument("--batches", type=int, help="score this many batches (default: all of --data once)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the model runs (default: auto, a GPU when there is one)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="the weights' and activations' type (default: fp32)")
    parser.add_argument("--tokenizer", help="SentencePiece model for --text (default: the run directory's)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = parser.parse_args(argv)
    for key in ("seq_len", "batch_size", "batches"):
        value = getattr(args, key)
        if value is not None and value <= 0:
            fail(f"--{key.replace('_', '-')}={value}: expected > 0")
    if args.data is not None:
        for suffix in (".idx", ".bin"):
            if not os.path.isfile(args.data + suffix):
                fail(f"{args.data}{suffix}: shard file not found")
    if args.text is not None:
        try:
            args.text_content = Path(args.text).read_text(encoding="utf-8")
        except UnicodeDecodeError as err:  # worded as the data pipeline words it
            fail(f"{args.text}: not UTF-8 text ({err.reason} at byte {err.start})")
        except OSError as err:
            fail(f"{args.text}: {err.strerror or err}")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device=cuda: no CUDA device is visible")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from pretrain.checkpoint.consolidate import CheckpointError, find_checkpoint, load_checkpoint, load_tokenizer

    try:
        find_checkpoint(args.checkpoint)
    except CheckpointError as err:
        fail(str(err))
    # Heavy imports only once the arguments are known to be good. megatron-core
    # warns about optional CUDA libraries and settings this model does not use.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    from data_pipeline.dataset import PackedSequenceDataset
    from data_pipeline.indexed import ShardError, open_shard
    from parallel.groups import init_process_groups
    from pretrain.model.llama import LlamaModel, transformer_config

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    try:
        checkpoint = load_checkpoint(args.checkpoint, dtype)
        seq_len = args.seq_len or checkpoint.train_config.get("data", {}).get("seq_len", 0)
        if not 0 < seq_len <= checkpoint.model.max_seq_len:
            raise CheckpointError(f"--seq-len={seq_len}: expected 1..{checkpoint.model.max_seq_len}"
                                  " (model.max_seq_len)")
        if args.valid:
            batches = validation_batches(checkpoint.train_config)
        elif args.data is not None:
            dataset = PackedSequenceDataset(open_shard(args.data), seq_len, seed=0, shuffle=False)
            batches = shard_batches(dataset, args.batch_size, args.batches)
        else:
            tokenizer = load_tokenizer(checkpoint, args.tokenizer)
            # As in training: the document ends in EOS and follows another document's EOS.
            ids = [tokenizer.eos_id] + tokenizer.encode([args.text_content])[0] + [tokenizer.eos_id]
            if len(ids) < 3:
                raise CheckpointError(f"{args.text}: no text to score")
            batches = text_batches(np.asarray(ids, dtype=np.int64), seq_len, args.batch_size)
            if args.batches is not None:
                batches = (b for _, b in zip(range(args.batches), batches))
    except (CheckpointError, ShardError, ValueError, FileNotFoundError) as err:
        fail(str(err))

    init_process_groups(1, 1, device)  # megatron-core's layers need their (one-rank) groups
    model = LlamaModel(checkpoint.model, transformer_config(checkpoint.model, params_dtype=dtype),
                       checkpoint.padded_vocab_size)
    model.load_state_dict(checkpoint.state_dict, strict=True)
    model.to(device).eval()
    loss, tokens, sequences = evaluate(model, batches, device)
    result = {
        "checkpoint": str(checkpoint.path),
        "step": checkpoint.step,
        "data": "validation" if args.valid else args.data or args.text,
        "loss": loss,
        "ppl": math.exp(min(loss, 50)),  # capped as in training, so a diverged model still prints
        "tokens": tokens,
        "sequences": sequences,
        "seq_len": seq_len,
    }
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(f"{result['data']}: loss {loss:.4f}  ppl {result['ppl']:.2f}  ({tokens:,} tokens in "
              f"{sequences} sequences of up to {seq_len}; {checkpoint.path}, step {checkpoint.step})",
              flush=True)
    return result


def cli() -> None:
    main()


if __name__ == "__main__":
    cli()
