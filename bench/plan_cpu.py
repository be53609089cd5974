"""The step-time model on this machine: calibrated on one process, checked on multi-rank layouts.

In one run:

1. This machine's ceilings, measured: the fp32 matrix-product rate of one
   thread (n = 512: the device's peak), one thread's copy bandwidth, and gloo's
   all-reduce time between two processes from 4 bytes to 16 MB (the link's
   latency and bandwidth, fitted).
2. Calibration: the step times of the one-process shapes of
   `bench.plan_cpu_measure` (`calib-*`), each run by the real trainer, give the
   measured constants of the model by least squares: the achieved fractions of
   the matmul peak in the matrix products and in attention, and the host
   overheads per layer and micro-batch and per step. One more one-process
   measurement, two copies of the base shape at once, gives how much slower a
   core computes while the other works too (shared memory bus, last-level
   cache and clock headroom): the multi-rank layouts keep every core busy.
3. Prediction against measurement for TP=2, PP=2, DP=2 with ZeRO 0-3 (two
   processes) and TP=2 x PP=2 (four processes on two cores: compute and host
   time stretch by 2), each run by the real trainer: the error per layout.

    .venv/bin/python -m bench.plan_cpu [--steps 12] [--warmup 4]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.multiprocessing as mp

from bench.plan_cpu_measure import LAYOUTS, compose_layout, layout_overrides, measure, run_ranks
from common.net import free_port
from pretrain.planning.cluster import Link, load_cluster
from pretrain.planning.step_time import plan_time


def matmul_rate(n: int = 512, repeats: int = 30) -> float:
    torch.set_num_threads(1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def copy_bandwidth(elements: int = 1 << 24, repeats: int = 10) -> float:
    """Bytes read and written per second by one thread's copy."""
    torch.set_num_threads(1)
    x, y = torch.randn(elements), torch.empty(elements)
    y.copy_(x)
    start = time.perf_counter()
    for _ in range(repeats):
        y.copy_(x)
    return 2 * x.numel() * 4 * repeats / (time.perf_counter() - start)


SIZES = (4, 1 << 18, 1 << 20, 1 << 22, 1 << 24)  # bytes per all-reduce


