"""The DeepSpeed engine: its config generated from ours, and one optimizer step."""

from __future__ import annotations

import math
from typing import Iterator

import deepspeed
import torch
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.utils import clip_grad_norm_

from parallel.groups import MegatronMPU
from pretrain.training import optim
from pretrain.config import Config, ConfigError


def precision_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def clips_in_loop(cfg: Config) -> bool:
    """Whether the loop, not DeepSpeed, clips gradients.

    DeepSpeed's mixed-precision and ZeRO optimizers report the gradient norm
    they clip by; with plain fp32 and no ZeRO it clips without recording the
    norm, so there we clip (with DeepSpeed's model-parallel aware function)
    and keep the norm for logging. The pipeline engine runs its whole step
    itself, so there DeepSpeed clips.
    """
    p = cfg.parallel
    return p.precision == "fp32" and p.zero_stage == 0 and p.pipeline == 1


def deepspeed_config(cfg: Config, data_parallel: int) -> dict:
    t, p = cfg.trainer, cfg.parallel
    accumulation = t.global_batch_size // (t.micro_batch_size * data_parallel)
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": 0.0 if clips_in_loop(cfg) else cfg.optim.grad_clip,
        "zero_optimization": {
            "stage": p.zero_stage,
            **({"offload_optimizer": {"device": "cpu", "pin_memory": cfg.trainer.device != "cpu"}}
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


def build_optimizer(cfg: Config, model: torch.nn.Module, device: torch.device):
    """torch's AdamW, or DeepSpeed's CPU Adam when ZeRO offloads the optimizer to host memory."""
    if not cfg.parallel.offload_optimizer:
        return optim.build_optimizer(model, cfg.optim, device)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    o = cfg.optim
    try:
        return DeepSpeedCPUAdam(optim.parameter_groups(model, o.weight_decay), lr=o.lr,
                                betas=(o.beta1, o.beta2), eps=o.eps, adamw_mode=True)
    except Exception as err:  # the C++ op is compiled on first use and needs a working compiler
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"parallel.offload_optimizer=true: DeepSpeed's CPU Adam op could not be "
                          f"built or loaded ({first}); expected a C++ compiler and ninja") from err


def build_engine(cfg: Config, model, optimizer, scheduler_factory, data_parallel: int):
    check_precision_supported(cfg.parallel.precision, next(model.parameters()).device, cfg.parallel.zero_stage)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler_factory,
        config=deepspeed_config(cfg, data_parallel),
        # The pipeline module brings its own grid of groups (same rank order).
        mpu=None if isinstance(model, PipelineModule) else MegatronMPU,
        dist_init_required=False,
    )
    if isinstance(engine, PipelineEngine) and cfg.parallel.precision == "fp32" and cfg.parallel.zero_stage == 0:
        keep_clipped_norm(engine)
    d = cfg.data
    if isinstance(engine, PipelineEngine) and (d.eod_mask_loss or d.reset_position_ids or d.reset_attention_mask):
        # The stages pass on (hidden, position ids, attention mask): DeepSpeed sends the last
        # tensor as fp16 and back to bool (NCCL has no bool), and sends no gradient for it.
        engine.set_has_attention_mask(True)
    if data_parallel == 1 and cfg.parallel.zero_stage == 0 and not isinstance(engine, PipelineEngine):
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


def _to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (batch["tokens"].to(device, non_blocking=True),
            batch["labels"].to(device, non_blocking=True))


# Optional per-token inputs a batch may carry (the end-of-document options).
_MODEL_EXTRAS = ("attention_mask", "position_ids")


def _extras(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: batch[k].to(device, non_blocking=True) for k in _MODEL_EXTRAS if k in batch}


def _loss_mask(batch: dict, device: torch.device) -> torch.Tensor | None:
    mask = batch.get("loss_mask")
    return None if mask is None else mask.to(device, non_blocking=True)


def _pipeline_micro_batch(batch: dict, device: torch.device) -> tuple:
    """(inputs, labels) as DeepSpeed's pipeline engine takes them: the first stage gets the
    inputs, the loss function the labels. With the end-of-document options the inputs are
    (tokens, position ids, attention mask), passed from stage to stage, and the labels
    (labels, loss mask)."""
    tokens, labels = _to_device(batch, device)
    if "loss_mask" not in batch:
        return tokens, labels
    extras = _extras(batch, device)
    return (tokens, extras["position_ids"], extras["attention_mask"]), (labels, _loss_mask(batch, device))


def train_step(
    engine, batches: Iterator[dict], device: torch.device, clip: float = 0.0
) -> tuple[torch.Tensor, float]:
    """One optimizer step over gradient_accumulation_steps micro-batches.

    Returns the mean loss and the gradient norm before clipping. `clip` > 0
    clips here (see `clips_in_loop`); otherwise DeepSpeed clips.
    """
    steps = engine.gradient_accumulation_steps()
    if isinstance(engine, PipelineEngine):
        # Every stage draws the step's micro-batches, so all ranks' loaders
        # stay in step; only the first and last stage use them.
        micro_batches = [_pipeline_micro_batch(next(batches), device) for _ in range(steps)]
        loss = engine.train_batch(data_iter=iter(micro_batches))
        grad_norm = engine.get_global_grad_norm()
        return loss.detach(), float(grad_norm if grad_norm is not None else float("nan"))

    total = torch.zeros((), device=device)
    grad_norm = None
    for _ in range(steps):
        batch = next(batches)
        loss = engine(*_to_device(batch, device), **_extras(batch, device),
                      loss_mask=_loss_mask(batch, device), reduction="mean")
        engine.backward(loss)  # DeepSpeed divides by the accumulation steps
        if clip > 0 and engine.is_gradient_accumulation_boundary():
            grad_norm = clip_grad_norm_(engine.module.parameters(), clip, mpu=MegatronMPU)
            if hasattr(engine.optimizer, "overflow"):
                # A non-finite norm skips the update, as DeepSpeed skips an fp16
                # overflow (see pretrain.training.guard.skip_nonfinite_updates).
                engine.optimizer.overflow = not math.isfinite(float(grad_norm))
        engine.step()  # steps the optimizer only at the accumulation boundary
        total += loss.detach()
    if grad_norm is None:
        grad_norm = engine.get_global_grad_norm()
    return total / steps, float(grad_norm if grad_norm is not None else float("nan"))


@torch.no_grad()
def eval_loss(engine, batches: list[dict], device: torch.device) -> torch.Tensor:
    """Mean loss over `batches` (this rank's share), without updating anything."""
    if isinstance(engine, PipelineEngine):
        micro_batches = [_pipeline_micro_batch(b, device) for b in batches]
        return engine.eval_batch(iter(micro_batches), num_micro_batches=len(micro_batches))
    engine.eval()
    total = torch.zeros((), device=device)
    for batch in batches:
        total += engine(*_to_device(batch, device), **_extras(batch, device),
                        loss_mask=_loss_mask(batch, device), reduction="mean").float()
    engine.train()
    return total / len(batches)
