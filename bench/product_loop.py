"""The product's training loop as the benchmarks drive it: `pretrain`'s config and `Trainer`.

The config is composed by Hydra from `configs/` exactly as `pretrain` composes
it, and the real `Trainer` is built in this process. `run_steps` calls
`Trainer.fit` for a given number of further steps, so a benchmark can run it
in chunks. Evaluation (every `eval_interval` steps, not per step) and the
checkpoint that `fit` saves when it returns are left out; everything else in
the loop (loader, metrics, console progress, metrics.jsonl, the per-step
checkpoint-trigger check, memory report) stays.
"""

from __future__ import annotations

import contextlib
import io

import torch

from pretrain.config import Config


def compose(overrides: list[str]) -> Config:
    """The config `pretrain` would run with these overrides."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from pretrain.main import CONFIG_DIR, to_config

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return to_config(hydra_compose(config_name="config", overrides=overrides))


def build_trainer(cfg: Config, run_dir: str):
    """A one-process `Trainer` writing into `run_dir`, set up for chunked `run_steps`."""
    from parallel.groups import init_process_groups
    from pretrain.training.callbacks import Checkpointing, Evaluation
    from pretrain.training.trainer import Trainer, load_training_data

    cfg.trainer.run_dir = run_dir
    topology = init_process_groups(cfg.parallel.tensor, cfg.parallel.pipeline, torch.device("cpu"))
    trainer = Trainer(cfg, topology, load_training_data(cfg, topology, log=lambda *_: None))
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, Evaluation)]
    for callback in trainer.callbacks:
        if isinstance(callback, Checkpointing):
            callback.on_train_end = lambda trainer: None  # no save each time a chunk ends
    return trainer


def run_steps(trainer, steps: int) -> None:
    """`Trainer.fit` for `steps` more steps; its progress lines are printed into a buffer and dropped."""
    trainer.cfg.trainer.train_steps = trainer.state.step + steps
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit()
