"""`pretrain`'s training loop against a plain-PyTorch loop of the same model, in one run.

Product: the real `Trainer` built from the default config (Hydra-composed, as
`pretrain` runs it): megatron-core model, DeepSpeed engine, `Trainer.fit` with
its metrics, console progress and metrics.jsonl; evaluation and checkpoint
saving are left out, as the reference does neither.

Reference: `bench.reference_llama.ReferenceLlama` (plain torch.nn, eager)
starting from the product's initial weights, fed the same batches, with
torch's AdamW under the same hyper-parameters, parameter groups, schedule and
gradient clipping (`bench.reference_loop`), in a process of its own that
waits while the product runs.

The two train in alternating chunks (ABBA order) so that load from other
processes falls on both alike. After the same number of steps both are
evaluated on the run's fixed validation batches.

    .venv/bin/python -m bench.cpu_throughput [--steps 300] [--chunk 20] [HYDRA OVERRIDES ...]
    .venv/bin/python -m bench.cpu_throughput trainer.compile=none   # the product without compile
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import warnings

warnings.filterwarnings("ignore")

import torch

from bench.product_loop import build_trainer, compose, run_steps
from bench.reference_loop import ReferenceProcess, timed


class LossLog:
    def __init__(self):
        self.losses: list[float] = []

    def log(self, record: dict) -> None:
        if "loss" in record:
            self.losses.append(record["loss"])

    on_train_start = on_step_end = on_train_end = lambda *_: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="default: trainer.train_steps")
    parser.add_argument("--chunk", type=int, default=20, help="steps per timed chunk")
    parser.add_argument("--warmup", type=int, default=10, help="untimed first steps (compilation)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for `pretrain`")
    args = parser.parse_args()
    cfg = compose(args.overrides)
    steps = args.steps or cfg.trainer.train_steps
    cfg.trainer.train_steps = steps  # the schedule of both spans exactly the benchmark

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(cfg, run_dir)
        padded_vocab = trainer.engine.module.padded_vocab_size
        reference = ReferenceProcess(cfg, trainer.engine.module, padded_vocab)
        product_losses = LossLog()
        trainer.sinks.append(product_losses)

        initial_valid = (trainer.evaluate(), reference.evaluate(trainer.valid_batches))
        warm = min(args.warmup, steps)
        warmup_seconds = (timed(run_steps, trainer, warm)[0], reference.train(warm)[0])
        # Per side, per chunk: (steps, wall seconds, cpu seconds).
        chunks: dict[str, list[tuple[int, float, float]]] = {"product": [], "reference": []}
        done, round_ = warm, 0
        while done < steps:
            n = min(args.chunk, steps - done)
            order = ("product", "reference") if round_ % 2 == 0 else ("reference", "product")
            for side in order:
                seconds = timed(run_steps, trainer, n) if side == "product" else reference.train(n)
                chunks[side].append((n, *seconds))
            done, round_ = done + n, round_ + 1
        product_valid = trainer.evaluate()
        reference_valid = reference.evaluate(trainer.valid_batches)
        reference_losses = reference.losses()
        reference.close()

    tokens_per_step = cfg.trainer.global_batch_size * cfg.data.seq_len
    total = {side: [sum(c[i] for c in cs) for i in range(3)] for side, cs in chunks.items()}
    wall_rate = {side: n * tokens_per_step / wall for side, (n, wall, _) in total.items()}
    cpu_rate = {side: n * tokens_per_step / cpu for side, (n, _, cpu) in total.items()}
    # Adjacent chunks ran under nearly the same load: their ratio is the least noisy estimate.
    round_ratios = [r[1] / p[1] for p, r in zip(chunks["product"], chunks["reference"])]
    ratio = statistics.median(round_ratios)
    last = lambda losses: statistics.fmean(losses[-10:])  # noqa: E731
    m, t = cfg.model, cfg.trainer
    print(f"model               {m.name}: {m.num_layers} layers x {m.hidden_size}, vocab {padded_vocab}, "
          f"seq {cfg.data.seq_len}, global batch {t.global_batch_size} (micro {t.micro_batch_size}), "
          f"compile={t.compile}, precision={cfg.parallel.precision}")
    print(f"steps               {steps}: {warm} untimed warm-up (product {warmup_seconds[0]:.1f} s, "
          f"reference {warmup_seconds[1]:.1f} s), then {len(round_ratios)} rounds of {args.chunk}, alternating")
    print(f"machine             {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    for side in ("product", "reference"):
        per_step = sorted(wall / n * 1000 for n, wall, _ in chunks[side])
        print(f"{side:<19} {wall_rate[side]:>8,.0f} tokens/s  {cpu_rate[side]:>8,.0f} tokens per CPU-s  "
              f"(ms/step by chunk: median {statistics.median(per_step):.0f}, best {per_step[0]:.0f})")
    print(f"train loss          product {last(product_losses.losses):.4f}  "
          f"reference {last(reference_losses):.4f}  (mean of the last 10 steps)")
    print(f"validation loss     product {product_valid:.4f}  reference {reference_valid:.4f}  "
          f"(after {steps} steps; at step 0: {initial_valid[0]:.4f} and {initial_valid[1]:.4f})")
    print(f"ratio               {ratio:.2f}x median of rounds (range {min(round_ratios):.2f}-"
          f"{max(round_ratios):.2f}); {wall_rate['product'] / wall_rate['reference']:.2f}x wall-clock totals; "
          f"{cpu_rate['product'] / cpu_rate['reference']:.2f}x CPU time  (target >= 1.2, loss no worse)")


if __name__ == "__main__":
    main()
