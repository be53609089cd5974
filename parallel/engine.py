"""The DeepSpeed engine: its config generated from ours, and the wrapper the trainer drives.

`Engine` is the only way the trainer and the checkpointer touch DeepSpeed:
a step, an evaluation, the learning rate and loss scale, the skipped-update
count, and the hook that writes checkpoint files in the background. What
DeepSpeed keeps inside (its optimizer wrappers, its checkpoint engine) stays
behind it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import deepspeed
import torch
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.utils import clip_grad_norm_

from common.typed_config import ConfigError
from parallel.config import ParallelConfig
from parallel.context import ContextSplit
from parallel.groups import MegatronMPU
from parallel.refuse import refuse_updates
from parallel.step import eval_loss, skip_nonfinite_updates, train_step


@dataclass(frozen=True)
class EngineOptions:
    """What the engine needs to know beyond the `parallel` section."""

    micro_batch_size: int
    global_batch_size: int
    grad_clip: float
    # Batches carry position ids and a document mask, which pipeline stages pass on.
    has_attention_mask: bool = False
    # Offloaded optimizer states in page-locked host memory (for copies to and from a GPU).
    pin_memory: bool = False


def precision_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def clips_in_loop(parallel: ParallelConfig) -> bool:
    """Whether the loop, not DeepSpeed, clips gradients.

    DeepSpeed's mixed-precision and ZeRO optimizers report the gradient norm
    they clip by; with plain fp32 and no ZeRO it clips without recording the
    norm, so there we clip (with DeepSpeed's model-parallel aware function)
    and keep the norm for logging. The pipeline engine runs its whole step
    itself, so there DeepSpeed clips.
    """
    return parallel.precision == "fp32" and parallel.zero_stage == 0 and parallel.pipeline == 1


def deepspeed_config(parallel: ParallelConfig, options: EngineOptions, data_parallel: int) -> dict:
    p, o = parallel, options
    accumulation = o.global_batch_size // (o.micro_batch_size * data_parallel)
    return {
        # DeepSpeed counts a micro-batch per rank of its data-parallel group, which is
        # data x context (`parallel.groups.MegatronMPU`): each sequence once per slice.
        "train_batch_size": o.global_batch_size * p.context,
        "train_micro_batch_size_per_gpu": o.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": 0.0 if clips_in_loop(p) else o.grad_clip,
        "zero_optimization": {
            "stage": p.zero_stage,
            **({"offload_optimizer": {"device": "cpu", "pin_memory": o.pin_memory}}
               if p.offload_optimizer else {}),
        },
        "bf16": {"enabled": p.precision == "bf16"},
        "fp16": {
            "enabled": p.precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": p.fp16_initial_scale_power,
            "loss_scale_window": p.fp16_loss_scale_window,
            "hysteresis": p.fp16_hysteresis,
            "min_loss_scale": 1,
        },
        # The pipeline engine sends each stage's output split over the tensor-parallel
        # ranks and gathers it on arrival, which assumes every tensor rank holds the
        # same activations; under sequence parallelism each holds its own slice.
        **({"pipeline": {"pipe_partitioned": False, "grad_partitioned": False}}
           if p.sequence_parallel and p.pipeline > 1 else {}),
        # Our AdamW is torch's; DeepSpeed only vouches for its own by default.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def check_precision_supported(precision: str, device: torch.device, zero_stage: int) -> None:
    """fp16 needs an accelerator with half-precision kernels; DeepSpeed's CPU
    accelerator has them only on CPUs with AVX512-FP16 or AMX.

    fp16 also needs ZeRO: DeepSpeed's engine multiplies the loss by the loss scale
    in backward only for its ZeRO optimizers, while its ZeRO-0 fp16 optimizers
    still divide the gradients by it, so every update would shrink by the scale
    and gradient clipping would never act.
    """
    from deepspeed.accelerator import get_accelerator

    if precision == "fp16" and device.type == "cpu" and not get_accelerator().is_fp16_supported():
        raise ConfigError("parallel.precision=fp16: DeepSpeed supports fp16 on this CPU only with "
                          "AVX512-FP16/AMX; expected bf16 or fp32 here, or trainer.device=cuda")
    if precision == "fp16" and zero_stage == 0:
        raise ConfigError("parallel.precision=fp16 with parallel.zero_stage=0: expected parallel.zero_stage "
                          ">= 1 (DeepSpeed applies the fp16 loss scale in backward only under ZeRO)")


def build_engine(model, optimizer, scheduler_factory, parallel: ParallelConfig, options: EngineOptions,
                 data_parallel: int):
    """`deepspeed.initialize` for our config; returns DeepSpeed's engine (see `Engine` to drive it)."""
    check_precision_supported(parallel.precision, next(model.parameters()).device, parallel.zero_stage)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler_factory,
        config=deepspeed_config(parallel, options, data_parallel),
        # The pipeline module brings its own grid of groups (same rank order).
        mpu=None if isinstance(model, PipelineModule) else MegatronMPU,
        dist_init_required=False,
    )
    if isinstance(engine, PipelineEngine) and parallel.precision == "fp32" and parallel.zero_stage == 0:
        keep_clipped_norm(engine)
    if isinstance(engine, PipelineEngine) and (options.has_attention_mask or parallel.context > 1):
        # The stages pass on (hidden, position ids, attention mask): DeepSpeed sends the last
        # tensor as fp16 and back to bool (NCCL has no bool), and sends no gradient for it.
        engine.set_has_attention_mask(True)
    if data_parallel * parallel.context == 1 and parallel.zero_stage == 0 \
            and not isinstance(engine, PipelineEngine):
        # With one data-parallel replica DeepSpeed would still flatten every gradient into a
        # bucket, all-reduce it over a group of one, divide it by 1 and copy it back, every step.
        engine.enable_backward_allreduce = False
    return engine


