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
def test_kernel_equals_torch_path(heads, kv_heads, dim, window, softcap):
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
    q = torch.randn(len(lens), heads, dim)
    kv = (cache[0], cache[1])
    common = (tables, lens, block_size, {window}, torch.device("cpu"), slots - 1)
    ref_meta = StepMeta(len(lens), torch.empty(0), torch.empty(0), torch.empty(0))
    decode_metadata(ref_meta, *common, kv_heads=kv_heads, num_slots=slots)
    meta = StepMeta(len(lens), torch.empty(0), torch.empty(0), torch.empty(0))
    decode_metadata(meta, *common, paged=True)
    scale = dim**-0.5
    want = TorchAttention(heads, kv_heads, dim, scale).decode(ref_meta, q, kv, window, softcap)
    got = cpu_kernels.CpuPagedAttention(heads, kv_heads, dim, scale).decode(
        meta, q, kv, window, softcap
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
