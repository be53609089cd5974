"""Steady-state optimizer-step times of the tiny model under several parallel layouts, on this CPU.

What is measured: seconds per optimizer step of the real trainer, as `pretrain`
builds it: the config composed by Hydra from `configs/` (the base shape below
plus the layout's dotted overrides), `pretrain.training.build.build_trainer`
on megatron-core's process groups, `Trainer.fit`; eager
(`trainer.compile=none`), `trainer.device=cpu`, fp32. The time of one step is
the trainer's own `metrics["step_time"]` (from drawing the batch to the loss
averaged over the data-parallel replicas), as rank 0 reports it to the
callbacks; the first `warmup` steps are dropped and the median of the rest is
the layout's step time.

How: every layout, one process included, runs in freshly spawned processes
joined by gloo (as torchrun would start them), one thread each
(`OMP_NUM_THREADS=1`, `torch.set_num_threads(1)`), so a world of N on this
machine's cores is oversubscribed when N exceeds them. The tokens are
synthetic and in memory (arithmetic progressions mod `VOCAB`), so no corpus is
prepared; evaluation, checkpoints and console progress are left out (none of
them runs inside a step). What the libraries print goes to a log per rank in a
temporary run directory; a failing rank's error comes back with its log's tail.

Other work on the machine inflates step times (a second busy process on 2
cores can double them), so each measurement also says how clean it was: each
rank's CPU share and the cores the rest of the machine kept busy meanwhile
("foreign", from /proc/stat, hypervisor steal included). `main` waits for a
quiet machine before each layout and measures a disturbed layout again,
keeping the cleanest run.

The single-process shapes (`calib-*`) differ in hidden size, sequence length
and micro-batch, so that a model of the step time can fit the compute rate
apart from the fixed per-layer and per-step overheads; the other layouts
measure tensor, pipeline and data parallelism (ZeRO 0 to 3) and TP x PP.

    .venv/bin/python -m bench.plan_cpu_measure [--out results.json] [--only NAME ...]
        [--steps 12] [--warmup 4] [--max-foreign 0.25] [--retries 1] [--quiet-wait 60]
"""

from __future__ import annotations

import argparse
import json
import os
import queue as queue_module
import resource
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

if TYPE_CHECKING:
    from pretrain.config import Config

VOCAB = 512  # tokens of the synthetic data; also model.vocab_size (a multiple of 128 x TP: no padding)

# The base run every layout overrides: big enough that compute dominates the Python
# around it, small enough that a layout's run takes well under a minute on 2 cores.
BASE: dict[str, Any] = {
    "model.num_layers": 4,
    "model.hidden_size": 256,
    "model.num_attention_heads": 8,
    "model.num_query_groups": 4,
    "model.ffn_hidden_size": 704,
    "model.vocab_size": VOCAB,
    "data.seq_len": 256,
    "parallel.precision": "fp32",
    "trainer.device": "cpu",
    "trainer.compile": "none",
    "trainer.micro_batch_size": 4,
    "trainer.global_batch_size": 8,
    "trainer.log_interval": 1000,
    "logger.kind": "console",
}

# (name, world size, overrides of BASE). A pipeline runs global / (micro x dp) micro-batches per step.
LAYOUTS: list[tuple[str, int, dict[str, Any]]] = [
    ("calib-base", 1, {}),
    ("calib-h384", 1, {"model.hidden_size": 384, "model.ffn_hidden_size": 1024}),
    ("calib-seq512", 1, {"data.seq_len": 512, "trainer.micro_batch_size": 2, "trainer.global_batch_size": 4}),
    ("calib-mb1", 1, {"trainer.micro_batch_size": 1, "trainer.global_batch_size": 2}),
    ("tp2", 2, {"parallel.tensor": 2}),
    ("pp2", 2, {"parallel.pipeline": 2, "trainer.micro_batch_size": 2}),
    ("dp2-zero0", 2, {"parallel.zero_stage": 0}),
    ("dp2-zero1", 2, {"parallel.zero_stage": 1}),
    ("dp2-zero2", 2, {"parallel.zero_stage": 2}),
    ("dp2-zero3", 2, {"parallel.zero_stage": 3}),
    ("tp2-pp2", 4, {"parallel.tensor": 2, "parallel.pipeline": 2, "parallel.zero_stage": 1,
                    "trainer.micro_batch_size": 2}),
]

