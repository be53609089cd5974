"""Rotary position embeddings: angles, cos/sin tables, and the rotation itself.

Plain torch, no megatron-core: the training layers hand these tables to
megatron-core's attention, and the generation decoder (`decode`) rotates
with the same functions.
"""

from __future__ import annotations

import torch


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


def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half form (megatron-core's `apply_rotary_pos_emb`, not interleaved)."""
    first, second = t.chunk(2, dim=-1)
    return t * cos + torch.cat((-second, first), dim=-1) * sin
