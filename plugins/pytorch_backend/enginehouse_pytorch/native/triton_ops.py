"""The GPU's attention kernels, in Triton: K/V into their slots, and paged decode attention.

`TritonAttention` is `TorchAttention` with two steps replaced:

- `store`: one program per new token writes its K and V (all KV heads) into the token's slot
  of the cache [kv_heads, num_slots, head_dim]; a negative slot is skipped.
- `decode`: each decode row attends over its context by reading its block table directly
  (slot = block_tables[b, pos // block_size] * block_size + pos % block_size), no gather in
  torch. One program serves all query heads of one KV head (grouped-query attention: K/V are
  loaded once per group; the group is padded to 16 rows for the tensor cores) and walks the
  context in tiles with an online softmax in float32. Sliding windows (keys > query - window),
  Gemma 2's soft-capping (tanh(s / cap) * cap) and rows of context length 0 (padding rows of a
  CUDA graph: their output is zeros) are handled in the kernel. When there are too few
  (row, KV head) programs to fill the GPU, the context is split in parts (flash-decoding): each
  part writes its partial softmax state and a second kernel combines them.
- verification (speculative decoding): the same kernel takes several queries per sequence
  (`Queries`: each sequence's first row and count, from native/verify_rows.py or the CUDA
  graphs' buffers). The tile then holds every query of the sequence times the KV head's query
  heads, so each K/V tile is read once for all of the sequence's K + 1 verified tokens; query i
  sees keys up to its own position (causal among them) and inside its own window.
- quantized caches (kv_quant.py): int8 with a scale per token and head (`TritonInt8Attention`)
  and fp8 e4m3 with one scale per layer's K and V (`TritonFp8Attention`), dequantized as read;
  e4m3 is decoded in integer ops, so it needs no fp8 instructions (any GPU, the interpreter).

Prefill stays the torch path (SDPA), which is already fast on a GPU. The number of parts is
a function of the tensor shapes only, so a captured CUDA graph replays the same launch.

The kernels also run under Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported) on CPU tensors, which is how the tests check them on machines without a GPU.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .attention import Queries, StepMeta, TorchAttention
from .kv_quant import QuantizedAttention

LOG2E = tl.constexpr(1.4426950408889634)
NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity" for a running max: no inf - inf


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    k_st,
    k_sh,
    v_st,
    v_sh,
    kc_sh,
    kc_ss,
    vc_sh,
    vc_ss,
    slot_stride,
    KVH: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t * slot_stride).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    # The slot test as a full tile, not a scalar: triton 3.9's interpreter refuses a mask
    # broadcast from a scalar ("mask has unsupported dtype").
    valid = (h[:, None] * 0 + slot) >= 0
    mask = (h[:, None] < KVH) & (d[None, :] < D) & valid
    h64 = h.to(tl.int64)
    k = tl.load(k_ptr + t * k_st + h[:, None] * k_sh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t * v_st + h[:, None] * v_sh + d[None, :], mask=mask)
    kc = kc_ptr + h64[:, None] * kc_sh + slot * kc_ss + d[None, :]
    vc = vc_ptr + h64[:, None] * vc_sh + slot * vc_ss + d[None, :]
    tl.store(kc, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(vc_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tanh(x):
    # tanh from exp (saturates cleanly at +-1 for large |x|); float32 in, float32 out.
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _fp8_e4m3_to_float(bits):
    """float8 e4m3 (bits held as uint8) to float32 in integer ops: any GPU (no sm_89 fp8
    instructions needed) and the interpreter. e4m3: sign, 4 exponent bits (bias 7), 3 mantissa
    bits; exponent 0 is subnormal (m * 2^-9). NaN (0x7f/0xff) never reaches the cache: the
    store clamps to +-448."""
    x = bits.to(tl.uint32)
    e = (x >> 3) & 15
    m = x & 7
    sign = (x >> 7) << 31
    normal = (sign | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125  # 2^-9
    sub = tl.where(sign != 0, -sub, sub)
    return tl.where(e == 0, sub, normal)


@triton.jit
def _fp8_values_kernel(bits_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    bits = tl.load(bits_ptr + i, mask=i < n, other=0)
    tl.store(out_ptr + i, _fp8_e4m3_to_float(bits), mask=i < n)


def fp8_e4m3_values(bits: torch.Tensor) -> torch.Tensor:
    """float8 e4m3 codes (uint8) to float32 as the decode kernel reads them (for checks)."""
    out = torch.empty(bits.shape, dtype=torch.float32, device=bits.device)
    n = bits.numel()
    _fp8_values_kernel[(triton.cdiv(n, 256),)](bits.contiguous(), out, n, BLOCK=256)
    return out


@triton.jit
def _dequantized(x, scale_ptr, kvh, s_sh, slot, p_ok, dtype, INT8: tl.constexpr, FP8: tl.constexpr):
    """A tile of K or V as read from the cache, in the queries' dtype: int8 times its scale per
    token and head, fp8 times the layer's one scale, a float cache as it is."""
    if INT8:
        scale = tl.load(scale_ptr + kvh.to(tl.int64) * s_sh + slot, mask=p_ok, other=0.0)
        x = (x.to(tl.float32) * scale[:, None]).to(dtype)
    if FP8:
        x = (_fp8_e4m3_to_float(x) * tl.load(scale_ptr)).to(dtype)
    return x


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    bt_ptr,
    lens_ptr,
    qs_ptr,
    qn_ptr,
    out_ptr,
    part_o_ptr,
    part_m_ptr,
    part_l_ptr,
    sinks_ptr,
    ks_ptr,
    vs_ptr,
    q_sb,
    q_sh,
    c_sh,
    c_ss,
    s_sh,
    bt_sb,
    bt_sw,
    lens_s,
    qs_s,
    o_sb,
    o_sh,
    p_sb,
    p_sh,
    p_ss,
    scale,
    softcap,
    window,
    tiles_per_split,
    G: tl.constexpr,
    D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    SPLIT: tl.constexpr,
    IEEE: tl.constexpr,
    INT8: tl.constexpr,  # an int8 cache with a float32 scale per token and head (kv_quant.py)
    HAS_SINKS: tl.constexpr = False,
    FP8: tl.constexpr = False,  # an fp8 (e4m3) cache with one float32 scale for K, one for V
    Q_ROWS: tl.constexpr = 1,  # queries per sequence, padded to a power of two (see below)
):
    """One program: one sequence, one KV head, one part of the context. Its tile holds the
    G query heads of that KV head for each of the sequence's queries: Q_ROWS == 1 is a decode
    (query row b, at position length - 1); otherwise (speculative verification) the sequence's
    qn[b] queries are rows qs[b] ... of q, at positions length - qn[b] ... length - 1, each
    attending causally, so each K/V tile is read once for all of them. Tile row m is query
    m // BLOCK_G, head m % BLOCK_G."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    length = tl.load(lens_ptr + b * lens_s).to(tl.int32)
    if Q_ROWS == 1:
        first_row = b
        count = 1
    else:
        first_row = tl.load(qs_ptr + b * qs_s).to(tl.int32)
        count = tl.load(qn_ptr + b * qs_s).to(tl.int32)
    lo = part * tiles_per_split * BLOCK_N
    hi = tl.minimum(lo + tiles_per_split * BLOCK_N, length)
    if HAS_WINDOW:  # keys > query - window for the first query (at length - count)
        lo = tl.maximum(lo, length - count - window + 1)

    m_rows = tl.arange(0, Q_ROWS * BLOCK_G)
    qi = m_rows // BLOCK_G
    g = m_rows % BLOCK_G
    d = tl.arange(0, BLOCK_D)
    row_ok = (g < G) & (qi < count)
    d_ok = d < D
    heads = kvh * G + g
    rows = first_row + qi  # the query's row in q and out
    qpos = length - count + qi  # the query's position: it sees keys at <= qpos
    q = tl.load(
        q_ptr + rows[:, None] * q_sb + heads[:, None] * q_sh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    k_base = kc_ptr + kvh.to(tl.int64) * c_sh
    v_base = vc_ptr + kvh.to(tl.int64) * c_sh

    m_i = tl.full([Q_ROWS * BLOCK_G], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([Q_ROWS * BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([Q_ROWS * BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        p_ok = pos < hi
        block = tl.load(bt_ptr + b * bt_sb + (pos // PAGE) * bt_sw, mask=p_ok, other=0)
        slot = block.to(tl.int64) * PAGE + pos % PAGE
        kv_ok = p_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + slot[:, None] * c_ss + d[None, :], mask=kv_ok, other=0)
        k = _dequantized(k, ks_ptr, kvh, s_sh, slot, p_ok, q.dtype, INT8, FP8)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        if HAS_SOFTCAP:
            s = _tanh(s / softcap) * softcap
        seen = p_ok[None, :]
        if Q_ROWS > 1:  # causal within the verified tokens
            seen = seen & (pos[None, :] <= qpos[:, None])
            if HAS_WINDOW:
                seen = seen & (pos[None, :] > qpos[:, None] - window)
        s = tl.where(seen, s * LOG2E, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + slot[:, None] * c_ss + d[None, :], mask=kv_ok, other=0)
        v = _dequantized(v, vs_ptr, kvh, s_sh, slot, p_ok, q.dtype, INT8, FP8)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if SPLIT:
        at = rows * p_sb + heads * p_sh + part * p_ss  # offsets into the parts
        tl.store(part_m_ptr + at, m_i, mask=row_ok)
        tl.store(part_l_ptr + at, l_i, mask=row_ok)
        o_ptrs = part_o_ptr + at[:, None] * BLOCK_D + d[None, :]
        tl.store(o_ptrs, acc, mask=row_ok[:, None] & d_ok[None, :])
    else:
        if HAS_SINKS:  # gpt-oss: one more logit per head in the denominator, with no value
            sink = tl.load(sinks_ptr + heads, mask=g < G, other=0.0).to(tl.float32) * LOG2E
            m_new = tl.maximum(m_i, sink)
            l_i = l_i * tl.exp2(m_i - m_new) + tl.exp2(sink - m_new)
            acc = acc * tl.exp2(m_i - m_new)[:, None]
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # an empty row stays zeros
        o_ptrs = out_ptr + rows[:, None] * o_sb + heads[:, None] * o_sh + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_parts_kernel(
    out_ptr,
    part_o_ptr,
    part_m_ptr,
    part_l_ptr,
    o_sb,
    o_sh,
    p_sb,
    p_sh,
    p_ss,
    num_parts,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    sinks_ptr,
    HAS_SINKS: tl.constexpr = False,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    m = tl.full([], NEG_BIG, dtype=tl.float32)
    total = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    base = b * p_sb + h * p_sh
    for i in range(num_parts):
        m_i = tl.load(part_m_ptr + base + i * p_ss)
        l_i = tl.load(part_l_ptr + base + i * p_ss)
        o_i = tl.load(part_o_ptr + (base + i * p_ss) * BLOCK_D + d, mask=d_ok, other=0.0)
        m_new = tl.maximum(m, m_i)
        a = tl.exp2(m - m_new)
        w = tl.exp2(m_i - m_new)
        total = total * a + l_i * w
        acc = acc * a + o_i * w
        m = m_new
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + h).to(tl.float32) * LOG2E
        m_new = tl.maximum(m, sink)
        total = total * tl.exp2(m - m_new) + tl.exp2(sink - m_new)
        acc = acc * tl.exp2(m - m_new)
    out = acc / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b * o_sb + h * o_sh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def store_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,  # [tokens, kv_heads, d]
    v: torch.Tensor,
    slots: torch.Tensor,  # [tokens] int, a negative slot is skipped
) -> None:
    t, kvh, d = k.shape
    if t == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    _store_kv_kernel[(t,)](
        k,
        v,
        k_cache,
        v_cache,
        slots,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        slots.stride(0),
        KVH=kvh,
        D=d,
        BLOCK_H=triton.next_power_of_2(kvh),
        BLOCK_D=triton.next_power_of_2(d),
    )


@functools.cache
def _parallel_programs(device: torch.device) -> int:
    """How many programs keep the GPU busy: two per multiprocessor. Elsewhere (the interpreter)
    one, so that contexts are only split when asked."""
    if device.type != "cuda":
        return 1
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def paged_decode(
    q: torch.Tensor,  # [rows, heads, d]
    k_cache: torch.Tensor,  # [kv_heads, slots, d]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int
    context_lens: torch.Tensor,  # [B] int
    block_size: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    num_parts: int | None = None,
    sinks: torch.Tensor | None = None,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    queries: Queries | None = None,
    fp8: bool = False,
) -> torch.Tensor:
    """Paged attention of each sequence's queries over its context; returns [rows, heads * d].

    Without `queries` a row is a sequence (B == rows) with one query, a decode, at position
    context_lens[b] - 1. With `queries` (speculative verification), sequence b has
    queries.counts[b] queries, rows queries.starts[b] ..., at the last positions of its
    context_lens[b] keys, each attending causally; K/V are read once for all of them. Rows no
    sequence claims come out zeros.

    `sinks` (gpt-oss): a logit per query head [heads] that joins each softmax's denominator.
    `num_parts` splits each context in that many parts (default: by the GPU's size, from the
    shapes alone, so a CUDA graph sees the same launch every replay). `scales`: an int8 cache's
    key and value scales [kv_heads, slots], or with `fp8` an e4m3 cache's (bits in uint8) two
    per-tensor scales (0-d), dequantized as read (kv_quant.py).
    """
    rows, h, d = q.shape
    b = block_tables.shape[0]
    kvh = k_cache.shape[0]
    g = h // kvh
    multi = queries is not None
    # Verification's padding rows (CUDA graphs) must be defined: zeros, as an empty row's.
    out = (torch.zeros if multi else torch.empty)(rows, h * d, dtype=q.dtype, device=q.device)
    if b == 0 or rows == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    block_d = triton.next_power_of_2(d)
    block_n = 32 if block_d >= 256 else 64
    tiles = max(1, math.ceil(block_tables.shape[1] * block_size / block_n))
    if num_parts is None:
        num_parts = _parallel_programs(q.device) // (b * kvh)
    num_parts = max(1, min(num_parts, tiles))
    tiles_per_part = math.ceil(tiles / num_parts)
    num_parts = math.ceil(tiles / tiles_per_part)
    split = num_parts > 1
    if split:  # zeros: a row without keys in a part (or any) combines to zeros
        part_o = torch.zeros(rows, h, num_parts, block_d, dtype=torch.float32, device=q.device)
        part_m = torch.zeros(rows, h, num_parts, dtype=torch.float32, device=q.device)
        part_l = torch.zeros_like(part_m)
    else:
        part_o = part_m = part_l = out  # unused
    k_scales, v_scales = scales if scales is not None else (out, out)  # unused without
    if scales is not None and not fp8:
        assert k_scales.stride() == v_scales.stride() and k_scales.stride(-1) == 1
    # The tile: the G query heads of a KV head, for each query; at least 16 rows (tensor cores).
    if multi:
        block_g = triton.next_power_of_2(g)
        q_rows = max(triton.next_power_of_2(queries.most), max(1, 16 // block_g))
        starts, counts = queries.starts, queries.counts
        assert starts.stride() == counts.stride()
    else:
        block_g, q_rows = max(16, triton.next_power_of_2(g)), 1
        starts = counts = context_lens  # unused
    _paged_decode_kernel[(b, kvh, num_parts)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        starts,
        counts,
        out,
        part_o,
        part_m,
        part_l,
        sinks if sinks is not None else q,
        k_scales,
        v_scales,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_scales.stride(0) if k_scales.dim() else 0,
        block_tables.stride(0),
        block_tables.stride(1),
        context_lens.stride(0),
        starts.stride(0),
        out.stride(0),
        d,
        h * num_parts,
        num_parts,
        1,
        float(scale),
        float(softcap or 1.0),
        int(window or 0),
        tiles_per_part,
        G=g,
        D=d,
        PAGE=block_size,
        BLOCK_G=block_g,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        HAS_WINDOW=window is not None,
        HAS_SOFTCAP=softcap is not None,
        SPLIT=split,
        IEEE=q.dtype == torch.float32,
        HAS_SINKS=sinks is not None,
        INT8=scales is not None and not fp8,
        FP8=fp8,
        Q_ROWS=q_rows,
        # A verify tile of many rows (K + 1 queries x the group) keeps its float32
        # accumulator in more warps' registers; a decode tile (16-64 rows) keeps the default.
        num_warps=4 if q_rows * block_g <= 64 else 8,
    )
    if split:
        _combine_parts_kernel[(rows, h)](
            out,
            part_o,
            part_m,
            part_l,
            out.stride(0),
            d,
            h * num_parts,
            num_parts,
            1,
            num_parts,
            D=d,
            BLOCK_D=block_d,
            sinks_ptr=sinks if sinks is not None else out,
            HAS_SINKS=sinks is not None,
        )
    return out


class TritonAttention(TorchAttention):
    """The GPU path: Triton kernels for the KV store and decode (several queries per sequence
    when verifying proposals); torch (SDPA) for prefill."""

    multi_query = True  # the runner builds `StepMeta.queries` for verify steps

    def store(self, cache: tuple[torch.Tensor, torch.Tensor], k, v, slots) -> None:
        store_kv(cache[0], cache[1], k, v, slots)

    def decode(self, meta: StepMeta, q, cache, window, softcap) -> torch.Tensor:
        return paged_decode(
            q,
            cache[0],
            cache[1],
            meta.block_tables,
            meta.context_lens,
            meta.block_size,
            self.scale,
            window,
            softcap,
            sinks=self.sinks,
            queries=meta.queries,
        )


class TritonInt8Attention(QuantizedAttention):
    """A quantized KV cache on the GPU: the store quantizes in torch ops (kv_quant.py), the
    decode is the paged Triton kernel dequantizing as it reads (int8 here, fp8 below)."""

    reads_tables = True  # the runner builds block tables for it, not gathers
    multi_query = True

    def decode(self, meta: StepMeta, q, cache, window, softcap) -> torch.Tensor:
        return paged_decode(
            q,
            cache[0],
            cache[1],
            meta.block_tables,
            meta.context_lens,
            meta.block_size,
            self.scale,
            window,
            softcap,
            sinks=self.sinks,
            scales=(cache[2], cache[3]),
            queries=meta.queries,
            fp8=self.kind == "fp8",
        )


class TritonFp8Attention(TritonInt8Attention):
    """An fp8 (e4m3) KV cache with per-tensor scales, decoded by the Triton kernel."""

    kind = "fp8"
