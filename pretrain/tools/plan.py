"""`pretrain-plan`: per-rank peak memory and step time predicted for a config and a cluster,
and a search for the fastest layout that fits, without allocating anything."""

from __future__ import annotations

import argparse
import sys

from common.errors import UserError, fail
from parallel.memory import format_bytes
from pretrain.config import Config
from pretrain.hydra_config import compose_config
from pretrain.planning.cluster import ClusterConfig, load_cluster, parse_size
from pretrain.planning.parameters import layout_data_parallel
from pretrain.planning.peak import RankPlan, plan_ranks
from pretrain.planning.search import PART_NAMES, Plan, changes_that_fit, evaluate, search, why_slower

# Errors are reported as `pretrain` reports them: the plan reads the same config tree.
PROG = "pretrain"
TOP = 5


def format_ranks(rows: list[RankPlan]) -> str:
    columns = ("parameters", "gradients", "optimizer", "offloaded", "activations", "peak")
    header = f"{'rank kind':<24}{'ranks':>6}" + "".join(f"{c:>13}" for c in columns)
    lines = [header, "-" * len(header)]
    for r in rows:
        m = r.states
        cells = (m.parameters, m.gradients, m.optimizer, m.offloaded, r.activations.total, r.peak)
        lines.append(f"{r.kind:<24}{r.count:>6}" + "".join(f"{format_bytes(c):>13}" for c in cells))
    return "\n".join(lines)


def describe(cfg: Config, world_size: int) -> str:
    p, t = cfg.parallel, cfg.trainer
    data = layout_data_parallel(cfg, world_size)
    context = f" x context {p.context}" if p.context > 1 else ""
    return (f"{cfg.model.name}: {world_size} ranks = tensor {p.tensor} x pipeline {p.pipeline}{context} x data {data}, "
            f"ZeRO-{p.zero_stage}, {p.precision}" + (", optimizer offloaded to CPU" if p.offload_optimizer else "")
            + f"; micro-batch {t.micro_batch_size} x sequence {cfg.data.seq_len}, global batch "
            f"{t.global_batch_size}, recompute {p.activation_checkpointing}"
            + (", sequence parallel" if p.sequence_parallel else ""))


def format_time(plan: Plan) -> str:
    time = plan.time
    step = time.step.total
    parts = "  ".join(f"{PART_NAMES[k]} {v / step:.0%}" for k, v in time.step.parts().items() if v > 0.005 * step)
    days = time.seconds_per_tokens(1e12) / 86400
    return (f"step {step:.3g} s   {time.tokens_per_second:,.0f} tokens/s   MFU {time.mfu:.1%}   "
            f"1T tokens in {days:,.1f} days\n  where the step goes: {parts}")


def fit_report(plan: Plan, cluster: ClusterConfig, world_size: int, memory: int) -> str:
    if plan.fits(memory):
        return f"fits: peak {format_bytes(plan.peak)} of {format_bytes(memory)} per device " \
               f"(activations {format_bytes(plan.activations)})"
    line = f"does not fit: peak {format_bytes(plan.peak)} > {format_bytes(memory)} per device"
    changes = changes_that_fit(plan, cluster, world_size, memory)
    if not changes:
        return line + "; no single change to recomputation, micro-batch, ZeRO stage, tensor, pipeline or " \
                      "context size makes it fit (try --search)"
    change, changed = changes[0]
    slower = changed.time.step.total / plan.time.step.total - 1
    return (line + f"\nsmallest change that fits: {change} (peak {format_bytes(changed.peak)}, "
            f"step {slower:+.0%})")


