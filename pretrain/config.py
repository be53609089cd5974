"""Typed configuration: the Hydra tree becomes these dataclasses at the entry point.

Every check that can be made before a process group, a tokenizer or a model
exists is made here, and fails with one line naming the key and what was
expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    name: str = "tiny"
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 8
    num_query_groups: int | None = None  # None: one key/value head per query head
    ffn_hidden_size: int = 688
    max_seq_len: int = 2048
    rotary_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False
    vocab_size: int | None = None  # None: taken from the tokenizer
    # The embedding and output layer are padded to a multiple of this (times TP).
    vocab_multiple: int = 128

    def __post_init__(self) -> None:
        for key in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                    "max_seq_len", "vocab_multiple"):
            _require(getattr(self, key) > 0, f"model.{key}={getattr(self, key)}: expected > 0")
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            f"model.hidden_size={self.hidden_size}: expected a multiple of "
            f"model.num_attention_heads={self.num_attention_heads}",
        )
        _require(
            self.query_groups > 0 and self.num_attention_heads % self.query_groups == 0,
            f"model.num_attention_heads={self.num_attention_heads}: expected a multiple of "
            f"model.num_query_groups={self.num_query_groups}",
        )
        _require(self.head_dim % 2 == 0, f"model head size {self.head_dim}: expected even for rotary")

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, vocab_size: int, tensor_parallel: int = 1) -> int:
        multiple = self.vocab_multiple * tensor_parallel
        return -(-vocab_size // multiple) * multiple

    def num_params(self, padded_vocab_size: int) -> int:
        """Parameter count, embeddings included."""
        h, f, kv = self.hidden_size, self.ffn_hidden_size, self.query_groups * self.head_dim
        per_layer = h * (h + 2 * kv) + h * h + 3 * h * f + 2 * h
        embeddings = padded_vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h


@dataclass
class TokenizerConfig:
    model: str | None = None  # path to an existing SentencePiece model; None trains one
    vocab_size: int = 4096
    model_type: Literal["bpe", "unigram", "char"] = "bpe"
    sample_bytes: int = 4_000_000  # how much of the corpus the tokenizer is trained on
    byte_fallback: bool | None = None  # None: on for bpe and unigram, off for char
    user_defined_symbols: list[str] = field(default_factory=list)  # pieces never split

    def __post_init__(self) -> None:
        _require(self.vocab_size >= 64, f"data.tokenizer.vocab_size={self.vocab_size}: expected >= 64")


@dataclass
class BlendSource:
    path: str  # a directory written by `pretrain-data preprocess`
    weight: float = 1.0


@dataclass
class DataConfig:
    # "stdlib" builds a corpus from the Python standard library's sources and
    # documentation; otherwise a list of files, directories or globs (.txt,
    # .jsonl[.gz|.zst], .parquet), saved `datasets` directories,
    # `builder:NAME:FILES` or `hub:NAME[:SPLIT]`.
    sources: list[str] = field(default_factory=lambda: ["stdlib"])
    max_corpus_bytes: int = 12_000_000
    cache_dir: str = ".cache/data"
    seq_len: int = 256
    valid_fraction: float = 0.02
    seed: int = 1234
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # Cleaning, applied while preprocessing `sources`.
    text_field: str = "text"
    normalize: Literal["NFC", "NFKC", "NFD", "NFKD", "none"] = "NFC"
    strip_control: bool = True
    min_chars: int = 1
    max_chars: int = 0  # 0: no limit
    dedup: bool = True
    on_bad_record: Literal["skip", "error"] = "skip"
    num_shards: int = 1
    workers: int = 0  # preprocessing processes; 0: one per core
    # Train on preprocessed corpora instead of `sources`, mixed by weight.
    blend: list[BlendSource] = field(default_factory=list)
    # Megatron's end-of-document options.
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    # Train straight from `sources`, cleaned, tokenized and packed on the fly
    # (no preprocessing pass), in this many loader processes per rank (0: in
    # the training process).
    streaming: bool = False
    streaming_workers: int = 2

    def __post_init__(self) -> None:
        _require(len(self.sources) > 0, "data.sources: expected at least one path or 'stdlib'")
        _require(self.streaming_workers >= 0,
                 f"data.streaming_workers={self.streaming_workers}: expected >= 0")
        _require(not (self.streaming and self.blend),
                 "data.streaming=true with data.blend: expected one of them (a blend mixes preprocessed corpora)")
        _require(self.seq_len > 0, f"data.seq_len={self.seq_len}: expected > 0")
        _require(0 < self.valid_fraction < 1,
                 f"data.valid_fraction={self.valid_fraction}: expected between 0 and 1")
        _require(self.num_shards >= 1, f"data.num_shards={self.num_shards}: expected >= 1")
        _require(self.min_chars >= 0 and self.max_chars >= 0,
                 "data.min_chars, data.max_chars: expected >= 0")
        for i, entry in enumerate(self.blend):
            _require(entry.weight >= 0, f"data.blend[{i}].weight={entry.weight}: expected >= 0")
        _require(not self.blend or sum(e.weight for e in self.blend) > 0,
                 "data.blend: expected a positive total weight")


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    zero_stage: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    sequence_parallel: bool = False
    # How pipeline stages are cut: equal numbers of transformer layers, or of parameters.
    pipeline_partition: Literal["uniform", "parameters"] = "uniform"
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    # ZeRO-Offload: fp32 master weights, gradients and Adam moments in host memory,
    # updated by DeepSpeed's CPU Adam (a C++ op built on first use).
    offload_optimizer: bool = False
    # fp16's dynamic loss scale (needs zero_stage >= 1): it starts at 2**fp16_initial_scale_power;
    # every overflowing step is skipped, and from the fp16_hysteresis-th overflow on each one
    # halves the scale; fp16_loss_scale_window steps without an overflow double it.
    fp16_initial_scale_power: int = 16
    fp16_loss_scale_window: int = 1000
    fp16_hysteresis: int = 2

    def __post_init__(self) -> None:
        _require(self.tensor >= 1, f"parallel.tensor={self.tensor}: expected >= 1")
        _require(0 <= self.fp16_initial_scale_power <= 64,
                 f"parallel.fp16_initial_scale_power={self.fp16_initial_scale_power}: expected 0 to 64")
        for key in ("fp16_loss_scale_window", "fp16_hysteresis"):
            _require(getattr(self, key) >= 1, f"parallel.{key}={getattr(self, key)}: expected >= 1")
        _require(not (self.offload_optimizer and self.zero_stage == 0),
                 "parallel.offload_optimizer=true: expected parallel.zero_stage >= 1 "
                 "(DeepSpeed offloads ZeRO's optimizer partitions)")
        _require(self.pipeline >= 1, f"parallel.pipeline={self.pipeline}: expected >= 1")
        _require(self.zero_stage in (0, 1, 2, 3),
                 f"parallel.zero_stage={self.zero_stage}: expected 0, 1, 2 or 3")
        _require(not (self.pipeline > 1 and self.zero_stage > 1),
                 f"parallel.zero_stage={self.zero_stage} with parallel.pipeline={self.pipeline}: "
                 "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only")
        _require(not (self.pipeline > 1 and self.precision == "bf16" and self.zero_stage == 0),
                 f"parallel.precision=bf16 with parallel.pipeline={self.pipeline}: expected "
                 "parallel.zero_stage=1 (DeepSpeed's pipeline engine reloads bf16 optimizer "
                 "state only under ZeRO)")
        _require(not (self.sequence_parallel and self.tensor == 1),
                 "parallel.sequence_parallel=true: expected parallel.tensor > 1")


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 30
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"optim.lr={self.lr}: expected > 0")
        _require(0 <= self.min_lr <= self.lr, f"optim.min_lr={self.min_lr}: expected in [0, optim.lr]")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps}: expected >= 0")


@dataclass
class TrainerConfig:
    run_dir: str = "runs/default"
    resume: str = "auto"  # auto | never | <checkpoint path>
    train_steps: int = 300
    micro_batch_size: int = 16
    global_batch_size: int = 16
    eval_interval: int = 100
    eval_batches: int = 8
    log_interval: int = 10
    checkpoint_interval: int = 0  # 0: only at the end
    # Also checkpoint every this many minutes of wall time (0: off); SIGUSR1
    # saves at the next step, SIGTERM saves and exits with status 75.
    checkpoint_minutes: float = 0.0
    keep_last_checkpoints: int = 3  # retention: the newest N checkpoints (0: keep all)
    keep_every_steps: int = 0  # ...plus, for good, those of steps that are multiples of M (0: none)
    # Copy the state to CPU memory and write it in a background thread (committed
    # once every rank has written it); the step stalls only for the copy.
    async_checkpoint: bool = False
    # Steps with a non-finite loss or gradient norm are skipped; more than this
    # many in a row roll back to the newest checkpoint (skipping the data that
    # led there) or abort.
    max_bad_steps: int = 3
    on_bad_steps: Literal["rollback", "abort"] = "rollback"
    seed: int = 1234
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch.compile: of each transformer layer, or of the whole model (which
    # also fuses the fp32 cross entropy); the first steps pay the compile time.
    # auto: the whole model on one process where torch.compile can build
    # kernels (CUDA, or CPU with a C++ compiler), none elsewhere.
    compile: Literal["auto", "none", "layers", "model"] = "none"
    # Continued pretraining: weights to start from (a Hugging Face Llama
    # directory or a .safetensors file, e.g. from pretrain-export) instead of
    # the seed's; the optimizer starts fresh at step 0. Ignored when resuming.
    init_from: str | None = None

    def __post_init__(self) -> None:
        _require(self.init_from is None or self.init_from.strip() != "",
                 "trainer.init_from='': expected a path or null")
        for key in ("train_steps", "micro_batch_size", "global_batch_size", "eval_batches",
                    "log_interval"):
            _require(getattr(self, key) > 0, f"trainer.{key}={getattr(self, key)}: expected > 0")
        for key in ("eval_interval", "checkpoint_interval", "checkpoint_minutes", "keep_last_checkpoints",
                    "keep_every_steps", "max_bad_steps"):
            _require(getattr(self, key) >= 0, f"trainer.{key}={getattr(self, key)}: expected >= 0")


@dataclass
class LoggerConfig:
    # Where metrics go besides the console and metrics.jsonl (always written).
    kind: Literal["console", "wandb", "tensorboard"] = "console"
    project: str = "pretrain"  # W&B project
    name: str | None = None  # W&B run name
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # W&B; auto: online with a key
    # Peak FLOP/s of one device for MFU; None: looked up for known GPUs, else MFU is not reported.
    peak_flops: float | None = None

    def __post_init__(self) -> None:
        _require(self.peak_flops is None or self.peak_flops > 0,
                 f"logger.peak_flops={self.peak_flops}: expected > 0 or null")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self) -> None:
        _require(
            self.data.seq_len <= self.model.max_seq_len,
            f"data.seq_len={self.data.seq_len}: expected at most model.max_seq_len={self.model.max_seq_len}",
        )
        _require(not (self.trainer.compile == "model" and self.parallel.pipeline > 1),
                 "trainer.compile=model with parallel.pipeline > 1: expected trainer.compile=layers "
                 "(pipeline stages are separate modules)")

    def validate_world(self, world_size: int) -> int:
        """Checks the parallel layout against the world; returns the data-parallel size."""
        m, p, t = self.model, self.parallel, self.trainer
        model_parallel = p.tensor * p.pipeline
        _require(world_size % model_parallel == 0,
                 f"world size {world_size}: expected a multiple of parallel.tensor x parallel.pipeline "
                 f"= {model_parallel}")
        for key in ("num_attention_heads", "ffn_hidden_size"):
            _require(getattr(m, key) % p.tensor == 0,
                     f"model.{key}={getattr(m, key)}: expected a multiple of parallel.tensor={p.tensor}")
        _require(m.query_groups % p.tensor == 0,
                 f"model.num_query_groups={m.query_groups}: expected a multiple of parallel.tensor={p.tensor}")
        _require(m.num_layers >= p.pipeline,
                 f"model.num_layers={m.num_layers}: expected at least parallel.pipeline={p.pipeline}")
        data_parallel = world_size // model_parallel
        per_step = t.micro_batch_size * data_parallel
        _require(t.global_batch_size % per_step == 0,
                 f"trainer.global_batch_size={t.global_batch_size}: expected a multiple of "
                 f"micro_batch_size x data-parallel size = {per_step}")
        return data_parallel


# --- dict → dataclass, with one-line errors ---------------------------------------------

def from_dict(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Builds dataclass `cls` from nested dicts, refusing unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(
                f"{prefix}{key}: unknown key; expected one of {', '.join(sorted(names))}"
            )
    kwargs = {key: _convert(hints[key], value, f"{prefix}{key}") for key, value in values.items()}
    return cls(**kwargs)


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{key}={value!r}: expected {hint.__name__}")
        return value
    return value
