"""The paged decode kernel against the torch path, on one case: shared by the interpreter tests
(tests/test_triton_kernels.py, on the CPU) and the GPU check (benchmarks/gpu_check.py)."""

from __future__ import annotations

import math

import torch

from enginehouse.plugin_api import kv_slot

from .attention import StepMeta, TorchAttention, decode_metadata

# max |error| / max(1, max |reference|): float32 exact up to summation order, the half types
# round probabilities and the output to 11 / 8 significant bits
TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}


def paged_case(gen: torch.Generator, kvh: int, d: int, bs: int, lens: list[int], spare: int = 3):
    """Contexts in shuffled blocks of a float32 CPU cache whose other slots hold NaN, but the
    null slot (zeros, as the runner keeps it). Returns tables, the null slot, K and V."""
    need = [math.ceil(n / bs) for n in lens]
    perm = torch.randperm(sum(need) + spare, generator=gen).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(tuple(perm[at : at + n]))
        at += n
    null = len(perm) * bs
    k_cache = torch.full((kvh, null + 1, d), float("nan"))
    v_cache = torch.full((kvh, null + 1, d), float("nan"))
    k_cache[:, null] = 0
    v_cache[:, null] = 0
    for table, n in zip(tables, lens):
        slots = torch.tensor([kv_slot(table, p, bs) for p in range(n)], dtype=torch.long)
        k_cache[:, slots] = torch.randn(kvh, n, d, generator=gen)
        v_cache[:, slots] = torch.randn(kvh, n, d, generator=gen)
    return tables, null, k_cache, v_cache


def reference_meta(tables, lens, block_size, window, device, null_slot, k_cache) -> StepMeta:
    """The torch path's decode metadata (gathered slots, masks) for `TorchAttention.decode`."""
    meta = StepMeta(num_decode=len(lens), slots=None, cos=None, sin=None)
    layout = {"kv_heads": k_cache.shape[0], "num_slots": k_cache.shape[1]}
    decode_metadata(meta, tables, lens, block_size, {window}, device, null_slot, **layout)
    return meta


def _quantized(kind: str, kc: torch.Tensor, vc: torch.Tensor, reference: TorchAttention):
    """The cache as `kind` stores it (kv_quant.py) and the torch attention that reads it. Slots
    nobody wrote hold 0 here, not NaN: a NaN has no int8 value, and it would set fp8's scale."""
    from .kv_quant import Fp8Attention, QuantizedAttention, quantize_fp8, quantize_int8

    attention = (QuantizedAttention if kind == "int8" else Fp8Attention)(
        reference.h, reference.kvh, reference.d, reference.scale
    )
    attention.sinks = reference.sinks
    k, v = (x.nan_to_num(0.0).transpose(0, 1) for x in (kc, vc))  # [slots, kv_heads, d]
    if kind == "int8":
        (kq, ks), (vq, vs) = quantize_int8(k), quantize_int8(v)
        cache = [x.transpose(0, 1).contiguous() for x in (kq, vq, ks, vs)]
    else:
        scales = [torch.zeros((), device=kc.device) for _ in range(2)]
        bits = [quantize_fp8(x, s) for x, s in zip((k, v), scales)]
        cache = [x.transpose(0, 1).contiguous() for x in bits] + scales
    return tuple(cache), attention


def decode_case(
    seed: int,
    kvh: int,
    g: int,
    d: int,
    bs: int,
    lens: list[int],
    window: int | None = None,
    softcap: float | None = None,
    dtype: str = "float32",
    parts: int | None = None,
    device: str | torch.device = "cpu",
    sinks: bool = False,
    counts: list[int] | None = None,
    kv: str = "auto",
) -> dict:
    """`paged_decode` against `TorchAttention.decode` (float32) on one case: the relative error
    of the rows with a context, whether empty rows are zero, whether all is finite, and the
    output dtype. Rows of length 0 have no torch reference: they must come out zero. With
    `sinks`, a random sink logit per head (gpt-oss) on both sides.

    `counts` (speculative verification): sequence i has counts[i] queries at its last
    positions, all given to the kernel at once (`Queries`); the reference attends each as a
    decode row over its own prefix. One more row that no sequence claims must come out zero.
    `kv` "int8" / "fp8": the cache quantized (kv_quant.py), against the torch path reading it.
    """
    from .attention import Queries
    from .triton_ops import paged_decode

    gen = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    h = kvh * g
    tables, null, kc, vc = paged_case(gen, kvh, d, bs, lens)
    multi = counts is not None
    per_seq = counts if multi else [1] * len(lens)
    row_tables, row_lens, row_seq = [], [], []
    for i, (t, n, c) in enumerate(zip(tables, lens, per_seq)):
        for j in range(c):
            row_tables.append(t)
            row_lens.append(n - c + 1 + j)
            row_seq.append(i)
    rows = len(row_lens) + (1 if multi else 0)
    q = (torch.randn(rows, h, d, generator=gen) * 2).to(device, dt)
    scale = d**-0.5
    sink = (torch.randn(h, generator=gen) * 2).to(device) if sinks else None
    torch_attention = TorchAttention(h, kvh, d, scale)
    torch_attention.sinks = sink
    cache: tuple = (kc, vc)
    if kv != "auto":
        cache, torch_attention = _quantized(kv, kc, vc, torch_attention)
    live = [r for r, n in enumerate(row_lens) if n > 0]
    reference = torch.zeros(0, h * d, device=device)
    if live:
        sub, sub_lens = [row_tables[r] for r in live], [row_lens[r] for r in live]
        meta = reference_meta(sub, sub_lens, bs, window, device, null, kc)
        floats = tuple(x.float() if x.is_floating_point() else x for x in cache)
        floats = tuple(x.to(device) for x in floats)
        reference = torch_attention.decode(meta, q[live].float(), floats, window, softcap)
    width = max(max(len(t) for t in tables), 1)
    bt = torch.tensor([list(t) + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    cl = torch.tensor(lens, dtype=torch.int32)
    queries = None
    if multi:
        starts = [sum(counts[:i]) for i in range(len(counts))]
        packed = torch.tensor([starts, counts], dtype=torch.int32).to(device)
        queries = Queries(packed[0], packed[1], max(max(counts), 1))
    kernel_cache = [
        x.to(device, dt) if x.is_floating_point() and x.dim() == 3 else x.to(device) for x in cache
    ]
    scales = None if kv == "auto" else (kernel_cache[2], kernel_cache[3])
    out = paged_decode(
        q,
        kernel_cache[0],
        kernel_cache[1],
        bt.to(device),
        cl.to(device),
        bs,
        scale,
        window,
        softcap,
        parts,
        sink,
        scales=scales,
        queries=queries,
        fp8=kv == "fp8",
    )
    err = (out[live].float() - reference).abs().max().item() if live else 0.0
    err /= max(1.0, reference.abs().max().item()) if live else 1.0
    empty = [r for r in range(rows) if r not in set(live)]
    return {
        "err": err,
        "tolerance": TOLERANCE[dtype],
        "zeros": bool((out[empty] == 0).all()) if empty else True,
        "finite": bool(out.float().isfinite().all()),
        "dtype_ok": out.dtype == dt,
    }


def describe(result: dict) -> str:
    return (
        f"max rel err {result['err']:.2e} (tol {result['tolerance']}), "
        f"empty rows zero {result['zeros']}, finite {result['finite']}"
    )
