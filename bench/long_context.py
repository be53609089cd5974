"""Packed documents at long sequence lengths, in one run: attention cut by a dense s x s mask
against the document path (pretrain.model.document_attention) on one process, then context
parallelism (parallel.context) against data parallelism on two.

For the tiny model (configs/model/tiny.yaml) at sequence 2k, 8k and 32k, one
sequence of documents of 64 to 2048 tokens per step, fp32 on CPU: the tokens/s
of a forward and backward pass, and its peak memory by a tensor-lifetime trace
(parallel.memory.PeakTrace). The dense path builds the [1, 1, s, s] mask and
SDPA's masked kernel keeps the probabilities, s^2 per head per layer; it is
skipped where that alone would pass `--memory-limit` (default 8 GiB).

Then on two spawned processes (gloo, one thread each; `bench.long_context_ranks`
says how): the real trainer with `parallel.context=1` (data parallel 2) and
`parallel.context=2` (each sequence split over the two), the same documents cut
at their starts and the same global batch of 2 sequences, micro-batch 1: tokens/s
per rank and the peak bytes per rank of a traced step, against their ideals (the
same tokens/s; the same states with half the activations). And the attention
exchange of one layer at each length: Ulysses' four all-to-alls of queries,
keys, values and output against ring attention's passing of the keys and values,
their times and the bytes each rank sends, each against one plain send/recv of
the same bytes.

Timed steps: `--steps` up to 8k tokens, `--long-steps` above, after one warm-up
pass (traced on one process; on two, a second pass is traced). Two processes time
at least 16k tokens per rank up to 8k (8 steps at 2k).

    .venv/bin/python -m bench.long_context [--lengths 2048 8192 32768] [--steps 3] [--long-steps 2]
        [--parts documents context]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench.long_context_ranks import WORLD
from bench.plan_cpu_measure import OtherWork
from parallel.memory import PeakTrace, format_bytes
from pretrain.model.config import ModelConfig
from pretrain.model.document_attention import dense_document_mask

VOCAB = 4096
EOD = 2
GLOBAL_BATCH = 2  # sequences per step there: one per rank under CP=1, two micro-batches under CP=2


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


def timed_steps(seq: int, args) -> int:
    return args.steps if seq <= 8192 else args.long_steps


def context_steps(seq: int, args) -> int:
    """Timed steps of a two-process layout: as `timed_steps`, but at least 16k tokens per rank
    (a step of 2k tokens takes under a second there)."""
    return max(timed_steps(seq, args), 16384 // seq) if seq <= 8192 else args.long_steps


def documents_against_dense(args) -> None:
    from parallel.groups import init_process_groups

    init_process_groups(1, 1, torch.device("cpu"))
    print(f"{'seq':>6}  {'documents tok/s':>15} {'peak':>10}  {'dense mask tok/s':>16} {'peak':>10}  "
          f"{'speed-up':>8} {'memory':>7}")
    for seq in args.lengths:
        cfg, model = tiny(seq)
        inputs, labels, masks = packed(seq)
        starts = masks["document_starts"]
        doc_time, doc_peak = measure(model, inputs, labels, masks, starts, timed_steps(seq, args))
        # The mask, and SDPA's probabilities for every head of every layer, fp32.
        dense_needs = seq * seq * (1 + 4 * cfg.num_attention_heads * cfg.num_layers)
        line = f"{seq:>6}  {seq / doc_time:>15,.0f} {format_bytes(doc_peak):>10}  "
        if dense_needs > args.memory_limit * 2**30:
            line += f"{'(needs ' + format_bytes(dense_needs) + ')':>27}"
        else:
            dense_time, dense_peak = measure(model, inputs, labels, masks, dense_document_mask(starts),
                                          timed_steps(seq, args))
            line += (f"{seq / dense_time:>16,.0f} {format_bytes(dense_peak):>10}  {dense_time / doc_time:>7.2f}x "
                     f"{dense_peak / doc_peak:>6.1f}x")
        print(line, flush=True)


def context_config(seq: int, context: int):
    """The config `pretrain` would run the tiny model with at `seq` on two processes: documents
    cut at their starts (all three end-of-document options), micro-batch 1, a global batch of
    2 sequences, eager, no evaluation."""
    from bench.product_loop import compose

    cfg = compose([f"model.max_seq_len={seq}", f"model.vocab_size={VOCAB}", f"data.seq_len={seq}",
                   "data.eod_mask_loss=true", "data.reset_position_ids=true", "data.reset_attention_mask=true",
                   f"parallel.context={context}", "trainer.micro_batch_size=1",
                   f"trainer.global_batch_size={GLOBAL_BATCH}", "trainer.device=cpu", "trainer.compile=none",
                   "trainer.eval_interval=0", "trainer.log_interval=100000", "logger.kind=console"])
    cfg.validate_world(WORLD)
    return cfg


def context_parallel(args) -> None:
    """CP=1 (data parallel 2) against CP=2 on two processes, and the attention exchanges."""
    from bench.long_context_ranks import run_ranks

    plan = []
    for seq in args.lengths:
        configs = {cp: context_config(seq, cp) for cp in (1, 2)}
        m = configs[2].model
        plan.append({"seq": seq, "configs": configs, "warmup": 1, "steps": context_steps(seq, args),
                     "rounds": args.rounds, "layers": m.num_layers,
                     "model": {"heads": m.num_attention_heads, "groups": m.query_groups, "head_dim": m.head_dim}})
    print(f"\ncontext parallelism: the trainer on {WORLD} processes (gloo, 1 thread each), documents, micro-batch 1, "
          f"global batch {GLOBAL_BATCH} sequences; per layout 1 warm-up step, 1 traced, then timed: "
          + ", ".join(f"{entry['steps']} at {entry['seq']}" for entry in plan), flush=True)
    started = time.perf_counter()
    ranks = run_ranks(plan, VOCAB, EOD)
    print(f"{'seq':>6}  {'CP=1 (DP=2) tok/s':>17} {'peak':>10}  {'CP=2 tok/s':>10} {'peak':>10}  "
          f"{'speed':>6} {'memory':>7} {'ideal':>6}")
    cp2_steps = []
    for k, entry in enumerate(plan):
        runs = {cp: [rank[k]["train"][cp] for rank in ranks] for cp in (1, 2)}
        step = {cp: statistics.median(r[0]["times"]) for cp, r in runs.items()}  # the ranks end each step together
        per_rank = {cp: runs[cp][0]["tokens_per_step"] / WORLD / step[cp] for cp in (1, 2)}
        peak = {cp: max(x["peak"] for x in r) for cp, r in runs.items()}
        states = {cp: max(x["baseline"] for x in r) for cp, r in runs.items()}
        ideal = (states[2] + (peak[1] - states[1]) / 2) / peak[1]
        print(f"{entry['seq']:>6}  {per_rank[1]:>17,.0f} {format_bytes(peak[1]):>10}  {per_rank[2]:>10,.0f} "
              f"{format_bytes(peak[2]):>10}  {per_rank[2] / per_rank[1]:>5.2f}x {peak[2] / peak[1]:>6.2f}x "
              f"{ideal:>5.2f}x", flush=True)
        cp2_steps.append(step[2])
    print("tok/s and peak: per rank (the larger rank's peak); speed: CP=2 / CP=1 tokens/s, ideal 1.00 (the same "
          "work per rank); memory: CP=2 / CP=1 peak, ideal: the same states with each rank's activations halved")
    m = plan[0]["model"]
    print(f"\nattention exchange of one layer, forward, on {WORLD} ranks (fp32, micro-batch 1, {m['heads']} heads "
          f"and {m['groups']} key-value groups of {m['head_dim']}): Ulysses = 4 all_to_all_single (q, k, v, "
          f"output); ring = cp - 1 send/recv steps of k and v")
    print(f"{'seq':>6}  {'Ulysses ms':>10} {'sent':>9} {'of link':>7} {'DeepSpeed ms':>12}  {'ring ms':>8} {'sent':>9} "
          f"{'of link':>7}  {'ring/Ulysses time':>17} {'bytes':>5}  {'in CP=2 step':>12}")
    for k, entry in enumerate(plan):
        x = ranks[0][k]["exchange"]
        t = x["seconds"]
        # The exchange runs forward and backward in every layer for each micro-batch of a step.
        in_step = t["ulysses_deepspeed"] * entry["layers"] * 2 * GLOBAL_BATCH / cp2_steps[k]
        print(f"{entry['seq']:>6}  {1e3 * t['ulysses']:>10.2f} {format_bytes(x['ulysses_bytes']):>9} "
              f"{t['ulysses_link'] / t['ulysses']:>7.2f} {1e3 * t['ulysses_deepspeed']:>12.2f}  "
              f"{1e3 * t['ring']:>8.2f} {format_bytes(x['ring_bytes']):>9} {t['ring_link'] / t['ring']:>7.2f}  "
              f"{t['ring'] / t['ulysses']:>16.2f}x {x['ring_bytes'] / x['ulysses_bytes']:>4.2f}x  "
              f"{100 * in_step:>11.1f}%", flush=True)
    print("sent: bytes leaving each rank; of link: the time of one send/recv of the same bytes / the exchange's; "
          "DeepSpeed: Ulysses as DeepSpeed's single_all_to_all runs it (layout copies included); in CP=2 step: "
          "that x layers x 2 (forward, backward) x 2 micro-batches / the CP=2 step time")
    spent = ", ".join(
        f"{entry['seq']}: " + " + ".join(f"{r['build_s']:.0f} + {r['fit_s']:.0f}" for r in ranks[0][k]["train"].values())
        + f" + {ranks[0][k]['exchange']['wall_s']:.0f}" for k, entry in enumerate(plan))
    print(f"two processes: {time.perf_counter() - started:.0f} s (rank 0's seconds building and training CP=1, "
          f"CP=2, then exchanging: {spent})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--steps", type=int, default=3, help="timed steps up to 8k tokens")
    parser.add_argument("--long-steps", type=int, default=2, help="timed steps above 8k tokens")
    parser.add_argument("--memory-limit", type=float, default=8.0, help="GiB the dense path may use")
    parser.add_argument("--parts", nargs="+", choices=["documents", "context"], default=["documents", "context"],
                        help="documents: dense mask against documents, one process; context: CP=1 against CP=2 "
                             "and the attention exchanges, two processes")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds of the exchange timings")
    args = parser.parse_args()
    if "documents" in args.parts:
        with OtherWork():
            documents_against_dense(args)
    if "context" in args.parts:
        with OtherWork():
            context_parallel(args)


if __name__ == "__main__":
    main()
