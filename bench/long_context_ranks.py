"""The two-process part of `bench.long_context`: context parallelism against data parallelism,
and the attention exchange of Ulysses against ring attention's, on one group of two ranks.

`run_ranks` spawns the two ranks once (gloo, one thread each, as torchrun would start
them) and each runs `rank_main` over every sequence length:

- Training. For CP=1 (data parallel 2) and CP=2 (each sequence split over the two
  ranks), the real trainer (`pretrain.training.build.build_trainer`, config composed
  as `pretrain` composes it, `parallel.context` set) trains the tiny model on packed
  documents with all three end-of-document options. Both layouts take the same
  global batch, 2 sequences of micro-batch 1: under CP=1 a sequence per rank, under
  CP=2 two micro-batches, each sequence in halves. The first steps warm up, the next
  one is traced for its peak bytes (`parallel.memory.PeakTrace` over the engine's
  states, as `PeakMemoryReport` does), and the rest are timed by the trainer's own
  `step_time`. Eager (`trainer.compile=none`, what `auto` picks on two processes).
- The exchange, for one layer's slices of the tiny model's queries, keys, values and
  output in fp32 (what `parallel.context.UlyssesAttention` exchanges at micro-batch
  1): (a) Ulysses, four `all_to_all_single`, raw and as DeepSpeed's
  `single_all_to_all` runs them (its layout copies included); (b) ring attention's,
  cp - 1 steps passing the key and value slices on (`batch_isend_irecv`); and the
  ceiling for each: one flat send/recv pair of the same bytes. Rounds alternate the
  five; each times several repetitions after a barrier, and the median round counts.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

WORLD = 2
START_TIMEOUT_S = 900.0


# --- the data: packed documents, as the one-process bench cuts them -----------------------------

class PackedDocuments:
    """Sample i: `bench.long_context.packed_tokens(seq, seed=i)`, batched with the three
    end-of-document options (loss mask, position ids, document starts)."""

    def __init__(self, seq: int, vocab: int, eod: int):
        self.seq, self.vocab, self.eod = seq, vocab, eod

    def __len__(self) -> int:
        return 1 << 20

    def __getitem__(self, index: int) -> np.ndarray:
        from bench.long_context import packed_tokens

        return packed_tokens(self.seq, seed=index)[0].numpy()

    def collate(self, samples: list[np.ndarray]) -> dict[str, torch.Tensor]:
        from data_pipeline.dataset import EodOptions, collate

        return collate(samples, EodOptions(self.eod, True, True, True))


# --- training one layout ------------------------------------------------------------------------

class StepRecorder:
    """Traces step `warmup + 1` for its peak bytes (by then DeepSpeed and the optimizer hold all
    their states), and records the trainer's `step_time` of every later step. The traced step
    is not timed: the trace adds a Python call per operator and per storage."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.trace = None
        self.peak = self.baseline = 0
        self.times: list[float] = []

    def on_train_start(self, trainer) -> None:
        if self.warmup == 0:
            self._start(trainer)

    def _start(self, trainer) -> None:
        from parallel.memory import PeakTrace

        self.trace = PeakTrace(trainer.engine.deepspeed)
        self.trace.__enter__()

    def on_step_end(self, trainer, metrics: dict) -> None:
        step = metrics["step"]
        if step > self.warmup + 1:
            self.times.append(float(metrics["step_time"]))
        if step == self.warmup + 1:
            self.trace.__exit__(None, None, None)
            self.peak, self.baseline, self.trace = self.trace.peak, self.trace.baseline, None
        if step == self.warmup:
            self._start(trainer)

    def on_train_end(self, trainer) -> None:
        if self.trace is not None:
            self.trace.__exit__(None, None, None)
            self.trace = None


def train_layout(cfg, warmup: int, steps: int, vocab: int, eod: int, run_dir: str) -> dict[str, Any]:
    """This rank's peak bytes of the step after `warmup` and the times of `steps` steps after it."""
    from data_pipeline.training_data import TrainingData
    from parallel.groups import init_layout_groups
    from pretrain.training.build import build_trainer

    began = time.perf_counter()
    cfg.trainer.run_dir = run_dir
    cfg.trainer.train_steps = warmup + 1 + steps
    topology = init_layout_groups(cfg.parallel, torch.device("cpu"))
    cfg.validate_world(topology.world_size)
    data = PackedDocuments(cfg.data.seq_len, vocab, eod)
    recorder = StepRecorder(warmup)
    trainer = build_trainer(cfg, topology, TrainingData(train=data, valid=data, vocab_size=vocab),
                            callbacks=[recorder])
    built = time.perf_counter()
    trainer.fit()
    tokens_per_step = trainer.tokens_per_step
    del trainer
    return {"times": recorder.times, "peak": recorder.peak, "baseline": recorder.baseline,
            "tokens_per_step": tokens_per_step, "build_s": built - began, "fit_s": time.perf_counter() - built}


# --- the exchange -------------------------------------------------------------------------------

