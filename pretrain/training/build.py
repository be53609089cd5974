"""Everything a `Trainer` is given, built in the order that makes runs reproducible.

The weights depend on the seed alone (not on the layout), and the per-rank
random streams start only once the model exists; data, model, engine,
checkpointer and callbacks are each built by their own layer and handed in.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable

import numpy as np
import torch
from megatron.core import parallel_state

from common.typed_config import ConfigError
from data_pipeline.dataset import fixed_batches
from data_pipeline.stream_loader import build_train_loader
from data_pipeline.training_data import TrainingData
from parallel.compile import resolve_compile
from parallel.engine import EngineOptions
from parallel.groups import Topology
from parallel.parallelize import parallelize
from parallel.rng import seed_model_parallel_rng
from pretrain.checkpoint.checkpointer import Checkpointer
from pretrain.checkpoint.reshard import Layout
from pretrain.config import Config
from pretrain.model.build import LAYER_TYPES, RECOMPUTED, build_model
from pretrain.model.moe import set_aux_loss_scale
from pretrain.training import faults
from pretrain.training.callback import Callback
from pretrain.training.callbacks import Checkpointing, ConsoleProgress, Evaluation
from pretrain.training.flops import FlopsMeter
from pretrain.training.guard import BadStepGuard
from pretrain.training.host_memory import retain_freed_host_memory
from pretrain.training.memory_report import MemoryReport
from pretrain.training.moe_balance import MoEBalance
from pretrain.training.optim import build_optimizer, build_scheduler
from pretrain.training.preemption import SaveTriggers
from pretrain.training.sinks import build_sinks
from pretrain.training.trainer import Trainer

# `trainer.callbacks` names → the callback, given the config and the checkpoint triggers.
CALLBACKS: dict[str, Callable[[Config, SaveTriggers], Callback]] = {
    "evaluation": lambda cfg, triggers: Evaluation(cfg.trainer.eval_interval),
    "progress": lambda cfg, triggers: ConsoleProgress(cfg.trainer.log_interval),
    "checkpointing": lambda cfg, triggers: Checkpointing(triggers),
    "memory_report": lambda cfg, triggers: MemoryReport(cfg),
}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def named_callbacks(cfg: Config, triggers: SaveTriggers) -> list[Callback]:
    return [CALLBACKS[name](cfg, triggers) for name in cfg.trainer.callbacks]


def build_trainer(cfg: Config, topology: Topology, data: TrainingData, triggers: SaveTriggers | None = None,
                  callbacks: list[Callback] | None = None) -> Trainer:
    """The trainer of `cfg` on this rank. `callbacks` replaces the ones `trainer.callbacks`
    names; the logging rank's metrics sinks are added after them either way."""
    t, device = cfg.trainer, topology.device
    padded_vocab = cfg.model.padded_vocab_size(cfg.model.vocab_size or data.vocab_size, topology.tensor)
    if data.vocab_size > padded_vocab:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size}: the tokenizer has {data.vocab_size} pieces")

    dp_rank, dp_size = topology.dp_rank, topology.data
    # The loader's state_dict() (saved in checkpoints) is collective over the
    # data-parallel group in streaming mode: each rank's streams have their own state.
    train_loader = build_train_loader(data.train, t.micro_batch_size, dp_rank, dp_size,
                                      group=parallel_state.get_data_parallel_group() if dp_size > 1 else None)
    valid_batches = fixed_batches(data.valid, t.micro_batch_size, t.eval_batches, dp_rank, dp_size)
    if device.type == "cpu":
        retain_freed_host_memory()  # each step's large activations reuse mapped pages

    # Model and engine. Weights depend on the seed alone, not on the layout.
    seed_everything(t.seed)
    seed_model_parallel_rng(t.seed, device)
    model = build_model(cfg.model, cfg.parallel, padded_vocab, t.seed, dp_size, device)
    d = cfg.data
    options = EngineOptions(
        micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size, grad_clip=cfg.optim.grad_clip,
        has_attention_mask=d.eod_mask_loss or d.reset_position_ids or d.reset_attention_mask,
        pin_memory=t.device != "cpu",
    )
    engine = parallelize(
        model, cfg.parallel, options=options,
        make_optimizer=lambda m: build_optimizer(m, cfg.optim, device, offload=cfg.parallel.offload_optimizer),
        scheduler_factory=build_scheduler(cfg.optim, t.train_steps), data_parallel=dp_size, device=device,
        compile_mode=resolve_compile(t.compile, topology), recomputed=RECOMPUTED, layer_types=LAYER_TYPES,
    )

    after_update = None
    if cfg.model.moe.enabled:
        micro_batches = engine.deepspeed.gradient_accumulation_steps()
        set_aux_loss_scale(micro_batches)
        after_update = MoEBalance(engine.module, micro_batches)

    trainer: Trainer  # the checkpointer and the fault hook report through it once it exists
    p = cfg.parallel
    checkpointer = Checkpointer(
        engine, t.run_dir, rank=topology.rank, world_size=topology.world_size,
        layout=Layout(topology.tensor, topology.pipeline, topology.gradient_replicas, p.zero_stage, p.precision,
                      topology.context, topology.expert),
        model=dataclasses.asdict(cfg.model), num_layers=cfg.model.num_layers,
        keep_last=t.keep_last_checkpoints, keep_every=t.keep_every_steps, background=t.async_checkpoint,
        say=lambda message: trainer.print(message), record=lambda record: trainer.log(record),
        before_commit=lambda step: faults.kill_if("kill_in_save", step, topology.rank),
    )
    faults.poison_loss(engine.module, lambda: trainer.state.step + 1, topology.rank)
    seed_everything(t.seed + topology.rank)  # per-rank streams from here on (dropout etc.)

    triggers = triggers or SaveTriggers(t.checkpoint_interval, t.checkpoint_minutes, device)
    sinks = build_sinks(cfg) if topology.is_logging_rank else []
    callbacks = (named_callbacks(cfg, triggers) if callbacks is None else list(callbacks)) + sinks
    trainer = Trainer(
        cfg, topology, data, engine, checkpointer, train_loader, valid_batches, callbacks, sinks,
        flops=FlopsMeter(cfg.model, d.seq_len, padded_vocab, device, p.precision, topology.world_size,
                         cfg.logger.peak_flops),
        guard=BadStepGuard(t.max_bad_steps, t.on_bad_steps, fp16=p.precision == "fp16"),
        num_params=cfg.model.num_params(padded_vocab), after_update=after_update,
    )
    return trainer
