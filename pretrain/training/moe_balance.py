"""After each update of a mixture-of-experts model: expert-bias balancing and the MoE metrics.

megatron-core moves its routers' expert biases (`model.moe.expert_bias`,
DeepSeek-V3's aux-loss-free balancing) in its own `finalize_model_grads`,
which DeepSpeed never runs; here each bias moves by the update rate toward
the mean load after every optimizer step, from the tokens every rank routed.

Metrics, per step (this rank's tokens; means over the MoE layers):
- `moe/aux_loss`, `moe/z_loss`: the routers' auxiliary losses, unscaled by
  their coefficients, as megatron-core's tracker records them;
- `moe/load_max_over_mean`: the busiest expert's tokens over the mean (1.0
  is a perfect balance; the number of experts means all on one);
- `moe/dropped_fraction`: routed token slots an expert's capacity turned away
  (0 when routing is dropless).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker, get_updated_expert_bias,
)

from pretrain.model.moe import DeviceRouter

_TRACKED = {"load_balancing_loss": "moe/aux_loss", "seq_load_balancing_loss": "moe/aux_loss",
            "z_loss": "moe/z_loss"}


class MoEBalance:
    """Called after every step (`Trainer.after_update`); returns the step's MoE metrics."""

    def __init__(self, model: torch.nn.Module, micro_batches: int):
        self.routers = [m for m in model.modules() if isinstance(m, DeviceRouter)]
        self.micro_batches = micro_batches

    def __call__(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if not self.routers:  # a pipeline stage without MoE layers
            clear_aux_losses_tracker()
            return metrics
        for router in self.routers:
            if router.enable_expert_bias:
                router.expert_bias.copy_(get_updated_expert_bias(
                    router.local_tokens_per_expert, router.expert_bias, router.config.moe_router_bias_update_rate))
                router.local_tokens_per_expert.zero_()
        loads, dropped = [], []
        for router in self.routers:
            tokens, routed = router.take_load()
            loads.append(float(tokens.max() / tokens.mean().clamp(min=1e-9)))
            dropped.append(1.0 - float(tokens.sum()) / max(routed, 1))
        metrics["moe/load_max_over_mean"] = sum(loads) / len(loads)
        metrics["moe/dropped_fraction"] = sum(dropped) / len(dropped)
        layers = len(self.routers)
        for name, entry in get_moe_layer_wise_logging_tracker().items():
            if name in _TRACKED:
                # Summed over the layers and the step's micro-batches.
                metrics[_TRACKED[name]] = float(entry["values"].sum()) / (layers * self.micro_batches)
        clear_aux_losses_tracker()
        return metrics
