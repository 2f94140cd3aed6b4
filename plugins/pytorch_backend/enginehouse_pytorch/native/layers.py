"""The building blocks: norms, projections, the gated MLP and the mixture of experts.

Parameters are created empty (no random init: the checkpoint fills them) and projections that
read the same input are fused into one matrix (q/k/v, gate/up), so a layer makes fewer, larger
matrix products; `weights.py` loads each checkpoint tensor into its slice of the fused one.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_build, cpu_decode
from .arch import MoE
from .cpu_decode import SMALL_ROWS
from .parallel import TensorParallel


def empty(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T (+ b). `shards` names the row ranges that separate checkpoint tensors fill."""

    def __init__(self, in_features: int, out_features: list[int], bias: bool = False) -> None:
        super().__init__()
        self.weight = empty(sum(out_features), in_features)
        self.bias = empty(sum(out_features)) if bias else None
        self.shards = [sum(out_features[:i]) for i in range(len(out_features) + 1)]

        self.packed: torch.Tensor | None = None
        self.small: torch.Tensor | None = None  # `cpu_decode`'s layout, for a few rows

    def pack(self, small_rows: bool = False) -> None:
        """CPU: lay the weight out once for the products. With `small_rows` (the `cpu_decode`
        kernels built) in `cpu_decode`'s layout: in float32 that product serves every row
        count (measured within 5% of oneDNN's from 1 to 2048 rows, faster at 1-4), so it is the
        only copy; in bfloat16 oneDNN's product (on the bf16 units) also gets its own copy for
        steps of more than `SMALL_ROWS` rows. Otherwise oneDNN's blocked layout alone, 1.4-2x
        faster than F.linear at 32 rows. The plain weight is dropped (benchmarks/RESULTS.md).
        """
        if small_rows:
            self.small = cpu_decode.pack(self.weight.data)
        if self.small is None or self.weight.dtype != torch.float32:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.data)
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.small is not None and (self.packed is None or x.shape[0] <= SMALL_ROWS):
            return cpu_decode.linear(x, self.small, self.bias, self.shards[-1])
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `Linear.pack` applies: float32 (or bfloat16 where the CPU has bf16 units) on a
    CPU whose torch build has oneDNN."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype != torch.float32 and not (dtype == torch.bfloat16 and cpu_build.has_bf16()):
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 2, dtype=dtype))
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2, dtype=dtype), w, None, "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    return True


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, plus_one: bool = False) -> None:
        super().__init__()
        self.weight = empty(dim)
        self.eps = eps
        self.plus_one = plus_one  # Gemma scales by (1 + weight); folded in after loading

    def fold(self) -> None:
        """Turn Gemma's (1 + w) into a plain weight once, so forward is one fused op."""
        if self.plus_one:
            self.weight.data += 1.0
            self.plus_one = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Half precision: normalise in float32, as the reference implementations do.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def activation(name: str):
    if name == "silu":
        return F.silu
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.gelu


class GatedMLP(nn.Module):
    """`intermediate` is this rank's slice when sharded; `down_proj` ends in `tp`'s all-reduce."""

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        act: str,
        bias: bool = False,
        tp: TensorParallel | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.gate_up_proj = Linear(hidden, [intermediate, intermediate], bias)
        self.down_proj = Linear(intermediate, [hidden], bias)
        self.act = activation(act)
        self.intermediate = intermediate
        self.fused = False  # cpu_decode's silu_mul (set after loading)
        self.silu = act == "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        # silu_mul is vectorised for float32; in bfloat16 it runs one value at a time, where
        # torch's own ops win past a decode's few rows.
        if self.fused and self.silu and (x.dtype == torch.float32 or x.shape[0] <= SMALL_ROWS):
            out = self.down_proj(cpu_decode.silu_mul(gate_up))
        else:
            gate, up = gate_up.split(self.intermediate, dim=-1)
            out = self.down_proj(self.act(gate) * up)
        return out if self.tp is None else self.tp.all_reduce(out)


class MixtureOfExperts(nn.Module):
    """Top-k routed gated experts. Tokens are grouped by expert, so each expert runs one
    matrix product over just the tokens routed to it. Sharded, every rank holds a slice of
    every expert (and the whole router), and the sum of the experts' outputs is all-reduced."""

    def __init__(self, hidden: int, moe: MoE, act: str, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.moe = moe
        self.tp = tp
        self.gate = Linear(hidden, [moe.num_experts])
        inter = moe.intermediate_size if tp is None else tp.intermediate(moe.intermediate_size)
        self.w13 = empty(moe.num_experts, 2 * inter, hidden)  # gate and up, stacked per expert
        self.w2 = empty(moe.num_experts, hidden, inter)
        self.act = activation(act)
        self.shared_expert: GatedMLP | None = None
        if moe.shared_expert_size:  # Qwen3-Next: every token also takes a gated shared expert
            shared = moe.shared_expert_size
            shared = shared if tp is None else tp.intermediate(shared)
            self.shared_expert = GatedMLP(hidden, shared, act)  # reduced with the experts' sum
            self.shared_expert_gate = Linear(hidden, [1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.run_experts(x, *self.route(x))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out if self.tp is None else self.tp.all_reduce(out)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's expert weights and experts, [tokens, top_k] each."""
        moe = self.moe
        probs = self.gate(x).softmax(dim=-1, dtype=torch.float32)
        weights, experts = probs.topk(moe.top_k, dim=-1)
        if moe.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts

    def run_experts(
        self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
    ) -> torch.Tensor:
        """The weighted sum of each token's experts (this rank's partial sum when sharded)."""
        weights = weights.to(x.dtype).flatten()
        out = torch.zeros_like(x)
        for e, rows, tokens in expert_groups(experts, self.moe.num_experts):
            gate, up = F.linear(x[tokens], self.w13[e]).chunk(2, dim=-1)
            y = F.linear(self.act(gate) * up, self.w2[e])
            out.index_add_(0, tokens, y * weights[rows, None])
        return out


def expert_groups(
    experts: torch.Tensor, num_experts: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Each used expert with its (token, choice) rows of `experts` [tokens, top_k] flattened,
    and those rows' tokens: one sort, then one product per expert over its tokens together."""
    top_k = experts.shape[-1]
    flat = experts.flatten()
    order = flat.argsort(stable=True)
    start = 0
    for e, n in enumerate(torch.bincount(flat, minlength=num_experts).tolist()):
        if n:
            rows = order[start : start + n]
            start += n
            yield e, rows, rows // top_k
