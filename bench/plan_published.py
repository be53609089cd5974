"""The step-time model against published large-scale runs (bench/published_runs.yaml).

For each run: its model, layout and cluster go through `pretrain.planning`, and
the predicted step time is compared with the step time its reported
throughput implies. A figure counted in hardware FLOPs (Megatron-LM 2021,
MT-NLG, BLOOM: full recomputation included) is turned into a step time with
that count: the model's FLOPs plus one more forward of the layers. A model
FLOPs utilisation (Korthikanti et al. 2022, Llama 3, Megatron-Core) is turned
into one with the model's FLOPs and the device's peak. A run with context
parallelism is priced as this stack runs it (Ulysses all-to-all), whatever
exchange the run itself used.

    .venv/bin/python -m bench.plan_published [--runs bench/published_runs.yaml]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import yaml

from pretrain.config import Config, from_dict
from pretrain.model.flops import flops_per_token
from pretrain.planning.cluster import load_cluster
from pretrain.planning.step_time import Stack, plan_time

RUNS = Path(__file__).with_name("published_runs.yaml")
# The runs each cluster's matmul_efficiency was calibrated on (configs/cluster/*.yaml): not
# predictions, and left out of the error summary.
CALIBRATION = {"megatron_2021_gpt3_175b_1536gpu", "megatron_core_2024_gpt_177b_h100"}


def run_config(run: dict) -> Config:
    model = dict(run["model"])
    tensor = run["tensor"]
    # A GPT MLP's 8h/3 SwiGLU equivalent need not divide over the tensor ranks: round it.
    model["ffn_hidden_size"] = round(model["ffn_hidden_size"] / (tensor * 64)) * tensor * 64
    model.update(name=run["name"], max_seq_len=run["seq_len"], vocab_multiple=1)
    # Under a pipeline this stack runs ZeRO-1 (for bf16) where a run used plain data
    # parallelism or sharded gradients (Llama 3's FSDP): the same bytes move per step.
    zero = run["zero_stage"]
    if run["pipeline"] > 1:
        zero = 1 if run["precision"] == "bf16" or zero > 1 else zero
    return from_dict(Config, {
        "model": model,
        "data": {"seq_len": run["seq_len"]},
        "parallel": {"tensor": tensor, "pipeline": run["pipeline"], "context": run["context"], "zero_stage": zero,
                     "precision": run["precision"], "sequence_parallel": run["sequence_parallel"],
                     "activation_checkpointing": run["recompute"]},
        "trainer": {"micro_batch_size": run["micro_batch_size"], "global_batch_size": run["global_batch_size"]},
    })


def reported_step_seconds(run: dict, cfg: Config, peak: float) -> float:
    """The step time the run's reported throughput implies."""
    m = cfg.model
    per_token = flops_per_token(m, run["seq_len"], m.vocab_size)
    tokens = run["global_batch_size"] * run["seq_len"]
    if run["flops_counted"] == "hardware" and run["recompute"] == "full":
        # One more forward of the layers (a third of their forward and backward); the
        # output layer is not recomputed.
        per_token += (per_token - 6 * m.vocab_size * m.hidden_size) / 3
    if run["reported_tflops_per_gpu"] is not None:
        rate = run["reported_tflops_per_gpu"] * 1e12
    else:
        rate = run["reported_mfu"] * peak
    return per_token * tokens / (run["gpus"] * rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=RUNS)
    args = parser.parse_args()
    runs = yaml.safe_load(args.runs.read_text())
    header = f"{'run':<34}{'GPUs':>6}  {'layout':<14}{'reported s':>11}{'predicted s':>12}{'error':>8}" \
             f"{'MFU rep.':>9}{'MFU pred.':>10}"
    print(header)
    print("-" * len(header))
    errors = []
    for run in runs:
        cluster = load_cluster(run["cluster"])
        layout = f"{run['tensor']}x{run['pipeline']}x{run['gpus'] // (run['tensor'] * run['pipeline'] * run['context'])}"
        if run["context"] > 1:
            layout += f"xcp{run['context']}"
        cfg = run_config(run)
        stack = Stack(overlap_tensor_comm=run["overlap_tensor_comm"],
                      overlap_grad_reduce=run["overlap_grad_reduce"], virtual_stages=run["virtual_pipeline"])
        plan = plan_time(cfg, cluster, run["gpus"], stack=stack)
        peak = cluster.peak(run["precision"])
        reported = reported_step_seconds(run, cfg, peak)
        predicted = plan.step.total
        error = predicted / reported - 1
        if run["name"] not in CALIBRATION:
            errors.append(error)
        model_flops = flops_per_token(cfg.model, run["seq_len"], cfg.model.vocab_size) \
            * run["global_batch_size"] * run["seq_len"]
        reported_mfu = model_flops / (reported * run["gpus"] * peak)
        print(f"{run['name']:<34}{run['gpus']:>6}  {layout:<14}{reported:>11.2f}{predicted:>12.2f}{error:>+8.1%}"
              f"{reported_mfu:>9.1%}{plan.mfu:>10.1%}" + ("  (calibration)" if run["name"] in CALIBRATION else ""))
    absolute = [abs(e) for e in errors]
    print(f"\n{len(errors)} runs predicted: mean |error| {statistics.mean(absolute):.1%}, median {statistics.median(absolute):.1%}, "
          f"worst {max(absolute):.1%}; within 15%: {sum(a <= 0.15 for a in absolute)} of {len(errors)}")


if __name__ == "__main__":
    main()
