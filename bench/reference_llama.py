"""The default model written in plain torch.nn: the reference the product is measured against.

The same computation as `pretrain.model.llama.LlamaModel` on one process (RMSNorm,
SwiGLU, rotary embeddings in megatron-core's rotate-half layout, grouped-query
attention through SDPA, fp32 cross entropy), with parameters named as in the
product's state dict so its weights load unchanged. No megatron-core, no
DeepSpeed: it is what a minimal hand-written trainer would run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.heads, self.groups, self.head_dim = cfg.num_attention_heads, cfg.query_groups, d
        self.input_layernorm = RMSNorm(h, cfg.norm_eps)
        # megatron-core's fused layout: per query group, its query heads, then one key, one value.
        self.linear_qkv = nn.Linear(h, (self.heads + 2 * self.groups) * d, bias=False)
        self.linear_proj = nn.Linear(self.heads * d, h, bias=False)
        self.pre_mlp_layernorm = RMSNorm(h, cfg.norm_eps)
        self.linear_fc1 = nn.Linear(h, 2 * cfg.ffn_hidden_size, bias=False)  # [gate; up]
        self.linear_fc2 = nn.Linear(cfg.ffn_hidden_size, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        per_group = self.heads // self.groups
        qkv = self.linear_qkv(self.input_layernorm(x)).view(b, s, self.groups, per_group + 2, self.head_dim)
        q = rotate(qkv[:, :, :, :per_group].reshape(b, s, self.heads, self.head_dim), cos, sin)
        k = rotate(qkv[:, :, :, per_group], cos, sin)
        v = qkv[:, :, :, per_group + 1]
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, enable_gqa=self.groups != self.heads,
        )
        x = x + self.linear_proj(attn.transpose(1, 2).reshape(b, s, -1))
        gate, up = self.linear_fc1(self.pre_mlp_layernorm(x)).chunk(2, dim=-1)
        return x + self.linear_fc2(F.silu(gate) * up)


def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=-1)
    return t * cos + torch.cat((-second, first), dim=-1) * sin


class ReferenceLlama(nn.Module):
    """Token ids [b, s] and labels [b, s] → per-token loss [b, s]."""

    def __init__(self, cfg: ModelConfig, padded_vocab_size: int):
        super().__init__()
        if cfg.tie_embeddings:
            raise ValueError("the reference covers untied embeddings (the default model's)")
        self.cfg = cfg
        self.embedding = nn.Embedding(padded_vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.output_layer = nn.Linear(cfg.hidden_size, padded_vocab_size, bias=False)
        d = cfg.head_dim
        inv_freq = 1.0 / cfg.rotary_base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)[None, :, None, :]  # [1, s, 1, d]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        s = tokens.shape[1]
        cos, sin = self.cos[:, :s], self.sin[:, :s]
        x = self.embedding(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.output_layer(self.final_layernorm(x))
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
        return loss.view_as(labels)

    @torch.no_grad()
    def load_product_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copies the weights of a one-process `LlamaModel` (its names, same shapes)."""
        renamed = {
            name.replace("decoder.", "").replace("self_attention.", "").replace("mlp.", ""): tensor
            for name, tensor in state_dict.items() if not name.endswith("_extra_state")
        }
        self.load_state_dict(renamed, strict=True)
