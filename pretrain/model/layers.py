"""Device-agnostic building blocks plugged into megatron-core's layer spec.

megatron-core's own `DotProductAttention` and `RotaryEmbedding` assume a CUDA
device, and its torch norm wrapper refuses sequence parallelism. These
replacements keep megatron-core's tensor layouts and call signatures so the
rest of its `TransformerLayer` is used unchanged, on CPU and on GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from parallel import sequence
from parallel.output_loss import chunked_output_loss
from pretrain.model.decode import rotate


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
        # A boolean mask (True = masked out, megatron's convention) replaces causal
        # masking, e.g. to stop attention across document boundaries.
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
    through `parallel.output_loss`, chunk by chunk, without the full logits.

    The loss goes through this module's call (not a free function on its weight)
    so that whatever DeepSpeed hooks onto the module, such as ZeRO-3's parameter
    gathering, runs as for the logits.
    """

    def forward(self, input_, weight=None, labels=None, token_weights=None, chunk_tokens=None):
        if labels is None:
            return super().forward(input_, weight=weight)
        weight = self.weight if weight is None else weight
        if self.sequence_parallel:
            input_ = sequence.gather_from_sequence_parallel_region(input_, self.tp_group)
        elif self.tp_group.size() > 1:
            input_ = tensor_parallel.copy_to_tensor_model_parallel_region(input_, self.tp_group)
        return chunked_output_loss(input_, weight, labels, token_weights, chunk_tokens, self.tp_group)


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


def rotary_frequencies(
    seq_len: int, head_dim: int, base: float, device: torch.device | None = None
) -> torch.Tensor:
    """Rotary angles in megatron-core's layout [s, 1, 1, head_dim].

    Positions are laid out as in megatron-core's `RotaryEmbedding` (the two
    halves of the head dimension rotate together), so its `apply_rotary_pos_emb`
    consumes them directly.
    """
    inv_freq = 1.0 / (
        base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    )
    positions = torch.arange(seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)
    return torch.cat((angles, angles), dim=-1)[:, None, None, :]


def rotary_tables(
    seq_len: int, head_dim: int, base: float, device: torch.device | None = None
) -> torch.Tensor:
    """cos and sin of `rotary_frequencies`, side by side: [s, 1, 1, 2 * head_dim], fp32.

    The model hands megatron-core these tables rather than the angles, and
    `apply_rotary_tables` rotates with them. Given the angles, megatron-core
    takes their cos and sin inside each layer, and torch.compile fuses that into
    the rotation, so both were recomputed for every element of every head,
    forward and backward. On CPU that was about 3% of the default model's
    step; with the tables the step is about 2% faster.
    """
    angles = rotary_frequencies(seq_len, head_dim, base, device)
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


class RotaryTables:
    """`rotary_tables` per (sequence length, device), made on first use, and picked
    per token where positions restart (e.g. at document boundaries).

    Held in a plain dict rather than a module buffer: the tables depend only on
    the shape, so checkpoints need not carry them. Under torch.compile the dict's
    entry reaches the graph as a ready tensor, its cos and sin not recomputed.
    """

    def __init__(self, head_dim: int, base: float):
        self.head_dim, self.base = head_dim, base
        self._tables: dict[tuple, torch.Tensor] = {}

    def __call__(self, seq_len: int, device: torch.device,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[s, 1, 1, 2 * head_dim]; [s, b, 1, 2 * head_dim] for `position_ids` [b, s]."""
        key = (seq_len, device)
        if key not in self._tables:
            self._tables[key] = rotary_tables(seq_len, self.head_dim, self.base, device)
        tables = self._tables[key]
        if position_ids is None:
            return tables
        return tables[:, 0, 0][position_ids.transpose(0, 1)].unsqueeze(2)


def apply_rotary_tables(t: torch.Tensor, tables: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """megatron-core's rotation (rotate-half, as its unfused `_apply_rotary_pos_emb_bshd`)
    of `t` [s, b, heads, head_dim] by `rotary_tables` [s, 1 or b, 1, 2 * head_dim].

    Installed as megatron-core's fused-RoPE function (see `pretrain.model.llama`), the
    hook its `apply_rotary_pos_emb` calls under `apply_rope_fusion`.
    """
    if interleaved:
        raise NotImplementedError("rotary_interleaved: the model rotates halves")
    cos, sin = (table.to(t.dtype) for table in tables.chunk(2, dim=-1))
    return rotate(t, cos, sin)
