"""Mixture-of-experts training throughput on CPU, and where an MoE step's forward time goes.

The real trainer (`build_trainer`, one process, fp32, CPU, `trainer.compile=none`,
as the config `pretrain` composes) trains `moe_tiny` (configs/model/moe_tiny.yaml:
4 layers x 128, 8 experts of 96, top-2, a shared expert of 96) and a dense model
with the same active parameters per token: the same attention, embeddings and
norms, and a SwiGLU MLP of ffn_hidden_size = top_k x 96 + 96 = 288, the width a
token goes through in the MoE layer. The router's h x experts weights (1,024
per layer) are the only active parameters the dense model lacks. Both read the
same random tokens (vocabulary 4096) at sequence 256, micro-batch 8 (one
micro-batch per step). Eager on both sides: compiling would compare the
compilers' work on two different graphs (megatron-core's MoE layer has
data-dependent shapes, so it breaks its graph there) rather than the layers.

Each model takes `--warmup` untimed steps, then the two alternate in `--rounds`
rounds of `--steps` timed steps (order swapped each round); step times are the
trainer's `step_time`, tokens/s are tokens per step over the median step time,
and the ratio is the median of the per-round ratios; the ratio of the two best steps is
printed too, as the one least moved by other work on the machine.

Then `--profile-steps` more MoE steps with the forward of every MoE layer's
router (`DeviceRouter.forward`), token dispatcher (dispatch_preprocess,
token_dispatch, dispatch_postprocess, combine_preprocess, token_combine,
combine_postprocess), routed experts and shared expert wrapped in a
perf_counter timer, and the whole model's forward too. Backward is not split:
autograd runs those parts' backward outside their calls. The shares are of the
step time of the same steps (forward, backward and the optimizer step); the
timers' own cost falls into them.

    .venv/bin/python -m bench.moe [--warmup 3] [--steps 2] [--rounds 8] [--profile-steps 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from bench.plan_cpu_measure import OtherWork

VOCAB = 4096
SEQ = 256
MICRO_BATCH = 8

DISPATCH = ("dispatch_preprocess", "token_dispatch", "dispatch_postprocess",
            "combine_preprocess", "token_combine", "combine_postprocess")


class RandomTokens:
    """Uniform random sequences of SEQ + 1 tokens, one per index."""

    def __len__(self) -> int:
        return 100_000

    def __getitem__(self, index: int) -> np.ndarray:
        return np.random.default_rng(index).integers(3, VOCAB, SEQ + 1)


def config(run_dir: str, dense: bool):
    from pretrain.hydra_config import compose_config

    overrides = ["model=moe_tiny", f"data.seq_len={SEQ}", f"model.vocab_size={VOCAB}",
                 "parallel.precision=fp32", f"trainer.micro_batch_size={MICRO_BATCH}",
                 f"trainer.global_batch_size={MICRO_BATCH}", "trainer.device=cpu", "trainer.compile=none",
                 "trainer.eval_interval=0", "trainer.log_interval=100000", "logger.kind=console",
                 f"trainer.run_dir={run_dir}"]
    if dense:
        base = compose_config(overrides).model.moe
        width = base.top_k * base.expert_ffn_hidden_size + base.shared_expert_ffn_hidden_size
        overrides += [f"model.ffn_hidden_size={width}", "model.moe.num_experts=0",
                      "model.moe.shared_expert_ffn_hidden_size=0"]
    return compose_config(overrides)


class StepTimes:
    def __init__(self) -> None:
        self.times: list[float] = []
        self.loss = float("nan")

    def on_train_start(self, trainer) -> None: ...

    def on_step_end(self, trainer, metrics: dict) -> None:
        self.times.append(metrics["step_time"])
        self.loss = metrics["loss"]

    def on_train_end(self, trainer) -> None: ...


def trainer_of(cfg, topology):
    from data_pipeline.training_data import TrainingData
    from pretrain.training.build import build_trainer

    times = StepTimes()
    trainer = build_trainer(cfg, topology, TrainingData(train=RandomTokens(), valid=RandomTokens(), vocab_size=VOCAB),
                            callbacks=[times])
    return trainer, times


def run(trainer, times: StepTimes, steps: int) -> list[float]:
    """The step times of `steps` more steps of `trainer.fit`."""
    import contextlib
    import io

    before = len(times.times)
    trainer.cfg.trainer.train_steps = trainer.state.step + steps
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit()
    return times.times[before:]


class Timers:
    """Seconds spent inside wrapped methods, by part."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, obj, name: str, part: str) -> None:
        method = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - start

        setattr(obj, name, timed)  # an instance attribute: nn.Module.__call__ finds it as self.forward


