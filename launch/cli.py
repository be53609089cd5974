"""`pretrain-launch`: one run (or one per multirun point) on any launcher.

    pretrain-launch launcher=torchrun launcher.nproc_per_node=8 parallel.tensor=2 trainer.train_steps=1000
    pretrain-launch launcher=slurm launcher.nodes=64 launcher.gpus_per_node=8 --dry-run model=llama_8b
    pretrain-launch -m optim.lr=1e-3,3e-3          # one run per point, each in its own run directory

The same Hydra tree as `pretrain`, plus the `launcher` group. `launcher*`
overrides configure the launcher; all others go to `pretrain`. Everything is
validated here, before a process starts or a job waits in a queue, and the
values every rank must agree on are resolved once here and passed down: the
run directory (made absolute, so every node and every rerun of a Slurm job
names the same one) and any `${now:...}` value. `--help` shows
configs/hydra/help/launch.yaml: the launchers and every key of each.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common import errors
from common.errors import EXIT_BAD_INPUT, UserError, first_line
from launch.config import Launcher, launcher_from_dict
from pretrain.config import Config
from pretrain.hydra_config import CONFIG_DIR, composition_error, compose_points, to_config

PROG = "pretrain-launch"
_statuses: list[int] = []  # one exit status per launched run (multirun: per point)


def fail(message: str) -> None:
    errors.fail(PROG, message)


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def is_launcher_key(key: str) -> bool:
    return key == "launcher" or key.startswith("launcher.")


def hydra_quote(value: str) -> str:
    """A value as a Hydra override writes it: bare when the grammar allows, else quoted."""
    if re.fullmatch(r"[\w/\-+.%*@?|:]+", value) and not re.fullmatch(r"(?i)true|false|null|[\d.e+-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def time_based_values(raw: DictConfig) -> dict[str, str]:
    """Keys whose value calls `${now:...}`, resolved now: ranks that each resolved them
    would disagree by however long apart they started."""
    found: dict[str, str] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, path + ".")
            elif isinstance(value, str) and "${now:" in value:
                found[path] = str(OmegaConf.select(raw, path))

    tree = OmegaConf.to_container(raw, resolve=False)
    walk({k: v for k, v in tree.items() if k not in ("hydra", "launcher")}, "")
    return found


def check_world(launcher: Launcher, cfg: Config) -> None:
    from launch.commands import deepspeed_ranks

    ranks = deepspeed_ranks(launcher) if launcher.kind == "deepspeed" else launcher.world_size()
    model_parallel = cfg.parallel.tensor * cfg.parallel.pipeline
    if ranks % model_parallel:
        fail(f"launcher={launcher.kind} starts {ranks} ranks ({_ranks_formula(launcher)}): expected a "
             f"multiple of parallel.tensor x parallel.pipeline = {model_parallel}")
    cfg.validate_world(ranks)


def _ranks_formula(launcher: Launcher) -> str:
    if launcher.kind == "slurm":
        return f"launcher.nodes={launcher.nodes} x {launcher.procs_per_node} per node"
    if launcher.kind == "torchrun":
        return f"launcher.nnodes={launcher.nnodes} x launcher.nproc_per_node={launcher.nproc_per_node}"
    if launcher.kind == "deepspeed" and launcher.hostfile:
        return f"the slots of launcher.hostfile={launcher.hostfile}"
    return f"launcher.nproc_per_node={launcher.nproc_per_node}"


def plan(raw: DictConfig) -> tuple[Launcher, Config]:
    """The typed launcher and training configs, checked against each other."""
    from data_pipeline.corpus import source_files

    try:
        launcher = launcher_from_dict(OmegaConf.to_container(raw.launcher, resolve=True))
        cfg = to_config(raw)
        check_world(launcher, cfg)
        if not cfg.data.blend:
            source_files(cfg.data.sources)
        from pretrain.checkpoint.files import check_run_dir

        check_run_dir(cfg.trainer.run_dir)  # a file, or below one: refused before any process starts
        if launcher.kind == "slurm":
            from launch.slurm import check_partition

            check_partition(launcher)
    except UserError as err:
        fail(str(err))
    except OmegaConfBaseException as err:
        fail(first_line(err))
    return launcher, cfg


def launch(raw: DictConfig) -> int:
    from launch.commands import TORCHRUN_ENV, deepspeed_command, torchrun_command
    from launch.local import run_command, run_local
    from common.net import free_port
    from launch.slurm import submit_slurm

    launcher, cfg = plan(raw)
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        run_dir = Path(hydra_cfg.runtime.output_dir)  # <trainer.run_dir>/<num>_<overrides>
    else:
        run_dir = Path(os.path.abspath(cfg.trainer.run_dir))
    pinned = {**time_based_values(raw), "trainer.run_dir": str(run_dir)}
    overrides = [o for o in hydra_cfg.overrides.task
                 if not is_launcher_key(override_key(o)) and override_key(o) not in pinned]
    overrides += [f"{key}={hydra_quote(value)}" for key, value in pinned.items()]
    print(f"{PROG}: launcher={launcher.kind}, run directory {run_dir}", flush=True)
    try:
        if launcher.kind == "local":
            return run_local(launcher, overrides)
        if launcher.kind == "torchrun":
            return run_command(torchrun_command(launcher, overrides, probe=not launcher.dry_run),
                               launcher.dry_run, TORCHRUN_ENV)
        if launcher.kind == "deepspeed":
            command = deepspeed_command(launcher, overrides, launcher.master_port or free_port())
            return run_command(command, launcher.dry_run)
        return submit_slurm(launcher, overrides, run_dir)
    except UserError as err:
        fail(str(err))
    return EXIT_BAD_INPUT


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def hydra_main(raw: DictConfig) -> None:
    _statuses.append(launch(raw))


# --- before Hydra: one-line errors, and every multirun point checked first --------------------

def sweep_points(overrides: list[str]) -> list[list[str]]:
    """Points that try every value of every swept key at least once (not the full product)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    longest = max((len(c) for c in choices), default=1)
    return [[c[min(i, len(c) - 1)] for c in choices] for i in range(longest)]


