"""The GPU's batched LoRA products in Triton: one launch per product for every adapter of a
step (punica's "segmented" idea, our code), in place of two torch products per adapter.

`segment_matmul(x, w, out, groups, add)` computes, for each run of rows (slot, begin, end) of
`LoraRows`, out[begin:end] (+)= x[begin:end] @ w[slot].T. A LoRA projection is two of them:
the shrink (w = the slots' A, [slots, R, in], into a [rows, R] scratch) and the expand (w = B,
[slots, out, R], added into the base product). The grid is (runs, output blocks); each program
walks its run's rows in blocks. Tested under Triton's interpreter on the CPU
(tests/test_lora.py); the CUDA path runs the same kernel compiled.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _segment_matmul(
    x_ptr,
    w_ptr,
    out_ptr,
    slots_ptr,
    starts_ptr,
    ends_ptr,
    K,
    N,
    stride_x,
    stride_slot,
    stride_n,
    stride_out,
    ADD: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    group = tl.program_id(0)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    slot = tl.load(slots_ptr + group)
    start = tl.load(starts_ptr + group)
    end = tl.load(ends_ptr + group)
    w_base = w_ptr + slot * stride_slot
    for m0 in range(start, end, BM):
        offs_m = m0 + tl.arange(0, BM)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            offs_k = k0 + tl.arange(0, BK)
            x_mask = (offs_m[:, None] < end) & (offs_k[None, :] < K)
            xs = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], x_mask, other=0.0)
            w_mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
            ws = tl.load(
                w_base + offs_n[None, :] * stride_n + offs_k[:, None], w_mask, other=0.0
            )  # [BK, BN]: w[slot].T's block
            acc += tl.dot(xs.to(tl.float32), ws.to(tl.float32))
        ptrs = out_ptr + offs_m[:, None] * stride_out + offs_n[None, :]
        mask = (offs_m[:, None] < end) & (offs_n[None, :] < N)
        if ADD:
            acc += tl.load(ptrs, mask, other=0.0).to(tl.float32)
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask)


def segment_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    groups: list[tuple[int, int, int]],
    add: bool,
) -> None:
    """out[b:e] (+)= x[b:e] @ w[slot].T for each (slot, b, e) in `groups`; rows outside every
    run are left as they are. `x`, `out` and each `w[slot]` must be row-major."""
    if not groups:
        return
    n, k = w.shape[1], w.shape[2]
    slots, starts, ends = (
        torch.tensor(col, dtype=torch.int32, device=x.device) for col in zip(*groups)
    )
    bn = 64 if n >= 64 else max(16, triton.next_power_of_2(n))
    grid = (len(groups), triton.cdiv(n, bn))
    _segment_matmul[grid](
        x, w, out, slots, starts, ends, k, n,
        x.stride(0), w.stride(0), w.stride(1), out.stride(0),
        ADD=add, BM=16, BN=bn, BK=32,
    )  # fmt: skip


def lora_add(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    groups: list[tuple[int, int, int]],
) -> None:
    """y[rows of each run] += (x @ A[slot].T) @ B[slot].T: the shrink into a scratch, then the
    expand added into `y`, each one launch for all the step's adapters."""
    x = x.contiguous()
    shrunk = torch.empty(x.shape[0], a.shape[1], dtype=torch.float32, device=x.device)
    segment_matmul(x, a, shrunk, groups, add=False)
    segment_matmul(shrunk, b, y, groups, add=True)