def _timed(fn, repeats: int) -> float:
    """Seconds per call of `fn` (a blocking exchange), over `repeats` calls after a barrier."""
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def exchanges(seq: int, heads: int, groups: int, head_dim: int, group, rounds: int) -> dict[str, Any]:
    """Seconds per layer of each exchange and the bytes each rank sends, for this rank's slice
    of one sequence (micro-batch 1, fp32)."""
    from deepspeed.sequence.layer import single_all_to_all

    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    local = seq // cp
    kv_heads = max(groups, cp)  # groups fewer than cp are repeated before the exchange
    g = torch.Generator().manual_seed(rank)
    query = torch.randn(local, 1, heads, head_dim, generator=g)
    key, value = (torch.randn(local, 1, kv_heads, head_dim, generator=g) for _ in range(2))
    output = torch.randn(local, 1, heads * head_dim, generator=g)
    # What the local attention returns on this rank: [s, b, heads / cp, d].
    attended = torch.randn(seq, 1, heads // cp, head_dim, generator=g)

    def ulysses_raw() -> None:
        for t in (query, key, value, output):
            dist.all_to_all_single(torch.empty_like(t), t, group=group)

    def ulysses_deepspeed() -> None:
        for t in (query, key, value):
            single_all_to_all(t, 2, 0, 1, group)
        single_all_to_all(attended, 0, 2, 1, group)

    successor = dist.get_global_rank(group, (rank + 1) % cp)
    predecessor = dist.get_global_rank(group, (rank - 1) % cp)

    def ring() -> None:
        k, v = key, value
        for _ in range(cp - 1):
            k_next, v_next = torch.empty_like(k), torch.empty_like(v)
            ops = [dist.P2POp(dist.isend, k, successor, group), dist.P2POp(dist.isend, v, successor, group),
                   dist.P2POp(dist.irecv, k_next, predecessor, group),
                   dist.P2POp(dist.irecv, v_next, predecessor, group)]
            for request in dist.batch_isend_irecv(ops):
                request.wait()
            k, v = k_next, v_next

    def flat(nbytes: int):
        """One send/recv pair of `nbytes` each way: the link's ceiling for that many bytes."""
        out, into = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)

        def send_receive() -> None:
            for request in dist.batch_isend_irecv([dist.P2POp(dist.isend, out, successor, group),
                                                   dist.P2POp(dist.irecv, into, predecessor, group)]):
                request.wait()
        return send_receive

    size = 4  # fp32
    # Bytes leaving this rank: an all-to-all keeps 1/cp of each tensor; a ring step passes k and v on.
    ulysses_bytes = sum(t.numel() for t in (query, key, value, output)) * size * (cp - 1) // cp
    ring_bytes = (cp - 1) * (key.numel() + value.numel()) * size
    runs = {"ulysses": ulysses_raw, "ulysses_deepspeed": ulysses_deepspeed, "ring": ring,
            "ulysses_link": flat(ulysses_bytes), "ring_link": flat(ring_bytes)}
    repeats = max(2, min(20, (64 << 20) // max(ulysses_bytes, 1)))
    for fn in runs.values():  # warm-up: connections, buffers
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            times[name].append(_timed(fn, repeats))
    return {"seconds": {name: statistics.median(t) for name, t in times.items()},
            "ulysses_bytes": ulysses_bytes, "ring_bytes": ring_bytes,
            "tensor_bytes": {"query": query.numel() * size, "key": key.numel() * size,
                             "value": value.numel() * size, "output": output.numel() * size}}


# --- one rank -----------------------------------------------------------------------------------

def rank_main(plan: list[dict], vocab: int, eod: int, run_root: str) -> list[dict]:
    """Every setting of `plan` in order: {"seq", "configs": {cp: Config}, "warmup", "steps",
    "rounds"}; returns per seq {"seq", "train": {cp: result}, "exchange": result}."""
    from megatron.core import parallel_state

    from parallel.groups import init_process_groups

    results = []
    for entry in plan:
        seq, out = entry["seq"], {"seq": entry["seq"], "train": {}}
        for cp, cfg in entry["configs"].items():
            run_dir = str(Path(run_root) / f"seq{seq}-cp{cp}")
            out["train"][cp] = train_layout(cfg, entry["warmup"], entry["steps"], vocab, eod, run_dir)
        m = entry["model"]
        began = time.perf_counter()
        init_process_groups(1, 1, torch.device("cpu"), WORLD)
        out["exchange"] = exchanges(seq, m["heads"], m["groups"], m["head_dim"],
                                    parallel_state.get_context_parallel_group(), entry["rounds"])
        out["exchange"]["wall_s"] = time.perf_counter() - began
        results.append(out)
    return results


def _rank_process(rank: int, port: int, results, log_path: str, args: tuple) -> None:
    from bench.plan_cpu_measure import spawned_rank

    spawned_rank(rank, WORLD, port, log_path)
    try:
        results.put((rank, "ok", rank_main(*args)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        from parallel.groups import destroy_process_groups

        destroy_process_groups()


def run_ranks(plan: list[dict], vocab: int, eod: int) -> list[list[dict]]:
    """`rank_main(plan, ...)` on two spawned ranks; each rank's results, in rank order. Raises
    with a failing rank's traceback and the tail of its log."""
    import torch.multiprocessing as mp

    from bench.plan_cpu_measure import collect_ranks, one_thread_environ
    from common.net import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="long_context-") as root:
        logs = [Path(root) / f"rank{rank}.log" for rank in range(WORLD)]
        procs = [ctx.Process(target=_rank_process, daemon=True,
                             args=(rank, port, results, str(logs[rank]), (plan, vocab, eod, root)))
                 for rank in range(WORLD)]
        with one_thread_environ():
            for proc in procs:
                proc.start()
        return collect_ranks(procs, results, logs, START_TIMEOUT_S)
