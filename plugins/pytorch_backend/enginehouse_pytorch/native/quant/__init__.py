"""Quantized projections for the native backend: checkpoints in GPTQ, AWQ, compressed-tensors
and FP8 layouts, and int8 / int4 weight-only quantization at load (`EngineConfig.quantization`).

- `scheme.py`: which quantization (torch-free, the probe's part), and its checks and memory;
- `formats.py`: each checkpoint layout read into one neutral form, `qweight.QuantWeight`;
- `qweight.py`: that form, quantization at load, and the kernels' layouts;
- `cpu_kernel.py` (C++) and `triton_kernel.py` (CUDA): the matmuls on codes;
- `linear.py`: `QuantLinear`, the layer;
- here: swapping a model's `Linear` layers for `QuantLinear` ones, before and after loading.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..layers import Linear
from .formats import MARKERS
from .linear import QuantLinear
from .scheme import QuantScheme

__all__ = ["QuantLinear", "QuantScheme", "quantized_modules", "prepare", "finish"]


def quantized_modules(
    files: Iterable[Path], scheme: QuantScheme, prefixes: Mapping[str, str | None] | None = None
) -> set[str]:
    """The model's projections (fused names) that the checkpoint holds quantized, from the
    tensor names alone (safetensors headers; no tensor is read)."""
    from safetensors import safe_open

    from ..weights import _renamed, target

    markers = MARKERS[scheme.method]
    found = set()
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                suffix = name.rpartition(".")[2]
                if suffix not in markers:
                    continue
                ours = _renamed(name, prefixes)
                where = None if ours is None else target(ours)
                if where is not None:
                    found.add(where[0].rpartition(".")[0])
    if scheme.method == "fp8":  # these stay float, dequantized at load (fp8_float.py)
        from .fp8_float import FLOAT_MODULES

        found = {m for m in found if not m.endswith(FLOAT_MODULES)}
    return found


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)


def prepare(model: nn.Module, scheme: QuantScheme, modules: set[str]) -> None:
    """Before loading a quantized checkpoint: each `Linear` in `modules` becomes an empty
    `QuantLinear` that collects its checkpoint tensors."""
    for name, m in list(model.named_modules()):
        if isinstance(m, Linear) and name in modules:
            outs = [b - a for a, b in zip(m.shards, m.shards[1:])]
            layer = QuantLinear(m.weight.shape[1], outs, m.bias is not None, scheme)
            layer.name = name
            _replace(model, name, layer)


def finish(model: nn.Module, scheme: QuantScheme, device: torch.device) -> None:
    """After loading: read and pack the collected tensors, or, for quantization at load,
    quantize every projection and the head (the embedding stays float)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            m.finish(device)
        elif scheme.at_load and isinstance(m, Linear):
            _replace(model, name, QuantLinear.of(m, scheme, device))
