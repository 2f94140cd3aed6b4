"""Checkpoint layouts of quantized projections, each read into a `QuantWeight`.

The facts of each layout, from the tools that write them (N outputs, K inputs, G = K / group):

- GPTQ (AutoGPTQ, GPTQModel): `qweight` int32 [K * bits / 32, N], packed along the inputs,
  the first input in the lowest bits; `qzeros` int32 [G, N * bits / 32], packed along the
  outputs the same way; `scales` float16 [G, N]; `g_idx` int32 [K], each input's group (act
  order when not k // group). w = scale * (q - zero). The "gptq" (v1) layout stores zero - 1
  (a symmetric 4-bit zero of 8 is stored as 7), "gptq_v2" the zero itself.
- AWQ, GEMM layout (AutoAWQ): `qweight` int32 [K, N / 8] and `qzeros` int32 [G, N / 8], packed
  along the outputs in the order 0, 2, 4, 6, 1, 3, 5, 7 (field i of word j holds output
  8j + order[i]); `scales` float16 [G, N]. w = scale * (q - zero), zeros as they are.
- compressed-tensors `pack-quantized` (llm-compressor's W4A16 / W8A16): `weight_packed` int32
  [N, ceil(K * bits / 32)], packed along the inputs, first input lowest, each value stored as
  q + 2^(bits-1) (q signed); `weight_scale` [N, G] (or [N, 1] per channel); asymmetric:
  `weight_zero_point` int32 [ceil(N * bits / 32), G], packed along the outputs, the same
  offset; `weight_g_idx` [K] with act order; `weight_shape` [2]. w = scale * (q - zero).
  `int-quantized`: `weight` int8 [N, K] and `weight_scale`. `float-quantized`: `weight`
  float8_e4m3fn [N, K], `weight_scale` per tensor, per channel [N, 1] or per block.
- FP8 (quant_method "fp8", DeepSeek / Qwen FP8): `weight` float8_e4m3fn [N, K] and
  `weight_scale_inv` float32 [ceil(N / bn), ceil(K / bk)] for blocks of bn x bk, or a single
  value per tensor; despite the name, w = weight * weight_scale_inv.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from enginehouse.plugin_api import InvalidModelError

from .qweight import QuantWeight
from .scheme import QuantScheme

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> their `32 // bits` fields along `dim`, lowest bits first (int32)."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    w = words.to(torch.int32).unsqueeze(dim + 1)
    view = [1] * w.dim()
    view[dim + 1] = per
    fields = (w >> shifts.view(view)) & ((1 << bits) - 1)
    return fields.flatten(dim, dim + 1)


def _need(tensors: Mapping[str, torch.Tensor], where: str, what: str, *names: str) -> torch.Tensor:
    for name in names:
        if name in tensors:
            return tensors[name]
    raise InvalidModelError(
        f"the checkpoint lacks {where}.{names[0]} ({what}); every quantized projection needs "
        "it: is the checkpoint complete, and does config.json's quantization_config describe it?"
    )


def _shape(t: torch.Tensor, want: tuple[int, ...], where: str, name: str) -> None:
    if tuple(t.shape) != want:
        raise InvalidModelError(
            f"{where}.{name} has shape {tuple(t.shape)}, the model expects {want} from "
            "config.json and its quantization_config (bits, group size); they disagree"
        )


def _groups(scheme: QuantScheme, k: int, where: str) -> tuple[int, int]:
    group = scheme.group or k
    if k % group:
        raise InvalidModelError(
            f"{where}: group size {group} does not divide the input size {k}; the checkpoint "
            "and quantization_config disagree"
        )
    return group, k // group


def _act_order(qw: QuantWeight, t: Mapping[str, torch.Tensor], name: str, where: str):
    """`qw` with its inputs in group order when the checkpoint has a `name` (g_idx) tensor that
    is not simply k // group: the layer then multiplies x[:, perm]."""
    if name not in t:
        return qw
    k, group = qw.shape[1], qw.group
    _shape(t[name], (k,), where, name)
    g_idx, plain = t[name].long(), torch.arange(k) // group
    if torch.equal(g_idx, plain):
        return qw
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], plain):
        raise InvalidModelError(
            f"{where}.{name} does not give every group exactly {group} inputs; not an act "
            "order this loader can run"
        )
    qw.codes = qw.codes[:, perm].contiguous()
    qw.perm = perm
    return qw