def _all_reduce_times() -> dict[int, float]:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    times = {}
    for nbytes in SIZES:
        x = torch.ones(nbytes // 4)
        for _ in range(3):
            dist.all_reduce(x)
        samples = []
        for _ in range(10):
            start = time.perf_counter()
            dist.all_reduce(x)
            samples.append(time.perf_counter() - start)
        times[nbytes] = statistics.median(samples)
    dist.destroy_process_group()
    return times


def _all_reduce_worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    times = _all_reduce_times()
    if rank == 0:
        queue.put(times)


def gloo_link() -> Link:
    """Latency and bandwidth of gloo between two processes, from a ring all-reduce's time
    (2 (n - 1)/n x bytes / bandwidth + 2 (n - 1) x latency, n = 2)."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    workers = [context.Process(target=_all_reduce_worker, args=(rank, port, queue)) for rank in range(2)]
    for worker in workers:
        worker.start()
    times = queue.get(timeout=300)
    for worker in workers:
        worker.join()
    # Two ranks: time = bytes / bandwidth + 2 x latency; fitted over sizes from a message's
    # header to a layer's activations.
    rows = np.array([[nbytes, 2.0] for nbytes in SIZES])
    (inverse_bandwidth, latency), *_ = np.linalg.lstsq(rows, np.array([times[n] for n in SIZES]), rcond=None)
    bandwidth = 1 / max(inverse_bandwidth, 1e-12)
    latency = max(latency, 0.0)
    return Link(bandwidth=bandwidth, latency=latency)


def fit_constants(cluster, measured: dict[str, tuple]) -> dict:
    """The matmul and attention efficiencies and the host overheads (per layer and micro-batch,
    per step) that best predict the one-process step times. The model is linear in the
    inverse efficiencies and in the overheads; an overhead the fit makes negative is zero."""
    def step(cfg, matmul=1.0, attention=1.0, per_layer=0.0, per_step=0.0):
        c = dataclasses.replace(cluster, matmul_efficiency=matmul, attention_efficiency=attention,
                                overhead=dataclasses.replace(cluster.overhead, per_layer=per_layer,
                                                             per_step=per_step))
        return plan_time(cfg, c, 1).step.total

    rows, targets = [], []
    for cfg, seconds in measured.values():
        base = step(cfg)
        matmul, attention = step(cfg, matmul=0.5) - base, step(cfg, attention=0.5) - base
        rows.append([matmul, attention, step(cfg, per_layer=1.0) - base, 1.0])
        targets.append(seconds - (base - matmul - attention))
    rows, targets = np.array(rows), np.array(targets)
    keep = [0, 1, 2, 3]
    while True:
        solution, *_ = np.linalg.lstsq(rows[:, keep], targets, rcond=None)
        negative = [k for k, value in zip(keep, solution) if k >= 2 and value < 0]
        if not negative:
            break
        keep.remove(negative[0])
    values = dict.fromkeys(range(4), 0.0) | dict(zip(keep, solution))
    # The layer's products may run faster than the n = 512 product that stands for the peak:
    # then the peak is raised, and the efficiencies are taken against it.
    peak = cluster.peak_flops.fp32 * max(1.0, 1 / values[0])
    scale = peak / cluster.peak_flops.fp32
    return {"peak_flops": dataclasses.replace(cluster.peak_flops, fp32=peak),
            "matmul_efficiency": 1 / (values[0] * scale), "attention_efficiency": min(1.0, 1 / (values[1] * scale)),
            "overhead": dataclasses.replace(cluster.overhead, per_layer=values[2], per_step=values[3])}


def measure_together(cfg, copies: int, steps: int, warmup: int) -> float:
    """The median step time of `copies` one-process runs of `cfg` at once, each on its own core."""
    with ThreadPoolExecutor(copies) as pool:
        runs = list(pool.map(lambda _: run_ranks(copy.deepcopy(cfg), 1, warmup + steps, warmup), range(copies)))
    return statistics.median(t for run in runs for t in run[0]["times"][warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    args = parser.parse_args()

    peak, bandwidth, link = matmul_rate(), copy_bandwidth(), gloo_link()
    print(f"this machine, one thread: {peak / 1e9:.0f} GFLOP/s fp32 matmul (n = 512), copy {bandwidth / 1e9:.1f} "
          f"GB/s; gloo {link.bandwidth / 1e9:.2f} GB/s and {link.latency * 1e6:.0f} us per message")
    cluster = load_cluster("cpu_2core")
    alone = dataclasses.replace(
        cluster, peak_flops=dataclasses.replace(cluster.peak_flops, fp32=peak), memory_bandwidth=bandwidth,
        intra_node=link, inter_node=link)

    results = {}
    for name, world, layout in LAYOUTS:
        cfg = compose_layout(layout_overrides(layout), world)
        results[name] = (cfg, world, measure(layout, world, steps=args.steps, warmup=args.warmup)["step_time"])
        print(f"  measured {name:<14} {results[name][2] * 1000:8.1f} ms", flush=True)
    # The cores share the memory bus, the last-level cache and the clock's headroom: a core
    # computes slower while the other works too. Measured as two independent one-process runs.
    together = measure_together(results[LAYOUTS[0][0]][0], 2, args.steps, args.warmup)
    slowdown = max(1.0, together / results[LAYOUTS[0][0]][2])
    print(f"  measured {LAYOUTS[0][0]} twice at once: {together * 1000:.1f} ms, {slowdown:.2f}x alone")

    calibration = {name: (cfg, seconds) for name, (cfg, world, seconds) in results.items() if world == 1}
    fitted = fit_constants(alone, calibration)
    alone = dataclasses.replace(alone, **fitted)
    busy = dataclasses.replace(alone, memory_bandwidth=bandwidth / slowdown,
                               peak_flops=dataclasses.replace(alone.peak_flops, fp32=alone.peak_flops.fp32 / slowdown))
    print(f"calibrated on {len(calibration)} one-process shapes: peak {alone.peak_flops.fp32 / 1e9:.0f} GFLOP/s, "
          f"matmul efficiency "
          f"{fitted['matmul_efficiency']:.2f}, attention {fitted['attention_efficiency']:.2f}, host "
          f"{fitted['overhead'].per_layer * 1000:.2f} ms per layer and micro-batch, "
          f"{fitted['overhead'].per_step * 1000:.1f} ms per step; with every core busy, "
          f"{slowdown:.2f}x slower")

    print(f"\n{'layout':<14}{'ranks':>6}{'measured ms':>13}{'predicted ms':>14}{'error':>8}   where the prediction goes")
    errors = []
    for name, (cfg, world, seconds) in results.items():
        plan = plan_time(cfg, alone if world == 1 else busy, world, ranks_per_node=world)
        predicted = plan.step.total
        error = predicted / seconds - 1
        if world > 1:
            errors.append(abs(error))
        parts = ", ".join(f"{k} {v * 1000:.0f}" for k, v in plan.step.parts().items() if v > 0.02 * predicted)
        label = name + (" (fit)" if world == 1 else "")
        print(f"{label:<14}{world:>6}{seconds * 1000:>13.1f}{predicted * 1000:>14.1f}{error:>+8.1%}   {parts}")
    print(f"\nmulti-rank layouts: mean |error| {statistics.mean(errors):.1%}, worst {max(errors):.1%}; "
          f"within 20%: {sum(e <= 0.2 for e in errors)} of {len(errors)}")


if __name__ == "__main__":
    main()
