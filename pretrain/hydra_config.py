"""The Hydra edge: compose `configs/` with overrides, and turn the result into a typed `Config`.

Every command that reads the config tree (`pretrain`, `pretrain-launch`,
`pretrain-plan`, the benchmarks) composes it here, so a bad override fails the
same way everywhere: one line naming the override and the reason, instead of
Hydra's several lines of advice.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from common.errors import first_line
from common.typed_config import ConfigError, from_dict
from pretrain.config import Config

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def to_config(raw: DictConfig) -> Config:
    values = OmegaConf.to_container(raw, resolve=True)
    values.pop("hydra", None)
    values.pop("launcher", None)  # how pretrain-launch starts the run; not part of the run
    return from_dict(Config, values)


def compose_points(points: list[list[str]]) -> list[DictConfig]:
    """The composed tree for each list of overrides; a composition error raises ConfigError."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return [compose(config_name="config", overrides=overrides) for overrides in points]
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(composition_error(err)) from None


def composition_error(err: BaseException) -> str:
    """A Hydra or OmegaConf error in one line: its first line and its cause's."""
    cause = first_line(err.__cause__) if err.__cause__ else ""
    return f"{first_line(err)} {cause}".strip()


def compose_raw(overrides: list[str]) -> DictConfig:
    return compose_points([overrides])[0]


def compose_config(overrides: list[str]) -> Config:
    """The typed config `pretrain` would run with these overrides."""
    return to_config(compose_raw(overrides))
