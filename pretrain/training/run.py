"""Everything `pretrain` does once its config is known to be valid."""

from __future__ import annotations

import json
import sys

from common.errors import EXIT_DIVERGED, EXIT_PREEMPTED, TrainingDiverged
from common.rank_log import rank_log
from data_pipeline.training_data import load_training_data
from parallel.engine import check_precision_supported
from parallel.groups import Topology, init_layout_groups, resolve_device
from pretrain.checkpoint import files
from pretrain.checkpoint.run_lock import hold_run_dir
from pretrain.config import Config
from pretrain.training.build import build_trainer
from pretrain.training.preemption import SaveTriggers
from pretrain.training.trainer import TrainState


def run(cfg: Config, resolved_yaml: str, launched: bool = False) -> TrainState:
    t = cfg.trainer
    device = resolve_device(t.device)
    check_precision_supported(cfg.parallel.precision, device, cfg.parallel.zero_stage)  # before any data or model work
    # SIGUSR1/SIGTERM from here on are served at the first step boundary.
    triggers = SaveTriggers(t.checkpoint_interval, t.checkpoint_minutes, device)
    triggers.install()
    topology = init_layout_groups(cfg.parallel, device)
    cfg.validate_world(topology.world_size)
    # One job at a time: rank 0 holds <run_dir>/.lock from before anything is written into the
    # run directory until this returns or exits; a second job stops here (every rank of it).
    # Each rank's output also goes to <run_dir>/logs/rank<r>.log (common/rank_log.py).
    with hold_run_dir(t.run_dir, topology.rank), rank_log(t.run_dir, topology.rank, launched=launched):
        return _train(cfg, resolved_yaml, topology, triggers)


def _train(cfg: Config, resolved_yaml: str, topology: Topology, triggers: SaveTriggers) -> TrainState:
    t = cfg.trainer
    # Chosen under the lock, so that no other job's save can change the choice.
    resume_from = files.resolve_resume(t.run_dir, t.resume, cfg.model)
    log = print if topology.is_logging_rank else (lambda *_: None)
    data = load_training_data(cfg.data, topology.rank, log)
    if resume_from is not None:
        files.check_tokenizer(resume_from, data.tokenizer)
    # Nothing is written into the run directory until the checkpoint has loaded: a refused
    # resume (another tokenizer, a damaged checkpoint) leaves every file as it was. The
    # sinks open at the first record.
    trainer = build_trainer(cfg, topology, data, triggers)
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
    elif t.init_from:  # continued pretraining from exported weights
        from pretrain.hf.import_weights import init_from

        init_from(trainer.engine.deepspeed, t.init_from, cfg.model, cfg.parallel, data.tokenizer, data.vocab_size,
                  say=trainer.print)
    if resume_from is not None and topology.rank == 0:
        files.restore_run_files(resume_from, t.run_dir)  # the W&B run id, before the sinks open
    files.write_run_file(t.run_dir, "config.yaml", resolved_yaml.encode())
    files.write_run_file(t.run_dir, files.TOKENIZER_FILE, data.tokenizer.model_bytes)
    try:
        state = trainer.fit()
    except TrainingDiverged as err:
        print(f"pretrain: error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_DIVERGED)
    if trainer.stop_requested:
        trainer.print(f"step {state.step:>6}  stopped by SIGTERM with a checkpoint saved; "
                      f"exit status {EXIT_PREEMPTED} asks for a requeue")
        sys.exit(EXIT_PREEMPTED)
    trainer.print(trainer.summary())
    if topology.is_logging_rank:
        files.write_run_file(t.run_dir, "summary.json", json.dumps(
            {"step": state.step, "tokens": state.consumed_tokens, "valid_history": state.valid_history}).encode())
    return state
