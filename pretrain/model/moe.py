"""Mixture-of-experts feed-forward layers from megatron-core's MoE (`model.moe`).

The layer is megatron-core's `MoELayer`: its `TopKRouter` (softmax or sigmoid
scores, top-k, auxiliary and z losses, expert bias, capacity), the all-gather
token dispatcher and `SequentialMLP` experts built from the same
tensor-parallel linears as the dense MLP. Two things in it assume CUDA, and
are adapted here rather than patched in place:

- `Router.gating` moves a CPU weight to `torch.cuda.current_device()` and goes
  through Transformer Engine's GEMM when it is installed; `DeviceRouter.gating`
  is the same linear map in the router's dtype, on the weight's own device.
- `TopKRouter.__init__` creates the expert-bias buffers on the current CUDA
  device; `DeviceRouter` builds them where its weight lives.

The all-gather dispatcher is chosen over all-to-all: megatron-core's
all-to-all dispatcher creates a CUDA stream while it is built. Under tensor
parallelism (which megatron-core's MoE runs on sequence-parallel slices) that
dispatcher gathers tokens with `tensor_parallel`'s all-gather and
reduce-scatter, which allocate on the current CUDA device; its module's
references are pointed at `parallel.sequence`'s, which allocate on the
tensors' own device (as `pretrain.model.llama` points megatron-core's rotary
hook at ours).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe import token_dispatcher
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec

from parallel import sequence
from pretrain.model.config import ModelConfig


def _gather_tokens(input_, tensor_parallel_output_grad=True, group=None, output_split_sizes=None,
                   use_global_buffer=False):
    """megatron-core's `gather_from_sequence_parallel_region` (even splits) on the input's device."""
    if output_split_sizes is not None or not tensor_parallel_output_grad:
        raise NotImplementedError("uneven or copy-gradient gathers: the all-gather dispatcher uses neither")
    if input_.dtype == torch.bool:  # the routing map; gloo gathers no booleans
        return sequence.gather_from_sequence_parallel_region(input_.to(torch.uint8), group).bool()
    return sequence.gather_from_sequence_parallel_region(input_, group)


def _reduce_scatter_tokens(input_, group=None, input_split_sizes=None, use_global_buffer=False):
    """megatron-core's `reduce_scatter_to_sequence_parallel_region` (even splits) on the input's device."""
    if input_split_sizes is not None:
        raise NotImplementedError("uneven reduce-scatter: the all-gather dispatcher does not use it")
    return sequence.reduce_scatter_to_sequence_parallel_region(input_, group)


token_dispatcher.gather_from_sequence_parallel_region = _gather_tokens
token_dispatcher.reduce_scatter_to_sequence_parallel_region = _reduce_scatter_tokens


class DeviceRouter(TopKRouter):
    """megatron-core's top-k router, with its weight and buffers on the weight's device."""

    def __init__(self, config, pg_collection=None):
        # Built without the options whose buffers TopKRouter puts on the CUDA device,
        # then given those buffers here.
        cpu_safe = dataclasses.replace(config, moe_router_enable_expert_bias=False) \
            if config.moe_router_enable_expert_bias else config
        super().__init__(config=cpu_safe, pg_collection=pg_collection)
        self.config = config
        self.enable_expert_bias = config.moe_router_enable_expert_bias
        if self.enable_expert_bias:
            experts, device = config.num_moe_experts, self.weight.device
            del self.local_tokens_per_expert, self.expert_bias  # set to None without the option
            self.register_buffer("local_tokens_per_expert",
                                 torch.zeros(experts, dtype=torch.float32, device=device), persistent=False)
            self.register_buffer("expert_bias", torch.zeros(experts, dtype=torch.float32, device=device))

        # Tokens each expert took, and tokens routed (top_k per token), since the last
        # `take_load`: the load metrics, on this rank's tokens.
        self.register_buffer("tokens_per_expert_seen", torch.zeros(config.num_moe_experts, dtype=torch.float32,
                                                                   device=self.weight.device), persistent=False)
        self.routed_seen = 0

    def routing(self, logits: torch.Tensor, *args, **kwargs):
        probs, routing_map = super().routing(logits, *args, **kwargs)
        if torch.is_grad_enabled():  # training's tokens, not evaluation's
            with torch.no_grad():
                self.tokens_per_expert_seen += routing_map.sum(dim=0).float()
                self.routed_seen += logits.numel() // logits.shape[-1] * self.topk
        return probs, routing_map

    def take_load(self) -> tuple[torch.Tensor, int]:
        """(tokens per expert, tokens routed) since the last call; resets both."""
        seen, routed = self.tokens_per_expert_seen.clone(), self.routed_seen
        self.tokens_per_expert_seen.zero_()
        self.routed_seen = 0
        return seen, routed

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, input.dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(input.to(dtype), self.weight.to(dtype), bias)


def moe_spec(cfg: ModelConfig) -> ModuleSpec:
    """The MoE feed-forward block of a layer (the dense MLP's place in `layer_spec`)."""
    from pretrain.model.layers import ColumnParallelLinear, RowParallelLinear

    mlp = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    shared = ModuleSpec(module=SharedExpertMLP, submodules=mlp) if cfg.moe.shared_expert_ffn_hidden_size else None
    return ModuleSpec(module=MoELayer, submodules=MoESubmodules(
        experts=ModuleSpec(module=SequentialMLP, submodules=mlp), shared_experts=shared, router=DeviceRouter))


def transformer_config_fields(cfg: ModelConfig) -> dict:
    """megatron-core `TransformerConfig` fields of `model.moe` (none for a dense model)."""
    moe = cfg.moe
    if not moe.enabled:
        return {}
    balancing = moe.load_balancing
    return {
        "num_moe_experts": moe.num_experts,
        "moe_router_topk": moe.top_k,
        "moe_ffn_hidden_size": cfg.expert_ffn_hidden_size,
        "moe_shared_expert_intermediate_size": moe.shared_expert_ffn_hidden_size or None,
        "moe_router_score_function": moe.score_function,
        # megatron-core normalises top-k sigmoid scores with a scaling factor; softmax
        # scores of the chosen k are renormalised by taking the softmax after top-k.
        "moe_router_pre_softmax": not moe.normalize_top_k,
        "moe_router_topk_scaling_factor": None,
        "moe_router_load_balancing_type": balancing,
        "moe_aux_loss_coeff": moe.aux_loss_coeff if balancing != "none" else 0.0,
        "moe_router_enable_expert_bias": moe.expert_bias,
        "moe_router_bias_update_rate": moe.expert_bias_update_rate,
        "moe_z_loss_coeff": moe.router_z_loss_coeff or None,
        "moe_expert_capacity_factor": moe.capacity_factor,
        "moe_token_drop_policy": "probs",
        "moe_token_dispatcher_type": "allgather",
        "moe_router_dtype": "fp32",
        "moe_grouped_gemm": False,
    }


def set_aux_loss_scale(gradient_accumulation_steps: int) -> None:
    """The auxiliary losses' gradients, like the main loss's, are averaged over the micro-batches
    of a step: megatron-core injects them in backward scaled by this factor (its schedules set
    it; DeepSpeed's engine divides only the main loss)."""
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / gradient_accumulation_steps))
