"""Llama-style decoder built from megatron-core's tensor-parallel layers.

RMSNorm, SwiGLU, rotary position embeddings and grouped-query attention, with
two options of recent recipes: RMSNorm on each head's queries and keys
(`model.qk_norm`) and z-loss on the output logits (`model.z_loss_multiplier`,
added to the training loss only: evaluation reports the cross entropy). The
model only describes the computation: which rank holds which shard is decided
by megatron-core's `parallel_state`, set up in `parallel/`, before the model is
built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from parallel.output_loss import token_weights
from parallel.sequence import scatter_to_sequence_parallel_region
from pretrain.model import moe
from pretrain.model.config import ModelConfig
from pretrain.model.cross_entropy import cross_entropy_and_logsumexp
from pretrain.model.init import initialize_local
from pretrain.model.layers import (
    ColumnParallelLinear, HeadNorm, OutputLayer, RMSNorm, RowParallelLinear, SDPAttention,
)
from pretrain.model.rotary import RotaryTables, apply_rotary_tables

# megatron-core rotates queries and keys through this hook when `apply_rope_fusion`
# is set (Transformer Engine's kernel, where installed, which takes angles). The
# model sets it and passes cos/sin tables (`pretrain.model.rotary.rotary_tables`).
rope_utils.fused_apply_rotary_pos_emb = apply_rotary_tables


def transformer_config(
    cfg: ModelConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    sequence_parallel: bool = False,
    expert_parallel: int = 1,
    recompute: str | None = None,
) -> TransformerConfig:
    """megatron-core's TransformerConfig for our model config.

    Every CUDA-only fusion is switched off. megatron-core's own initialisation
    is skipped: `pretrain.model.init` draws the weights, the same for every layout.
    `recompute` selects megatron-core's own recomputation, which needs CUDA;
    training uses `parallel.activation_checkpointing` instead, which runs anywhere.
    """
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        qk_layernorm=cfg.qk_norm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_std,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        sequence_parallel=sequence_parallel,
        expert_model_parallel_size=expert_parallel,
        use_cpu_initialization=True,
        perform_initialization=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=True,  # our rotation, on cos/sin tables (see rope_utils above)
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        recompute_granularity=recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
        **moe.transformer_config_fields(cfg),
    )


def layer_spec(qk_norm: bool = False, experts: ModuleSpec | None = None) -> ModuleSpec:
    """A pre-norm Llama layer: norm → attention → residual, norm → SwiGLU → residual.

    With `qk_norm`, megatron-core's attention normalises each head's queries and keys
    (over the head's channels, one weight per layer shared by the heads) before
    rotating them, as its `qk_layernorm` spec does. `experts` (`pretrain.model.moe`)
    takes the SwiGLU MLP's place in a mixture-of-experts layer.
    """
    head_norm = HeadNorm if qk_norm else IdentityOp
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=SDPAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=head_norm,
                    k_layernorm=head_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=experts or ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=ColumnParallelLinear,
                    linear_fc2=RowParallelLinear,
                ),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def model_layer_spec(cfg: ModelConfig, index: int) -> ModuleSpec:
    """The spec of layer `index` (from 0): dense, or with experts (`model.moe`)."""
    return layer_spec(cfg.qk_norm, moe.moe_spec(cfg) if cfg.is_moe_layer(index) else None)


class LlamaModel(torch.nn.Module):
    """Token ids [b, s] → per-token loss [b, s], their masked mean, or logits when no labels.

    `loss_chunk_tokens` (see `parallel.output_loss.chunk_tokens`) makes the mean
    loss go through the output layer in chunks of that many tokens, with the
    full logits never in memory; None computes them all.
    """

    def __init__(
        self, cfg: ModelConfig, config: TransformerConfig, padded_vocab_size: int, seed: int = 0,
        loss_chunk_tokens: int | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.config = config
        self.padded_vocab_size = padded_vocab_size
        self.loss_chunk_tokens = loss_chunk_tokens
        self.embedding = tensor_parallel.VocabParallelEmbedding(
            padded_vocab_size, cfg.hidden_size, init_method=config.init_method, config=config
        )
        self.decoder = TransformerBlock(
            config,
            TransformerBlockSubmodules(
                layer_specs=[model_layer_spec(cfg, i) for i in range(cfg.num_layers)], layer_norm=RMSNorm
            ),
            pre_process=True,
            post_process=True,
        )
        self.output_layer = OutputLayer(
            cfg.hidden_size,
            padded_vocab_size,
            config=config,
            init_method=config.init_method,
            bias=False,
            gather_output=False,
            skip_weight_param_allocation=cfg.tie_embeddings,
        )
        self.rotary = RotaryTables(cfg.head_dim, cfg.rotary_base, cfg.rope_scaling, cfg.max_seq_len)
        initialize_local(self.named_parameters(), cfg, seed)

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        document_starts: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        reduction: str = "none",
    ) -> torch.Tensor:
        """`document_starts` [b, s] (bool) cut attention before each document start (None:
        causal over the whole sequence; a dense [b, 1, s, s] mask, True where cut, works too);
        `position_ids` [b, s] restart rotary positions, e.g. at document boundaries.
        With labels, `reduction="none"` gives the loss of every token [b, s] and
        `"mean"` its mean over the tokens where `loss_mask` [b, s] is set (all if None).
        In training mode the loss includes the z-loss term when `model.z_loss_multiplier` > 0."""
        if reduction not in ("none", "mean"):
            raise ValueError(f"reduction={reduction!r}: expected 'none' or 'mean'")
        hidden = embed_tokens(self.embedding, tokens, self.config.sequence_parallel)
        rotary = self.rotary(tokens.shape[1], tokens.device, position_ids)
        # megatron-core hands `attention_mask` to the core attention as it is (layers.SDPAttention).
        hidden = self.decoder(hidden, attention_mask=document_starts, rotary_pos_emb=rotary)
        weight = self.embedding.weight if self.cfg.tie_embeddings else None
        z_loss = self.cfg.z_loss_multiplier if self.training else 0.0
        if labels is not None and reduction == "mean" and self.loss_chunk_tokens:
            labels = labels.transpose(0, 1)  # the hidden states' [s, b] order
            weights = token_weights(labels, None if loss_mask is None else loss_mask.transpose(0, 1))
            return self.output_layer(hidden, weight=weight, labels=labels, token_weights=weights,
                                     chunk_tokens=self.loss_chunk_tokens, z_loss=z_loss)
        logits, _ = self.output_layer(hidden, weight=weight)  # [s, b, vocab / tp]
        if labels is None:
            return logits.transpose(0, 1)
        loss = per_token_loss(logits, labels, z_loss)
        return masked_mean(loss, loss_mask) if reduction == "mean" else loss


# --- the two ends, shared with the pipeline stages ------------------------------------------

def embed_tokens(embedding: torch.nn.Module, tokens: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """Token ids [b, s] → hidden states in megatron-core's layout [s, b, h]; under sequence
    parallelism, this tensor-parallel rank's slice of the sequence."""
    hidden = embedding(tokens).transpose(0, 1).contiguous()
    if sequence_parallel:
        hidden = scatter_to_sequence_parallel_region(hidden, parallel_state.get_tensor_model_parallel_group())
    return hidden


def per_token_loss(logits: torch.Tensor, labels: torch.Tensor, z_loss: float = 0.0) -> torch.Tensor:
    """Cross entropy [b, s] of logit shards [s, b, vocab / tp] against labels [b, s], in fp32
    over the vocabulary shards, without gathering them; plus `z_loss` * logsumexp(logits)^2
    per token when `z_loss` > 0 (the log-sum-exp taken over the whole vocabulary)."""
    labels = labels.transpose(0, 1).contiguous()
    if not z_loss:
        return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels).transpose(0, 1)
    loss, lse = cross_entropy_and_logsumexp(logits, labels)
    return (loss + z_loss * lse.square()).transpose(0, 1)


def masked_mean(per_token_loss: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    if loss_mask is None:
        return per_token_loss.mean()
    loss_mask = loss_mask.to(per_token_loss.dtype)
    return (per_token_loss * loss_mask).sum() / loss_mask.sum().clamp(min=1)
