"""The whole run's configuration, assembled from the sections each layer owns.

`model.*` is `pretrain.model.config`, `data.*` is `data_pipeline.config`,
`parallel.*` is `parallel.config`; the optimizer, trainer and logger sections
belong to training and live here. Every check that can be made before a
process group, a tokenizer or a model exists is made in the sections'
`__post_init__` or here, and fails with one line naming the key and what was
expected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.typed_config import ConfigError, from_dict, require
from data_pipeline.config import BlendSource, DataConfig, TokenizerConfig
from parallel.config import ParallelConfig
from pretrain.model.config import ModelConfig

__all__ = ["BlendSource", "Config", "ConfigError", "DataConfig", "LoggerConfig", "ModelConfig", "OptimConfig",
           "ParallelConfig", "SpikeConfig", "TokenizerConfig", "TrainerConfig", "from_dict"]


# The learning rate a schedule decays to when `optim.min_lr` is not set: lr / 5
# (the default lr 2e-3 decays to 4e-4).
MIN_LR_DIVISOR = 5


@dataclass
class OptimConfig:
    lr: float = 3e-3
    # None: lr / MIN_LR_DIVISOR, resolved here, so the schedule, the checkpoints and
    # the logged config all hold the number.
    min_lr: float | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 30
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        require(self.lr > 0, f"optim.lr={self.lr}: expected > 0")
        if self.min_lr is None:
            self.min_lr = self.lr / MIN_LR_DIVISOR
        require(0 <= self.min_lr <= self.lr,
                f"optim.min_lr={self.min_lr}: expected in [0, optim.lr={self.lr}] (or null: optim.lr / "
                f"{MIN_LR_DIVISOR})")
        require(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps}: expected >= 0")


# The signals the spike detector can watch (`trainer.spike.metrics`).
SPIKE_METRICS = ("loss", "grad_norm")


@dataclass
class SpikeConfig:
    """Loss-spike detection, `trainer.spike.*` (see `training.spikes`).

    A step is a spike when its training loss or gradient norm lies more than
    `sigma_factor` robust standard deviations above the median of the last
    `window` accepted steps (once `warmup` of them are there).
    """

    # off: no detection | log: record it, keep the update | skip: refuse the update
    # (decided on the gradient norm, known before the update) | rollback: back to the
    # newest checkpoint, skipping the data that led there.
    action: Literal["off", "log", "skip", "rollback"] = "log"
    metrics: list[Literal["loss", "grad_norm"]] = field(default_factory=lambda: list(SPIKE_METRICS))
    window: int = 128
    warmup: int = 32
    sigma_factor: float = 6.0

    def __post_init__(self) -> None:
        require(self.window >= 3, f"trainer.spike.window={self.window}: expected >= 3")
        require(3 <= self.warmup <= self.window,
                f"trainer.spike.warmup={self.warmup}: expected in [3, trainer.spike.window={self.window}]")
        require(self.sigma_factor > 0, f"trainer.spike.sigma_factor={self.sigma_factor}: expected > 0")
        require(len(self.metrics) > 0 and len(set(self.metrics)) == len(self.metrics),
                f"trainer.spike.metrics={self.metrics}: expected one or both of {', '.join(SPIKE_METRICS)}, "
                "each once")
        require(self.action != "skip" or "grad_norm" in self.metrics,
                f"trainer.spike.metrics={self.metrics} with trainer.spike.action=skip: expected grad_norm among "
                "them (an update is refused on its gradient norm, the only signal known before it is applied)")


# Every callback `trainer.callbacks` can name (`training.build.CALLBACKS`); all of them by default.
CALLBACK_NAMES = ("evaluation", "progress", "checkpointing", "memory_report")


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
    # Finite loss or gradient-norm spikes: detected against the recent steps, then
    # logged, skipped or rolled back (see SpikeConfig).
    spike: SpikeConfig = field(default_factory=SpikeConfig)
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
    # The callbacks run around every step, by name, in this order (`training.build.CALLBACKS`).
    # Metrics sinks (metrics.jsonl and `logger.kind`) are always added on the logging rank.
    callbacks: list[str] = field(default_factory=lambda: list(CALLBACK_NAMES))
    # false: the console shows the project's lines and the warnings that matter, and
    # third-party output (DeepSpeed, megatron-core, torch, compilers) goes to
    # <run_dir>/logs/rank<r>.log only (`common.console`); true: the console shows it all.
    verbose: bool = False

    def __post_init__(self) -> None:
        require(self.init_from is None or self.init_from.strip() != "",
                "trainer.init_from='': expected a path or null")
        for key in ("train_steps", "micro_batch_size", "global_batch_size", "eval_batches",
                    "log_interval"):
            require(getattr(self, key) > 0, f"trainer.{key}={getattr(self, key)}: expected > 0")
        for key in ("eval_interval", "checkpoint_interval", "checkpoint_minutes", "keep_last_checkpoints",
                    "keep_every_steps", "max_bad_steps"):
            require(getattr(self, key) >= 0, f"trainer.{key}={getattr(self, key)}: expected >= 0")
        for i, name in enumerate(self.callbacks):
            require(name in CALLBACK_NAMES,
                    f"trainer.callbacks[{i}]={name!r}: expected one of {', '.join(CALLBACK_NAMES)}")


@dataclass
class LoggerConfig:
    # Where metrics go besides the console and metrics.jsonl (always written).
    kind: Literal["console", "wandb", "tensorboard"] = "console"
    project: str = "pretrain"  # W&B project
    name: str | None = None  # W&B run name
    # W&B; auto follows WANDB_MODE, else online with WANDB_API_KEY, else offline
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    # Peak FLOP/s of one device for MFU; None: looked up for known GPUs, else MFU is not reported.
    peak_flops: float | None = None

    def __post_init__(self) -> None:
        require(self.peak_flops is None or self.peak_flops > 0,
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
        require(
            self.data.seq_len <= self.model.max_seq_len,
            f"data.seq_len={self.data.seq_len}: expected at most model.max_seq_len={self.model.max_seq_len}",
        )
        if self.parallel.context > 1:
            self._check_context_split()
        require(not (self.model.moe.enabled and self.parallel.tensor > 1 and not self.parallel.sequence_parallel),
                "model.moe.num_experts > 0 with parallel.tensor > 1: expected parallel.sequence_parallel=true "
                "(megatron-core's MoE layers take sequence-parallel slices under tensor parallelism)")
        require(not (self.model.moe.enabled and self.parallel.precision == "fp16"),
                "parallel.precision=fp16 with model.moe.num_experts > 0: expected bf16 or fp32 (the "
                "routers' auxiliary-loss gradients are injected in backward without the fp16 loss scale)")
        if self.parallel.expert > 1:
            self._check_expert_split()
        require(not (self.trainer.compile == "model" and self.parallel.pipeline > 1),
                "trainer.compile=model with parallel.pipeline > 1: expected trainer.compile=layers "
                "(pipeline stages are separate modules)")

    def _check_expert_split(self) -> None:
        """Expert parallelism gives each rank num_experts / parallel.expert whole experts."""
        moe, expert = self.model.moe, self.parallel.expert
        require(moe.enabled, f"parallel.expert={expert}: expected model.moe.num_experts > 0 (a dense model "
                             "has no experts to split)")
        require(moe.num_experts % expert == 0,
                f"model.moe.num_experts={moe.num_experts}: expected a multiple of parallel.expert={expert}")

    def _check_context_split(self) -> None:
        """Context parallelism cuts each sequence into equal slices and exchanges attention
        heads all-to-all (`parallel.context`): both must divide."""
        m, p, seq = self.model, self.parallel, self.data.seq_len
        require(seq % p.context == 0,
                f"data.seq_len={seq}: expected a multiple of parallel.context={p.context}")
        heads, groups = m.num_attention_heads // p.tensor, m.query_groups // p.tensor
        require(heads % p.context == 0,
                f"model.num_attention_heads={m.num_attention_heads}: expected the {heads} heads per tensor-"
                f"parallel rank to be a multiple of parallel.context={p.context} (attention is split by heads)")
        require(groups % p.context == 0 or p.context % groups == 0,
                f"model.num_query_groups={m.query_groups}: expected the {groups} query groups per tensor-"
                f"parallel rank to divide or be divided by parallel.context={p.context}")

    def validate_world(self, world_size: int) -> int:
        """Checks the parallel layout against the world; returns the data-parallel size."""
        m, p, t = self.model, self.parallel, self.trainer
        model_parallel = p.tensor * p.pipeline * p.context
        require(world_size % model_parallel == 0,
                f"world size {world_size}: expected a multiple of parallel.tensor x parallel.pipeline "
                f"x parallel.context = {model_parallel}")
        for key in ("num_attention_heads", "ffn_hidden_size"):
            require(getattr(m, key) % p.tensor == 0,
                    f"model.{key}={getattr(m, key)}: expected a multiple of parallel.tensor={p.tensor}")
        require(m.query_groups % p.tensor == 0,
                f"model.num_query_groups={m.query_groups}: expected a multiple of parallel.tensor={p.tensor}")
        require(m.num_layers >= p.pipeline,
                f"model.num_layers={m.num_layers}: expected at least parallel.pipeline={p.pipeline}")
        data_parallel = world_size // model_parallel
        # Expert-parallel ranks are taken from the ranks that hold the same dense weights.
        require(data_parallel * p.context % p.expert == 0,
                f"parallel.expert={p.expert}: expected a divisor of the data-parallel x context-parallel "
                f"size {data_parallel * p.context} (world size {world_size})")
        per_step = t.micro_batch_size * data_parallel
        require(t.global_batch_size % per_step == 0,
                f"trainer.global_batch_size={t.global_batch_size}: expected a multiple of "
                f"micro_batch_size x data-parallel size = {per_step}")
        return data_parallel
