"""Rotary position embeddings: angles, cos/sin tables, and the rotation itself.

Plain torch, no megatron-core: the training layers hand these tables to
megatron-core's attention, and the generation decoder (`decode`) rotates
with the same functions.
"""

from __future__ import annotations

import math

import torch

from pretrain.model.config import RopeScaling


def inverse_frequencies(head_dim: int, base: float, scaling: RopeScaling | None = None,
                        device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """Each rotating pair's angle per position [head_dim / 2], and the factor cos and sin are
    scaled by (YaRN's attention factor; 1 otherwise). As Hugging Face's
    `modeling_rope_utils` computes them, so that an export rotates the same."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    if scaling is None or scaling.type == "none":
        return inv_freq, 1.0
    factor = scaling.factor
    if scaling.type == "linear":
        return inv_freq / factor, 1.0
    original = scaling.original_max_position_embeddings
    if scaling.type == "llama3":
        wavelength = 2 * math.pi / inv_freq
        low_wavelength, high_wavelength = original / scaling.low_freq_factor, original / scaling.high_freq_factor
        scaled = torch.where(wavelength > low_wavelength, inv_freq / factor, inv_freq)
        smooth = (original / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        between = ~(wavelength < high_wavelength) & ~(wavelength > low_wavelength)
        return torch.where(between, blended, scaled), 1.0
    # yarn: dimensions that turn fewer than beta_slow times over the original context are
    # interpolated, more than beta_fast times extrapolated, and those between blended.
    def dimension(turns: float) -> float:
        return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dimension(scaling.beta_fast)), 0)
    high = min(math.ceil(dimension(scaling.beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolated = 1 - ramp
    inv_freq = inv_freq / factor * (1 - extrapolated) + inv_freq * extrapolated
    attention = scaling.attention_factor if scaling.attention_factor is not None else (
        0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    return inv_freq, attention


def rotary_frequencies(
    seq_len: int, head_dim: int, base: float, device: torch.device | None = None,
    scaling: RopeScaling | None = None,
) -> torch.Tensor:
    """Rotary angles in megatron-core's layout [s, 1, 1, head_dim].

    Positions are laid out as in megatron-core's `RotaryEmbedding` (the two
    halves of the head dimension rotate together), so its `apply_rotary_pos_emb`
    consumes them directly. YaRN's attention factor is not in the angles: it
    scales cos and sin (`rotary_tables`).
    """
    return _angles(seq_len, inverse_frequencies(head_dim, base, scaling, device)[0])


def _angles(seq_len: int, inv_freq: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(seq_len, dtype=torch.float32, device=inv_freq.device)
    angles = torch.outer(positions, inv_freq)
    return torch.cat((angles, angles), dim=-1)[:, None, None, :]


def rotary_tables(
    seq_len: int, head_dim: int, base: float, device: torch.device | None = None,
    scaling: RopeScaling | None = None,
) -> torch.Tensor:
    """cos and sin of `rotary_frequencies`, side by side: [s, 1, 1, 2 * head_dim], fp32,
    times YaRN's attention factor where it applies.

    The model hands megatron-core these tables rather than the angles, and
    `apply_rotary_tables` rotates with them. Given the angles, megatron-core
    takes their cos and sin inside each layer, and torch.compile fuses that into
    the rotation, so both were recomputed for every element of every head,
    forward and backward. On CPU that was about 3% of the default model's
    step; with the tables the step is about 2% faster.
    """
    inv_freq, attention = inverse_frequencies(head_dim, base, scaling, device)
    angles = _angles(seq_len, inv_freq)
    tables = torch.cat((angles.cos(), angles.sin()), dim=-1)
    return tables if attention == 1.0 else tables * attention


class RotaryTables:
    """`rotary_tables` per (sequence length, device), made on first use, and picked
    per token where positions restart (e.g. at document boundaries).

    Held in a plain dict rather than a module buffer: the tables depend only on
    the shape, so checkpoints need not carry them. Under torch.compile the dict's
    entry reaches the graph as a ready tensor, its cos and sin not recomputed.
    """

    def __init__(self, head_dim: int, base: float, scaling: RopeScaling | None = None, max_positions: int = 0):
        self.head_dim, self.base, self.scaling = head_dim, base, scaling
        # Position ids index a table this long at least: a slice of a longer sequence
        # (context parallelism) holds positions beyond its own length.
        self.max_positions = max_positions
        self._tables: dict[tuple, torch.Tensor] = {}

    def __call__(self, seq_len: int, device: torch.device,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[s, 1, 1, 2 * head_dim]; [s, b, 1, 2 * head_dim] for `position_ids` [b, s]."""
        if position_ids is not None:
            seq_len = max(seq_len, self.max_positions)
        key = (seq_len, device)
        if key not in self._tables:
            self._tables[key] = rotary_tables(seq_len, self.head_dim, self.base, device, self.scaling)
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
