"""A whole decode step on the CPU as one C++ call, for steps of a few rows.

At batch 1 a step reads every weight once and computes little with it, so what it costs beyond
the weights' memory traffic is overhead: nine ops per layer, each a trip through Python, the
module machinery and the dispatcher. `DecodeStep` hands all layers to `cpu_decode`'s
`decode_layers` at once (the same kernels, in the same order, with the same roundings as the
separate fused ops, so the numbers are the same). It applies to a decoder whose every layer is
plain (gated SiLU MLP, rope over whole heads with no q/k norm, no sandwich norms), with packed
float32 or bfloat16 projections and the C++ paged attention; others keep the per-op path.
Measurements: benchmarks/RESULTS.md, issue 14.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import cpu_decode
from .attention import StepMeta
from .cpu_kernels import CpuPagedAttention
from .layers import GatedMLP, Linear

if TYPE_CHECKING:
    from .model import DecoderLM, KVCache


def _bias(linear: Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().float().contiguous()


def _fits(model: DecoderLM) -> bool:
    """Every layer is one `decode_layers` handles (the per-op fused path, all of it)."""
    if not model.fused or model.arch.embed_scale is not None:
        return False
    # A sharded model (tensor parallel) reduces partial sums between its projections, which
    # this call would skip.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            return False
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not (attn.fused_rope and attn.softcap is None and isinstance(mlp, GatedMLP)):
            return False
        if not (mlp.fused and mlp.silu):
            return False
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if not all(type(m) is Linear and m.small is not None for m in linears):
            return False
        if not isinstance(attn.attn, CpuPagedAttention):
            return False
    return True


class DecodeStep:
    """The decoder's layers and final norm for a decode-only step of up to `SMALL_ROWS` rows."""

    def __init__(self, model: DecoderLM) -> None:
        weights: list[torch.Tensor | None] = []
        self.windows: list[int] = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for norm, pair in (
                (layer.input_layernorm, (attn.qkv_proj, attn.o_proj)),
                (layer.post_attention_layernorm, (mlp.gate_up_proj, mlp.down_proj)),
            ):
                weights.append(norm.weight.detach())
                for linear in pair:
                    weights += [linear.small, _bias(linear)]
            self.windows.append(attn.window or 0)
        weights.append(model.model.norm.weight.detach())
        self.weights = weights
        first = model.model.layers[0].self_attn
        self.heads, self.kv_heads, _ = first.heads
        self.scale = first.attn.scale
        self.eps = model.model.norm.eps

    @staticmethod
    def applies(x: torch.Tensor, meta: StepMeta) -> bool:
        return not meta.prefills and x.shape[0] <= cpu_decode.SMALL_ROWS

    def __call__(self, x: torch.Tensor, meta: StepMeta, kv: list[KVCache]) -> torch.Tensor:
        caches = [t for pair in kv for t in pair]
        return torch.ops.enginehouse_decode.decode_layers(
            x,
            self.weights,
            caches,
            meta.cos.contiguous(),
            meta.sin.contiguous(),
            meta.slots,
            meta.block_tables,
            meta.context_lens,
            meta.block_size,
            self.heads,
            self.kv_heads,
            self.windows,
            self.eps,
            self.scale,
            0.0,
        )


def build(model: DecoderLM) -> DecodeStep | None:
    """The one-call step for `model`, or None where some layer needs the per-op path."""
    return DecodeStep(model) if _fits(model) else None
