"""The training loop and the set-up that feeds it.

`Trainer.fit` is the whole loop: take a step, hand the metrics to the
callbacks. Everything else here builds what the loop needs: process groups,
data, model, DeepSpeed engine, and the state a checkpoint carries.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

# megatron-core warns at import that optional CUDA fusion libraries are absent;
# we use none of them.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
logging.getLogger("megatron").setLevel(logging.WARNING)

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from data_pipeline.dataset import PackedSequenceDataset, fixed_batches
from data_pipeline.prepare import prepare_data
from data_pipeline.stream_loader import build_train_loader
from data_pipeline.tokenizer import Tokenizer
from parallel.engine import (build_engine, build_optimizer, check_precision_supported, clips_in_loop,
                             eval_loss, precision_dtype, train_step)
from parallel.output_loss import chunk_tokens
from parallel.pipeline import build_pipeline
from parallel.rng import seed_model_parallel_rng
from parallel.tensor import reduce_sequence_parallel_grads
from parallel.groups import Topology, init_process_groups, resolve_device
from parallel.activation_checkpointing import apply_activation_checkpointing
from parallel.memory import MemoryReport
from pretrain import async_save, checkpoint, faults
from pretrain.training.callbacks import (
    Callback,
    Checkpointing,
    ConsoleProgress,
    Evaluation,
    build_sinks,
    loss_scale,
    memory_bytes,
)
from pretrain.config import Config, ConfigError
from pretrain.training.flops import FlopsMeter
from pretrain.training.host_memory import retain_freed_host_memory
from pretrain.training.guard import EXIT_DIVERGED, MAX_ROLLBACKS_PER_CHECKPOINT, BadStepGuard, TrainingDiverged, \
    skip_nonfinite_updates
from pretrain.model.llama import LlamaModel, transformer_config
from pretrain.training.optim import build_scheduler
from pretrain.training.preemption import SaveTriggers


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    consumed_tokens: int = 0
    valid_history: list = field(default_factory=list)  # (step, loss)
    last_checkpoint_step: int = -1
    train_seconds: float = 0.0
    skipped_steps: int = 0  # updates refused for a non-finite gradient (or an fp16 overflow)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainingData:
    train: PackedSequenceDataset
    valid: PackedSequenceDataset
    vocab_size: int
    tokenizer: Tokenizer | None = None


def load_training_data(cfg: Config, topology: Topology, log=print) -> TrainingData:
    """Rank 0 builds the tokenizer and shards; the other ranks then find them cached."""
    if not cfg.data.blend:
        if topology.rank == 0:
            if cfg.data.streaming:
                from data_pipeline.streaming import streaming_tokenizer

                streaming_tokenizer(cfg.data, log=log)
            else:
                prepare_data(cfg.data, log=log)
        dist.barrier()
    return training_data(cfg, log if topology.rank == 0 else (lambda *_: None))


def training_data(cfg: Config, log=print) -> TrainingData:
    """The train and validation datasets of a config (needs no process group).

    With `data.blend`, the preprocessed corpora are mixed by weight instead
    (each split by document into train and validation), all read with the
    tokenizer of the first; otherwise `data.sources` are prepared and split.
    """
    from data_pipeline.blend import BlendedDataset
    from data_pipeline.dataset import EodOptions
    from data_pipeline.shards import manifest_tokenizer, open_corpus, split_documents

    d = cfg.data
    if d.streaming:  # no shards: a stream spec to train on, held-out documents to validate on
        from data_pipeline.streaming import streaming_data

        stream, held_out, tokenizer = streaming_data(d, log=log)
        return TrainingData(train=stream, valid=held_out, vocab_size=tokenizer.vocab_size, tokenizer=tokenizer)
    if d.blend:
        tokenizer = Tokenizer(d.tokenizer.model or manifest_tokenizer(d.blend[0].path))
        corpora = [open_corpus(entry.path, tokenizer) for entry in d.blend]  # same tokenizer for all
        weights = [entry.weight for entry in d.blend]
    else:
        prepared = prepare_data(d, log=log)  # found in the cache after the first call
        tokenizer = prepared.tokenizer
        corpora, weights = [open_corpus(prepared.corpus, tokenizer)], [1.0]
    eod = EodOptions(tokenizer.eos_id, d.eod_mask_loss, d.reset_position_ids, d.reset_attention_mask)
    train, valid = [], []
    for k, corpus in enumerate(corpora):
        train_docs, valid_docs = split_documents(corpus.num_documents, d.valid_fraction, d.seed + k)
        train.append(PackedSequenceDataset(corpus, d.seq_len, d.seed + k, documents=train_docs, eod=eod))
        # Shuffled too (with a fixed seed), so the fixed evaluation batches sample
        # every held-out document rather than the first few.
        valid.append(PackedSequenceDataset(corpus, d.seq_len, d.seed + k,
                                           documents=valid_docs, eod=eod))
    return TrainingData(
        train=train[0] if len(train) == 1 else BlendedDataset(train, weights),
        valid=valid[0] if len(valid) == 1 else BlendedDataset(valid, weights),
        vocab_size=tokenizer.vocab_size,
        tokenizer=tokenizer,
    )


def compile_model(module: torch.nn.Module, mode: str) -> None:
    """torch.compile in place; layers of a pipeline stage are its TransformerLayerStage children."""
    if mode == "model":
        module.compile()
    elif mode == "layers":
        layers = (module.decoder.layers if hasattr(module, "decoder")
                  else [m for m in module.children() if type(m).__name__ == "TransformerLayerStage"])
        for layer in layers:
            layer.compile()


def resolve_compile(mode: str, topology: Topology) -> str:
    """`auto` becomes `model` on one process where inductor can build kernels, else `none`.

    Only the one-process layout has been measured and checked against eager
    with it (docs/benchmarks.md); other layouts compile when asked explicitly."""
    if mode != "auto":
        return mode
    if topology.world_size > 1:
        return "none"
    if topology.device.type == "cpu":
        try:  # inductor's CPU kernels are C++, built on the first steps
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception:
            return "none"
    return "model"


class Trainer:
    def __init__(self, cfg: Config, topology: Topology, data: TrainingData,
                 triggers: SaveTriggers | None = None):
        self.cfg = cfg
        self.topology = topology
        self.device = topology.device
        self.state = TrainState()
        t = cfg.trainer
        self.tokens_per_step = t.global_batch_size * cfg.data.seq_len

        self.data = data
        padded_vocab = cfg.model.padded_vocab_size(cfg.model.vocab_size or data.vocab_size, topology.tensor)
        if data.vocab_size > padded_vocab:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size}: the tokenizer has {data.vocab_size} pieces"
            )
        dp_rank, dp_size = topology.dp_rank, topology.data
        # The loader's state_dict() (saved in checkpoints) is collective over the
        # data-parallel group in streaming mode: each rank's streams have their own state.
        self.train_loader = build_train_loader(
            data.train, t.micro_batch_size, dp_rank, dp_size,
            group=parallel_state.get_data_parallel_group() if dp_size > 1 else None)
        self.valid_batches = fixed_batches(data.valid, t.micro_batch_size, t.eval_batches, dp_rank, dp_size)

        if self.device.type == "cpu":
            retain_freed_host_memory()  # each step's large activations reuse mapped pages
        # Model and engine. Weights depend on the seed alone, not on the layout.
        seed_everything(t.seed)
        seed_model_parallel_rng(t.seed, self.device)
        dtype = precision_dtype(cfg.parallel.precision)
        tconfig = transformer_config(
            cfg.model, params_dtype=dtype, tensor_parallel=topology.tensor,
            pipeline_parallel=topology.pipeline, sequence_parallel=cfg.parallel.sequence_parallel,
        )
        if topology.pipeline > 1:
            self.model = build_pipeline(
                cfg.model, tconfig, padded_vocab, t.seed, topology.pipeline, topology.tensor, dp_size,
                cfg.parallel.pipeline_partition,
            )
        else:
            self.model = LlamaModel(cfg.model, tconfig, padded_vocab, seed=t.seed,
                                    loss_chunk_tokens=chunk_tokens(self.device, padded_vocab // topology.tensor))
        self.num_params = cfg.model.num_params(padded_vocab)
        # torch.utils.checkpoint around layers or core attention (megatron-core's recompute needs CUDA).
        apply_activation_checkpointing(self.model, cfg.parallel.activation_checkpointing)
        if cfg.parallel.sequence_parallel:
            reduce_sequence_parallel_grads(self.model)
        optimizer = build_optimizer(cfg, self.model, self.device)
        self.engine = build_engine(
            cfg, self.model, optimizer, build_scheduler(cfg.optim, t.train_steps), dp_size
        )
        compile_model(self.engine.module, resolve_compile(t.compile, topology))
        self.loop_clip = cfg.optim.grad_clip if clips_in_loop(cfg) else 0.0
        if self.loop_clip:
            skip_nonfinite_updates(self.engine.optimizer)
        self.guard = BadStepGuard(t.max_bad_steps, t.on_bad_steps, fp16=cfg.parallel.precision == "fp16")
        self.rollbacks: dict[int, int] = {}  # checkpoint step -> rollbacks to it
        self.stop_requested = False  # set on SIGTERM, once the checkpoint is saved
        self.writer = async_save.install(self.engine) if t.async_checkpoint else None
        self.pending_save: async_save.PendingSave | None = None  # being written in the background
        faults.poison_loss(self.engine.module, lambda: self.state.step + 1, topology.rank)
        seed_everything(t.seed + topology.rank)  # per-rank streams from here on (dropout etc.)

        self.triggers = triggers or SaveTriggers(t.checkpoint_interval, t.checkpoint_minutes, self.device)
        self.callbacks: list[Callback] = [Evaluation(t.eval_interval), ConsoleProgress(t.log_interval),
                                          Checkpointing(self.triggers)]
        self.sinks = build_sinks(cfg) if topology.is_logging_rank else []
        self.callbacks.extend(self.sinks)
        self.memory = MemoryReport(self.engine, cfg, topology.world_size, cfg.model.vocab_size or data.vocab_size)
        self.callbacks.append(self.memory)
        self.flops = FlopsMeter(cfg.model, cfg.data.seq_len, padded_vocab, self.device,
                                cfg.parallel.precision, topology.world_size, cfg.logger.peak_flops)

    # --- the loop ---------------------------------------------------------------------------

    def fit(self) -> TrainState:
        for callback in self.callbacks:
            callback.on_train_start(self)
        while self.state.step < self.cfg.trainer.train_steps:
            start = time.perf_counter()
            skipped_before = self.engine.skipped_steps
            loss, grad_norm = train_step(self.engine, self.train_loader, self.device, self.loop_clip)
            loss = self.data_parallel_mean(loss)  # also waits for the step to finish
            skipped = self.engine.skipped_steps > skipped_before  # counted by DeepSpeed, once
            self.state.skipped_steps += int(skipped)
            step_time = time.perf_counter() - start
            self.state.step += 1
            self.state.consumed_tokens += self.tokens_per_step
            self.state.train_seconds += step_time
            metrics = {
                "step": self.state.step,
                "loss": loss,
                "lr": self.engine.get_lr()[0],
                "grad_norm": grad_norm,
                "step_time": step_time,
                "tokens_per_s": self.tokens_per_step / step_time,
                **self.flops(self.tokens_per_step, step_time),  # tflops, mfu
                **loss_scale(self.engine),
                "consumed_tokens": self.state.consumed_tokens,
                "memory_bytes": memory_bytes(self.device),
                "skipped_steps": self.state.skipped_steps,
            }
            self.log(metrics)
            if self.guard.check(self.state.step, loss, grad_norm, skipped) == "rollback":
                self.rollback(self.guard.reason)
                continue
            for callback in self.callbacks:
                callback.on_step_end(self, metrics)
            faults.kill_if("kill_after_step", self.state.step, self.topology.rank)
            if self.stop_requested:
                break
        # Preempted: the checkpoint is written; evaluating now would only delay the exit.
        for callback in self.sinks if self.stop_requested else self.callbacks:
            callback.on_train_end(self)
        return self.state

    # --- what the callbacks use -------------------------------------------------------------

    def evaluate(self) -> float:
        return self.data_parallel_mean(eval_loss(self.engine, self.valid_batches, self.device))

    def data_parallel_mean(self, value: torch.Tensor) -> float:
        value = value.detach().float().clone()
        if self.topology.data > 1:
            dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
            value /= self.topology.data
        return value.item()

    def log(self, record: dict) -> None:
        for sink in self.sinks:
            sink.log(record)

    def print(self, *args) -> None:
        if self.topology.is_logging_rank:
            print(*args, flush=True)

    def save_checkpoint(self, reason: str = "") -> Path:
        self.finish_pending_save()  # one checkpoint in flight at a time
        t, step = self.cfg.trainer, self.state.step
        id_file = Path(t.run_dir) / checkpoint.WANDB_ID_FILE  # written by the W&B sink
        wandb_run_id = id_file.read_text().strip() if id_file.is_file() else None
        client_state = {
            "trainer": dataclasses.asdict(self.state) | {"last_checkpoint_step": step},
            "loader": self.train_loader.state_dict(),
            "config": dataclasses.asdict(self.cfg),
            "tokenizer_hash": self.data.tokenizer.hash if self.data.tokenizer else None,
            "wandb_run_id": wandb_run_id,
        }
        files = {}
        if self.data.tokenizer is not None:
            files[checkpoint.TOKENIZER_FILE] = self.data.tokenizer.model_bytes
        if wandb_run_id:
            files[checkpoint.WANDB_ID_FILE] = wandb_run_id.encode()
        saved = checkpoint.save(
            self.engine, t.run_dir, step, client_state, files=files, model=dataclasses.asdict(self.cfg.model),
            world_size=self.topology.world_size, keep_last=t.keep_last_checkpoints,
            keep_every=t.keep_every_steps, writer=self.writer,
            before_commit=lambda: faults.kill_if("kill_in_save", step, self.topology.rank),
        )
        self.state.last_checkpoint_step = step
        self.triggers.saved()
        if isinstance(saved, async_save.PendingSave):
            self.pending_save, path = saved, saved.final
            self.print(f"step {step:>6}  checkpoint being written to {path}" + (f" ({reason})" if reason else ""))
            return path
        path = saved
        self.print(f"step {step:>6}  checkpoint saved to {path}" + (f" ({reason})" if reason else ""))
        self.log({"step": self.state.step, "checkpoint/step": self.state.step, "checkpoint/path": str(path)})
        return path

    def finish_pending_save(self) -> None:
        """Commits the checkpoint being written in the background, once every rank has written
        it (waiting for this rank's writes if they are still going)."""
        if self.pending_save is None:
            return
        pending, self.pending_save = self.pending_save, None
        self.writer.wait()
        dist.barrier()  # every rank's files are on disk
        faults.kill_if("kill_in_save", pending.facts["step"], self.topology.rank)
        path = pending.commit()
        dist.barrier()  # the checkpoint is in place for every rank
        self.print(f"step {self.state.step:>6}  checkpoint of step {pending.facts['step']} committed to {path}")
        self.log({"step": self.state.step, "checkpoint/step": pending.facts["step"], "checkpoint/path": str(path)})

    def load_checkpoint(self, path: Path) -> None:
        from pretrain.checkpoint.files import reshard

        # A checkpoint of another parallel layout is resharded; DeepSpeed reloads only its own.
        client_state = (reshard.load_resharded(self, path) if reshard.layout_changed(self, path)
                        else checkpoint.load(self.engine, path))
        saved_hash = client_state.get("tokenizer_hash")
        if saved_hash and self.data.tokenizer and saved_hash != self.data.tokenizer.hash:
            raise checkpoint.RunDirError(
                f"{path}: written with tokenizer {saved_hash[:12]}, but the data uses "
                f"{self.data.tokenizer.hash[:12]}"
            )
        self.state = TrainState(**client_state["trainer"])
        self.train_loader.load_state_dict(client_state["loader"])
        rng = checkpoint.load_rng_state(path, self.topology.rank, self.topology.world_size)
        if rng is not None:  # None: written by another number of ranks
            checkpoint.restore_rng_state(rng)
        self.print(f"resumed from {path} at step {self.state.step}")

    def rollback(self, reason: str) -> None:
        """Back to the newest checkpoint, with the loader kept where it is: the data that
        led to the bad steps is skipped, since replaying it would repeat them exactly."""
        self.finish_pending_save()
        path = checkpoint.latest_checkpoint(self.cfg.trainer.run_dir)
        if path is None:
            raise TrainingDiverged(f"{reason}; no checkpoint to roll back to")
        step = int(path.name.split("_")[-1])
        self.rollbacks[step] = self.rollbacks.get(step, 0) + 1
        if self.rollbacks[step] > MAX_ROLLBACKS_PER_CHECKPOINT:
            raise TrainingDiverged(f"{reason}; rolled back to {path} {MAX_ROLLBACKS_PER_CHECKPOINT} times "
                                   "already")
        position = self.train_loader.state_dict()
        self.print(f"{reason}; rolling back to {path}")
        self.load_checkpoint(path)
        self.train_loader.load_state_dict(position)
        self.log({"step": self.state.step, "rollback/to_step": step})

    def summary(self) -> str:
        s, t = self.state, self.cfg.trainer
        (first_step, first), (last_step, last) = s.valid_history[0], s.valid_history[-1]
        tokens_per_s = s.consumed_tokens / s.train_seconds if s.train_seconds else 0.0
        return "\n".join([
            "── summary " + "─" * 50,
            f"model             {self.cfg.model.name}, {self.num_params / 1e6:.2f}M parameters",
            f"steps             {s.step}",
            f"tokens            {s.consumed_tokens:,}",
            f"throughput        {tokens_per_s:,.0f} tokens/s",
            f"validation loss   {first:.4f} (step {first_step}) → {last:.4f} (step {last_step}), "
            f"ppl {math.exp(min(last, 50)):.2f}",
            f"run directory     {t.run_dir}",
            f"checkpoint        {checkpoint.latest_checkpoint(t.run_dir)}",
            f"config            {Path(t.run_dir) / 'config.yaml'}",
            f"metrics           {Path(t.run_dir) / 'metrics.jsonl'}",
        ])


def run(cfg: Config, resolved_yaml: str) -> TrainState:
    """Everything `pretrain` does after the config is valid."""
    device = resolve_device(cfg.trainer.device)
    check_precision_supported(cfg.parallel.precision, device, cfg.parallel.zero_stage)  # before any data or model work
    # SIGUSR1/SIGTERM from here on are served at the first step boundary.
    triggers = SaveTriggers(cfg.trainer.checkpoint_interval, cfg.trainer.checkpoint_minutes, device)
    triggers.install()
    # Settle what can be known before any process group, data or model exists.
    resume_from = checkpoint.resolve_resume(cfg.trainer.run_dir, cfg.trainer.resume, cfg.model)
    topology = init_process_groups(cfg.parallel.tensor, cfg.parallel.pipeline, device)
    cfg.validate_world(topology.world_size)
    log = print if topology.is_logging_rank else (lambda *_: None)
    if resume_from is not None and topology.rank == 0:
        checkpoint.restore_run_files(resume_from, cfg.trainer.run_dir)  # the W&B run id, before the sinks
    trainer = Trainer(cfg, topology, load_training_data(cfg, topology, log), triggers)
    if resume_from is None and cfg.trainer.init_from:  # continued pretraining from exported weights
        from pretrain.hf.import_weights import init_from

        init_from(trainer, cfg.trainer.init_from)
    checkpoint.write_run_file(cfg.trainer.run_dir, "config.yaml", resolved_yaml.encode())
    checkpoint.write_run_file(cfg.trainer.run_dir, "tokenizer.model", trainer.data.tokenizer.model_bytes)
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
    try:
        state = trainer.fit()
    except TrainingDiverged as err:
        print(f"pretrain: error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_DIVERGED)
    if trainer.stop_requested:
        trainer.print(f"step {state.step:>6}  stopped by SIGTERM with a checkpoint saved; "
                      f"exit status {checkpoint.EXIT_PREEMPTED} asks for a requeue")
        sys.exit(checkpoint.EXIT_PREEMPTED)
    trainer.print(trainer.summary())
    if topology.is_logging_rank:
        checkpoint.write_run_file(
            cfg.trainer.run_dir, "summary.json",
            json.dumps({"step": state.step, "tokens": state.consumed_tokens,
                        "valid_history": state.valid_history}).encode(),
        )
    return state
