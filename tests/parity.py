"""Train the same tiny model under a given parallel layout; used by the parity tests.

Each layout trains `STEPS` optimizer steps on the same synthetic data with the
same global batch, saves a checkpoint, then checks that a fresh engine loaded
from it takes the same next step as the run that saved it. It also reports the
bytes its engine allocated in the first step next to the memory plan's
prediction for that rank.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pretrain.config import Config, from_dict

STEPS = 5
VOCAB = 256
SEQ = 32


class PatternTokens:
    """Learnable sequences (arithmetic progressions mod VOCAB), one per index."""

    def __len__(self) -> int:
        return 10_000

    def __getitem__(self, index: int) -> np.ndarray:
        rng = np.random.default_rng(index)
        start, stride = rng.integers(0, VOCAB), rng.integers(1, 7)
        return (start + stride * np.arange(SEQ + 1)) % VOCAB


EOD = 0  # the end-of-document token of `DocumentTokens`


class DocumentTokens(PatternTokens):
    """`PatternTokens` cut into documents by an EOD every 5 to 12 tokens, batched with all
    three end-of-document options (loss mask, position ids, attention mask)."""

    def __getitem__(self, index: int) -> np.ndarray:
        tokens = super().__getitem__(index).copy()
        cuts = np.cumsum(np.random.default_rng(10_000 + index).integers(5, 13, size=SEQ))
        tokens[cuts[cuts < SEQ + 1]] = EOD
        return tokens

    def collate(self, samples: list[np.ndarray]) -> dict[str, torch.Tensor]:
        from data_pipeline.dataset import EodOptions, collate

        return collate(samples, EodOptions(EOD, mask_loss=True, reset_position_ids=True, reset_attention_mask=True))


def layout_config(run_dir: Path, tensor=1, pipeline=1, context=1, zero=0, precision="fp32",
                  sequence_parallel=False, tie=False, offload=False, checkpointing="none",
                  eod=False, moe=None, expert=1) -> Config:
    return from_dict(Config, {
        "model": {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
                  "ffn_hidden_size": 128, "max_seq_len": SEQ, "tie_embeddings": tie, "moe": moe or {}},
        "data": {"seq_len": SEQ, "eod_mask_loss": eod, "reset_position_ids": eod, "reset_attention_mask": eod},
        "parallel": {"tensor": tensor, "pipeline": pipeline, "context": context, "expert": expert,
                     "zero_stage": zero,
                     "precision": precision,
                     "sequence_parallel": sequence_parallel, "offload_optimizer": offload,
                     "activation_checkpointing": checkpointing},
        "optim": {"lr": 1e-2, "min_lr": 1e-2, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.1},
        "trainer": {"run_dir": str(run_dir), "train_steps": STEPS, "micro_batch_size": 2,
                    "global_batch_size": 8, "eval_interval": 0, "eval_batches": 1, "log_interval": 100,
                    "seed": 7, "device": "cpu"},
    })


class LossRecorder:
    def __init__(self):
        self.losses = []

    def on_train_start(self, trainer): ...

    def on_step_end(self, trainer, metrics):
        self.losses.append(metrics["loss"])

    def on_train_end(self, trainer): ...


def train_layout(run_dir: str, **layout) -> dict:
    """Per-step losses, and the step after a checkpoint round trip, for one layout."""
    from pretrain.planning.parameters import predict_rank
    from pretrain.training.memory_report import MemoryReport, PeakMemoryReport
    from pretrain.checkpoint import files as checkpoint

    trainer = layout_trainer(run_dir, **layout)
    cfg, topology = trainer.cfg, trainer.topology
    recorder, peak = LossRecorder(), PeakMemoryReport(cfg)
    trainer.callbacks += [recorder, peak]
    trainer.fit()  # saves a checkpoint at the last step
    report = next(c for c in trainer.callbacks if isinstance(c, MemoryReport))
    measured = report.first_step.result()
    predicted = predict_rank(cfg, topology.world_size, topology.pp_rank, VOCAB)
    # Modules whose forward is wrapped in place by activation checkpointing.
    checkpointed = sum("forward" in vars(m) for m in trainer.engine.module.modules())
    continued = next_step_loss(trainer)
    tied_weight = tied_embedding(trainer.engine)

    restored = layout_trainer(run_dir, **layout)
    restored.load_checkpoint(checkpoint.latest_checkpoint(run_dir))
    resumed = next_step_loss(restored)
    return {"losses": recorder.losses, "continued": continued, "resumed": resumed,
            "step": restored.state.step, "memory": vars(measured), "predicted": vars(predicted),
            "peak": peak.result,
            "checkpointed": checkpointed, "coords": (topology.pp_rank, topology.tp_rank),
            "tied_weight": tied_weight, "restored_tied_weight": tied_embedding(restored.engine)}


def layout_trainer(run_dir: str, **layout):
    return trainer_for(layout_config(Path(run_dir), **layout))


def trainer_for(cfg: Config):
    """A `Trainer` of `cfg` on this world's process groups, reading the parity tokens
    (cut into documents when `cfg` uses the end-of-document options)."""
    from parallel.groups import init_layout_groups
    from data_pipeline.training_data import TrainingData
    from pretrain.training.build import build_trainer

    topology = init_layout_groups(cfg.parallel, torch.device("cpu"))
    cfg.validate_world(topology.world_size)
    tokens = DocumentTokens if cfg.data.eod_mask_loss else PatternTokens
    return build_trainer(cfg, topology, TrainingData(train=tokens(), valid=tokens(), vocab_size=VOCAB))


def next_step_loss(trainer) -> float:
    """The loss of one more training step, averaged over the data-parallel ranks."""
    return trainer.data_parallel_mean(trainer.engine.train_step(trainer.train_loader).loss)


def tied_embedding(engine) -> np.ndarray | None:
    """This rank's copy of a pipeline's tied embedding weight (None when it holds none)."""
    tied = getattr(engine.module, "tied_modules", None)
    if not tied:
        return None
    return next(iter(tied.values())).embedding.weight.detach().float().numpy().copy()


def resumed_step(run_dir: str, checkpoint_dir: str, **layout) -> float:
    """The loss of the first step after loading `checkpoint_dir` (of any layout) under `layout`."""
    trainer = layout_trainer(run_dir, **layout)
    trainer.load_checkpoint(Path(checkpoint_dir))
    return next_step_loss(trainer)


def train_layouts(root: str, layouts: dict[str, dict]) -> dict[str, dict]:
    return {name: train_layout(str(Path(root) / name), **layout) for name, layout in layouts.items()}
