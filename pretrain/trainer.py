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

from data_pipeline.dataset import DataParallelLoader, PackedSequenceDataset, fixed_batches
from data_pipeline.indexed import open_shard
from data_pipeline.prepare import prepare_data
from data_pipeline.tokenizer import Tokenizer
from parallel.engine import build_engine, clips_in_loop, eval_loss, precision_dtype, train_step
from parallel.pipeline import build_pipeline
from parallel.rng import seed_model_parallel_rng
from parallel.tensor import reduce_sequence_parallel_grads
from parallel.groups import Topology, init_process_groups, resolve_device
from pretrain import checkpoint
from pretrain.callbacks import (
    Callback,
    Checkpointing,
    ConsoleProgress,
    Evaluation,
    build_sinks,
    loss_scale,
    memory_bytes,
)
from pretrain.config import Config, ConfigError
from pretrain.flops import FlopsMeter
from pretrain.model import LlamaModel, transformer_config
from pretrain.optim import build_optimizer, build_scheduler


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    consumed_tokens: int = 0
    valid_history: list = field(default_factory=list)  # (step, loss)
    last_checkpoint_step: int = -1
    train_seconds: float = 0.0


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


class Trainer:
    def __init__(self, cfg: Config, topology: Topology, data: TrainingData):
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
        self.train_loader = DataParallelLoader(data.train, t.micro_batch_size, dp_rank, dp_size)
        self.valid_batches = fixed_batches(data.valid, t.micro_batch_size, t.eval_batches, dp_rank, dp_size)

        # Model and engine. Weights depend on the seed alone, not on the layout.
        seed_everything(t.seed)
        seed_model_parallel_rng(t.seed, self.device)
        dtype = precision_dtype(cfg.parallel.precision)
        recompute = None if cfg.parallel.activation_checkpointing == "none" else cfg.parallel.activation_checkpointing
        tconfig = transformer_config(
            cfg.model, params_dtype=dtype, tensor_parallel=topology.tensor,
            pipeline_parallel=topology.pipeline, sequence_parallel=cfg.parallel.sequence_parallel,
            recompute=recompute,
        )
        if topology.pipeline > 1:
            self.model = build_pipeline(
                cfg.model, tconfig, padded_vocab, t.seed, topology.pipeline, topology.tensor, dp_size,
                cfg.parallel.pipeline_partition,
            )
        else:
            self.model = LlamaModel(cfg.model, tconfig, padded_vocab, seed=t.seed)
        self.num_params = cfg.model.num_params(padded_vocab)
        if cfg.parallel.sequence_parallel:
            reduce_sequence_parallel_grads(self.model)
        optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.engine = build_engine(
            cfg, self.model, optimizer, build_scheduler(cfg.optim, t.train_steps), dp_size
        )
        compile_model(self.engine.module, t.compile)
        self.loop_clip = cfg.optim.grad_clip if clips_in_loop(cfg) else 0.0
        seed_everything(t.seed + topology.rank)  # per-rank streams from here on (dropout etc.)

        self.callbacks: list[Callback] = [Evaluation(t.eval_interval), ConsoleProgress(t.log_interval),
                                          Checkpointing(t.checkpoint_interval)]
        self.sinks = build_sinks(cfg) if topology.is_logging_rank else []
        self.callbacks.extend(self.sinks)
        self.flops = FlopsMeter(cfg.model, cfg.data.seq_len, padded_vocab, self.device,
                                cfg.parallel.precision, topology.world_size, cfg.logger.peak_flops)

    # --- the loop ---------------------------------------------------------------------------

    def fit(self) -> TrainState:
        for callback in self.callbacks:
            callback.on_train_start(self)
        while self.state.step < self.cfg.trainer.train_steps:
            start = time.perf_counter()
            loss, grad_norm = train_step(self.engine, self.train_loader, self.device, self.loop_clip)
            loss = self.data_parallel_mean(loss)  # also waits for the step to finish
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
            }
            if not math.isfinite(loss):
                raise FloatingPointError(f"step {self.state.step}: loss is {loss}")
            self.log(metrics)
            for callback in self.callbacks:
                callback.on_step_end(self, metrics)
        for callback in self.callbacks:
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

    def save_checkpoint(self) -> Path:
        client_state = {
            "trainer": dataclasses.asdict(self.state) | {"last_checkpoint_step": self.state.step},
            "loader": self.train_loader.state_dict(),
            "config": dataclasses.asdict(self.cfg),
            "tokenizer_hash": self.data.tokenizer.hash if self.data.tokenizer else None,
        }
        path = checkpoint.save(self.engine, self.cfg.trainer.run_dir, self.state.step, client_state)
        self.state.last_checkpoint_step = self.state.step
        self.print(f"step {self.state.step:>6}  checkpoint saved to {path}")
        self.log({"step": self.state.step, "checkpoint/step": self.state.step, "checkpoint/path": str(path)})
        return path

    def load_checkpoint(self, path: Path) -> None:
        client_state = checkpoint.load(self.engine, path)
        saved_hash = client_state.get("tokenizer_hash")
        if saved_hash and self.data.tokenizer and saved_hash != self.data.tokenizer.hash:
            raise checkpoint.RunDirError(
                f"{path}: written with tokenizer {saved_hash[:12]}, but the data uses "
                f"{self.data.tokenizer.hash[:12]}"
            )
        self.state = TrainState(**client_state["trainer"])
        self.train_loader.load_state_dict(client_state["loader"])
        self.print(f"resumed from {path} at step {self.state.step}")

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
    if cfg.parallel.sequence_parallel and device.type != "cuda":
        # megatron-core's sequence-parallel linear layers allocate their
        # gather and reduce-scatter buffers on the current CUDA device.
        raise ConfigError("parallel.sequence_parallel=true: needs CUDA devices (trainer.device=cuda)")
    # Settle what can be known before any process group, data or model exists.
    resume_from = checkpoint.resolve_resume(cfg.trainer.run_dir, cfg.trainer.resume)
    topology = init_process_groups(cfg.parallel.tensor, cfg.parallel.pipeline, device)
    cfg.validate_world(topology.world_size)
    log = print if topology.is_logging_rank else (lambda *_: None)
    trainer = Trainer(cfg, topology, load_training_data(cfg, topology, log))
    checkpoint.write_run_file(cfg.trainer.run_dir, "config.yaml", resolved_yaml.encode())
    checkpoint.write_run_file(cfg.trainer.run_dir, "tokenizer.model", trainer.data.tokenizer.model_bytes)
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
    state = trainer.fit()
    trainer.print(trainer.summary())
    if topology.is_logging_rank:
        checkpoint.write_run_file(
            cfg.trainer.run_dir, "summary.json",
            json.dumps({"step": state.step, "tokens": state.consumed_tokens,
                        "valid_history": state.valid_history}).encode(),
        )
    return state
