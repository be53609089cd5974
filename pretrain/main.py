"""`pretrain`: the Hydra entry point.

The composed Hydra config becomes typed dataclasses here (`hydra_config`) and
nowhere else; everything below this file takes plain typed arguments. Every
bad input below, whichever layer finds it, is a `UserError`: caught here once,
reported in one line, exit status 2.

Unless `trainer.verbose=true`, the console shows this program's own lines and
the warnings that matter; what the libraries and compilers below print goes
to the run's log (common/console.py). `--help` shows configs/hydra/help/pretrain.yaml.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from common import console
from common.errors import UserError, fail
from pretrain.hydra_config import CONFIG_DIR, compose_raw, to_config

PROG = "pretrain"


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def hydra_main(raw: DictConfig) -> None:
    from data_pipeline.corpus import source_files
    from parallel.cluster_env import detect

    try:
        cfg = to_config(raw)
        if not cfg.trainer.verbose:  # third-party output to the run's log (common/console.py)
            console.quiet()
        cluster = detect()  # torchrun, deepspeed, Slurm or OpenMPI variables
        cfg.validate_world(cluster.world_size)
        source_files(cfg.data.sources)  # a missing corpus fails before the heavy imports
        if cfg.trainer.init_from:  # so does a missing or mismatched init_from
            from pretrain.hf.import_weights import check_source

            check_source(cfg.trainer.init_from, cfg.model)
        from pretrain.checkpoint.files import check_run_dir, resolve_resume

        check_run_dir(cfg.trainer.run_dir)  # a file, or below one, fails before anything is written
        if cfg.logger.kind == "wandb":  # so does a WANDB_MODE that logger.mode=auto cannot follow
            from pretrain.training.sinks import wandb_mode

            wandb_mode(cfg.logger.mode, os.environ)
        # So does a checkpoint that is incomplete, corrupt or of another model shape.
        resolve_resume(cfg.trainer.run_dir, cfg.trainer.resume, cfg.model)
    except UserError as err:
        fail(PROG, str(err))
    from pretrain.training.run import run  # heavy imports only once the config is known to be good

    try:
        run(cfg, OmegaConf.to_yaml(raw), launched=cluster.launched)
    except (UserError, FileNotFoundError) as err:
        fail(PROG, str(err))


def take_local_rank(argv: list[str]) -> list[str]:
    """Removes the `--local_rank` the deepspeed launcher appends, keeping it in LOCAL_RANK."""
    kept, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 1
        else:
            kept.append(arg)
        i += 1
    return kept


# Hydra's flags that take the next argument as their value.
VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--info", "-i", "--config-path", "-cp", "--config-name", "-cn",
               "--config-dir", "-cd", "--experimental-rerun"}


def overrides(args: list[str]) -> list[str]:
    """The config overrides among the arguments (an argument that is no flag, nor a flag's value):
    `key=value`, `+key=value`, `~key`, and a mistyped `key` without a value, which fails here."""
    return [a for i, a in enumerate(args)
            if not a.startswith("-") and not (i > 0 and args[i - 1] in VALUE_FLAGS)]


def cli() -> None:
    sys.argv[1:] = take_local_rank(sys.argv[1:])
    args = sys.argv[1:]
    if "--help" in args or "-h" in args:  # what pretrain does, then its groups and keys
        # configs/hydra/help/pretrain.yaml, next to the other overrides (Hydra takes them in one run)
        at = next((i for i, a in enumerate(args) if "=" in a and not a.startswith("-")), len(args))
        sys.argv[1:] = [*args[:at], "hydra/help=pretrain", *args[at:]]
    if not any(a in ("-m", "--multirun") or a.startswith("--") and a not in ("--cfg",) for a in args):
        try:  # composed once up front, so that a bad override fails in one line
            compose_raw(overrides(args))
        except UserError as err:
            fail(PROG, str(err))
    hydra_main()


if __name__ == "__main__":
    cli()
