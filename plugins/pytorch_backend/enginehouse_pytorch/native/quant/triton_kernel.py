"""The GPU kernel of quantized projections, in Triton: w4a16 / w8a16 (and FP8 weights) GEMM.

One program computes a BLOCK_M x BLOCK_N tile of y = x W^T (+ b) from the "columns" layout
of `qweight.py`: codes [K, N] (4-bit: [K/2, N], inputs 2i and 2i + 1 in the low and high nibble of
row i), scales and minimums [groups, N]. Per BLOCK_K inputs it loads the codes, decodes them
(4-bit: two nibbles, joined back into input order; FP8 e4m3: the bits moved into a half float,
the 2^8 exponent bias folded into the scales at packing), applies the tile's one group scale
(BLOCK_K divides the group) and multiplies with `tl.dot` in the activations' dtype, accumulating
in float32. Activations in float32 multiply in IEEE float32 (no TF32).

Checked under Triton's interpreter on the CPU (tests/test_quant_triton.py) and, on a GPU, by
benchmarks/gpu_check.py; not yet run on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .qweight import KINDS, Packed

BLOCK_K = 32  # divides every supported group (32, 64, 128, or the whole input when K % 32 == 0)


@triton.jit
def _decode(codes, KIND: tl.constexpr):
    """uint8 codes -> float32 values (before scale and minimum)."""
    if KIND == 2:  # e4m3 bits into a half float's: sign to bit 15, the rest shifted by 7
        c = codes.to(tl.int16)
        bits = ((c & 0x80) << 8) | ((c & 0x7F) << 7)
        return bits.to(tl.float16, bitcast=True).to(tl.float32)
    return codes.to(tl.float32)


@triton.jit
def _qlinear_kernel(
    x_ptr,
    c_ptr,
    s_ptr,
    m_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_ym,
    center,
    KIND: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_MINS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None], other=0.0)
        if KIND == 1:  # 4-bit: BLOCK_K / 2 rows of bytes, two inputs each
            rows = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            b = tl.load(c_ptr + rows[:, None] * N + rn[None, :], mask=n_ok[None, :], other=0)
            lo = (b & 15).to(tl.float32)
            hi = (b >> 4).to(tl.float32)
            # [K/2, N] pairs -> [K/2, 2, N] -> [K, N]: inputs back in order 2i, 2i + 1.
            w = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (BLOCK_K, BLOCK_N))
        else:
            b = tl.load(c_ptr + rk[:, None] * N + rn[None, :], mask=n_ok[None, :], other=0)
            w = _decode(b, KIND)
        g = k0 // GROUP
        scale = tl.load(s_ptr + g * N + rn, mask=n_ok, other=0.0)
        if HAS_MINS:
            low = tl.load(m_ptr + g * N + rn, mask=n_ok, other=0.0)
        else:
            low = -center * scale
        w = w * scale[None, :] + low[None, :]
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def supports(k: int, group: int) -> bool:
    """Whether the kernel takes this input size and group (else the torch path runs)."""
    return k % BLOCK_K == 0 and group % BLOCK_K == 0


def qlinear(x: torch.Tensor, cols: Packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ bias) for x [M, K] (float32, float16 or bfloat16) on the kernel's device."""
    x = x.contiguous()
    m = x.shape[0]
    y = torch.empty(m, cols.n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    block_m = 16 if m <= 16 else 64
    block_n = 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(cols.n, block_n))
    _qlinear_kernel[grid](
        x,
        cols.codes,
        cols.scales,
        cols.mins if cols.mins is not None else cols.scales,
        bias if bias is not None else cols.scales,
        y,
        m,
        cols.n,
        cols.k,
        x.stride(0),
        y.stride(0),
        cols.center,
        KIND=KINDS[cols.kind],
        GROUP=cols.group,
        HAS_MINS=cols.mins is not None,
        HAS_BIAS=bias is not None,
        IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=BLOCK_K,
    )
    return y
