"""The quantized-matmul kernels against a float32 reference on one case: shared by the tests
(tests/test_quantization.py on the CPU kernel, tests/test_quant_triton.py on the Triton kernel
under the interpreter) and the GPU check (benchmarks/gpu_check.py)."""

from __future__ import annotations

import torch

from .qweight import KINDS, QuantWeight, pack

# max |error| / max(1, max |reference|). float32: exact weights, float32 sums (order differs);
# the half types round the activations and the decoded weights to 11 / 8 significant bits.
TOLERANCE = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}


def random_weight(
    kind: str, n: int, k: int, group: int, asym: bool = False, perm: bool = False, seed: int = 0
) -> QuantWeight:
    """Random codes, scales (and zeros, and an act-order permutation) of one kind."""
    gen = torch.Generator().manual_seed(seed)
    groups = k // group
    scales = torch.rand(n, groups, generator=gen) * 0.02 + 0.005
    if kind == "f8":
        values = torch.randn(n, k, generator=gen) * 3
        codes = values.to(torch.float8_e4m3fn).view(torch.uint8)
        return QuantWeight("f8", codes, scales, None, 0.0, group)
    top = 256 if kind == "u8" else 16
    codes = torch.randint(0, top, (n, k), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, top, (n, groups), generator=gen).float() if asym else None
    order = torch.randperm(k, generator=gen) if perm else None
    return QuantWeight(kind, codes, scales, zeros, top / 2, group, order)


def reference(x: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T (+ bias) in float32, x in the checkpoint's input order."""
    y = x.float() @ qw.dequantize().t()
    return y if bias is None else y + bias.float()


def case_inputs(qw: QuantWeight, m: int, bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, qw.shape[1], generator=gen)
    b = torch.randn(qw.shape[0], generator=gen) if bias else None
    return x, b


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.float() - want).abs().max().item() / max(1.0, want.abs().max().item())


def cpu_case(qw: QuantWeight, m: int, bias: bool = False, namespace: str = "enginehouse_quant"):
    """The C++ kernel (built under `namespace`) on one case: its relative error."""
    x, b = case_inputs(qw, m, bias)
    p = pack(qw, "panels")
    xk = x if p.perm is None else x[:, p.perm]
    op = getattr(torch.ops, namespace).qlinear
    got = op(xk, p.codes, p.scales, p.mins, b, KINDS[p.kind], p.n, p.group, p.center)
    return relative_error(got, reference(x, qw, b))


def triton_case(
    kind: str,
    n: int,
    k: int,
    m: int,
    group: int,
    asym: bool = False,
    perm: bool = False,
    bias: bool = False,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
) -> dict:
    """The Triton kernel on one case, against the float32 reference."""
    from .triton_kernel import qlinear

    qw = random_weight(kind, n, k, group, asym, perm, seed=n + k + m)
    x, b = case_inputs(qw, m, bias)
    dt = getattr(torch, dtype)
    x = x.to(dt)  # the reference takes the same rounded activations
    want = reference(x, qw, b)
    p = pack(qw, "columns").to(torch.device(device))
    xk = x if p.perm is None else x[:, qw.perm]
    got = qlinear(xk.to(device), p, None if b is None else b.to(device, dt))
    return {
        "err": relative_error(got.cpu(), want),
        "tolerance": TOLERANCE[dtype],
        "dtype_ok": got.dtype == dt,
        "shape_ok": tuple(got.shape) == (m, n),
    }
