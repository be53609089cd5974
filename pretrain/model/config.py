"""The model section of the config (`model.*`): the shape of a Llama-style decoder."""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.typed_config import require


@dataclass
class ModelConfig:
    name: str = "tiny"
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 8
    num_query_groups: int | None = None  # None: one key/value head per query head
    ffn_hidden_size: int = 688
    max_seq_len: int = 2048
    rotary_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False
    vocab_size: int | None = None  # None: taken from the tokenizer
    # The embedding and output layer are padded to a multiple of this (times TP).
    vocab_multiple: int = 128
    # Training adds z_loss_multiplier * mean(logsumexp(logits)^2) to the cross entropy
    # (PaLM's z-loss; OLMo-core's name). 1e-4 is typical; 0 turns it off.
    z_loss_multiplier: float = 0.0
    # RMSNorm on each head's queries and keys before the rotary embedding
    # (megatron-core's qk_layernorm; exported as Hugging Face Qwen3).
    qk_norm: bool = False

    def __post_init__(self) -> None:
        for key in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                    "max_seq_len", "vocab_multiple"):
            require(getattr(self, key) > 0, f"model.{key}={getattr(self, key)}: expected > 0")
        require(
            self.hidden_size % self.num_attention_heads == 0,
            f"model.hidden_size={self.hidden_size}: expected a multiple of "
            f"model.num_attention_heads={self.num_attention_heads}",
        )
        require(
            self.query_groups > 0 and self.num_attention_heads % self.query_groups == 0,
            f"model.num_attention_heads={self.num_attention_heads}: expected a multiple of "
            f"model.num_query_groups={self.num_query_groups}",
        )
        require(self.head_dim % 2 == 0, f"model head size {self.head_dim}: expected even for rotary")
        z = self.z_loss_multiplier
        require(
            isinstance(z, (int, float)) and not isinstance(z, bool) and math.isfinite(z) and z >= 0,
            f"model.z_loss_multiplier={z!r}: expected a number >= 0 (0 turns it off; 1e-4 is typical)",
        )
        require(isinstance(self.qk_norm, bool), f"model.qk_norm={self.qk_norm!r}: expected true or false")

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, vocab_size: int, tensor_parallel: int = 1) -> int:
        multiple = self.vocab_multiple * tensor_parallel
        return -(-vocab_size // multiple) * multiple

    def num_params(self, padded_vocab_size: int) -> int:
        """Parameter count, embeddings included."""
        h, f, kv = self.hidden_size, self.ffn_hidden_size, self.query_groups * self.head_dim
        per_layer = h * (h + 2 * kv) + h * h + 3 * h * f + 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        embeddings = padded_vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h
