"""The C++ paged decode kernel of the CPU path against the torch-ops path it replaces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from enginehouse.runner import kv_slot
from enginehouse_pytorch.native import cpu_build, cpu_kernels
from enginehouse_pytorch.native.attention import StepMeta, TorchAttention, decode_metadata

pytestmark = pytest.mark.skipif(not cpu_kernels.load(), reason="no C++ toolchain to build it")


@pytest.mark.parametrize(
    "heads,kv_heads,dim,window,softcap",
    [(4, 4, 16, None, None), (8, 2, 64, None, None), (6, 3, 24, 5, None), (4, 2, 16, 7, 3.0)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_torch_path(heads, kv_heads, dim, window, softcap, dtype):
    """bfloat16: the kernel reads the bfloat16 cache and computes in float32, so it is compared
    with the float32 torch path on the same (rounded) values."""
    torch.manual_seed(0)
    block_size, num_blocks = 4, 40
    slots = num_blocks * block_size + 1  # the last one is the null slot the torch path pads with
    cache = torch.full((2, kv_heads, slots, dim), float("nan"))  # never-written slots are NaN
    cache[:, :, -1] = 0.0
    lens = [1, 9, 17, 4]
    perm = torch.randperm(num_blocks).tolist()  # block ids shuffled across the cache
    tables, at = [], 0
    for n in lens:
        need = -(-n // block_size)
        tables.append(tuple(perm[at : at + need]))
        at += need
        for p in range(n):
            slot = kv_slot(tables[-1], p, block_size)
            cache[:, :, slot] = torch.randn(2, kv_heads, dim)
    q = torch.randn(len(lens), heads, dim).to(dtype)
    cache = cache.to(dtype)
    kv = (cache[0], cache[1])
    common = (tables, lens, block_size, {window}, torch.device("cpu"), slots - 1)
    ref_meta = StepMeta(len(lens), torch.empty(0), torch.empty(0), torch.empty(0))
    decode_metadata(ref_meta, *common, kv_heads=kv_heads, num_slots=slots)
    meta = StepMeta(len(lens), torch.empty(0), torch.empty(0), torch.empty(0))
    decode_metadata(meta, *common, paged=True)
    scale = dim**-0.5
    ref = TorchAttention(heads, kv_heads, dim, scale)
    want = ref.decode(ref_meta, q.float(), (kv[0].float(), kv[1].float()), window, softcap)
    got = cpu_kernels.CpuPagedAttention(heads, kv_heads, dim, scale).decode(
        meta, q, kv, window, softcap
    )
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def quantized_cache(kind, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A layer's cache as the runner holds it: (keys, values) [kv_heads, slots, d] in
    `kind`'s storage (a torch dtype, "int8" or "fp8"), and their scales where quantized."""
    from enginehouse_pytorch.native.kv_quant import quantize_fp8, quantize_int8

    if kind == "int8":
        (kq, ks), (vq, vs) = quantize_int8(k.transpose(0, 1)), quantize_int8(v.transpose(0, 1))
        return tuple(x.transpose(0, 1).contiguous() for x in (kq, vq, ks, vs))
    if kind == "fp8":
        scales = torch.zeros(2, 2)  # the runner's [layers, 2] per-tensor scales, one layer
        kq = quantize_fp8(k.transpose(0, 1), scales[0, 0]).transpose(0, 1).contiguous()
        vq = quantize_fp8(v.transpose(0, 1), scales[0, 1]).transpose(0, 1).contiguous()
        return kq, vq, scales[0, 0], scales[0, 1]
    return k.to(kind).contiguous(), v.to(kind).contiguous()


# (heads, kv_heads, dim, window, softcap, sinks): MHA, GQA, a sliding window that verify rows
# cross, soft-capping, gpt-oss's sinks.
VERIFY_SHAPES = [
    (4, 4, 16, None, None, False),
    (8, 2, 64, None, None, False),
    (6, 3, 24, 5, None, False),
    (4, 2, 16, 7, 3.0, True),
]


