"""Paged attention in plain torch ops: the CPU path, and the GPU path's prefill.

The KV cache of a layer is two tensors [kv_heads, num_slots, head_dim] (slot = block id *
block_size + offset). A step's tokens are ordered decodes first: the decode rows attend as one
batch over their gathered context, each prefill chunk attends on its own (packed, no padding).
Everything that depends only on the batch (gather indices, masks) is built once per step in
`StepMeta` and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


@dataclass
class Prefill:
    """A chunk of one sequence's prompt: tokens [begin, end) of the step, at positions
    start_pos ...; `context` gathers its earlier KV from the cache when start_pos > 0."""

    begin: int
    end: int
    start_pos: int
    context: torch.Tensor | None = None  # slots of positions 0 .. start_pos + n - 1
    masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)


@dataclass
class Queries:
    """Several queries per sequence (speculative verification) for a kernel that reads each
    sequence's K/V once for all of them (`TritonAttention`, native/verify_rows.py): sequence b's
    queries are decode rows starts[b] .. starts[b] + counts[b] - 1, at the last counts[b] of its
    context_lens[b] positions; `block_tables` / `context_lens` then hold one row per sequence."""

    starts: torch.Tensor  # [sequences] int32
    counts: torch.Tensor  # [sequences] int32
    most: int  # the largest count (the kernel's tile is sized by it)


@dataclass
class StepMeta:
    num_decode: int  # the first num_decode tokens are single-token decodes
    slots: torch.Tensor  # [tokens] where each new token's K/V goes
    cos: torch.Tensor  # [tokens, 1, rotary_dim]
    sin: torch.Tensor
    decode_gather: torch.Tensor | None = None  # [decodes * max_len] context slots, padded
    decode_len: int = 0
    decode_masks: dict[int | None, torch.Tensor] = field(default_factory=dict)
    # The GPU's paged kernel reads block tables directly instead of gathered slots.
    block_tables: torch.Tensor | None = None  # [decodes, max blocks] int32, padded with 0
    context_lens: torch.Tensor | None = None  # [decodes] int32
    block_size: int = 0  # tokens per block, for the kernel to turn positions into slots
    queries: Queries | None = None  # verify steps of a multi-query kernel: tables per sequence
    # Speculative verify rows: [sequences + 1] row offsets, each sequence's decode rows
    # together (the CPU kernel reads their K/V once); None where every row is its own.
    query_starts: torch.Tensor | None = None
    prefills: list[Prefill] = field(default_factory=list)
    linear: Any = None  # hybrid models: the state slots of the step (linear_attention.StateMeta)
    # With KV groups: each group's metadata (its slots, tables, window and rope); layers of
    # group g read `group(g)`. Empty: every layer reads this one.
    by_group: list[StepMeta] = field(default_factory=list)

    def group(self, g: int) -> StepMeta:
        return self.by_group[g] if self.by_group else self


def window_mask(
    query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None, limit: torch.Tensor
) -> torch.Tensor:
    """True where a query may see a key: causal, below `limit`, inside the sliding window
    (key > query - window, the convention of Mistral and transformers)."""
    ok = (key_pos <= query_pos) & (key_pos < limit)
    if window is not None:
        ok &= key_pos > query_pos - window
    return ok


def across_heads(slots: torch.Tensor, kv_heads: int, num_slots: int) -> torch.Tensor:
    """Row indices of `slots` in every head of a cache viewed as [kv_heads * num_slots, d].

    Gathering rows of that 2-D view (index_select on dim 0, each row one contiguous head_dim
    vector) ran 2.5-5x faster here than index_select on dim 1 of [kv_heads, slots, d], and it
    lands already laid out as [kv_heads, ..., d] for the attention products.
    """
    heads = torch.arange(kv_heads, device=slots.device)[:, None] * num_slots
    return (heads + slots.flatten()[None]).flatten()


def decode_metadata(
    meta: StepMeta,
    block_tables: list[tuple[int, ...]],
    context_lens: list[int],
    block_size: int,
    windows: set[int | None],
    device: torch.device,
    null_slot: int,
    paged: bool = False,
    kv_heads: int = 1,
    num_slots: int = 0,
) -> None:
    """Gather indices and additive masks for the decode rows, as [1, B, 1, L] masks.

    Padding positions read `null_slot`, which always holds zeros: a masked position still goes
    through probs @ V, and a stale slot holding a NaN (0 * NaN = NaN) would poison the row.
    """
    longest = max(context_lens)
    width = max(len(t) for t in block_tables)
    table = torch.tensor([list(t) + [0] * (width - len(t)) for t in block_tables])
    if paged:
        meta.block_tables = table.to(device, torch.int32)
        meta.context_lens = torch.tensor(context_lens, dtype=torch.int32).to(device)
        meta.block_size = block_size
        return
    lens = torch.tensor(context_lens)[:, None]
    window = only_window(windows)
    if window is None:
        pos = torch.arange(longest)[None].expand(len(context_lens), -1)
    else:  # a sliding group: only the window's positions, the rest may be freed blocks
        pos = lens - min(longest, window) + torch.arange(min(longest, window))[None]
    inside = (pos >= 0) & (pos < lens)
    at = pos.clamp(min=0)
    gather = table.gather(1, at // block_size) * block_size + at % block_size
    gather = torch.where(inside, gather, null_slot)
    meta.decode_gather = across_heads(gather, kv_heads, num_slots).to(device)
    meta.decode_len = pos.shape[1]
    for w in windows:
        ok = window_mask(lens - 1, pos, w, lens) & inside
        bias = torch.zeros(ok.shape).masked_fill_(~ok, NEG_INF)
        meta.decode_masks[w] = bias[None, :, None, :].to(device)


def only_window(windows: set[int | None]) -> int | None:
    """The window of a step whose layers all share one sliding window, else None: then the
    positions before it are never read (a sliding KV group may have freed their blocks)."""
    return next(iter(windows)) if len(windows) == 1 else None


def both_ways(
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    blocks: list[tuple[int, int]],
    window: int | None,
) -> torch.Tensor:
    """True where a query and a key are tokens of one image (`blocks` in positions), which
    see each other both ways: Gemma 3's prefill mask, causal OR same image, AND the window
    on sliding layers (transformers' `create_masks_for_vision_model`)."""
    ok = torch.zeros(query_pos.shape[0], key_pos.shape[1], dtype=torch.bool)
    for a, b in blocks:
        ok |= (query_pos >= a) & (query_pos < b) & (key_pos >= a) & (key_pos < b)
    if window is not None:
        ok &= key_pos > query_pos - window
    return ok


def prefill_metadata(
    chunk_range: tuple[int, int],
    start_pos: int,
    block_table: tuple[int, ...],
    block_size: int,
    windows: set[int | None],
    device: torch.device,
    kv_heads: int = 1,
    num_slots: int = 0,
    blocks: list[tuple[int, int]] | None = None,
) -> Prefill:
    """The chunk's gather indices and masks; `blocks` ([start, end) rows of the chunk) are
    images whose tokens attend to each other both ways (Gemma 3)."""
    begin, end = chunk_range
    n = end - begin
    total = start_pos + n
    p = Prefill(begin, end, start_pos)
    window = only_window(windows)
    # The first key the chunk's first token reads: with one sliding window, the earlier
    # positions are never gathered (their blocks may have been freed).
    first = 0 if window is None else max(0, start_pos - window + 1)
    if start_pos > 0:
        pos = torch.arange(first, total)
        table = torch.tensor(block_table)
        slots = table[pos // block_size] * block_size + pos % block_size
        p.context = across_heads(slots, kv_heads, num_slots).to(device)
    images = [(start_pos + a, start_pos + b) for a, b in blocks or ()]
    for w in windows:
        if start_pos == 0 and (w is None or w >= n) and not images:
            p.masks[w] = None  # plain causal: the kernel's own is_causal is fastest
        else:
            q, keys = torch.arange(start_pos, total)[:, None], torch.arange(first, total)[None]
            ok = window_mask(q, keys, w, total)
            if images:
                ok |= both_ways(q, keys, images, w)
            p.masks[w] = ok.to(device)
    return p


def _softcapped(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    return scores if cap is None else torch.tanh(scores / cap) * cap


def attend_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    softcap: float | None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped-query attention as two matrix products: q [kvh, ..., g, d], k/v [kvh, ..., L, d].

    Query heads that share a KV head are grouped, so K/V are never repeated per query head.
    `sinks` (gpt-oss), shaped to broadcast against the scores' last column: one more logit
    per head in the softmax's denominator, attending to nothing.
    """
    scores = _softcapped(q @ k.transpose(-1, -2) * scale, softcap)
    if bias is not None:
        scores = scores + bias
    if sinks is None:
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        return probs @ v
    sink = sinks.to(scores.dtype).expand(*scores.shape[:-1], 1)
    probs = torch.cat([scores, sink], dim=-1).softmax(dim=-1, dtype=torch.float32)
    return probs[..., :-1].to(q.dtype) @ v


class TorchAttention:
    """Paged attention for one step, in torch ops; `meta` was built for this step."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.h, self.kvh, self.d = num_heads, num_kv_heads, head_dim
        self.g = num_heads // num_kv_heads
        self.scale = scale
        # gpt-oss: this rank's sink logit per query head (set by the model after loading);
        # with sinks every attention takes the math path (SDPA has no sinks).
        self.sinks: torch.Tensor | None = None

    def rows(self, cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Gather rows (see `across_heads`) of one cache viewed as [kv_heads * slots, d]."""
        return cache.view(-1, self.d).index_select(0, index)

    def keys_values(
        self, cache, index: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of the gathered rows, in `dtype` (a quantized cache
        dequantizes them here, see kv_quant.py)."""
        return self.rows(cache[0], index), self.rows(cache[1], index)

    def store(self, cache: tuple[torch.Tensor, torch.Tensor], k, v, slots) -> None:
        cache[0].index_copy_(1, slots, k.transpose(0, 1))
        cache[1].index_copy_(1, slots, v.transpose(0, 1))

    def __call__(
        self,
        meta: StepMeta,
        q: torch.Tensor,  # [tokens, heads, d]
        k: torch.Tensor,  # [tokens, kv_heads, d]
        v: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
        window: int | None,
        softcap: float | None,
    ) -> torch.Tensor:
        self.store(cache, k, v, meta.slots)
        return self.attend(meta, q, k, v, cache, window, softcap)

    def attend(self, meta: StepMeta, q, k, v, cache, window, softcap) -> torch.Tensor:
        """The step's attention once its K/V are in the cache (`__call__` without the store)."""
        b = meta.num_decode
        if not meta.prefills:  # the common step: decodes only, no copy into a shared output
            return self.decode(meta, q, cache, window, softcap)
        if not b and len(meta.prefills) == 1:
            return self.prefill(meta.prefills[0], q, k, v, cache, window, softcap)
        out = torch.empty(q.shape[0], self.h * self.d, dtype=q.dtype, device=q.device)
        if b:
            out[:b] = self.decode(meta, q[:b], cache, window, softcap)
        for p in meta.prefills:
            out[p.begin : p.end] = self.prefill(p, q, k, v, cache, window, softcap)
        return out

    def decode(self, meta: StepMeta, q, cache, window, softcap) -> torch.Tensor:
        b, L = q.shape[0], meta.decode_len
        keys, values = self.keys_values(cache, meta.decode_gather, q.dtype)
        keys, values = keys.view(self.kvh, b, L, self.d), values.view(self.kvh, b, L, self.d)
        qg = q.view(b, self.kvh, self.g, self.d).transpose(0, 1)  # [kvh, b, g, d]
        sinks = None if self.sinks is None else self.sinks.view(self.kvh, 1, self.g, 1)
        mask = meta.decode_masks[window]
        o = attend_math(qg, keys, values, mask, self.scale, softcap, sinks)
        return o.transpose(0, 1).reshape(b, self.h * self.d)

    def prefill(self, p: Prefill, q, k, v, cache, window, softcap) -> torch.Tensor:
        q = q[p.begin : p.end].transpose(0, 1)  # [h, n, d]
        if p.context is None:
            k, v = k[p.begin : p.end].transpose(0, 1), v[p.begin : p.end].transpose(0, 1)
        else:
            k, v = self.keys_values(cache, p.context, q.dtype)
            k, v = k.view(self.kvh, -1, self.d), v.view(self.kvh, -1, self.d)
        mask = p.masks[window]
        n = q.shape[1]
        if softcap is not None or self.sinks is not None:
            if mask is None:
                mask = window_mask(torch.arange(n)[:, None], torch.arange(n)[None], None, n)
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
            bias.masked_fill_(~mask.to(q.device), NEG_INF)
            qg = q.view(self.kvh, self.g, n, self.d)
            sinks = None if self.sinks is None else self.sinks.view(self.kvh, self.g, 1, 1)
            o = attend_math(qg, k[:, None], v[:, None], bias, self.scale, softcap, sinks)
            return o.view(self.h, n, self.d).transpose(0, 1).reshape(n, self.h * self.d)
        # With a batch dimension torch picks its fused (flash) kernel, 2-4x faster on the CPU
        # than the unbatched call's plain products (64 to 2048 tokens: benchmarks/RESULTS.md).
        o = F.scaled_dot_product_attention(
            q[None],
            k[None],
            v[None],
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scale,
            enable_gqa=True,
        )[0]
        return o.transpose(0, 1).reshape(n, self.h * self.d)
