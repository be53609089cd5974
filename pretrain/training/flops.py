"""Device peak FLOP/s, and model FLOPs utilisation (MFU) for the model FLOPs of pretrain.model.flops.

MFU counts the FLOPs the model needs, not the FLOPs the hardware executes:
activation recomputation and padding are not counted, so the same run
reports the same MFU with or without activation checkpointing.
"""

from __future__ import annotations

import torch

from pretrain.model.config import ModelConfig
from pretrain.model.flops import flops_per_token

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
