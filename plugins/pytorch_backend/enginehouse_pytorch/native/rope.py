"""Rotary position embeddings: the inverse frequencies of each rope type, and a cos/sin table.

The table covers every position the engine may use, so a step only indexes it by position.
Formulas follow the papers (and agree with transformers' implementations to float32 rounding).
"""

from __future__ import annotations

import math

import torch

from .arch import Arch


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between."""
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def _longrope_factor(arch: Arch) -> tuple[float, int]:
    """Phi-3 LongRoPE: the attention factor and the original (short) context length."""
    p = arch.rope.params
    original = p.get("original_max_position_embeddings") or arch.max_positions
    factor = p.get("factor") or arch.max_positions / original
    attention = p.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return attention, original


def _yarn(arch: Arch, dim: int) -> tuple[torch.Tensor, float]:
    """YaRN (gpt-oss, DeepSeek): each frequency between its original (fast rotations, kept) and
    its interpolation by `factor` (slow ones), with a linear ramp between `beta_fast` and
    `beta_slow` rotations over the original context; cos and sin scaled by the attention
    factor. DeepSeek's `mscale` / `mscale_all_dim` set that factor as a ratio of two."""
    p = arch.rope.params
    base = arch.rope.theta
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or arch.max_positions / original
    attention = p.get("attention_factor")
    if attention is None:
        mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
        if mscale and mscale_all:
            attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attention = _yarn_mscale(factor)
    fast, slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(fast), correction_dim(slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the original frequency, 0: the interpolated one
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, float(attention)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_table(arch: Arch, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, float32, shape [num_positions, rotary_dim]."""
    rope = arch.rope
    dim = rope.rotary_dim or arch.head_dim
    positions = torch.arange(num_positions, dtype=torch.float32)
    scale = 1.0
    if rope.kind == "longrope":
        scale, original = _longrope_factor(arch)
        shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        short = 1.0 / (torch.tensor(rope.params["short_factor"]) * rope.theta**shape)
        long = 1.0 / (torch.tensor(rope.params["long_factor"]) * rope.theta**shape)
        # Each position takes the frequencies of its own range. transformers instead switches a
        # whole sequence to the long factors once it passes `original` and recomputes its cache;
        # a paged cache keeps the KV it computed, so sequences past `original` differ from it.
        freqs = torch.where(
            (positions >= original)[:, None],
            positions[:, None] * long[None],
            positions[:, None] * short[None],
        )
    elif rope.kind == "yarn":
        inv_freq, scale = _yarn(arch, dim)
        freqs = positions[:, None] * inv_freq[None]
    else:
        inv_freq = _base_inv_freq(rope.theta, dim)
        if rope.kind == "linear":
            inv_freq = inv_freq / rope.params["factor"]
        elif rope.kind == "llama3":
            inv_freq = _llama3(inv_freq, dict(rope.params))
        freqs = positions[:, None] * inv_freq[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    # The first half of sin is negated here once, so that applying rope needs no negation:
    # rotate_half(x) * sin == roll(x, half) * signed_sin.
    sign = torch.cat([-torch.ones(dim // 2), torch.ones(dim // 2)])
    return emb.cos() * scale, emb.sin() * scale * sign


def mrope_rows(
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    section: tuple[int, ...],
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the table for multimodal positions [3, tokens] (Qwen2-VL's M-RoPE): each
    frequency takes its row from the time, height or width position, by `section`: a run of
    pairs per axis, or (`interleaved`, Qwen3-VL and Qwen3.5) pair i from axis i % 3 while
    i < 3 * section[axis], from time after that."""
    if interleaved:
        i = torch.arange(sum(section))
        axis = i % 3
        half = torch.where(i < 3 * torch.tensor(section)[axis], axis, 0)
    else:
        half = torch.cat([torch.full((n,), i) for i, n in enumerate(section)])
    which = torch.cat([half, half]).to(cos.device)  # both halves of the rotate-half layout
    columns = torch.arange(cos.shape[-1], device=cos.device)
    rows = positions.to(cos.device)[which]  # [dim, tokens]: the position each column uses
    return cos[rows, columns[:, None]].T, sin[rows, columns[:, None]].T


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [tokens, heads, head_dim] by rows of `rope_table` ([tokens, 1, rotary_dim]),
    in the rotate-half form: x * cos + rotate_half(x) * sin, in three ops."""
    rot = cos.shape[-1]
    if rot != x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rot], cos, signed_sin), x[..., rot:]], dim=-1)
    return torch.addcmul(x * cos, x.roll(rot // 2, dims=-1), signed_sin)
