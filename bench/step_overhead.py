"""Time per training step spent outside forward, backward and the optimizer, as a fraction.

Runs `Trainer.fit` of the default config (Hydra-composed, as `pretrain` runs
it) under torch.profiler. The DeepSpeed engine's `forward`, `backward` and
`step` and the gradient clipping are wrapped in `record_function` ranges (the
compute); the whole `fit` call is one range too. Everything else in the loop
is overhead: drawing and collating the batch, moving it to the device, the
loss read-back, metrics, logging and callbacks. Evaluation and checkpoint
saving (every few hundred steps, not per step) are left out (see
`bench.product_loop`). The overhead
parts are wrapped in ranges of their own, so the profile also says where it
goes.

The profiler's per-op recording slows the compute more than the Python
around it, so the same ranges are also timed with perf_counter in a second,
unprofiled pass; both fractions are printed.

    .venv/bin/python -m bench.step_overhead [--steps 30] [--warmup 10] [HYDRA OVERRIDES ...]
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
import warnings
from collections import defaultdict

warnings.filterwarnings("ignore")

from torch.profiler import ProfilerActivity, profile, record_function

from bench.product_loop import build_trainer, compose, run_steps

COMPUTE = ("forward", "backward", "clip", "optimizer")


class Ranges:
    """Named ranges: a profiler `record_function` and a perf_counter total for each."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            with record_function(f"bench/{name}"):
                result = fn(*args, **kwargs)
            self.seconds[name] += time.perf_counter() - start
            return result

        return wrapped


def instrument(trainer, ranges: Ranges) -> None:
    import parallel.step

    engine = trainer.engine.deepspeed
    engine.forward = ranges.wrap("forward", engine.forward)
    engine.backward = ranges.wrap("backward", engine.backward)
    engine.step = ranges.wrap("optimizer", engine.step)
    parallel.step.clip_grad_norm_ = ranges.wrap("clip", parallel.step.clip_grad_norm_)
    loader = trainer.train_loader
    trainer.train_loader = type("TimedLoader", (), {
        "__iter__": lambda self: self,
        "__next__": lambda self: ranges.wrap("loader", loader.__next__)(),
        "state_dict": lambda self: loader.state_dict(),
        "load_state_dict": lambda self, state: loader.load_state_dict(state),
    })()
    trainer.data_parallel_mean = ranges.wrap("loss read-back", trainer.data_parallel_mean)
    trainer.log = ranges.wrap("metric sinks", trainer.log)
    for callback in trainer.callbacks:
        callback.on_step_end = ranges.wrap(f"callback {type(callback).__name__}", callback.on_step_end)


def profiled_ranges(prof) -> dict[str, float]:
    """Seconds per `bench/` range, from the profiler's own events."""
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.name.startswith("bench/"):
            totals[event.name.removeprefix("bench/")] += event.time_range.elapsed_us() / 1e6
    return totals


def report(title: str, seconds: dict[str, float], steps: int) -> float:
    total = seconds["fit"]
    compute = sum(seconds.get(name, 0.0) for name in COMPUTE)
    overhead = total - compute
    print(f"{title}: {total / steps * 1000:.1f} ms/step, overhead {overhead / steps * 1000:.2f} ms/step "
          f"= {100 * overhead / total:.2f}% of the step")
    for name, value in sorted(seconds.items(), key=lambda kv: -kv[1]):
        if name != "fit":
            kind = "compute " if name in COMPUTE else "overhead"
            print(f"    {kind}  {name:<28} {value / steps * 1000:8.2f} ms/step  {100 * value / total:6.2f}%")
    rest = overhead - sum(v for k, v in seconds.items() if k != "fit" and k not in COMPUTE)
    print(f"    overhead  {'rest of the loop':<28} {rest / steps * 1000:8.2f} ms/step  {100 * rest / total:6.2f}%")
    return overhead / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="measured steps (each pass)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed first steps (compilation)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for `pretrain`")
    args = parser.parse_args()
    cfg = compose(args.overrides)

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(cfg, run_dir)
        ranges = Ranges()
        instrument(trainer, ranges)
        run_steps(trainer, args.warmup)

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function("bench/fit"):
                run_steps(trainer, args.steps)
        profiled = profiled_ranges(prof)

        ranges.seconds.clear()
        start = time.perf_counter()
        run_steps(trainer, args.steps)
        timed = dict(ranges.seconds, fit=time.perf_counter() - start)

    t = cfg.trainer
    print(f"config              {cfg.model.name}: {cfg.model.num_layers} layers x {cfg.model.hidden_size}, "
          f"seq {cfg.data.seq_len}, micro-batch {t.micro_batch_size}, compile={t.compile}, "
          f"logger={cfg.logger.kind}; {args.steps} steps per pass after {args.warmup} warm-up")
    print(f"machine             {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    fraction = report("torch.profiler", profiled, args.steps)
    report("perf_counter (unprofiled)", timed, args.steps)
    print(f"overhead            {100 * fraction:.2f}% of step time (torch.profiler; target <= 3%)")


if __name__ == "__main__":
    main()
