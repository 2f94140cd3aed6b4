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
) -> dict:
    """`paged_decode` against `TorchAttention.decode` (float32) on one case: the relative error
    of the rows with a context, whether empty rows are zero, whether all is finite, and the
    output dtype. Rows of length 0 have no torch reference: they must come out zero. With
    `sinks`, a random sink logit per head (gpt-oss) on both sides."""
    from .triton_ops import paged_decode

    gen = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    h = kvh * g
    tables, null, kc, vc = paged_case(gen, kvh, d, bs, lens)
    kc, vc = kc.to(device, dt), vc.to(device, dt)
    q = (torch.randn(len(lens), h, d, generator=gen) * 2).to(device, dt)
    scale = d**-0.5
    sink = (torch.randn(h, generator=gen) * 2).to(device) if sinks else None
    live = [i for i, n in enumerate(lens) if n > 0]
    reference = torch.zeros(0, h * d, device=device)
    if live:
        sub, sub_lens = [tables[i] for i in live], [lens[i] for i in live]
        meta = reference_meta(sub, sub_lens, bs, window, device, null, kc)
        torch_attention = TorchAttention(h, kvh, d, scale)
        torch_attention.sinks = sink
        reference = torch_attention.decode(
            meta, q[live].float(), (kc.float(), vc.float()), window, softcap
        )
    width = max(max(len(t) for t in tables), 1)
    bt = torch.tensor([list(t) + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    cl = torch.tensor(lens, dtype=torch.int32)
    out = paged_decode(
        q, kc, vc, bt.to(device), cl.to(device), bs, scale, window, softcap, parts, sink
    )
    err = (out[live].float() - reference).abs().max().item() if live else 0.0
    err /= max(1.0, reference.abs().max().item()) if live else 1.0
    empty = [i for i, n in enumerate(lens) if n == 0]
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
