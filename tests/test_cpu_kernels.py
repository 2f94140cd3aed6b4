"""The C++ paged decode kernel of the CPU path against the torch-ops path it replaces."""

from __future__ import annotations

import pytest
import torch

from enginehouse.runner import kv_slot
from enginehouse_pytorch.native import cpu_kernels
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
