"""The trained model's forward pass in plain torch, with a key/value cache.

megatron-core's inference path (KV cache, dynamic batching) expects CUDA.
Generation needs much less: one sequence at a time, a cache of past keys and
values, any device. `Decoder` reads the single-process `LlamaModel` weights
(see `pretrain.checkpoint.consolidate`) and computes the same logits as
`LlamaModel.forward`; the tests hold the two to 1e-5 in fp32. It imports
neither megatron-core nor DeepSpeed, so generation starts quickly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretrain.model.config import ModelConfig
from pretrain.model.rotary import rotary_tables, rotate


@dataclass
class KVCache:
    """Rotated keys and values of the positions processed so far, per layer: [b, groups, max_len, d]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]


class Decoder:
    def __init__(self, cfg: ModelConfig, state_dict: dict[str, torch.Tensor],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = dtype

        def weight(name: str) -> torch.Tensor:
            return state_dict[name].to(self.device, dtype)

        self.embedding = weight("embedding.weight")
        self.output = self.embedding if cfg.tie_embeddings else weight("output_layer.weight")
        self.final_norm = weight("decoder.final_layernorm.weight")
        self.layers = []
        for i in range(cfg.num_layers):
            prefix = f"decoder.layers.{i}."
            self.layers.append({
                key: weight(prefix + name) for key, name in (
                    ("attn_norm", "input_layernorm.weight"),
                    ("qkv", "self_attention.linear_qkv.weight"),
                    ("proj", "self_attention.linear_proj.weight"),
                    ("mlp_norm", "pre_mlp_layernorm.weight"),
                ) + ((("q_norm", "self_attention.q_layernorm.weight"),
                      ("k_norm", "self_attention.k_layernorm.weight")) if cfg.qk_norm else ())
            })
            if not cfg.is_moe_layer(i):
                self.layers[-1] |= {"fc1": weight(prefix + "mlp.linear_fc1.weight"),
                                    "fc2": weight(prefix + "mlp.linear_fc2.weight")}
                continue
            moe = cfg.moe
            experts = [(weight(prefix + f"mlp.experts.local_experts.{e}.linear_fc1.weight"),
                        weight(prefix + f"mlp.experts.local_experts.{e}.linear_fc2.weight"))
                       for e in range(moe.num_experts)]
            shared = (weight(prefix + "mlp.shared_experts.linear_fc1.weight"),
                      weight(prefix + "mlp.shared_experts.linear_fc2.weight")) \
                if moe.shared_expert_ffn_hidden_size else None
            bias = state_dict.get(prefix + "mlp.router.expert_bias")
            self.layers[-1] |= {"router": weight(prefix + "mlp.router.weight"), "experts": experts,
                                "shared": shared, "expert_bias": None if bias is None else bias.to(self.device)}
        self._rotary = torch.empty(0, 2 * cfg.head_dim, device=self.device)

    @property
    def vocab_size(self) -> int:
        """The padded vocabulary: the width of the logits."""
        return self.output.shape[0]

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        shape = (batch_size, self.cfg.query_groups, max_len, self.cfg.head_dim)
        make = lambda: torch.zeros(shape, device=self.device, dtype=self.dtype)  # noqa: E731
        return KVCache([make() for _ in self.layers], [make() for _ in self.layers])

    def rotary(self, start: int, stop: int) -> torch.Tensor:
        """cos and sin [stop - start, 2 * head_dim] for positions start..stop-1.

        The training model's tables (`pretrain.model.rotary.rotary_tables`, RoPE scaling
        included), grown on demand.
        """
        if stop > self._rotary.shape[0]:
            length = max(stop, 2 * self._rotary.shape[0])
            self._rotary = rotary_tables(length, self.cfg.head_dim, self.cfg.rotary_base, self.device,
                                         self.cfg.rope_scaling)[:, 0, 0]
        return self._rotary[start:stop]

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [b, s, padded vocab] for tokens [b, s].

        With a cache, `tokens` continue the cached positions and their keys and
        values are appended to it; without, they are the whole sequence.
        """
        cfg = self.cfg
        batch, seq = tokens.shape
        start = cache.length if cache is not None else 0
        if cache is not None and start + seq > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} positions; {start + seq} needed")
        tables = self.rotary(start, start + seq)[None, :, None, :].to(self.dtype)  # [1, s, 1, 2d]
        cos, sin = tables.chunk(2, dim=-1)
        groups, heads, d = cfg.query_groups, cfg.num_attention_heads, cfg.head_dim
        per_group = heads // groups
        # Causal attention over cached and new positions. A single new token
        # sees everything cached; a first chunk is plainly causal; a later chunk
        # needs the offset spelled out (SDPA aligns `is_causal` to the top left).
        mask = None
        if seq > 1 and start > 0:
            mask = torch.arange(start + seq, device=self.device)[None, :] <= (
                start + torch.arange(seq, device=self.device)[:, None])

        x = self.embedding[tokens]  # [b, s, h]
        for i, w in enumerate(self.layers):
            y = F.rms_norm(x, w["attn_norm"].shape, w["attn_norm"], cfg.norm_eps)
            # megatron-core's fused layout: per query group, its query heads, then one key, one value.
            qkv = (y @ w["qkv"].T).view(batch, seq, groups, per_group + 2, d)
            q = qkv[:, :, :, :per_group].reshape(batch, seq, heads, d)
            k = qkv[:, :, :, per_group]
            if cfg.qk_norm:  # each head's channels, before rotating
                q = F.rms_norm(q, (d,), w["q_norm"], cfg.norm_eps)
                k = F.rms_norm(k, (d,), w["k_norm"], cfg.norm_eps)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            v = qkv[:, :, :, per_group + 1]
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads or groups, s, d]
            if cache is not None:
                cache.keys[i][:, :, start:start + seq] = k
                cache.values[i][:, :, start:start + seq] = v
                k, v = cache.keys[i][:, :, :start + seq], cache.values[i][:, :, :start + seq]
            attn = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and seq > 1, enable_gqa=groups != heads
            )
            x = x + attn.transpose(1, 2).reshape(batch, seq, heads * d) @ w["proj"].T
            y = F.rms_norm(x, w["mlp_norm"].shape, w["mlp_norm"], cfg.norm_eps)
            x = x + (self._experts(y, w) if "router" in w else _swiglu(y, w["fc1"], w["fc2"]))
        if cache is not None:
            cache.length = start + seq
        x = F.rms_norm(x, self.final_norm.shape, self.final_norm, cfg.norm_eps)
        return x @ self.output.T

    __call__ = forward

    def _experts(self, y: torch.Tensor, w: dict) -> torch.Tensor:
        """A mixture-of-experts layer as megatron-core's router computes it: top-k of softmax
        (over the chosen k when renormalised) or sigmoid scores (the expert bias steering the
        choice only), every token through its k experts and the shared one. Dropless: a
        capacity factor, a training-time limit, does not apply to generation."""
        moe = self.cfg.moe
        logits = (y @ w["router"].T).float()
        if moe.score_function == "softmax":
            if moe.normalize_top_k:
                top, chosen = logits.topk(moe.top_k, dim=-1)
                probs = top.softmax(dim=-1)
            else:
                probs, chosen = logits.softmax(dim=-1).topk(moe.top_k, dim=-1)
        else:
            scores = logits.sigmoid()
            steer = scores if w["expert_bias"] is None else scores + w["expert_bias"]
            chosen = steer.topk(moe.top_k, dim=-1).indices
            probs = scores.gather(-1, chosen)
            if moe.top_k > 1:
                probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
        out = torch.zeros_like(y)
        for e, (fc1, fc2) in enumerate(w["experts"]):
            weight = (probs * (chosen == e)).sum(dim=-1, keepdim=True).to(y.dtype)  # 0 where not chosen
            if weight.any():
                out = out + weight * _swiglu(y, fc1, fc2)
        if w["shared"] is not None:
            out = out + _swiglu(y, *w["shared"])
        return out


def _swiglu(y: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor) -> torch.Tensor:
    gate, up = (y @ fc1.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ fc2.T