def _flat_zeros(zeros: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """Zero points that are all one value (a symmetric checkpoint) become a center."""
    first = zeros.flatten()[0].item()
    if bool((zeros == first).all()):
        return None, float(first)
    return zeros.float(), 0.0


def gptq(t: Mapping[str, torch.Tensor], scheme: QuantScheme, n: int, k: int, where: str):
    bits, per = scheme.bits, 32 // scheme.bits
    group, g = _groups(scheme, k, where)
    qweight = _need(t, where, "GPTQ packed weights", "qweight")
    qzeros = _need(t, where, "GPTQ zero points", "qzeros")
    scales = _need(t, where, "GPTQ scales", "scales")
    _shape(qweight, (k // per, n), where, "qweight")
    _shape(qzeros, (g, -(-n // per)), where, "qzeros")
    _shape(scales, (g, n), where, "scales")
    codes = unpack(qweight, bits, 0).t()  # [N, K]
    zeros = unpack(qzeros, bits, 1)[:, :n].t() + scheme.zero_offset  # [N, G]
    zeros, center = _flat_zeros(zeros)
    qw = QuantWeight(scheme.kind, codes.to(torch.uint8), scales.t().float(), zeros, center, group)
    return _act_order(qw, t, "g_idx", where)


def awq(t: Mapping[str, torch.Tensor], scheme: QuantScheme, n: int, k: int, where: str):
    group, g = _groups(scheme, k, where)
    qweight = _need(t, where, "AWQ packed weights", "qweight")
    qzeros = _need(t, where, "AWQ zero points", "qzeros")
    scales = _need(t, where, "AWQ scales", "scales")
    _shape(qweight, (k, n // 8), where, "qweight")
    _shape(qzeros, (g, n // 8), where, "qzeros")
    _shape(scales, (g, n), where, "scales")
    # Field i of each word holds output AWQ_ORDER[i] of its eight: put them back in order.
    inverse = torch.tensor([AWQ_ORDER.index(j) for j in range(8)])

    def outputs(words: torch.Tensor) -> torch.Tensor:
        fields = unpack(words, 4, 1).view(words.shape[0], -1, 8)
        return fields[:, :, inverse].flatten(1)

    codes = outputs(qweight).t().to(torch.uint8)
    zeros, center = _flat_zeros(outputs(qzeros).t())
    return QuantWeight("u4", codes.contiguous(), scales.t().float(), zeros, center, group)


def compressed(t: Mapping[str, torch.Tensor], scheme: QuantScheme, n: int, k: int, where: str):
    if scheme.kind == "f8":
        return _fp8(t, scheme, n, k, where, "weight_scale")
    bits, per, offset = scheme.bits, 32 // scheme.bits, 1 << (scheme.bits - 1)
    group, g = _groups(scheme, k, where)
    scale = _need(t, where, "compressed-tensors scales", "weight_scale").float()
    if scale.numel() == 1:
        scale = scale.reshape(1, 1).expand(n, 1)
    _shape(scale, (n, g), where, "weight_scale")
    if scheme.fmt == "pack-quantized":
        packed = _need(t, where, "compressed-tensors packed weights", "weight_packed")
        _shape(packed, (n, -(-k // per)), where, "weight_packed")
        codes = unpack(packed, bits, 1)[:, :k]
    else:  # int-quantized: int8 as they are
        weight = _need(t, where, "compressed-tensors int8 weights", "weight")
        _shape(weight, (n, k), where, "weight")
        codes = weight.to(torch.int32) + offset
    if scheme.symmetric:
        zeros, center = None, float(offset)
    else:
        zp = _need(t, where, "compressed-tensors zero points", "weight_zero_point")
        if scheme.fmt == "pack-quantized":
            _shape(zp, (-(-n // per), g), where, "weight_zero_point")
            zp = unpack(zp, bits, 0)[:n]
        else:
            zp = zp.to(torch.int32).reshape(n, g) + offset
        zeros, center = _flat_zeros(zp)
    qw = QuantWeight(scheme.kind, codes.to(torch.uint8), scale.contiguous(), zeros, center, group)
    return _act_order(qw, t, "weight_g_idx", where)


def fp8(t: Mapping[str, torch.Tensor], scheme: QuantScheme, n: int, k: int, where: str):
    return _fp8(t, scheme, n, k, where, "weight_scale_inv", "weight_scale")


def _fp8(t, scheme: QuantScheme, n: int, k: int, where: str, *scale_names: str) -> QuantWeight:
    weight = _need(t, where, "FP8 weights", "weight")
    if weight.dtype != torch.float8_e4m3fn:
        raise InvalidModelError(
            f"{where}.weight is {weight.dtype}; FP8 checkpoints run natively in e4m3 "
            "(torch.float8_e4m3fn) only"
        )
    _shape(weight, (n, k), where, "weight")
    scale = _need(t, where, "FP8 scales", *scale_names).float()
    if scheme.block:
        bn, bk = scheme.block
        _shape(scale, (-(-n // bn), -(-k // bk)), where, scale_names[0])
        group = bk
        scale = scale.repeat_interleave(bn, dim=0)[:n]
    elif scale.numel() == 1:
        group, scale = k, scale.reshape(1, 1).expand(n, 1)
    else:
        _shape(scale, (n, 1), where, scale_names[0])
        group = k
    if k % group:
        raise InvalidModelError(f"{where}: FP8 block width {group} does not divide {k} inputs")
    codes = weight.view(torch.uint8)
    return QuantWeight("f8", codes.contiguous(), scale.contiguous(), None, 0.0, group)


READERS = {"gptq": gptq, "awq": awq, "compressed-tensors": compressed, "fp8": fp8}

# The tensor that marks a projection as quantized, per method and layout.
MARKERS = {
    "gptq": ("qweight",),
    "awq": ("qweight",),
    "compressed-tensors": ("weight_packed", "weight_scale"),
    "fp8": ("weight_scale_inv", "weight_scale"),
}


def read(tensors: Mapping[str, torch.Tensor], scheme: QuantScheme, n: int, k: int, where: str):
    """One projection's `QuantWeight` from its checkpoint tensors (named by suffix)."""
    return READERS[scheme.method](tensors, scheme, n, k, where)
