"""Trainers on the parity tests' synthetic data, for the checkpoint and resume tests."""

from pathlib import Path

import torch

from parity import VOCAB, PatternTokens, layout_config


def make_trainer(topology, run_dir: Path, triggers=None, **trainer_keys):
    from data_pipeline.training_data import TrainingData
    from pretrain.training.build import build_trainer

    layout = {k: trainer_keys.pop(k) for k in ("tensor", "precision", "zero") if k in trainer_keys}
    cfg = layout_config(run_dir, **layout)
    cfg.trainer.eval_interval = 0
    for key, value in trainer_keys.items():
        setattr(cfg.trainer, key, value)
    return build_trainer(cfg, topology, TrainingData(train=PatternTokens(), valid=PatternTokens(), vocab_size=VOCAB),
                         triggers)


class Record:
    """Each step's metrics and, after it, a copy of the weights."""

    def __init__(self):
        self.metrics, self.weights = [], []

    def on_train_start(self, trainer): ...

    def on_step_end(self, trainer, metrics):
        self.metrics.append(metrics)
        self.weights.append(weights(trainer))

    def on_train_end(self, trainer): ...


def weights(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.engine.module.parameters()]


def train(trainer, steps: int) -> Record:
    record = Record()
    trainer.callbacks.insert(0, record)
    trainer.cfg.trainer.train_steps = steps
    trainer.fit()
    return record
