"""`QuantLinear`: a projection whose weight stays quantized, in place of `layers.Linear`.

Made in two ways. From a quantized checkpoint: the loader hands each of the layer's checkpoint
tensors (`qweight`, `scales`, ...) to `take`, per shard of a fused projection (q, k, v), and
`finish` reads them (`formats.py`), checks them and packs them for the device. At load: `of`
quantizes a loaded float `Linear` (int8 per output channel, int4 per group).

The shards of a fused projection become one matrix when they share their input order; GPTQ's
act order (`g_idx`) may give each shard its own, and then each shard multiplies its own
permutation of x (`parts`). Forward on the CPU: the C++ kernel (`cpu_kernel.py`), or where it is
not built, the weight decoded in torch per call (slow, same result); on CUDA: the Triton kernel
(`triton_kernel.py`) where the shapes fit it, else the same torch path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from enginehouse.plugin_api import InvalidModelError

from . import formats
from .qweight import (
    KINDS,
    Packed,
    QuantWeight,
    concat,
    pack,
    quantize_int4,
    quantize_int8,
    same_layout,
)
from .scheme import QuantScheme


class QuantLinear(nn.Module):
    def __init__(
        self, in_features: int, out_features: list[int], bias: bool, scheme: QuantScheme
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = list(out_features)
        self.scheme = scheme
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(sum(out_features)), requires_grad=False)
        self.shards = [sum(out_features[:i]) for i in range(len(out_features) + 1)]
        self.name = ""  # the module's name, for error messages (set by `quant.prepare`)
        self.raw: dict[int | None, dict[str, torch.Tensor]] = {}  # shard -> suffix -> tensor
        self.where: dict[int | None, str] = {}  # shard -> its checkpoint module name
        self.parts: list[Packed] = []
        self.kernel = "torch"

    # --- loading ------------------------------------------------------------------------------

    def take(self, suffix: str, shard: int | None, tensor: torch.Tensor, name: str) -> None:
        """One checkpoint tensor of this layer (`name` as the checkpoint spells it)."""
        self.raw.setdefault(shard, {})[suffix] = tensor
        self.where[shard] = name[: -len(suffix) - 1]

    def finish(self, device: torch.device) -> None:
        """Read the taken tensors into weights and pack them for `device`."""
        shards = [None] if None in self.raw else list(range(len(self.out_features)))
        missing = [s for s in shards if s not in self.raw]
        if missing or not self.raw:
            raise InvalidModelError(
                f"the checkpoint lacks the quantized weights of {self.name}"
                + (f" (shard {missing[0]} of {len(shards)})" if missing else "")
                + "; is it complete, and does quantization_config describe it?"
            )
        weights = []
        for s in shards:
            n = sum(self.out_features) if s is None else self.out_features[s]
            read = formats.read(self.raw[s], self.scheme, n, self.in_features, self.where[s])
            weights.append(read)
        self.raw = {}
        self.set_weights(weights, device)

    @classmethod
    def of(cls, linear: nn.Module, scheme: QuantScheme, device: torch.device) -> QuantLinear:
        """`linear` (a loaded float `Linear`) quantized at load, per scheme.method."""
        k = linear.weight.shape[1]
        outs = [b - a for a, b in zip(linear.shards, linear.shards[1:])]
        layer = cls(k, outs, linear.bias is not None, scheme)
        if linear.bias is not None:
            layer.bias.data = linear.bias.data
        w = linear.weight.data
        qw = quantize_int8(w) if scheme.method == "int8" else quantize_int4(w, scheme.group)
        layer.set_weights([qw], device)
        return layer

    def set_weights(self, weights: list[QuantWeight], device: torch.device) -> None:
        groups = [weights] if same_layout(weights) else [[w] for w in weights]
        self.parts = [self._pack(concat(g), device) for g in groups]

    def _pack(self, qw: QuantWeight, device: torch.device) -> Packed:
        if device.type == "cuda":
            from . import triton_kernel

            layout = "columns"
            self.kernel = "triton" if triton_kernel.supports(qw.shape[1], qw.group) else "torch"
        else:
            from . import cpu_kernel

            layout = "panels"
            self.kernel = "cpu" if cpu_kernel.load() else "torch"
        return pack(qw, layout).to(device)

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.parts)

    # --- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.parts) == 1:
            return self._part(self.parts[0], x, self.bias)
        outs, at = [], 0
        for p in self.parts:
            bias = None if self.bias is None else self.bias[at : at + p.n]
            outs.append(self._part(p, x, bias))
            at += p.n
        return torch.cat(outs, dim=-1)

    def _part(self, p: Packed, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if p.perm is not None:
            x = x.index_select(1, p.perm)
        if self.kernel == "cpu":
            b = None if bias is None else bias.float()  # the kernel takes float32 only
            y = torch.ops.enginehouse_quant.qlinear(
                x.float(), p.codes, p.scales, p.mins, b, KINDS[p.kind], p.n, p.group, p.center
            ).to(x.dtype)
        elif self.kernel == "triton":
            from . import triton_kernel

            y = triton_kernel.qlinear(x, p, bias)
        else:
            y = F.linear(x, p.dequantize().to(x.dtype), bias)
        return y.reshape(*shape[:-1], p.n)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.scheme.describe()}, {self.kernel}"
