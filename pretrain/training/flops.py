"""Model FLOPs per token, device peak FLOP/s, and model FLOPs utilisation (MFU).

MFU counts the FLOPs the model needs, not the FLOPs the hardware executes:
activation recomputation and padding are not counted, so the same run
reports the same MFU with or without activation checkpointing.
"""

from __future__ import annotations

import torch

from pretrain.config import ModelConfig

# Dense (no sparsity) peak FLOP/s per device, by precision. The first entry
# whose key appears in the CUDA device name wins, so more specific names
# ("H100 PCIe", "L40S") come before names they contain ("H100", "L4"). fp32
# means plain fp32 matmuls (torch's default: TF32 off); a precision missing
# from an entry has no known peak.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("B200", {"bf16": 2250e12, "fp16": 2250e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    ("L40", {"bf16": 181e12, "fp16": 181e12, "fp32": 90.5e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),
]


def matmul_params(cfg: ModelConfig, padded_vocab_size: int) -> int:
    """Weights that take part in a matmul for every token: all linear layers and the output layer.

    The input embedding is a lookup, not a matmul, and norms are negligible.
    The output layer is counted even when tied to the embedding: it is still a
    [hidden x vocab] matmul per token.
    """
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    kv = cfg.query_groups * cfg.head_dim
    attention = h * (h + 2 * kv) + h * h  # fused q/k/v projection (GQA) + output projection
    mlp = 3 * h * f  # SwiGLU: gate, up, down
    return cfg.num_layers * (attention + mlp) + padded_vocab_size * h


def flops_per_token(cfg: ModelConfig, seq_len: int, padded_vocab_size: int) -> float:
    """Training FLOPs (forward + backward) per token.

    6 * N for the N matmul parameters (2 forward, 4 backward per multiply-add),
    plus 12 * layers * hidden * seq_len for attention scores and the weighted
    sum of values (QK^T and AV: 2 matmuls x 2 FLOPs x 3 for forward + backward).
    As in Megatron-LM and PaLM, causal attention is counted as full: the half
    of the score matrix that the mask removes is not subtracted.
    """
    return 6.0 * matmul_params(cfg, padded_vocab_size) + 12.0 * cfg.num_layers * cfg.hidden_size * seq_len


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """The table's peak for this CUDA device and precision; None for CPU or an unknown device."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return peak_for_name(name, precision)


def peak_for_name(name: str, precision: str) -> float | None:
    for key, peaks in PEAK_FLOPS:
        if key in name:
            return peaks.get(precision)
    return None


class FlopsMeter:
    """Achieved TFLOP/s per device and MFU for one optimizer step.

    `configured_peak` (logger.peak_flops) takes precedence over the table, so
    CPUs and devices the table lacks can report MFU too; with neither, only
    TFLOP/s is reported.
    """

    def __init__(self, cfg: ModelConfig, seq_len: int, padded_vocab_size: int, device: torch.device,
                 precision: str, world_size: int, configured_peak: float | None = None):
        self.flops_per_token = flops_per_token(cfg, seq_len, padded_vocab_size)
        self.peak = configured_peak or device_peak_flops(device, precision)
        self.world_size = world_size

    def __call__(self, tokens: int, seconds: float) -> dict[str, float]:
        per_device = self.flops_per_token * tokens / seconds / self.world_size
        metrics = {"tflops": per_device / 1e12}
        if self.peak:
            metrics["mfu"] = per_device / self.peak
        return metrics
