"""Device-agnostic building blocks plugged into megatron-core's layer spec.

megatron-core's own `DotProductAttention` and `RotaryEmbedding` assume a CUDA
device, and its torch norm wrapper refuses sequence parallelism. These
replacements keep megatron-core's tensor layouts and call signatures so the
rest of its `TransformerLayer` is used unchanged, on CPU and on GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from parallel import sequence
from parallel.output_loss import chunked_output_loss
from pretrain.model.document_attention import document_attention


class RMSNorm(torch.nn.Module):
    """RMSNorm whose weight is marked for the sequence-parallel all-reduce.

    Under sequence parallelism each tensor-parallel rank normalises a different
    slice of the sequence, so the norm weight's gradient is partial and must be
    summed over the tensor-parallel group; megatron-core does that for every
    parameter carrying `sequence_parallel = True`.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class HeadNorm(torch.nn.Module):
    """RMSNorm over each attention head's channels, for queries and keys (`model.qk_norm`).

    Takes [s, b, heads, head_dim]; one weight [head_dim] serves every head. Each
    tensor-parallel rank holds its own heads, so its gradient of the shared weight
    covers those heads only: the weight enters the forward through megatron-core's
    copy to the tensor-parallel region, whose backward sums the gradient over the
    group (megatron-core's own training loop sums these in `finalize_model_grads`,
    which a DeepSpeed engine does not run). Queries and keys span the whole
    sequence even under sequence parallelism (the qkv projection gathered it), so
    the weight is not marked `sequence_parallel`.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.tp_group = parallel_state.get_tensor_model_parallel_group() \
            if parallel_state.get_tensor_model_parallel_world_size() > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.tp_group is not None:
            weight = tensor_parallel.copy_to_tensor_model_parallel_region(weight, self.tp_group)
        return F.rms_norm(x, weight.shape, weight, self.eps)


class SDPAttention(MegatronModule):
    """Causal attention through `F.scaled_dot_product_attention`.

    SDPA selects flash or memory-efficient kernels on GPU and a fused kernel on
    CPU. Grouped-query attention is handled by SDPA itself (`enable_gqa`), so
    keys and values are never repeated in memory.

    Takes megatron-core's layout: query [s, b, heads, d], key/value
    [s, b, groups, d]; returns [s, b, heads * d].
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention takes neither packed sequences nor a bias")
        seq, batch, heads, head_dim = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        if attention_mask is not None and attention_mask.dim() == 2:
            # Document starts [b, s] (`data.reset_attention_mask`): causal within each document,
            # in memory linear in the sequence (pretrain.model.document_attention).
            out = document_attention(q, k, v, attention_mask, self.softmax_scale)
            return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * head_dim)
        # A boolean mask [b, 1, s, s] (True = masked out, megatron's convention) replaces
        # causal masking.
        mask = None if attention_mask is None else ~attention_mask
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None,
            scale=self.softmax_scale,
            enable_gqa=k.shape[1] != heads,
        )
        return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * head_dim)


class ColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
    """megatron-core's column-parallel linear; under sequence parallelism its input
    gather runs through `parallel.sequence`, which allocates on the input's device
    (megatron-core's gathers into a buffer on the current CUDA device)."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        if kwargs.get("sequence_parallel") and weight.requires_grad:
            return sequence.sequence_parallel_linear(input, weight, kwargs.get("bias"), self.tp_group)
        return super()._forward_impl(input, weight, *args, **kwargs)


class OutputLayer(ColumnParallelLinear):
    """The vocabulary projection. Given labels, it returns their weighted cross entropy
    (plus `z_loss` times the weighted squared log-sum-exp) through `parallel.output_loss`,
    chunk by chunk, without the full logits.

    The loss goes through this module's call (not a free function on its weight)
    so that whatever DeepSpeed hooks onto the module, such as ZeRO-3's parameter
    gathering, runs as for the logits.
    """

    def forward(self, input_, weight=None, labels=None, token_weights=None, chunk_tokens=None, z_loss=0.0):
        if labels is None:
            return super().forward(input_, weight=weight)
        weight = self.weight if weight is None else weight
        if self.sequence_parallel:
            input_ = sequence.gather_from_sequence_parallel_region(input_, self.tp_group)
        elif self.tp_group.size() > 1:
            input_ = tensor_parallel.copy_to_tensor_model_parallel_region(input_, self.tp_group)
        return chunked_output_loss(input_, weight, labels, token_weights, chunk_tokens, self.tp_group, z_loss)


class RowParallelLinear(tensor_parallel.RowParallelLinear):
    """megatron-core's row-parallel linear, passing its own group to the matmul.

    megatron-core 0.16 passes `tp_group=None`, which makes the matmul call
    `warnings.warn` on every forward: torch.compile breaks the graph there,
    twice per layer. Under sequence parallelism the output's reduce-scatter
    runs through `parallel.sequence` (device-agnostic buffers).
    """

    def _forward_impl(self, input, weight, *args, **kwargs):
        kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)

    def forward(self, input_):
        if not self.sequence_parallel or self.explicit_expert_comm:
            return super().forward(input_)
        output_parallel = self._forward_impl(
            input=input_, weight=self.weight, bias=None,
            gradient_accumulation_fusion=self.gradient_accumulation_fusion,
            allreduce_dgrad=False, sequence_parallel=False, grad_output_buffer=None,
        )
        output = sequence.reduce_scatter_to_sequence_parallel_region(output_parallel, self.tp_group)
        if self.skip_bias_add:
            return output, self.bias
        return (output + self.bias if self.bias is not None else output), None
