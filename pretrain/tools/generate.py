"""`pretrain-generate`: sample text from a checkpoint.

    pretrain-generate runs/default --prompt "def fibonacci(n):" --max-new-tokens 80
    pretrain-generate runs/default/checkpoints/step_0000300 --prompt "import os" --temperature 0

Temperature 0 is greedy decoding, which is deterministic; otherwise sampling
with top-k and nucleus (top-p) filtering is reproducible through `--seed`.
A checkpoint of any parallel layout is consolidated into one process.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

import torch

from common import errors



def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits [b, v] with everything outside the top-k and the top-p nucleus set to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the more likely ones already reach top_p; the most likely always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator) -> torch.Tensor:
    """One token id per row of logits [b, v]."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    decoder,
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    use_cache: bool = True,
    stop_ids: tuple[int, ...] = (),
    vocab_size: int | None = None,
) -> list[int]:
    """New token ids continuing `prompt` (stopping after a stop id).

    Without the cache every step recomputes the whole sequence; with it, the
    prompt is processed once and each step feeds only the newest token. Both
    give the same tokens. Ids at or past `vocab_size` (the embedding's padding)
    are never produced.
    """
    device = decoder.device
    generator = torch.Generator(device=device).manual_seed(seed)
    sequence = torch.tensor([prompt], dtype=torch.long, device=device)
    cache = decoder.new_cache(1, len(prompt) + max_new_tokens) if use_cache else None
    feed = sequence
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = decoder(feed, cache)[:, -1].float()
        if vocab_size is not None:
            logits[:, vocab_size:] = float("-inf")
        token = next_token(logits, temperature, top_k, top_p, generator)
        new.append(int(token))
        if new[-1] in stop_ids:
            break
        sequence = torch.cat((sequence, token[:, None]), dim=1)
        feed = token[:, None] if use_cache else sequence
    return new


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pretrain-generate", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               '  pretrain-generate runs/default --prompt "def fibonacci(n):" --max-new-tokens 80\n'
               '  pretrain-generate runs/default/checkpoints/step_0000300 --prompt "import os" --temperature 0\n'
               '  pretrain-generate runs/default --temperature 0.8 --top-p 0.95 --seed 7')
    parser.add_argument("checkpoint", help="a run directory (its newest checkpoint) or a checkpoint directory")
    parser.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=100,
                        help="tokens to generate, cut (with a note) so that prompt and output fit "
                             "model.max_seq_len (default: 100)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="sampling temperature; 0: greedy, deterministic (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=50, help="sample from the k likeliest tokens; 0: no top-k "
                                                              "filtering (default: 50)")
    parser.add_argument("--top-p", type=float, default=0.95,
                        help="nucleus sampling: the likeliest tokens up to this probability mass; 1: no nucleus "
                             "filtering (default: 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the sampling (default: 0)")
    parser.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence every step")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the model runs (default: auto, a GPU when there is one)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="the weights' and activations' type (default: fp32)")
    parser.add_argument("--tokenizer", help="SentencePiece model (default: the run directory's)")
    args = parser.parse_args(argv)
    for key in ("max_new_tokens", "top_k"):
        if getattr(args, key) < 0:
            fail(f"--{key.replace('_', '-')}={getattr(args, key)}: expected >= 0")
    if args.temperature < 0:
        fail(f"--temperature={args.temperature}: expected >= 0")
    if not 0 < args.top_p <= 1:
        fail(f"--top-p={args.top_p}: expected in (0, 1]")
    return args


def fail(message: str) -> NoReturn:
    errors.fail("pretrain-generate", message)


def note(message: str) -> None:
    """One line on stderr about something done otherwise than asked; the command goes on."""
    print(f"pretrain-generate: note: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    from pretrain.checkpoint.consolidate import load_checkpoint, load_tokenizer
    from pretrain.model.decode import Decoder

    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device=cuda: no CUDA device is visible")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    try:
        checkpoint = load_checkpoint(args.checkpoint)
        tokenizer = load_tokenizer(checkpoint, args.tokenizer)
    except (errors.UserError, FileNotFoundError) as err:  # CheckpointError is a UserError
        fail(str(err))
    # Training documents each end in EOS, so EOS before the prompt reads as
    # "a new document starts here", and EOS after it ends the text.
    prompt = [tokenizer.eos_id] + tokenizer.encode([args.prompt])[0]
    max_seq_len = checkpoint.model.max_seq_len
    room = max_seq_len - len(prompt)
    if room <= 0:
        fail(f"--prompt: {len(prompt)} tokens; the model takes at most {max_seq_len}")
    if args.max_new_tokens > room:
        note(f"--max-new-tokens={args.max_new_tokens} cut to {room} "
             f"(model.max_seq_len={max_seq_len} minus the prompt's {len(prompt)} tokens)")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    decoder = Decoder(checkpoint.model, checkpoint.state_dict, device, dtype)
    new = generate(
        decoder, prompt, min(args.max_new_tokens, room),
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        use_cache=not args.no_kv_cache, stop_ids=(tokenizer.eos_id,), vocab_size=tokenizer.vocab_size,
    )
    text = tokenizer.decode(prompt[1:] + new)
    print(text, flush=True)
    return text


def cli() -> None:
    main()


if __name__ == "__main__":
    cli()
