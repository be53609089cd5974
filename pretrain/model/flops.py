"""Model FLOPs per token: the work a training step needs, whatever the hardware executes.

Recomputation and padding are not counted, so the same run reports the same
model FLOPs utilisation (MFU) with or without activation checkpointing.
"""

from __future__ import annotations

from pretrain.model.config import ModelConfig


def matmul_params(cfg: ModelConfig, padded_vocab_size: int) -> int:
    """Weights that take part in a matmul for every token: all linear layers and the output layer.

    The input embedding is a lookup, not a matmul, and norms are negligible.
    The output layer is counted even when tied to the embedding: it is still a
    [hidden x vocab] matmul per token.
    """
    h, f, moe = cfg.hidden_size, cfg.ffn_hidden_size, cfg.moe
    kv = cfg.query_groups * cfg.head_dim
    attention = h * (h + 2 * kv) + h * h  # fused q/k/v projection (GQA) + output projection
    mlp = 3 * h * f  # SwiGLU: gate, up, down
    # A mixture-of-experts layer counts what a token goes through: the router, its
    # top_k experts and the shared expert (active parameters).
    experts = h * moe.num_experts + 3 * h * (moe.top_k * cfg.expert_ffn_hidden_size
                                             + moe.shared_expert_ffn_hidden_size)
    layers = sum(attention + (experts if cfg.is_moe_layer(i) else mlp) for i in range(cfg.num_layers))
    return layers + padded_vocab_size * h


def flops_per_token(cfg: ModelConfig, seq_len: int, padded_vocab_size: int) -> float:
    """Training FLOPs (forward + backward) per token.

    6 * N for the N matmul parameters (2 forward, 4 backward per multiply-add),
    plus 12 * layers * hidden * seq_len for attention scores and the weighted
    sum of values (QK^T and AV: 2 matmuls x 2 FLOPs x 3 for forward + backward).
    As in Megatron-LM and PaLM, causal attention is counted as full: the half
    of the score matrix that the mask removes is not subtracted.
    """
    return 6.0 * matmul_params(cfg, padded_vocab_size) + 12.0 * cfg.num_layers * cfg.hidden_size * seq_len
