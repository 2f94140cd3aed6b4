"""DeepSeek's mixture of experts: grouped routing, and shared experts every token runs.

The router follows transformers 5.25's `DeepseekV2TopkRouter` / `DeepseekV3TopkRouter` op for
op, in float32 as they do (the checkpoint keeps the router in float32 too):
- V2 (softmax scores): "greedy" takes the top_k experts; "group_limited_greedy" first keeps the
  `topk_groups` groups with the best single expert, then the top_k experts among them.
- V3 (sigmoid scores, "noaux_tc"): the choice adds the learned `e_score_correction_bias`; groups
  are ranked by the sum of their two best experts; the weights are the unbiased scores of the
  chosen experts, renormalised when `norm_topk_prob`.
Both then scale the weights by `routed_scaling_factor`. The routed experts run through
`MixtureOfExperts.run_experts`; the shared experts are one gated MLP added to their sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .arch import MoE, Routing
from .layers import GatedMLP, MixtureOfExperts
from .parallel import TensorParallel


class GroupedRouter(nn.Module):
    """`gate` in the checkpoint: `weight` [experts, hidden] and V3's `e_score_correction_bias`,
    both float32 whatever the model's dtype."""

    def __init__(self, hidden: int, moe: MoE) -> None:
        super().__init__()
        assert moe.routing is not None
        self.routing: Routing = moe.routing
        self.top_k = moe.top_k
        self.renormalize = moe.renormalize
        n = moe.num_experts
        self.weight = nn.Parameter(torch.empty(n, hidden, dtype=torch.float32), False)
        if self.routing.score_bias:
            self.e_score_correction_bias = nn.Parameter(torch.empty(n, dtype=torch.float32), False)

    def _group_mask(self, scores: torch.Tensor, group_scores: torch.Tensor) -> torch.Tensor:
        """True for the experts of each token's `topk_groups` best groups."""
        r = self.routing
        best = torch.topk(group_scores, k=r.topk_groups, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores).scatter_(1, best, 1).bool()
        per_group = scores.shape[-1] // r.num_groups
        return mask[:, :, None].expand(-1, -1, per_group).reshape(scores.shape)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, experts), [tokens, top_k] each, weights in float32."""
        r = self.routing
        logits = F.linear(x.float(), self.weight.float())
        if r.scoring == "sigmoid":
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias
            groups = choice.view(-1, r.num_groups, choice.shape[-1] // r.num_groups)
            mask = self._group_mask(choice, groups.topk(2, dim=-1)[0].sum(dim=-1))
            choice = choice.masked_fill(~mask, float("-inf"))
            experts = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
            weights = scores.gather(1, experts)
            if self.renormalize:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            scores = logits.softmax(dim=-1, dtype=torch.float32)
            if r.method == "group_limited_greedy":
                groups = scores.view(-1, r.num_groups, scores.shape[-1] // r.num_groups)
                mask = self._group_mask(scores, groups.max(dim=-1).values)
                scores = scores.masked_fill(~mask, 0.0)
            weights, experts = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        return weights * r.scaling, experts


class SharedExpertsMoE(MixtureOfExperts):
    """Routed experts (`w13`/`w2`, as `MixtureOfExperts`) plus `shared_experts`, a gated MLP
    of `n_shared_experts * moe_intermediate_size` every token runs. Sharded, both are sliced
    along the intermediate size and their sum is all-reduced once."""

    def __init__(
        self, hidden: int, moe: MoE, act: str, bias: bool, tp: TensorParallel | None = None
    ) -> None:
        super().__init__(hidden, moe, act, tp)
        self.gate = GroupedRouter(hidden, moe)
        self.shared_experts: GatedMLP | None = None
        if moe.shared_intermediate_size:
            inter = moe.shared_intermediate_size
            inter = inter if tp is None else tp.intermediate(inter)
            self.shared_experts = GatedMLP(hidden, inter, act, bias)  # reduced with the experts

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.run_experts(x, *self.route(x))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out if self.tp is None else self.tp.all_reduce(out)
