"""`pretrain`: the Hydra entry point.

The composed Hydra config becomes typed dataclasses here and nowhere else;
everything below this file takes plain typed arguments.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.config import Config, ConfigError, from_dict

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
EXIT_BAD_INPUT = 2


def fail(message: str) -> None:
    print(f"pretrain: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


def to_config(raw: DictConfig) -> Config:
    values = OmegaConf.to_container(raw, resolve=True)
    values.pop("hydra", None)
    values.pop("launcher", None)  # how pretrain-launch starts the run; not part of the run
    return from_dict(Config, values)


def check_overrides(overrides: list[str]) -> DictConfig:
    """Composes the config once up front so a bad override fails in one line.

    Hydra reports composition errors over several lines with advice about
    environment variables; this gives the key and the reason instead.
    """
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        cause = str(err.__cause__).strip().splitlines()[0] if err.__cause__ else ""
        fail(f"{first} {cause}".strip())


def compose_config(overrides: list[str]) -> Config:
    """The typed config `pretrain` would run with these overrides, for tools outside a run."""
    raw = check_overrides(overrides)
    try:
        return to_config(raw)
    except ConfigError as err:
        fail(str(err))


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def hydra_main(raw: DictConfig) -> None:
    from data_pipeline.corpus import CorpusError, source_files
    from parallel.cluster_env import ClusterEnvError, detect

    try:
        cfg = to_config(raw)
        cluster = detect()  # torchrun, deepspeed, Slurm or OpenMPI variables
        cfg.validate_world(cluster.world_size)
        source_files(cfg.data.sources)  # a missing corpus fails before the heavy imports
        if cfg.trainer.init_from:  # so does a missing or mismatched init_from
            from pretrain.hf.import_weights import check_source

            check_source(cfg.trainer.init_from, cfg.model)
    except (ConfigError, CorpusError, ClusterEnvError) as err:
        fail(str(err))
    from pretrain.checkpoint.files import RunDirError, resolve_resume

    try:  # so does a checkpoint that is incomplete, corrupt or of another model shape
        resolve_resume(cfg.trainer.run_dir, cfg.trainer.resume, cfg.model)
    except RunDirError as err:
        fail(str(err))
    if cluster.launched:  # each rank's output also goes to <run_dir>/logs/rank<r>.log
        from launch.rank_log import rank_log_path, tee_output

        tee_output(rank_log_path(cfg.trainer.run_dir, cluster.rank))
    from pretrain.training.trainer import run  # heavy imports only once the config is known to be good

    try:
        run(cfg, OmegaConf.to_yaml(raw))
    except (ConfigError, FileNotFoundError) as err:
        fail(str(err))
    except Exception as err:
        # Bad-input errors from the data and checkpoint layers name their file.
        from data_pipeline.indexed import ShardError
        from pretrain.checkpoint.files import RunDirError

        if isinstance(err, (CorpusError, ShardError, RunDirError)):
            fail(str(err))
        raise


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


def cli() -> None:
    sys.argv[1:] = take_local_rank(sys.argv[1:])
    args = sys.argv[1:]
    if not any(a in ("-m", "--multirun") or a.startswith("--") and a not in ("--cfg",) for a in args):
        check_overrides([a for a in args if "=" in a and not a.startswith("-")])
    hydra_main()


if __name__ == "__main__":
    cli()
