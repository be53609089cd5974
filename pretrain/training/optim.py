"""AdamW with decoupled weight decay, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from common.errors import first_line
from common.typed_config import ConfigError
from pretrain.config import OptimConfig


def learning_rate(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warm-up to `lr`, then cosine, linear or constant decay to `min_lr`.

    `step` counts optimizer steps already taken; step 0 is the first update.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms, biases and embeddings are left undecayed.

    Under expert parallelism the expert weights (named to DeepSpeed by
    `parallel.expert`) form groups of their own, flagged `moe`: DeepSpeed's ZeRO
    partitions and reduces those over the expert-data-parallel group.
    """
    decay, no_decay, experts = [], [], {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if hasattr(param, "group_name"):
            experts.setdefault(param.group_name, []).append(param)
        elif param.ndim < 2 or "embedding" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        *({"params": params, "weight_decay": weight_decay, "name": group, "moe": True}
          for group, params in experts.items()),
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device, offload: bool = False):
    """torch's AdamW, or DeepSpeed's CPU Adam when ZeRO offloads the optimizer to host memory."""
    if offload:
        return cpu_adam(model, cfg)
    # The fused kernel updates each tensor in one pass, on CUDA and on CPU
    # (vectorised, across threads); on CPU it takes about two thirds of the
    # multi-tensor (foreach) path's time for the default model.
    return torch.optim.AdamW(
        parameter_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=device.type in ("cuda", "cpu"),
    )


def cpu_adam(model: torch.nn.Module, cfg: OptimConfig):
    """DeepSpeed's CPU Adam (AdamW mode), a C++ op compiled on first use."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    try:
        return DeepSpeedCPUAdam(parameter_groups(model, cfg.weight_decay), lr=cfg.lr,
                                betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, adamw_mode=True)
    except Exception as err:  # the C++ op needs a working compiler
        raise ConfigError(f"parallel.offload_optimizer=true: DeepSpeed's CPU Adam op could not be "
                          f"built or loaded ({first_line(err)}); expected a C++ compiler and ninja") from err


def build_scheduler(cfg: OptimConfig, total_steps: int):
    """A factory for DeepSpeed: it hands over the optimizer it ends up wrapping."""

    def make(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: learning_rate(step, cfg, total_steps) / cfg.lr
        )

    return make
