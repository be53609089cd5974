"""Packed documents at long sequence lengths: attention cut by a dense s x s mask against the
document path (pretrain.model.document_attention), in one run.

For the tiny model (configs/model/tiny.yaml) at sequence 2k, 8k and 32k, one
sequence of documents of 64 to 2048 tokens per step, fp32 on CPU: the tokens/s
of a forward and backward pass, and its peak memory by a tensor-lifetime trace
(parallel.memory.PeakTrace). The dense path builds the [1, 1, s, s] mask and
SDPA's masked kernel keeps the probabilities, s^2 per head per layer; it is
skipped where that alone would pass `--memory-limit` (default 8 GiB).

    .venv/bin/python -m bench.long_context [--lengths 2048 8192 32768] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from parallel.memory import PeakTrace, format_bytes
from pretrain.model.config import ModelConfig
from pretrain.model.document_attention import dense_document_mask

VOCAB = 4096
EOD = 2


def tiny(seq: int):
    import yaml

    from pretrain.model.llama import LlamaModel, transformer_config

    values = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/model/tiny.yaml").read_text())
    values.update(max_seq_len=seq, vocab_size=VOCAB)
    cfg = ModelConfig(**values)
    return cfg, LlamaModel(cfg, transformer_config(cfg), cfg.padded_vocab_size(VOCAB), seed=1)


def packed_tokens(seq: int, seed: int = 0) -> torch.Tensor:
    """[1, seq + 1] random tokens cut by EOD into documents of 64 to 2048 tokens."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, VOCAB, (1, seq + 1), generator=g)
    cuts = torch.cumsum(torch.randint(64, 2048, (seq // 64,), generator=g), 0)
    tokens[0, cuts[cuts < seq + 1]] = EOD
    return tokens


def packed(seq: int, seed: int = 0):
    from data_pipeline.dataset import EodOptions, eod_masks

    tokens = packed_tokens(seq, seed)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    return inputs, labels, eod_masks(inputs, EodOptions(EOD, True, True, True))


def measure(model, inputs, labels, masks, cut, steps: int) -> tuple[float, int]:
    """(median seconds of a forward and backward pass, peak bytes of one) for attention cut by `cut`."""
    times = []
    for step in range(steps + 1):
        trace = PeakTrace() if step == 0 else None
        start = time.perf_counter()
        if trace is not None:
            trace.__enter__()
        loss = model(inputs, labels, cut, masks["position_ids"], masks["loss_mask"], reduction="mean")
        loss.backward()
        if trace is not None:
            trace.__exit__(None, None, None)
            peak = trace.peak - trace.baseline
        else:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--memory-limit", type=float, default=8.0, help="GiB the dense path may use")
    args = parser.parse_args()
    from parallel.groups import init_process_groups

    init_process_groups(1, 1, torch.device("cpu"))
    print(f"{'seq':>6}  {'documents tok/s':>15} {'peak':>10}  {'dense mask tok/s':>16} {'peak':>10}  "
          f"{'speed-up':>8} {'memory':>7}")
    for seq in args.lengths:
        cfg, model = tiny(seq)
        inputs, labels, masks = packed(seq)
        starts = masks["document_starts"]
        doc_time, doc_peak = measure(model, inputs, labels, masks, starts, args.steps)
        # The mask, and SDPA's probabilities for every head of every layer, fp32.
        dense_needs = seq * seq * (1 + 4 * cfg.num_attention_heads * cfg.num_layers)
        line = f"{seq:>6}  {seq / doc_time:>15,.0f} {format_bytes(doc_peak):>10}  "
        if dense_needs > args.memory_limit * 2**30:
            line += f"{'(needs ' + format_bytes(dense_needs) + ')':>27}"
        else:
            dense_time, dense_peak = measure(model, inputs, labels, masks, dense_document_mask(starts), args.steps)
            line += (f"{seq / dense_time:>16,.0f} {format_bytes(dense_peak):>10}  {dense_time / doc_time:>7.2f}x "
                     f"{dense_peak / doc_peak:>6.1f}x")
        print(line, flush=True)
    print("context parallelism (CP=1 against CP=2 on two processes): not built yet")


if __name__ == "__main__":
    main()