def format_search(fitting: list[Plan], memory: int) -> str:
    best = fitting[0]
    lines = [f"{len(fitting)} layouts fit in {format_bytes(memory)}; the fastest {min(TOP, len(fitting))}:"]
    for rank, plan in enumerate(fitting[:TOP], 1):
        time = plan.time
        verdict = "fastest" if rank == 1 else why_slower(best.time.step, time.step)
        lines.append(f"{rank}. {plan.layout()}\n   step {time.step.total:.3g} s  MFU {time.mfu:.1%}  "
                     f"peak {format_bytes(plan.peak)} (activations {format_bytes(plan.activations)})  "
                     f"[{verdict}]")
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="pretrain-plan",
        description="Peak memory per rank (parameters, gradients, optimizer states and activations)\n"
                    "for a config, and with --cluster its step time, MFU and whether it fits;\n"
                    "--search ranks every layout that fits by predicted step time.\n"
                    "Takes the same overrides as pretrain. Nothing is allocated.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  pretrain-plan model=llama_8b parallel.tensor=8 parallel.pipeline=2 parallel.zero_stage=1 "
               "parallel.precision=bf16 --world-size 64\n"
               "  pretrain-plan --cluster h100_80g --nodes 64 model=llama_70b parallel.tensor=8 "
               "parallel.pipeline=4 parallel.precision=bf16 data.seq_len=4096 trainer.global_batch_size=512\n"
               "  pretrain-plan --cluster h100_80g --nodes 64 --search model=llama_70b ...\n"
               "  pretrain-plan --cluster h100_80g --nodes 4 model=llama_8b model.max_seq_len=131072 "
               "data.seq_len=131072 parallel.tensor=8 parallel.context=4 parallel.precision=bf16 "
               "trainer.micro_batch_size=1 trainer.global_batch_size=8\n"
               "clusters: configs/cluster/*.yaml (or the path of such a file)",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=llama_8b parallel.tensor=8")
    parser.add_argument("--world-size", type=int, default=None,
                        help="number of ranks (default: nodes x devices per node, or 1; fewer uses part of a node)")
    parser.add_argument("--cluster", help="a cluster in configs/cluster (h100_80g, a100_80g, ...) or a .yaml path")
    parser.add_argument("--nodes", type=int, default=1, help="nodes of the cluster (default 1)")
    parser.add_argument("--device-memory", help="memory per device, e.g. 80GiB (default: the cluster's)")
    parser.add_argument("--search", action="store_true",
                        help=f"rank every valid layout that fits by predicted step time; print the top {TOP}")
    args = parser.parse_args(argv)
    try:
        run(args)
    except UserError as err:
        fail(PROG, str(err))


def run(args) -> None:
    if args.nodes < 1:
        raise UserError(f"--nodes={args.nodes}: expected >= 1")
    if args.world_size is not None and args.world_size < 1:
        raise UserError(f"--world-size={args.world_size}: expected >= 1")
    memory = parse_size(args.device_memory, "--device-memory") if args.device_memory else None
    cluster = load_cluster(args.cluster) if args.cluster else None
    if args.search and cluster is None:
        raise UserError("--search: expected --cluster (the step time decides between layouts)")
    world_size = args.world_size or (args.nodes * cluster.devices_per_node if cluster else 1)
    if cluster and args.world_size and args.world_size > args.nodes * cluster.devices_per_node:
        raise UserError(f"--world-size={args.world_size}: expected at most --nodes x {cluster.devices_per_node} "
                        f"devices per node = {args.nodes * cluster.devices_per_node}")
    memory = memory or (cluster.memory_bytes if cluster else None)
    cfg = compose_config(args.overrides)

    if args.search:
        fitting, smallest = search(cfg, cluster, world_size, memory)
        if not fitting:
            if smallest is None:
                raise UserError(f"no layout of {cfg.model.name} runs on {world_size} ranks: none divides the "
                                "model and the global batch (trainer.global_batch_size)")
            raise UserError(f"no layout fits {format_bytes(memory)} per device on {world_size} ranks: the "
                            f"smallest peak is {format_bytes(smallest.peak)}, with {smallest.layout()}")
        print(f"{cfg.model.name} on {args.nodes} x {cluster.name} ({world_size} devices), sequence "
              f"{cfg.data.seq_len}, global batch {cfg.trainer.global_batch_size}, {cfg.parallel.precision}")
        print(format_search(fitting, memory))
        return

    try:
        layout_data_parallel(cfg, world_size)
    except UserError as err:
        if cluster:
            raise UserError(f"--nodes={args.nodes}: {err}") from None
        raise
    device = cluster.device if cluster else ("cpu" if cfg.trainer.device == "cpu" else "cuda")
    print(describe(cfg, world_size))
    if cluster is None:
        ranks = plan_ranks(cfg, world_size, device=device)
        print(format_ranks(ranks))
        if memory:
            peak = max(r.peak for r in ranks)
            verdict = "fits" if peak <= memory else "does not fit"
            print(f"{verdict}: peak {format_bytes(peak)} of {format_bytes(memory)} per device")
        return
    plan = evaluate(cfg, cluster, world_size)
    print(format_ranks(plan.ranks))
    print(fit_report(plan, cluster, world_size, memory))
    print(format_time(plan))


if __name__ == "__main__":
    cli(sys.argv[1:])
