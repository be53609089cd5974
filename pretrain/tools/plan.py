"""`pretrain-plan`: bytes per rank predicted for a config, without allocating anything."""

from __future__ import annotations

import argparse
import sys

from common.errors import UserError, fail
from parallel.memory import format_bytes
from parallel.memory_plan import RankMemory
from pretrain.hydra_config import compose_config
from pretrain.training.memory_plan import plan_memory

# Errors are reported as `pretrain` reports them: the plan reads the same config tree.
PROG = "pretrain"


def format_plan(rows: list[tuple[str, int, RankMemory]]) -> str:
    header = f"{'rank kind':<28}{'ranks':>6}{'parameters':>13}{'gradients':>13}{'optimizer':>13}" \
             f"{'offloaded':>13}{'device total':>15}"
    lines = [header, "-" * len(header)]
    for kind, count, m in rows:
        lines.append(f"{kind:<28}{count:>6}{format_bytes(m.parameters):>13}{format_bytes(m.gradients):>13}"
                     f"{format_bytes(m.optimizer):>13}{format_bytes(m.offloaded):>13}{format_bytes(m.device_total):>15}")
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="pretrain-plan",
        description="Bytes of parameters, gradients and optimizer states per rank, predicted\n"
                    "for a config without allocating anything. Takes the same overrides as pretrain.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  pretrain-plan model=llama_8b parallel.tensor=8 parallel.pipeline=2 parallel.zero_stage=1 "
               "parallel.precision=bf16 --world-size 64\n"
               "  pretrain-plan model=llama_1b parallel.zero_stage=3 parallel.offload_optimizer=true --world-size 8",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=llama_8b parallel.tensor=8")
    parser.add_argument("--world-size", type=int, default=1, help="number of ranks (default 1)")
    args = parser.parse_args(argv)
    if args.world_size < 1:
        fail(PROG, f"--world-size={args.world_size}: expected >= 1")
    try:
        cfg = compose_config(args.overrides)
        rows = plan_memory(cfg, args.world_size)
    except UserError as err:
        fail(PROG, str(err))
    p = cfg.parallel
    print(f"{cfg.model.name}: {args.world_size} ranks = tensor {p.tensor} x pipeline {p.pipeline} x "
          f"data {args.world_size // (p.tensor * p.pipeline)}, ZeRO-{p.zero_stage}, {p.precision}"
          + (", optimizer offloaded to CPU" if p.offload_optimizer else ""))
    print(format_plan(rows))


if __name__ == "__main__":
    cli(sys.argv[1:])
