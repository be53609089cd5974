"""The model's weights and config in Hugging Face's Llama format, both ways.

A mixture-of-experts model (`model.moe`) is exported as Mixtral, or as Qwen3-MoE
with `model.qk_norm` (see `moe_refusal` for the options neither expresses): a
router `gate` and per-expert SwiGLU projections, in transformers' saved names.

A model with `model.qk_norm` is exported as Hugging Face Qwen3 instead: Qwen3 is
Llama's layer (pre-norm, SwiGLU, rotate-half RoPE, grouped-query attention, no
biases) plus an RMSNorm of size head_dim on each head's queries and keys before
the rotation, which is what megatron-core's `qk_layernorm` computes. Its weights
take the Llama names, and `q_norm`/`k_norm` for the two norms.

No permutation is needed for rotary embeddings: megatron-core (with
`rotary_interleaved=False`, our setting) and Hugging Face's Llama both rotate
the two halves of each head together (`rotate_half`), with the same
frequencies. What differs is packing: megatron-core fuses q, k and v into one
weight laid out per query group ([the group's q heads, its k head, its v head]
for each group), and SwiGLU's gate and up projections into one fc1 weight
[gate; up]. `to_hf` unpacks both, `from_hf` packs them again.
"""

from __future__ import annotations

import math

import torch

from common.errors import UserError
from pretrain.model.config import ModelConfig, RopeScaling

LAYER = "decoder.layers.{i}."
HF_LAYER = "model.layers.{i}."

# Weights renamed one to one: (ours, Hugging Face's), per layer and for the whole model.
_LAYER_RENAMES = (
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
)
_DENSE_MLP_RENAMES = (("mlp.linear_fc2.weight", "mlp.down_proj.weight"),)
# With model.qk_norm (Qwen3's names).
_QK_NORM_RENAMES = (
    ("self_attention.q_layernorm.weight", "self_attn.q_norm.weight"),
    ("self_attention.k_layernorm.weight", "self_attn.k_norm.weight"),
)
_HF_QK_NORMS = tuple(theirs for _, theirs in _QK_NORM_RENAMES)
_MODEL_RENAMES = (
    ("embedding.weight", "model.embed_tokens.weight"),
    ("decoder.final_layernorm.weight", "model.norm.weight"),
    ("output_layer.weight", "lm_head.weight"),
)


class FormatError(UserError, ValueError):
    """Weights that do not fit the model config; the message names the weight."""


def architecture(cfg: ModelConfig) -> tuple[str, str]:
    """(Hugging Face architecture, model_type) computing what a model of `cfg` computes."""
    if cfg.moe.enabled:
        return ("Qwen3MoeForCausalLM", "qwen3_moe") if cfg.qk_norm else ("MixtralForCausalLM", "mixtral")
    return ("Qwen3ForCausalLM", "qwen3") if cfg.qk_norm else ("LlamaForCausalLM", "llama")


def moe_refusal(cfg: ModelConfig) -> str | None:
    """Why no transformers family computes this mixture-of-experts model, or None.

    Mixtral and Qwen3-MoE both route by a softmax over every expert's logit, take the
    top k, and (Mixtral always, Qwen3-MoE with norm_topk_prob) rescale them to sum to
    one; they route dropless and have no shared expert. Qwen3-MoE keeps the dense MLP
    in `mlp_only_layers`; Mixtral has none.
    """
    moe = cfg.moe
    if not moe.enabled:
        return None
    if moe.shared_expert_ffn_hidden_size:
        return (f"model.moe.shared_expert_ffn_hidden_size={moe.shared_expert_ffn_hidden_size}: Mixtral and "
                "Qwen3-MoE have no shared expert (Qwen2-MoE's is gated)")
    if moe.score_function != "softmax":
        return f"model.moe.score_function={moe.score_function}: Mixtral and Qwen3-MoE route by softmax"
    if moe.capacity_factor is not None:
        return f"model.moe.capacity_factor={moe.capacity_factor}: transformers routes dropless"
    if not cfg.qk_norm and moe.first_dense_layers:
        return (f"model.moe.first_dense_layers={moe.first_dense_layers}: Mixtral has no dense layers "
                "(Qwen3-MoE, with model.qk_norm=true, has)")
    if not cfg.qk_norm and not moe.normalize_top_k:
        return "model.moe.normalize_top_k=false: Mixtral always rescales the chosen scores"
    return None