def precheck(overrides: list[str], multirun: bool) -> None:
    from hydra.errors import HydraException

    try:
        points = sweep_points(overrides) if multirun else [overrides]
        raws = compose_points([[o for o in point if not override_key(o).startswith("hydra")] for point in points])
    except (HydraException, OmegaConfBaseException) as err:  # a sweep that does not parse
        fail(composition_error(err))
    except UserError as err:
        fail(str(err))
    for raw in raws:
        plan(raw)


def cli() -> None:
    args = sys.argv[1:]
    if "--dry-run" in args:
        args = [a for a in args if a != "--dry-run"] + ["launcher.dry_run=true"]
    if "--help" in args or "-h" in args:  # the launchers, their keys and --dry-run
        # configs/hydra/help/launch.yaml, next to the other overrides (Hydra takes them in one run)
        at = next((i for i, a in enumerate(args) if "=" in a and not a.startswith("-")), len(args))
        args = [*args[:at], "hydra/help=launch", *args[at:]]
    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if not a.startswith("-")]
    if not any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):  # not --help, --cfg
        precheck(overrides, multirun)
    if multirun:
        # Each point runs in <trainer.run_dir>/<num>_<its swept values>, e.g. 1_optim.lr=0.003.
        from hydra.core.override_parser.overrides_parser import OverridesParser

        keys = {override_key(o) for o in overrides}
        parsed = OverridesParser.create().parse_overrides(overrides)
        excluded = sorted({o.key_or_group for o in parsed if not o.is_sweep_override()})
        defaults = {
            "hydra.sweep.dir": "${trainer.run_dir}",
            "hydra.sweep.subdir": "${hydra.job.num}_${hydra.job.override_dirname}",
            "hydra.job.config.override_dirname.exclude_keys": f"[{','.join(excluded)}]",
        }
        args += [f"{k}={v}" for k, v in defaults.items() if k not in keys]
    sys.argv[1:] = args
    hydra_main()
    sys.exit(next((s for s in _statuses if s), 0))


if __name__ == "__main__":
    cli()
