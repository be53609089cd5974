"""`optim.min_lr` follows `optim.lr` (lr / 5) unless it is set; the default run is unchanged."""

import dataclasses

import pytest

from pretrain.config import MIN_LR_DIVISOR, Config, ConfigError, OptimConfig, from_dict
from pretrain.hydra_config import compose_config
from pretrain.training.optim import learning_rate


def test_default_run_decays_to_the_same_min_lr():
    optim = compose_config([]).optim
    assert optim.lr == 2e-3 and optim.min_lr == 4e-4  # exactly what configs/optim/adamw.yaml said before
    assert MIN_LR_DIVISOR == 5


def test_a_low_lr_brings_min_lr_down_with_it():
    optim = compose_config(["optim.lr=1e-4"]).optim  # below the old fixed min_lr of 4e-4: refused before
    assert optim.min_lr == 1e-4 / 5
    assert OptimConfig(lr=3e-3).min_lr == 3e-3 / 5
    # The schedule ends there, and the number is what checkpoints and W&B keep.
    assert learning_rate(300, optim, 300) == pytest.approx(optim.min_lr, rel=1e-12)
    saved = dataclasses.asdict(compose_config(["optim.lr=1e-4"]))
    assert saved["optim"]["min_lr"] == 1e-4 / 5
    assert from_dict(Config, saved).optim == optim  # a saved config reads back the same


def test_explicit_min_lr_is_kept_and_checked():
    assert compose_config(["optim.min_lr=0"]).optim.min_lr == 0.0
    assert compose_config(["optim.lr=1e-3", "optim.min_lr=1e-3"]).optim.min_lr == 1e-3
    assert compose_config(["optim.min_lr=null"]).optim.min_lr == 4e-4
    with pytest.raises(ConfigError) as err:
        compose_config(["optim.min_lr=0.01"])
    assert str(err.value) == "optim.min_lr=0.01: expected in [0, optim.lr=0.002] (or null: optim.lr / 5)"
    with pytest.raises(ConfigError, match=r"optim.min_lr=-1e-05: expected in \[0, optim.lr"):
        compose_config(["optim.min_lr=-1e-5"])
    with pytest.raises(ConfigError, match="optim.min_lr='low': expected float"):
        compose_config(["optim.min_lr=low"])
