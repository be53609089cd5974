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
    from pretrain.hydra_config import compose_config

    return compose_config(overrides)


def build_trainer(cfg: Config, run_dir: str):
    """A one-process `Trainer` writing into `run_dir`, set up for chunked `run_steps`."""
    from data_pipeline.training_data import load_training_data
    from parallel.groups import init_layout_groups
    from pretrain.training.build import build_trainer
    from pretrain.training.callbacks import Checkpointing, ConsoleProgress
    from pretrain.training.memory_report import MemoryReport
    from pretrain.training.preemption import SaveTriggers

    cfg.trainer.run_dir = run_dir
    t = cfg.trainer
    topology = init_layout_groups(cfg.parallel, torch.device("cpu"))
    triggers = SaveTriggers(t.checkpoint_interval, t.checkpoint_minutes, topology.device)
    callbacks = [ConsoleProgress(t.log_interval),
                 Checkpointing(triggers, save_at_end=False),  # no save each time a chunk ends
                 MemoryReport(cfg)]
    return build_trainer(cfg, topology, load_training_data(cfg.data, topology.rank, log=lambda *_: None),
                         triggers, callbacks)


def run_steps(trainer, steps: int) -> None:
    """`Trainer.fit` for `steps` more steps; its progress lines are printed into a buffer and dropped."""
    trainer.cfg.trainer.train_steps = trainer.state.step + steps
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit()
