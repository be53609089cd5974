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


MOE_SCORES = ("softmax", "sigmoid")
MOE_BALANCING = ("aux_loss", "seq_aux_loss", "none")


@dataclass
class MoEConfig:
    """Mixture-of-experts feed-forward layers (`model.moe`); `num_experts: 0` is a dense model.

    Each MoE layer routes every token to `top_k` of `num_experts` SwiGLU experts of
    `expert_ffn_hidden_size` (fine-grained experts are many small ones), plus, when
    `shared_expert_ffn_hidden_size` > 0, a shared expert every token goes through.
    The first `first_dense_layers` layers keep the dense MLP (DeepSeek-V3's 3).
    Routing scores are a softmax or sigmoid of the router's logits
    (`score_function`); with `normalize_top_k` the chosen k are rescaled to sum to one.
    Load is balanced by an auxiliary loss over the batch (`aux_loss`, Switch/GShard)
    or per sequence (`seq_aux_loss`, DeepSeek-V3), times `aux_loss_coeff`, and/or
    without a loss by a per-expert bias added to the scores for choosing only
    (`expert_bias`: DeepSeek-V3's aux-loss-free balancing, moved by
    `expert_bias_update_rate` toward the mean load after every update).
    `router_z_loss_coeff` penalises large router logits (ST-MoE). Routing is dropless
    unless `capacity_factor` is set: an expert then takes at most
    capacity_factor x tokens x top_k / experts tokens and drops the lowest-scored rest.
    """

    num_experts: int = 0
    top_k: int = 2
    expert_ffn_hidden_size: int | None = None  # None: model.ffn_hidden_size
    shared_expert_ffn_hidden_size: int = 0  # 0: no shared expert
    first_dense_layers: int = 0
    score_function: Literal["softmax", "sigmoid"] = "softmax"
    normalize_top_k: bool = True
    load_balancing: Literal["aux_loss", "seq_aux_loss", "none"] = "aux_loss"
    aux_loss_coeff: float = 1e-2
    expert_bias: bool = False
    expert_bias_update_rate: float = 1e-3
    router_z_loss_coeff: float = 0.0
    capacity_factor: float | None = None  # None: dropless

    def __post_init__(self) -> None:
        require(self.num_experts >= 0, f"model.moe.num_experts={self.num_experts}: expected >= 0 (0: dense)")
        if self.num_experts == 0:
            require(self.shared_expert_ffn_hidden_size == 0,
                    f"model.moe.shared_expert_ffn_hidden_size={self.shared_expert_ffn_hidden_size}: expected 0 "
                    "without experts (model.moe.num_experts=0)")
            return
        require(1 <= self.top_k <= min(8, self.num_experts),
                f"model.moe.top_k={self.top_k}: expected 1 to min(8, model.moe.num_experts={self.num_experts})")
        require(self.expert_ffn_hidden_size is None or self.expert_ffn_hidden_size > 0,
                f"model.moe.expert_ffn_hidden_size={self.expert_ffn_hidden_size}: expected > 0 or null")
        require(self.shared_expert_ffn_hidden_size >= 0,
                f"model.moe.shared_expert_ffn_hidden_size={self.shared_expert_ffn_hidden_size}: expected >= 0")
        require(self.first_dense_layers >= 0,
                f"model.moe.first_dense_layers={self.first_dense_layers}: expected >= 0")
        require(self.score_function in MOE_SCORES,
                f"model.moe.score_function={self.score_function!r}: expected one of {', '.join(MOE_SCORES)}")
        require(self.load_balancing in MOE_BALANCING,
                f"model.moe.load_balancing={self.load_balancing!r}: expected one of {', '.join(MOE_BALANCING)}")
        for key in ("aux_loss_coeff", "expert_bias_update_rate", "router_z_loss_coeff"):
            require(getattr(self, key) >= 0, f"model.moe.{key}={getattr(self, key)}: expected >= 0")
        require(self.normalize_top_k or self.score_function == "softmax" or self.top_k == 1,
                "model.moe.normalize_top_k=false with model.moe.score_function=sigmoid: expected true "
                "(megatron-core always rescales the chosen sigmoid scores to sum to one)")
        require(not (self.normalize_top_k and self.top_k == 1 and self.score_function == "softmax"),
                "model.moe.normalize_top_k=true with model.moe.top_k=1: expected false (one chosen softmax "
                "score rescaled is always 1, and the router would learn nothing)")
        require(not self.expert_bias or self.score_function == "sigmoid",
                "model.moe.expert_bias=true: expected model.moe.score_function=sigmoid (the bias steers "
                "sigmoid scores, as in DeepSeek-V3)")
        require(self.capacity_factor is None or self.capacity_factor > 0,
                f"model.moe.capacity_factor={self.capacity_factor}: expected > 0, or null for dropless routing")

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0


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
    # Mixture-of-experts feed-forward layers (see MoEConfig); num_experts 0: dense.
    moe: MoEConfig = field(default_factory=MoEConfig)

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
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        require(self.moe.first_dense_layers <= self.num_layers,
                f"model.moe.first_dense_layers={self.moe.first_dense_layers}: expected at most "
                f"model.num_layers={self.num_layers}")
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

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer `index` (from 0) has experts rather than the dense MLP."""
        return self.moe.enabled and index >= self.moe.first_dense_layers

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe.expert_ffn_hidden_size or self.ffn_hidden_size

    def num_params(self, padded_vocab_size: int, active: bool = False) -> int:
        """Parameter count, embeddings included; `active`: those one token goes through
        (top_k of the experts of each MoE layer, and the shared expert)."""
        h, f, kv = self.hidden_size, self.ffn_hidden_size, self.query_groups * self.head_dim
        attention_and_norms = h * (h + 2 * kv) + h * h + 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        moe = self.moe
        experts = moe.top_k if active else moe.num_experts
        moe_layer = (h * moe.num_experts + 3 * h * self.expert_ffn_hidden_size * experts
                     + 3 * h * moe.shared_expert_ffn_hidden_size) if moe.enabled else 0
        layers = sum(attention_and_norms + (moe_layer if self.is_moe_layer(i) else 3 * h * f)
                     for i in range(self.num_layers))
        embeddings = padded_vocab_size * h * (1 if self.tie_embeddings else 2)
        return layers + embeddings + h
