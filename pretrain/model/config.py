"""The model section of the config (`model.*`): the shape of a Llama-style decoder."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from common.typed_config import require

ROPE_TYPES = ("none", "linear", "llama3", "yarn")


@dataclass
class RopeScaling:
    """Rotary position scaling for contexts longer than pretraining's (`model.rope_scaling`).

    linear: every position divided by `factor` (position interpolation).
    llama3: Llama 3.1's, by wavelength: long wavelengths divided by `factor`,
    short ones kept, those between `low_freq_factor` and `high_freq_factor`
    (in units of the original context) blended.
    yarn: YaRN (Peng et al. 2023): frequencies blended between kept and divided
    by `factor` over the dimensions that turn between `beta_fast` and
    `beta_slow` times within the original context, and cos/sin scaled by
    `attention_factor` (default 0.1 ln(factor) + 1).
    `original_max_position_embeddings`: the context the model was pretrained at
    (llama3 and yarn need it). The scaled model supports factor times it.
    """

    type: Literal["none", "linear", "llama3", "yarn"] = "none"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None

    def __post_init__(self) -> None:
        require(self.type in ROPE_TYPES,
                f"model.rope_scaling.type={self.type!r}: expected one of {', '.join(ROPE_TYPES)}")
        if self.type == "none":
            return
        require(self.factor >= 1, f"model.rope_scaling.factor={self.factor}: expected >= 1 for "
                                  f"model.rope_scaling.type={self.type}")
        if self.type in ("llama3", "yarn"):
            original = self.original_max_position_embeddings
            require(original is not None and original > 0,
                    f"model.rope_scaling.original_max_position_embeddings={original}: expected the "
                    f"pretraining context length (> 0) for model.rope_scaling.type={self.type}")
        if self.type == "llama3":
            require(0 < self.low_freq_factor < self.high_freq_factor,
                    f"model.rope_scaling.low_freq_factor={self.low_freq_factor}, high_freq_factor="
                    f"{self.high_freq_factor}: expected 0 < low < high")
        if self.type == "yarn":
            require(0 < self.beta_slow < self.beta_fast,
                    f"model.rope_scaling.beta_slow={self.beta_slow}, beta_fast={self.beta_fast}: "
                    "expected 0 < beta_slow < beta_fast")
            require(self.attention_factor is None or self.attention_factor > 0,
                    f"model.rope_scaling.attention_factor={self.attention_factor}: expected > 0 or null")

    def supported_length(self) -> int | None:
        """The longest sequence the scaled positions cover (None: no bound is known)."""
        if self.type in ("llama3", "yarn"):
            return int(self.original_max_position_embeddings * self.factor)
        return None


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
    # Rotary position scaling for long contexts (none, linear, llama3, yarn; see RopeScaling).
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)

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
        if isinstance(self.rope_scaling, dict):  # built in code rather than from a config tree
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        supported = self.rope_scaling.supported_length()
        require(supported is None or self.max_seq_len <= supported,
                f"model.max_seq_len={self.max_seq_len}: above the {supported} positions "
                f"model.rope_scaling ({self.rope_scaling.type}, factor {self.rope_scaling.factor:g} x "
                f"{self.rope_scaling.original_max_position_embeddings}) covers")

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