def _moe_names(cfg: ModelConfig) -> tuple[str, str, str, str]:
    """Hugging Face's (block, gate, up, down) names in a mixture-of-experts layer."""
    if cfg.qk_norm:
        return "mlp", "gate_proj", "up_proj", "down_proj"
    return "block_sparse_moe", "w1", "w3", "w2"


def _layer_renames(cfg: ModelConfig, index: int) -> tuple[tuple[str, str], ...]:
    mlp = () if cfg.is_moe_layer(index) else _DENSE_MLP_RENAMES
    return _LAYER_RENAMES + mlp + (_QK_NORM_RENAMES if cfg.qk_norm else ())


def expected_shapes(cfg: ModelConfig, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    """Every weight of the single-process model with its full shape."""
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    qkv = (cfg.num_attention_heads + 2 * cfg.query_groups) * d
    shapes = {"embedding.weight": (padded_vocab, h), "decoder.final_layernorm.weight": (h,)}
    if not cfg.tie_embeddings:
        shapes["output_layer.weight"] = (padded_vocab, h)
    for i in range(cfg.num_layers):
        prefix = LAYER.format(i=i)
        shapes |= {
            prefix + "input_layernorm.weight": (h,),
            prefix + "self_attention.linear_qkv.weight": (qkv, h),
            prefix + "self_attention.linear_proj.weight": (h, cfg.num_attention_heads * d),
            prefix + "pre_mlp_layernorm.weight": (h,),
        }
        if cfg.is_moe_layer(i):
            moe, fe = cfg.moe, cfg.expert_ffn_hidden_size
            shapes[prefix + "mlp.router.weight"] = (moe.num_experts, h)
            for e in range(moe.num_experts):
                expert = prefix + f"mlp.experts.local_experts.{e}."
                shapes |= {expert + "linear_fc1.weight": (2 * fe, h), expert + "linear_fc2.weight": (h, fe)}
            if moe.shared_expert_ffn_hidden_size:
                fs = moe.shared_expert_ffn_hidden_size
                shapes |= {prefix + "mlp.shared_experts.linear_fc1.weight": (2 * fs, h),
                           prefix + "mlp.shared_experts.linear_fc2.weight": (h, fs)}
        else:
            shapes |= {prefix + "mlp.linear_fc1.weight": (2 * f, h), prefix + "mlp.linear_fc2.weight": (h, f)}
        if cfg.qk_norm:
            shapes |= {prefix + ours: (d,) for ours, _ in _QK_NORM_RENAMES}
    return shapes


def check_weights(weights: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> int:
    """Raises FormatError unless `weights` are exactly the model's; returns the padded vocabulary."""
    if "embedding.weight" not in weights:
        raise FormatError(f"{source}: no embedding.weight")
    padded_vocab = weights["embedding.weight"].shape[0]
    expected = expected_shapes(cfg, padded_vocab)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise FormatError(f"{source}: {len(missing)} weights missing, e.g. {missing[0]}")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise FormatError(f"{source}: unexpected weight {unexpected[0]}")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise FormatError(f"{source}: {name} has shape {tuple(weights[name].shape)}; "
                              f"expected {shape} for the saved model config")
    return padded_vocab


def _qkv_split(cfg: ModelConfig) -> tuple[int, int, int]:
    per_group = cfg.num_attention_heads // cfg.query_groups
    return per_group * cfg.head_dim, cfg.head_dim, cfg.head_dim


def to_hf(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our single-process weights (tensors only) under Hugging Face Llama (or Qwen3) names."""
    hf = {theirs: weights[ours] for ours, theirs in _MODEL_RENAMES if ours in weights}
    q_rows, k_rows, v_rows = _qkv_split(cfg)
    for i in range(cfg.num_layers):
        ours, theirs = LAYER.format(i=i), HF_LAYER.format(i=i)
        for a, b in _layer_renames(cfg, i):
            hf[theirs + b] = weights[ours + a]
        qkv = weights[ours + "self_attention.linear_qkv.weight"]
        grouped = qkv.view(cfg.query_groups, q_rows + k_rows + v_rows, cfg.hidden_size)
        q, k, v = grouped.split((q_rows, k_rows, v_rows), dim=1)
        hf[theirs + "self_attn.q_proj.weight"] = q.reshape(-1, cfg.hidden_size)
        hf[theirs + "self_attn.k_proj.weight"] = k.reshape(-1, cfg.hidden_size)
        hf[theirs + "self_attn.v_proj.weight"] = v.reshape(-1, cfg.hidden_size)
        if cfg.is_moe_layer(i):
            block, gate_name, up_name, down_name = _moe_names(cfg)
            hf[theirs + f"{block}.gate.weight"] = weights[ours + "mlp.router.weight"]
            for e in range(cfg.moe.num_experts):
                expert = ours + f"mlp.experts.local_experts.{e}."
                gate, up = weights[expert + "linear_fc1.weight"].chunk(2, dim=0)
                hf[theirs + f"{block}.experts.{e}.{gate_name}.weight"] = gate
                hf[theirs + f"{block}.experts.{e}.{up_name}.weight"] = up
                hf[theirs + f"{block}.experts.{e}.{down_name}.weight"] = weights[expert + "linear_fc2.weight"]
            continue
        gate, up = weights[ours + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        hf[theirs + "mlp.gate_proj.weight"] = gate
        hf[theirs + "mlp.up_proj.weight"] = up
    return {name: t.contiguous() for name, t in hf.items()}


def from_hf(hf: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """Hugging Face Llama (or Qwen3) weights under our single-process names (inverse of `to_hf`)."""

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            hint = " (model.qk_norm=true expects a Qwen3 model)" if name.endswith(_HF_QK_NORMS) else ""
            raise FormatError(f"{source}: no weight {name}{hint}")
        return hf[name]

    stray = next((name for name in hf if name.endswith(_HF_QK_NORMS)), None)
    if stray and not cfg.qk_norm:
        raise FormatError(f"{source}: weight {stray} belongs to a model with query/key norms; "
                          "expected model.qk_norm=true")

    weights = {ours: take(theirs) for ours, theirs in _MODEL_RENAMES
               if not (ours == "output_layer.weight" and cfg.tie_embeddings)}
    for i in range(cfg.num_layers):
        ours, theirs = LAYER.format(i=i), HF_LAYER.format(i=i)
        for a, b in _layer_renames(cfg, i):
            weights[ours + a] = take(theirs + b)
        q, k, v = (take(theirs + f"self_attn.{p}_proj.weight") for p in "qkv")
        per_group = [t.reshape(cfg.query_groups, -1, t.shape[-1]) for t in (q, k, v)]
        weights[ours + "self_attention.linear_qkv.weight"] = torch.cat(per_group, dim=1).reshape(-1, q.shape[-1])
        if cfg.is_moe_layer(i):
            block, gate_name, up_name, down_name = _moe_names(cfg)
            weights[ours + "mlp.router.weight"] = take(theirs + f"{block}.gate.weight")
            for e in range(cfg.moe.num_experts):
                expert, hf_expert = ours + f"mlp.experts.local_experts.{e}.", theirs + f"{block}.experts.{e}."
                weights[expert + "linear_fc1.weight"] = torch.cat(
                    (take(hf_expert + f"{gate_name}.weight"), take(hf_expert + f"{up_name}.weight")), dim=0)
                weights[expert + "linear_fc2.weight"] = take(hf_expert + f"{down_name}.weight")
            continue
        weights[ours + "mlp.linear_fc1.weight"] = torch.cat(
            (take(theirs + "mlp.gate_proj.weight"), take(theirs + "mlp.up_proj.weight")), dim=0)
    check_weights(weights, cfg, source)
    return weights


def hf_config(cfg: ModelConfig, padded_vocab: int, dtype: torch.dtype, special_ids: dict) -> dict:
    """config.json of a `LlamaForCausalLM` (`Qwen3ForCausalLM` with `model.qk_norm`) computing
    what our model computes.

    The vocabulary is the padded one (the embedding's rows); rope_theta is
    written both as the classic top-level key and in `rope_parameters`, which
    newer transformers versions read. z-loss (`model.z_loss_multiplier`) is a
    training term only: it leaves nothing to export.
    """
    name, model_type = architecture(cfg)
    config = {
        "architectures": [name],
        "model_type": model_type,
        "vocab_size": padded_vocab,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.query_groups,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        **rope_fields(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
        **special_ids,
    }
    if cfg.qk_norm or cfg.moe.enabled:
        # Qwen3, Qwen3-MoE and Mixtral know no MLP bias or pretraining_tp.
        del config["mlp_bias"], config["pretraining_tp"]
    if cfg.qk_norm:  # Qwen3's sliding window stays off.
        config |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.num_layers,
                   "layer_types": ["full_attention"] * cfg.num_layers}
    return config | moe_fields(cfg)


def moe_fields(cfg: ModelConfig) -> dict:
    """config.json's mixture-of-experts keys: Mixtral's, or Qwen3-MoE's with `model.qk_norm`."""
    moe = cfg.moe
    if not moe.enabled:
        return {}
    if not cfg.qk_norm:
        return {"num_local_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
                "intermediate_size": cfg.expert_ffn_hidden_size, "router_aux_loss_coef": moe.aux_loss_coeff,
                "router_jitter_noise": 0.0, "output_router_logits": False, "sliding_window": None}
    return {"num_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
            "moe_intermediate_size": cfg.expert_ffn_hidden_size, "norm_topk_prob": moe.normalize_top_k,
            "decoder_sparse_step": 1, "mlp_only_layers": list(range(moe.first_dense_layers)),
            "router_aux_loss_coef": moe.aux_loss_coeff, "output_router_logits": False}


def rope_parameters(scaling: RopeScaling) -> dict | None:
    """`model.rope_scaling` as Hugging Face's `rope_scaling` dict (None when off)."""
    if scaling.type == "none":
        return None
    values = {"rope_type": scaling.type, "factor": scaling.factor}
    if scaling.type in ("llama3", "yarn"):
        values["original_max_position_embeddings"] = scaling.original_max_position_embeddings
    if scaling.type == "llama3":
        values |= {"low_freq_factor": scaling.low_freq_factor, "high_freq_factor": scaling.high_freq_factor}
    if scaling.type == "yarn":
        values |= {"beta_fast": scaling.beta_fast, "beta_slow": scaling.beta_slow}
        if scaling.attention_factor is not None:
            values["attention_factor"] = scaling.attention_factor
    return values


def rope_fields(cfg: ModelConfig) -> dict:
    """rope_theta as the classic top-level key, the scaling as `rope_scaling`, and both in
    `rope_parameters`, which newer transformers versions read."""
    scaling = rope_parameters(cfg.rope_scaling)
    return {"rope_theta": cfg.rotary_base,
            "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": cfg.rotary_base},
            "rope_scaling": scaling}


# Keys of a Hugging Face rope_scaling that this model reproduces, by type, with the defaults
# transformers takes for those left out.
_ROPE_KEYS = {
    "default": {},
    "linear": {"factor": None},
    "llama3": {"factor": None, "original_max_position_embeddings": None, "low_freq_factor": None,
               "high_freq_factor": None},
    "yarn": {"factor": None, "original_max_position_embeddings": None, "beta_fast": 32.0, "beta_slow": 1.0,
             "attention_factor": None},
}


def _effective(kind: str, values: dict) -> dict:
    """A rope_scaling's values with transformers' defaults filled in (YaRN's attention factor too)."""
    filled = {k: values.get(k, default) for k, default in _ROPE_KEYS[kind].items()}
    if kind == "yarn" and filled["attention_factor"] is None and filled["factor"] is not None:
        factor = float(filled["factor"])
        filled["attention_factor"] = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return {k: None if v is None else float(v) for k, v in filled.items()}


def rope_mismatch(hf: dict, cfg: ModelConfig) -> str | None:
    """Why a Hugging Face config's RoPE scaling is not ours, or None. Types or keys this model
    cannot reproduce (dynamic NTK, LongRoPE, YaRN's mscale) are refused, not dropped."""
    theirs = dict(hf.get("rope_scaling") or {})
    if not theirs:
        theirs = {k: v for k, v in (hf.get("rope_parameters") or {}).items() if k != "rope_theta"}
    kind = theirs.pop("rope_type", theirs.pop("type", "default"))
    if kind not in _ROPE_KEYS:
        return f"rope_scaling rope_type={kind!r}: this model reproduces only linear, llama3 and yarn"
    if theirs.get("partial_rotary_factor", 1.0) == 1.0:
        theirs.pop("partial_rotary_factor", None)
    if kind == "yarn" and theirs.pop("truncate", True) is not True:
        return "rope_scaling yarn with truncate=false: this model reproduces the truncated ramp only"
    unknown = sorted(set(theirs) - set(_ROPE_KEYS[kind]))
    if unknown:
        return f"rope_scaling {kind} with {', '.join(unknown)}: this model cannot reproduce it"
    ours_kind = cfg.rope_scaling.type if cfg.rope_scaling.type != "none" else "default"
    ours = _effective(ours_kind, rope_parameters(cfg.rope_scaling) or {})
    if ours_kind != kind or _effective(kind, theirs) != ours:
        described = ", ".join(f"{k}={v}" for k, v in sorted(theirs.items()))
        return (f"rope_scaling {kind}" + (f" ({described})" if described else "")
                + f", but model.rope_scaling is {cfg.rope_scaling.type}"
                + (f" ({', '.join(f'{k}={v:g}' for k, v in sorted(ours.items()))})" if ours else ""))
    return None


# config.json key → our ModelConfig field, for the checks made before importing.
_CONFIG_FIELDS = (
    ("hidden_size", "hidden_size"),
    ("intermediate_size", "ffn_hidden_size"),
    ("num_hidden_layers", "num_layers"),
    ("num_attention_heads", "num_attention_heads"),
    ("num_key_value_heads", "query_groups"),
    ("rms_norm_eps", "norm_eps"),
    ("tie_word_embeddings", "tie_embeddings"),
)


def config_mismatch(hf: dict, cfg: ModelConfig) -> str | None:
    """The first difference between a Hugging Face config.json and our model config, if any."""
    model_type = architecture(cfg)[1]
    if hf.get("model_type", "llama") != model_type:
        return (f"model_type={hf.get('model_type')!r}; expected {model_type!r} for "
                f"model.qk_norm={str(cfg.qk_norm).lower()}")
    if hf.get("use_sliding_window"):
        return "use_sliding_window=true; expected full attention in every layer"
    for theirs, ours in _CONFIG_FIELDS:
        if theirs == "intermediate_size" and cfg.moe.enabled and not cfg.qk_norm:
            continue  # Mixtral's is the experts' (in moe_fields)
        value = hf.get(theirs, hf.get("num_attention_heads") if theirs == "num_key_value_heads" else None)
        if value != getattr(cfg, ours):
            return f"{theirs}={value}, but model.{ours.replace('query_groups', 'num_query_groups')}=" \
                   f"{getattr(cfg, ours)}"
    theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta"))
    if theta is not None and float(theta) != cfg.rotary_base:
        return f"rope_theta={theta}, but model.rotary_base={cfg.rotary_base}"
    rope = rope_mismatch(hf, cfg)
    if rope:
        return rope
    if hf.get("head_dim") not in (None, cfg.head_dim):
        return f"head_dim={hf['head_dim']}, but the model's head size is {cfg.head_dim}"
    for key, ours in moe_fields(cfg).items():
        if key not in _MOE_TRAINING_KEYS and hf.get(key, ours) != ours:
            return f"{key}={hf.get(key)}, but model.moe gives {ours}"
    return None


# config.json keys of training alone (loss coefficients, router noise): an import may differ.
_MOE_TRAINING_KEYS = ("router_aux_loss_coef", "output_router_logits", "router_jitter_noise", "sliding_window")
