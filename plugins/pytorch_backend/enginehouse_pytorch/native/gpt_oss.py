"""gpt-oss's mixture of experts: a router with a bias, a softmax over the top k chosen logits,
and experts with biases whose gate and up projections are interleaved (gate in the even
columns, up in the odd ones) and joined by a clamped SwiGLU.

The experts keep the checkpoint's layout, [experts, in, out], so a product is x @ W + b as in
transformers. Its attention (sinks, a window on every other layer) is the common `Attention`
with `Arch.sinks`; its MXFP4 checkpoints are read by `mxfp4.py`.
"""

from __future__ import annotations

import torch
from torch import nn

from .arch import MoE
from .layers import Linear, empty, expert_groups
from .parallel import TensorParallel


def clamped_swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """(up + 1) * gate * sigmoid(alpha * gate), the gate clamped above at `limit` and the up
    projection to [-limit, limit] (transformers' GptOssExperts._apply_gate)."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


class GptOssMoE(nn.Module):
    """`model.layers.N.mlp`: `router` (weight and bias), and the experts' `w13` / `w13_bias`
    (the checkpoint's gate_up_proj) and `w2` / `w2_bias` (down_proj), renamed by weights.py.
    Sharded, each rank holds a slice of every expert's intermediate units (the interleaved
    pairs stay together) and rank 0 alone the down projection's bias; the sum is all-reduced."""

    def __init__(self, hidden: int, moe: MoE, tp: TensorParallel | None = None) -> None:
        super().__init__()
        assert moe.swiglu is not None
        self.moe = moe
        self.tp = tp
        self.alpha, self.limit = moe.swiglu
        inter = moe.intermediate_size if tp is None else tp.intermediate(moe.intermediate_size)
        self.router = Linear(hidden, [moe.num_experts], bias=True)
        self.w13 = empty(moe.num_experts, hidden, 2 * inter)
        self.w13_bias = empty(moe.num_experts, 2 * inter)
        self.w2 = empty(moe.num_experts, inter, hidden)
        self.w2_bias = empty(moe.num_experts, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moe = self.moe
        top, experts = self.router(x).topk(moe.top_k, dim=-1)
        weights = top.softmax(dim=-1).flatten()
        out = torch.zeros_like(x)
        for e, rows, tokens in expert_groups(experts, moe.num_experts):
            gate_up = x[tokens] @ self.w13[e] + self.w13_bias[e]
            y = clamped_swiglu(gate_up, self.alpha, self.limit) @ self.w2[e] + self.w2_bias[e]
            out.index_add_(0, tokens, y * weights[rows, None])
        return out if self.tp is None else self.tp.all_reduce(out)


def rank_part(tp: TensorParallel, pname: str, read) -> tuple[bool, torch.Tensor | None]:
    """This rank's part of a gpt-oss tensor that the common rules do not cover: (True, part),
    or (False, None) for the others. Sinks follow the query heads; the experts are sliced
    along their intermediate units (both columns of a gate/up pair); the down projection's
    bias is added once, on rank 0."""
    a = tp.arch
    if pname.endswith(".self_attn.sinks"):
        return True, read((0, tp.rank * tp.heads, (tp.rank + 1) * tp.heads))
    if not pname.endswith((".mlp.w13", ".mlp.w13_bias", ".mlp.w2", ".mlp.w2_bias")):
        return False, None
    begin, end = tp.span(a.moe.intermediate_size)  # type: ignore[union-attr]
    if pname.endswith(".mlp.w13"):
        return True, read((2, 2 * begin, 2 * end))
    if pname.endswith(".mlp.w13_bias"):
        return True, read((1, 2 * begin, 2 * end))
    if pname.endswith(".mlp.w2"):
        return True, read((1, begin, end))
    return True, read() if tp.rank == 0 else None