START_TIMEOUT_S = 600.0  # a rank that has not reported by then is taken as hung


class SyntheticTokens:
    """`count` learnable sequences of `seq_len + 1` tokens (arithmetic progressions mod VOCAB)."""

    def __init__(self, seq_len: int, count: int = 10_000):
        self.seq_len, self.count = seq_len, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> np.ndarray:
        rng = np.random.default_rng(index)
        start, stride = rng.integers(0, VOCAB), rng.integers(1, 7)
        return (start + stride * np.arange(self.seq_len + 1)) % VOCAB


def hydra_value(value: Any) -> str:
    """`value` as Hydra's override grammar spells it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    return str(value)


def layout_overrides(layout: dict[str, Any]) -> dict[str, Any]:
    """BASE with `layout` applied: the dotted overrides a measurement runs with."""
    return {**BASE, **layout}


def compose_layout(overrides: dict[str, Any], world_size: int) -> Config:
    """The `Config` `pretrain` would run with these overrides, checked against the world."""
    from bench.product_loop import compose

    cfg = compose([f"{key}={hydra_value(value)}" for key, value in overrides.items()])
    cfg.validate_world(world_size)
    return cfg


def machine_busy_seconds() -> float:
    """CPU seconds this machine's cores have spent busy since boot, all processes together,
    time stolen by the hypervisor included (/proc/stat; NaN where there is none)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class StepTimes:
    """Records `metrics["step_time"]` of every step, as the trainer reports it, and when each
    step ends: the wall clock, this process's CPU clock and the machine's busy CPU seconds."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.clocks: list[tuple[float, float, float]] = []  # (perf_counter, process_time, machine busy)

    def on_train_start(self, trainer) -> None: ...

    def on_step_end(self, trainer, metrics: dict) -> None:
        self.times.append(float(metrics["step_time"]))
        self.clocks.append((time.perf_counter(), time.process_time(), machine_busy_seconds()))

    def on_train_end(self, trainer) -> None: ...

    def window(self, warmup: int) -> dict[str, float]:
        """Wall, process CPU and machine busy seconds over the steps after `warmup`."""
        first, last = self.clocks[max(warmup - 1, 0)], self.clocks[-1]
        wall, cpu, busy = (b - a for a, b in zip(first, last))
        return {"wall_s": wall, "cpu_s": cpu, "machine_busy_s": busy}


class OtherWork:
    """The cores other work on the machine kept busy while it was open: the machine's busy CPU
    seconds (/proc/stat, hypervisor steal included) less this process's and its children's,
    per wall second; and the load average at its start and end."""

    def __enter__(self):
        self.start = (time.perf_counter(), machine_busy_seconds(), self._ours(), os.getloadavg()[0])
        return self

    @staticmethod
    def _ours() -> float:
        return sum(sum(resource.getrusage(who)[:2]) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))

    def __exit__(self, *exc) -> None:
        wall, busy, ours, load = self.start
        wall = time.perf_counter() - wall
        foreign = (machine_busy_seconds() - busy - (self._ours() - ours)) / wall
        print(f"other work on the machine meanwhile: {foreign:.2f} cores; load average {load:.1f} at the start, "
              f"{os.getloadavg()[0]:.1f} at the end; {wall:.0f} s", flush=True)


def train_rank(cfg: Config, total_steps: int, warmup: int) -> dict[str, Any]:
    """This rank's step times over `total_steps` steps of `cfg` (process group started here),
    and its clocks over the steps after `warmup` (`StepTimes.window`)."""
    import torch

    from data_pipeline.training_data import TrainingData
    from parallel.engine import check_precision_supported
    from parallel.groups import init_layout_groups, resolve_device
    from pretrain.training.build import build_trainer

    device = resolve_device(cfg.trainer.device)
    check_precision_supported(cfg.parallel.precision, device, cfg.parallel.zero_stage)
    topology = init_layout_groups(cfg.parallel, device)
    cfg.validate_world(topology.world_size)
    cfg.trainer.train_steps = total_steps
    tokens = SyntheticTokens(cfg.data.seq_len)
    recorder = StepTimes()
    trainer = build_trainer(cfg, topology, TrainingData(train=tokens, valid=tokens, vocab_size=VOCAB),
                            callbacks=[recorder])
    assert torch.get_num_threads() == 1, torch.get_num_threads()
    trainer.fit()
    return {"times": recorder.times, **recorder.window(warmup)}


def spawned_rank(rank: int, world_size: int, port: int, log_path: str) -> None:
    """Makes this spawned process rank `rank` of a local env:// group on `port`, with one
    thread (the ranks share this machine's cores) and its output in `log_path`."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    log = open(log_path, "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)


def _rank_main(cfg: Config, rank: int, world_size: int, port: int, results, log_path: str, total_steps: int,
               warmup: int) -> None:
    """One spawned rank: env:// variables, one thread, library output to `log_path`."""
    spawned_rank(rank, world_size, port, log_path)
    try:
        results.put((rank, "ok", train_rank(cfg, total_steps, warmup)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        from parallel.groups import destroy_process_groups

        destroy_process_groups()


@contextmanager
def one_thread_environ() -> Iterator[None]:
    """OMP/MKL at one thread in the environment that processes started meanwhile inherit."""
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update({key: "1" for key in keys})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def log_tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a rank's log ("" when it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_ranks(cfg: Config, world_size: int, total_steps: int, warmup: int,
              timeout: float = START_TIMEOUT_S) -> list[dict[str, Any]]:
    """Every rank's `train_rank` result, in rank order; raises with a failing rank's traceback and log."""
    import torch.multiprocessing as mp

    from common.net import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="plan_cpu_measure-") as run_dir:
        cfg.trainer.run_dir = run_dir
        logs = [Path(run_dir) / f"rank{rank}.log" for rank in range(world_size)]
        procs = [ctx.Process(target=_rank_main, args=(cfg, rank, world_size, port, results, str(logs[rank]),
                                                      total_steps, warmup), daemon=True)
                 for rank in range(world_size)]
        with one_thread_environ():
            for proc in procs:
                proc.start()
        return collect_ranks(procs, results, logs, timeout)


def collect_ranks(procs: list, results, logs: list[Path], timeout: float) -> list[Any]:
    """Each started rank's result from `results` ((rank, "ok" | "error", value) entries), in rank
    order; raises with a failing or silent rank's traceback and the tail of its log."""
    done: dict[int, Any] = {}
    error = ""
    deadline = time.monotonic() + timeout
    while len(done) < len(procs) and not error:
        try:
            rank, status, value = results.get(timeout=1.0)
        except queue_module.Empty:
            dead = [r for r, p in enumerate(procs) if r not in done and p.exitcode not in (None, 0)]
            if dead:
                rank = dead[0]
                error = f"rank {rank} exited with status {procs[rank].exitcode}:\n{log_tail(logs[rank])}"
            elif time.monotonic() > deadline:
                error = f"no result after {timeout:.0f} s:\n{log_tail(logs[0])}"
            continue
        if status == "error":
            error = f"rank {rank}:\n{value}\n--- rank {rank} log ---\n{log_tail(logs[rank])}"
        else:
            done[rank] = value
    for proc in procs:
        proc.join(timeout=5 if error else 60)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if error:
        raise RuntimeError(error)
    return [done[rank] for rank in range(len(procs))]


def measure(layout: dict, world_size: int, steps: int = 12, warmup: int = 4) -> dict:
    """Runs the layout on `world_size` processes (1 thread each; world_size=1 runs in a spawned
    single process too, with 1 thread) and returns {"step_time": median seconds per optimizer
    step over the steps after warm-up, "step_times": [...], "config": <the overrides used>}.

    `layout` holds dotted config overrides applied over BASE. Also returned, over the measured
    steps: "warmup_step_times" (the dropped first steps), "rank_step_times" (every rank's
    steps), "cpu_fraction" (each rank's CPU seconds per wall second: about 1 for a rank busy
    on a core of its own, less while it waits for its peers or for a core) and "foreign_cores"
    (the cores' busy time not spent by the ranks, per wall second: other work on the machine
    and hypervisor steal; near 0 for a clean measurement).
    """
    overrides = layout_overrides(layout)
    cfg = compose_layout(overrides, world_size)  # a bad layout fails here, before any process starts
    per_rank = run_ranks(cfg, world_size, warmup + steps, warmup)
    times, wall = per_rank[0]["times"], per_rank[0]["wall_s"]
    ours = sum(r["cpu_s"] for r in per_rank)
    return {"step_time": statistics.median(times[warmup:]), "step_times": times[warmup:],
            "warmup_step_times": times[:warmup], "rank_step_times": [r["times"][warmup:] for r in per_rank],
            "cpu_fraction": [r["cpu_s"] / r["wall_s"] for r in per_rank],
            "foreign_cores": (per_rank[0]["machine_busy_s"] - ours) / wall, "config": overrides}


def spread(times: list[float]) -> float:
    """(max - min) / median of the step times: the measurement's relative spread."""
    return (max(times) - min(times)) / statistics.median(times)


def wait_for_quiet(max_cores: float, limit_s: float, sample_s: float = 1.0) -> float:
    """Waits (at most `limit_s`) until the machine's busy cores over `sample_s` fall to
    `max_cores` or below; returns the last sample."""
    deadline = time.monotonic() + limit_s
    while True:
        before = machine_busy_seconds()
        time.sleep(sample_s)
        busy = (machine_busy_seconds() - before) / sample_s
        if not busy > max_cores or time.monotonic() >= deadline:  # NaN (no /proc/stat): no wait
            return busy


def measure_clean(layout: dict, world_size: int, steps: int, warmup: int, retries: int,
                  max_foreign: float, quiet_wait_s: float) -> dict:
    """`measure`, after waiting for a quiet machine, repeated (up to `retries` more times) while
    other work took more than `max_foreign` cores during it; the run with the least is kept."""
    runs: list[dict] = []
    for _ in range(retries + 1):
        wait_for_quiet(max_foreign, quiet_wait_s)
        runs.append(measure(layout, world_size, steps, warmup))
        if runs[-1]["foreign_cores"] <= max_foreign:
            break
    best = min(runs, key=lambda run: run["foreign_cores"])
    return {**best, "attempts_foreign_cores": [run["foreign_cores"] for run in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/plan_cpu_measure.json", help="JSON file: name -> result")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these layouts, by name")
    parser.add_argument("--steps", type=int, default=12, help="measured steps per layout")
    parser.add_argument("--warmup", type=int, default=4, help="dropped first steps per layout")
    parser.add_argument("--max-foreign", type=float, default=0.25,
                        help="cores other work may take during a clean measurement")
    parser.add_argument("--retries", type=int, default=1,
                        help="re-measurements of a layout that other work disturbed (the cleanest is kept)")
    parser.add_argument("--quiet-wait", type=float, default=60.0,
                        help="seconds to wait at most for a quiet machine before each measurement")
    args = parser.parse_args()
    names = [name for name, _, _ in LAYOUTS]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        parser.error(f"--only {' '.join(unknown)}: expected among {', '.join(names)}")
    chosen = [entry for entry in LAYOUTS if not args.only or entry[0] in args.only]

    print(f"machine: {os.cpu_count()} cores; {args.steps} steps after {args.warmup} warm-up per layout; "
          f"cpu: the least busy rank's CPU share, foreign: cores taken by other work", flush=True)
    print(f"{'layout':<14} {'world':>5} {'step (s)':>9} {'min':>7} {'max':>7} {'spread':>7} {'cpu':>5} "
          f"{'foreign':>7} {'runs':>4} {'time (s)':>8}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    start = time.perf_counter()
    for name, world_size, layout in chosen:
        began = time.perf_counter()
        result = measure_clean(layout, world_size, args.steps, args.warmup, args.retries, args.max_foreign,
                               args.quiet_wait)
        result.update(world_size=world_size, overrides=layout, wall_s=time.perf_counter() - began)
        results[name] = result
        times = result["step_times"]
        print(f"{name:<14} {world_size:>5} {result['step_time']:>9.3f} {min(times):>7.3f} {max(times):>7.3f} "
              f"{100 * spread(times):>6.1f}% {min(result['cpu_fraction']):>5.2f} {result['foreign_cores']:>7.2f} "
              f"{len(result['attempts_foreign_cores']):>4} {result['wall_s']:>8.1f}", flush=True)
        out.write_text(json.dumps(results, indent=2) + "\n")  # kept as it grows
    print(f"total {time.perf_counter() - start:.0f} s; wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