def keep_clipped_norm(engine) -> None:
    """Records the gradient norm of DeepSpeed's plain fp32 clipping.

    The pipeline engine without ZeRO clips through `clip_fp32_gradients`,
    which computes the global norm and drops it, so `get_global_grad_norm`
    would report nothing; this keeps it for logging and the bad-step checks.
    """

    def clip() -> None:
        engine._global_grad_norm = clip_grad_norm_(
            parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(), mpu=engine.mpu)

    engine.clip_fp32_gradients = clip


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's mean loss over the step's micro-batches
    grad_norm: float  # before clipping; nan when unknown
    skipped: bool  # the update was refused (non-finite gradients, or an fp16 overflow)


class Engine:
    """A DeepSpeed engine (`deepspeed`) behind the calls a training loop makes.

    With `loop_clip` > 0 the step clips gradients itself (see `clips_in_loop`)
    and refuses an update whose gradient norm is not finite, as DeepSpeed's own
    optimizers do on the other paths.
    """

    def __init__(self, deepspeed_engine, device: torch.device, loop_clip: float = 0.0,
                 context: ContextSplit | None = None):
        self.deepspeed = deepspeed_engine
        self.device = device
        self.loop_clip = loop_clip
        self.context = context  # this rank's slice of each sequence (`parallel.context`)
        if loop_clip:
            skip_nonfinite_updates(deepspeed_engine.optimizer)

    @property
    def module(self) -> torch.nn.Module:
        return self.deepspeed.module

    def train_step(self, batches: Iterator[dict]) -> StepResult:
        skipped_before = self.deepspeed.skipped_steps  # counted by DeepSpeed, once per refused update
        loss, grad_norm = train_step(self.deepspeed, batches, self.device, self.loop_clip, self.context)
        return StepResult(loss, grad_norm, self.deepspeed.skipped_steps > skipped_before)

    def refuse_updates(self, refuse: Callable[[float], bool]) -> None:
        """Asks `refuse(gradient norm)` before each update is applied; True refuses it as a
        non-finite one is refused (counted in `skipped_steps`). See `parallel.refuse`."""
        refuse_updates(self.deepspeed, refuse, loop_sets_overflow=bool(self.loop_clip))

    def eval_loss(self, batches: list[dict]) -> torch.Tensor:
        return eval_loss(self.deepspeed, batches, self.device, self.context)

    def lr(self) -> float:
        return self.deepspeed.get_lr()[0]

    def loss_scale(self) -> dict[str, float]:
        """fp16's dynamic loss scale; bf16 and fp32 have none, so nothing is reported for them."""
        if not self.deepspeed.fp16_enabled():
            return {}
        scale = getattr(self.deepspeed.optimizer, "loss_scale", None)
        return {} if scale is None else {"loss_scale": float(scale)}

    def wrap_checkpoint_writes(self, wrap: Callable):
        """Routes DeepSpeed's checkpoint file writes through `wrap(its checkpoint engine)`
        (e.g. a background writer); returns the wrapper."""
        wrapper = wrap(self.deepspeed.checkpoint_engine)
        self.deepspeed.checkpoint_engine = wrapper
        return wrapper