def instrument(model) -> tuple[Timers, int]:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    timers = Timers()
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in layers:
        timers.wrap(layer.router, "forward", "router")
        for name in DISPATCH:
            timers.wrap(layer.token_dispatcher, name, "dispatch + combine")
        timers.wrap(layer.experts, "forward", "routed experts")
        if layer.shared_experts is not None:
            timers.wrap(layer.shared_experts, "forward", "shared expert")
    timers.wrap(model, "forward", "forward")
    return timers, len(layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds")
    parser.add_argument("--profile-steps", type=int, default=5, help="MoE steps with the forward timers")
    args = parser.parse_args()

    from parallel.groups import init_process_groups

    with OtherWork(), tempfile.TemporaryDirectory() as root:
        started = time.perf_counter()
        topology = init_process_groups(1, 1, torch.device("cpu"))
        runs = {}
        for name in ("MoE", "dense"):
            cfg = config(os.path.join(root, name), dense=name == "dense")
            trainer, times = trainer_of(cfg, topology)
            m = cfg.model
            padded = m.padded_vocab_size(VOCAB)
            runs[name] = {"trainer": trainer, "times": times, "cfg": m, "timed": [],
                          "active": m.num_params(padded, active=True), "total": m.num_params(padded)}
        built = time.perf_counter() - started

        moe, dense = runs["MoE"]["cfg"], runs["dense"]["cfg"]
        e = moe.moe
        print(f"MoE    {moe.name}: {moe.num_layers} layers x {moe.hidden_size}, {e.num_experts} experts of "
              f"{e.expert_ffn_hidden_size}, top-{e.top_k}, shared expert of {e.shared_expert_ffn_hidden_size}; "
              f"{runs['MoE']['active']:,} active of {runs['MoE']['total']:,} parameters")
        print(f"dense  the same with a SwiGLU MLP of {dense.ffn_hidden_size} "
              f"(= {e.top_k} x {e.expert_ffn_hidden_size} + {e.shared_expert_ffn_hidden_size}); "
              f"{runs['dense']['active']:,} parameters (MoE's active less its routers' "
              f"{moe.num_layers} x {moe.hidden_size} x {e.num_experts} = "
              f"{runs['MoE']['active'] - runs['dense']['active']:,})")
        print(f"run    seq {SEQ}, micro-batch {MICRO_BATCH} (one per step), vocab {VOCAB}, fp32, compile=none, "
              f"CPU, torch threads {torch.get_num_threads()}; {args.warmup} warm-up steps each, then "
              f"{args.rounds} alternating rounds of {args.steps} steps", flush=True)

        started = time.perf_counter()
        for name in runs:
            run(runs[name]["trainer"], runs[name]["times"], args.warmup)
        ratios = []
        for r in range(args.rounds):
            order = ("MoE", "dense") if r % 2 == 0 else ("dense", "MoE")
            medians = {}
            for name in order:
                t = run(runs[name]["trainer"], runs[name]["times"], args.steps)
                runs[name]["timed"] += t
                medians[name] = statistics.median(t)
            ratios.append(medians["dense"] / medians["MoE"])
        tokens = SEQ * MICRO_BATCH
        for name, r in runs.items():
            t = r["timed"]
            print(f"{name:<6} {tokens / statistics.median(t):>8,.0f} tokens/s  (ms/step: median "
                  f"{1e3 * statistics.median(t):.0f}, best {1e3 * min(t):.0f}, worst {1e3 * max(t):.0f}; "
                  f"train loss {r['times'].loss:.3f} at step {r['trainer'].state.step})")
        print(f"MoE / dense tokens/s: {statistics.median(ratios):.2f}x (rounds: "
              + ", ".join(f"{x:.2f}" for x in ratios) + f"); of the best steps: "
              f"{min(runs['dense']['timed']) / min(runs['MoE']['timed']):.2f}x")
        trained = time.perf_counter() - started

        trainer = runs["MoE"]["trainer"]
        timers, layers = instrument(trainer.engine.module)
        step = sum(run(trainer, runs["MoE"]["times"], args.profile_steps))
        s = timers.seconds
        parts = ["router", "dispatch + combine", "routed experts", "shared expert"]
        inside = sum(s.get(p, 0.0) for p in parts)
        print(f"\nMoE step, {args.profile_steps} steps with timers on the forward of the {layers} MoE layers' parts "
              f"(backward not split), as fractions of the step time ({1e3 * step / args.profile_steps:.0f} ms/step):")
        for p in parts:
            print(f"  {p + ' (forward)':<30} {100 * s.get(p, 0.0) / step:>5.1f}%  "
                  f"({100 * s.get(p, 0.0) / s['forward']:.1f}% of the forward)")
        print(f"  {'rest of the forward':<30} {100 * (s['forward'] - inside) / step:>5.1f}%  "
              f"({100 * (s['forward'] - inside) / s['forward']:.1f}% of the forward: attention, norms, "
              f"embeddings, loss)")
        print(f"  {'backward and optimizer step':<30} {100 * (step - s['forward']) / step:>5.1f}%")
        print(f"seconds: building {built:.0f}, throughput {trained:.0f}, timed MoE steps {step:.0f}", flush=True)


if __name__ == "__main__":
    main()
