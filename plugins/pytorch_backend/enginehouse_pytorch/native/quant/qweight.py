"""One projection's quantized weight in a single, format-neutral form, and what is made of it.

Every checkpoint format (`formats.py`) and the quantization at load (`quantize`) produce a
`QuantWeight`: one code per weight (uint8, unpacked), a float32 scale per (output channel,
input group) and, for asymmetric formats, a zero point per group:

    w[n, k] = (codes[n, k] - zeros[n, k // group]) * scales[n, k // group]

(FP8: w = e4m3(codes) * scale). `perm` is GPTQ's act-order: group k // group holds input
column perm[k], so a layer multiplies x[:, perm]. From this one form come the kernels' layouts
(`pack`): "panels" for the CPU kernel, "columns" for the Triton kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

# Code kinds and their number in the kernels.
KINDS = {"u8": 0, "u4": 1, "f8": 2}
PANEL = 16  # output channels per CPU panel
F8_HALF_SHIFT = 256.0  # e4m3 read as a half float's bits is 2^-8 of its value


@dataclass
class QuantWeight:
    kind: str  # "u8" (8-bit integer codes), "u4" (4-bit), "f8" (float8 e4m3 bytes)
    codes: torch.Tensor  # uint8 [N, K]
    scales: torch.Tensor  # float32 [N, groups]
    zeros: torch.Tensor | None  # float32 [N, groups]; None: every zero is `center`
    center: float
    group: int
    perm: torch.Tensor | None = None  # int64 [K]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K], in the checkpoint's input order."""
        if self.kind == "f8":
            values = self.codes.view(torch.float8_e4m3fn).float()
            zeros = None
        else:
            values = self.codes.float()
            zeros = self.zeros
            if zeros is None:
                zeros = torch.full_like(self.scales, self.center)
        n, k = self.shape
        values = values.view(n, k // self.group, self.group)
        if zeros is not None:
            values = values - zeros[:, :, None]
        w = (values * self.scales[:, :, None]).view(n, k)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w


def concat(parts: list[QuantWeight]) -> QuantWeight:
    """Shards of a fused projection (q, k, v) stacked along the output channels. They must
    agree on kind, group and input order (`same_layout`)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    zeros = None
    if any(p.zeros is not None or p.center != first.center for p in parts):
        zeros = torch.cat(
            [p.zeros if p.zeros is not None else torch.full_like(p.scales, p.center) for p in parts]
        )
    return replace(
        first,
        codes=torch.cat([p.codes for p in parts]),
        scales=torch.cat([p.scales for p in parts]),
        zeros=zeros,
    )


def same_layout(parts: list[QuantWeight]) -> bool:
    a = parts[0]
    for b in parts[1:]:
        if (b.kind, b.group, b.shape[1]) != (a.kind, a.group, a.shape[1]):
            return False
        if (a.perm is None) != (b.perm is None) or (
            a.perm is not None and not torch.equal(a.perm, b.perm)
        ):
            return False
    return True


# --- quantization at load ---------------------------------------------------------------------


def quantize_int8(w: torch.Tensor) -> QuantWeight:
    """Symmetric int8 per output channel: scale = max |w| / 127, codes q + 128."""
    w = w.float()
    scales = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scales).clamp_(-127, 127)
    return QuantWeight("u8", (q + 128).to(torch.uint8), scales, None, 128.0, w.shape[1])


def quantize_int4(w: torch.Tensor, group: int) -> QuantWeight:
    """Symmetric int4 per group of `group` inputs, as llama.cpp's Q4_0: the value of largest
    magnitude maps to -8 exactly, the rest round to [-8, 7]; codes q + 8."""
    n, k = w.shape
    g = w.float().view(n, k // group, group)
    idx = g.abs().argmax(dim=2, keepdim=True)
    extreme = g.gather(2, idx)
    scales = extreme / -8.0
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    q = torch.round(g / scales).clamp_(-8, 7)
    codes = (q + 8).to(torch.uint8).view(n, k)
    return QuantWeight("u4", codes, scales.view(n, k // group), None, 8.0, group)


# --- the kernels' layouts ---------------------------------------------------------------------


@dataclass
class Packed:
    """A `QuantWeight` laid out for a kernel. `layout` "panels" (the CPU kernel): codes
    [P, K, 16] for P = ceil(N / 16) panels of 16 outputs (u4: [P, K/2, 16]), scales and mins
    [P, groups, 16]. "columns" (the Triton kernel): codes [K, N] (u4: [K/2, N]), scales and
    mins [groups, N]. 4-bit codes hold inputs 2i and 2i + 1 in the low and high nibble of one
    byte. mins = -zero * scale (None: -center * scale); FP8 scales are times 2^8."""

    layout: str
    kind: str
    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    center: float
    n: int
    k: int
    group: int
    perm: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.scales, self.mins, self.perm) if t is not None]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def to(self, device: torch.device) -> Packed:
        moved = {f: getattr(self, f) for f in ("codes", "scales", "mins", "perm")}
        return replace(self, **{f: None if t is None else t.to(device) for f, t in moved.items()})

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K], inputs in the kernel's order (`perm` applied): the torch
        path where no kernel runs."""
        codes = self.codes
        pairs = 1 if self.layout == "panels" else 0  # the dim that holds input pairs
        if self.kind == "u4":
            codes = torch.stack([codes & 15, codes >> 4], dim=pairs + 1).flatten(pairs, pairs + 1)
        if self.kind == "f8":
            values = codes.view(torch.float8_e4m3fn).float() / F8_HALF_SHIFT
        else:
            values = codes.float()
        mins = self.mins if self.mins is not None else -self.center * self.scales
        g = self.k // self.group
        if self.layout == "columns":  # [K, N]
            values = values.view(g, self.group, self.n)
            return (values * self.scales[:, None] + mins[:, None]).view(self.k, self.n).t()
        p = codes.shape[0]
        values = values.view(p, g, self.group, PANEL)
        w = values * self.scales[:, :, None] + mins[:, :, None]
        return w.view(p, self.k, PANEL).transpose(1, 2).reshape(p * PANEL, self.k)[: self.n]


def _per_panel(t: torch.Tensor, panels: int) -> torch.Tensor:
    """[N, X] -> [P, X, 16], zero-padded past N."""
    if t.shape[0] < panels * PANEL:
        t = torch.cat([t, t.new_zeros(panels * PANEL - t.shape[0], t.shape[1])])
    return t.view(panels, PANEL, t.shape[1]).transpose(1, 2).contiguous()


def pack(qw: QuantWeight, layout: str) -> Packed:
    """`qw` in the CPU kernel's "panels" or the Triton kernel's "columns" layout."""
    n, k = qw.shape
    scales, center = qw.scales.float(), qw.center
    if qw.kind == "f8":
        scales, center = scales * F8_HALF_SHIFT, 0.0
    mins = -qw.zeros * qw.scales if qw.zeros is not None and qw.kind != "f8" else None
    if layout == "panels":
        p = -(-n // PANEL)
        codes = _per_panel(qw.codes, p)  # [P, K, 16]
        if qw.kind == "u4":
            codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
        scales = _per_panel(scales, p)
        mins = None if mins is None else _per_panel(mins, p)
    else:
        codes = qw.codes.t()
        if qw.kind == "u4":
            codes = codes[0::2] | (codes[1::2] << 4)
        scales = scales.t()
        mins = None if mins is None else mins.t()
    return Packed(
        layout,
        qw.kind,
        codes.contiguous(),
        scales.contiguous(),
        None if mins is None else mins.contiguous(),
        center,
        n,
        k,
        qw.group,
        qw.perm,
    )
