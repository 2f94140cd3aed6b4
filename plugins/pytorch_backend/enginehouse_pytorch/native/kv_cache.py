"""The native runner's KV cache: its layer groups (`KVGroup`) and their tensors.

Layers are grouped by their sliding window: a model whose every layer attends over the whole
context has no groups (`KVSpec` as before groups existed, one pool); one with sliding-window
layers has a "sliding" group per window and a "full" group for the rest (Gemma 2 and 3, Mistral,
Qwen2 with sliding layers). Each group has its own tensor, [layers, 2, kv_heads, slots, d], and
its own null slot (one past its blocks: zeros that padding reads) and scratch slot after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from enginehouse.plugin_api import KVGroup, format_size, split_blocks, total_blocks

from . import kv_quant
from .arch import Arch


@dataclass
class GroupCache:
    """One group's tensor and where its special slots are."""

    layers: tuple[int, ...]
    window: int | None
    cache: torch.Tensor  # [layers, 2, kv_heads, slots, d]
    null_slot: int
    scratch_slot: int
    scales: torch.Tensor | None = None  # a quantized cache's scales (kv_quant.py)
    # A cache of another shape (MLA's [slots, latent + rope key] per layer) states its layout.
    fixed_layout: dict[str, int] | None = None

    def layer(self, j: int) -> tuple[torch.Tensor, ...]:
        """The cache of the group's j-th layer: (keys, values), and their scales where
        quantized."""
        if self.scales is None:
            return self.cache[j, 0], self.cache[j, 1]
        return self.cache[j, 0], self.cache[j, 1], self.scales[j, 0], self.scales[j, 1]

    @property
    def layout(self) -> dict[str, int]:
        if self.fixed_layout is not None:
            return self.fixed_layout
        return {"kv_heads": self.cache.shape[2], "num_slots": self.cache.shape[3]}


def layer_groups(arch: Arch) -> list[tuple[int | None, tuple[int, ...]]]:
    """(window, layers) per group: full attention first, then each window."""
    windows = [arch.window(i) for i in range(arch.num_layers)]
    order = sorted(set(windows), key=lambda w: (w is not None, w or 0))
    return [(w, tuple(i for i, x in enumerate(windows) if x == w)) for w in order]


def kv_groups(arch: Arch, kv_heads: int, head_bytes: int) -> tuple[KVGroup, ...]:
    """The `KVSpec.groups` of `arch` (none where every layer is full attention).
    `head_bytes`: what one token's key (or value) of one head takes (`kv_quant.head_bytes`)."""
    groups = layer_groups(arch)
    if groups == [(None, tuple(range(arch.num_layers)))]:
        return ()
    per_layer = 2 * kv_heads * head_bytes
    return tuple(
        KVGroup(
            "full" if w is None else "sliding",
            layers,
            bytes_per_token=per_layer * len(layers),
            window=w,
        )
        for w, layers in groups
    )


def allocate(
    groups: list[tuple[int | None, tuple[int, ...]]],
    blocks: list[int],
    block_size: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    kind: str = "auto",
) -> list[GroupCache]:
    """One tensor per group (and one of scales where `kind` quantizes, see kv_quant.py).
    Slots stay uninitialised (attention only reads slots written before) except each group's
    null slot, zeros always."""
    out = []
    for (window, layers), n in zip(groups, blocks):
        null = n * block_size
        shape = (len(layers), 2, kv_heads, null + 2, head_dim)
        cache = torch.empty(shape, dtype=kv_quant.storage_dtype(kind, dtype), device=device)
        cache[:, :, :, null].zero_()
        scales = None
        if kind == "int8":
            scales = torch.empty(shape[:-1], dtype=torch.float32, device=device)
            scales[:, :, :, null].zero_()
        elif kind == "fp8":  # per-tensor scales, set by the first store (kv_quant.py)
            scales = torch.zeros(len(layers), 2, dtype=torch.float32, device=device)
        out.append(GroupCache(layers, window, cache, null, null + 1, scales))
    return out


def plan_line(
    groups: tuple[KVGroup, ...],
    budget: int,
    block_size: int,
    session_len: int,
    max_batch_size: int,
    max_chunk: int,
    element: str,
    every_layer: int | None = None,
) -> str:
    """`explain`'s account of the KV plan: per group its kind, layers, bytes per token (per
    sequence for a state group) and the tokens (sequences) its pool holds, then the sequences
    that fit at full context, against what full attention in every layer would fit
    (`every_layer` bytes per token; the paged groups' sum by default)."""
    args = (block_size, session_len, max_batch_size, max_chunk)
    total = total_blocks(groups, budget, *args)
    plans = split_blocks(groups, total, block_size, session_len, max_chunk, max_batch_size)
    parts = []
    for p in plans:
        g, n = p.group, len(p.group.layers)
        layers = f"{n} layer{'s' * (n > 1)}"
        if g.paged:
            parts.append(
                f"{g.describe()} ({layers}, {g.bytes_per_token} B/token in {element}): "
                f"{p.tokens} tokens"
            )
        else:
            saved = ", snapshots at block boundaries for prefix hits" if g.snapshots else ""
            parts.append(
                f"{g.describe()} ({layers}, {format_size(g.bytes_per_seq)}/sequence{saved}): "
                f"{p.blocks} slots"
            )
    every = every_layer or sum(g.bytes_per_token for g in groups)
    # Both counts stop at max_batch_size: the engine runs no more sequences at once.
    plain = min(budget // (every * session_len), max_batch_size)
    fits = min(p.blocks // p.blocks_per_seq for p in plans)
    cap = f", at most max_batch_size={max_batch_size}" if max(fits, plain) == max_batch_size else ""
    return (
        f"KV cache groups: {'; '.join(parts)}; {fits} sequences of {session_len} tokens fit "
        f"in {format_size(budget)} (with full attention in every layer: {plain}{cap})"
    )