@pytest.mark.parametrize("heads,kv_heads,dim,window,softcap,sinks", VERIFY_SHAPES)
@pytest.mark.parametrize("kind", [torch.float32, torch.bfloat16, "int8", "fp8"])
def test_verify_rows_read_together_equal_the_torch_path(
    heads, kv_heads, dim, window, softcap, sinks, kind
):
    """Speculative verify rows: a sequence's rows at consecutive positions, each seeing the
    context up to itself, read the sequence's K/V once (`query_starts`). Every row must equal
    the torch path's decode of that row alone, over every cache kind."""
    from enginehouse_pytorch.native.kv_quant import attention_for

    torch.manual_seed(1)
    block_size, num_blocks = 4, 48
    slots = num_blocks * block_size + 1  # the last one is the null slot the torch path pads with
    k, v = torch.randn(2, kv_heads, slots, dim)
    k[:, -1], v[:, -1] = 0.0, 0.0
    # Sequences: a plain decode, four verify rows (K = 3), a verify crossing a block boundary,
    # a one-token context, two rows from position 0.
    rows_per_seq = [(9, 1), (14, 4), (6, 3), (1, 1), (1, 2)]  # (first row's length, rows)
    perm = torch.randperm(num_blocks).tolist()
    tables, lens, starts, at = [], [], [0], 0
    for first, q_len in rows_per_seq:
        need = -(-(first + q_len - 1) // block_size)
        table = tuple(perm[at : at + need])
        at += need
        for r in range(q_len):
            tables.append(table)
            lens.append(first + r)
        starts.append(starts[-1] + q_len)
    cache = quantized_cache(kind, k, v)
    q = torch.randn(len(lens), heads, dim)
    scale = dim**-0.5
    if isinstance(kind, str):
        ref = attention_for(kind)(heads, kv_heads, dim, scale)
        mine = cpu_kernels.quantized_attention(kind)(heads, kv_heads, dim, scale)
        ref_cache = cache
    else:
        ref = TorchAttention(heads, kv_heads, dim, scale)
        mine = cpu_kernels.CpuPagedAttention(heads, kv_heads, dim, scale)
        ref_cache = (cache[0].float(), cache[1].float())
        q = q.to(kind)
    if sinks:
        ref.sinks = mine.sinks = torch.randn(heads)
    common = (tables, lens, block_size, {window}, torch.device("cpu"), slots - 1)
    ref_meta = StepMeta(len(lens), torch.empty(0), torch.empty(0), torch.empty(0))
    decode_metadata(ref_meta, *common, kv_heads=kv_heads, num_slots=slots)
    want = ref.decode(ref_meta, q.float(), ref_cache, window, softcap)
    meta = StepMeta(len(lens), torch.empty(0), torch.empty(0), torch.empty(0))
    decode_metadata(meta, *common, paged=True)
    alone = mine.decode(meta, q, cache, window, softcap)  # every row its own sequence
    meta.query_starts = torch.tensor(starts)
    together = mine.decode(meta, q, cache, window, softcap)
    assert together.dtype == q.dtype
    torch.testing.assert_close(together, alone, rtol=0, atol=0)  # the same arithmetic
    tol = 1e-2 if kind == torch.bfloat16 else 1e-5
    torch.testing.assert_close(together.float(), want.float(), rtol=tol, atol=tol)


def test_query_starts_are_checked():
    q = torch.randn(3, 2, 16)
    cache = torch.zeros(2, 9, 16)
    tables, lens = torch.zeros(3, 2, dtype=torch.int32), torch.tensor([1, 2, 3])
    op = torch.ops.enginehouse_cpu.paged_decode
    with pytest.raises(RuntimeError, match="query_starts"):
        op(q, cache, cache, tables, lens, 4, 0.25, 0.0, 0, None, torch.tensor([0, 2]))
    with pytest.raises(RuntimeError, match="a block table row and a context length per"):
        op(q, cache, cache, tables[:2], lens, 4, 0.25, 0.0, 0, None, None)


def test_fp8_widening_is_exact():
    """The kernel's e4m3 -> float32 bit arithmetic gives torch's conversion for every finite
    bit pattern (normals, subnormals, zeros of both signs): a one-slot cache read by a
    one-hot query returns each value times its scale."""
    bits = torch.arange(256, dtype=torch.uint8)
    finite = ~torch.isnan(bits.view(torch.float8_e4m3fn).float())
    bits = bits[finite]
    d = bits.numel()  # 254 values: the vector body and the scalar tail both run
    values = bits.view(torch.float8_e4m3fn).float()
    k = torch.zeros(1, 2, d, dtype=torch.uint8)
    v = k.clone()
    v[0, 0] = bits
    out = torch.ops.enginehouse_cpu.paged_decode_fp8(
        torch.zeros(1, 1, d),
        k,
        v,
        torch.tensor(1.0),
        torch.tensor(0.5),
        torch.zeros(1, 1, dtype=torch.int32),
        torch.tensor([1]),
        4,
        1.0,
        0.0,
        0,
    )
    torch.testing.assert_close(out[0], values * 0.5, rtol=0, atol=0)


AVX2_CHECK = """
import sys
import torch
from enginehouse_pytorch.native import cpu_kernels
assert cpu_kernels.load(("-mno-avx512f",))
cpu_kernels.load = lambda *a: True  # the AVX2 build is the one registered
sys.path.insert(0, sys.argv[1])
import test_cpu_kernels as t
t.test_fp8_widening_is_exact()
for shape in t.VERIFY_SHAPES:
    for kind in (torch.float32, torch.bfloat16, "int8", "fp8"):
        t.test_verify_rows_read_together_equal_the_torch_path(*shape, kind)
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif("avx512f" not in cpu_build.cpu_flags(), reason="the native build is AVX2")
def test_avx2_build_reads_verify_rows_and_fp8_as_the_torch_path():
    """CI's CPUs may have AVX2 only: the kernel's AVX2 variant (8-wide loads, its own e4m3
    widening) built and checked here too, in a fresh process (both register the same ops)."""
    here = str(Path(__file__).parent)
    done = subprocess.run([sys.executable, "-c", AVX2_CHECK, here], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
