"""The exportable decoder: the native model's weights under a forward written for ONNX.

The native model attends over a paged cache through index ops and C++ kernels, which do not
export. This module keeps its modules and weights (loaded by `native/weights.py`, rope from
`native/rope.py`, the MLP from `native/layers.py`) and reimplements only the step in plain,
shape-generic torch ops, in the standard decoder interface of ONNX tools:

    input_ids [B, S], attention_mask [B, P+S], position_ids [B, S],
    past_key_values.{i}.key / .value [B, kv_heads, P, head_dim]
    -> logits [B, S, vocab], present.{i}.key / .value [B, kv_heads, P+S, head_dim]

Key j of row b is visible to query i when attention_mask[b, j] is 1 and its position
(cumsum(attention_mask) - 1, as transformers derives positions from a padded mask) is at most
position_ids[b, i], and inside the layer's sliding window. Masking by positions rather than by
index lets a row's past and new tokens sit anywhere in the padded layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from enginehouse_pytorch.native.layers import GatedMLP, Linear, MixtureOfExperts
from enginehouse_pytorch.native.model import DecoderLM
from enginehouse_pytorch.native.rope import apply_rope, rope_table


def kv_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def input_names(num_layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids", *kv_names(num_layers, "past_key_values")]


def output_names(num_layers: int) -> list[str]:
    return ["logits", *kv_names(num_layers, "present")]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """In float32 whatever the graph's dtype, as the native half path and transformers do.
    Written out because F.rms_norm has no ONNX symbolic in the TorchScript exporter."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def linear(layer: Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)


def dense_experts(moe: MixtureOfExperts, x: torch.Tensor) -> torch.Tensor:
    """The mixture with every expert computing every token, weighted by the routing (zero for
    experts not chosen): the same sum as the native grouped loop, in static shapes, since a
    graph cannot group tokens by a data-dependent count. Costs num_experts / top_k more MLPs."""
    cfg = moe.moe
    probs = linear(moe.gate, x).softmax(dim=-1, dtype=torch.float32)
    weights, experts = probs.topk(cfg.top_k, dim=-1)
    if cfg.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    routing = torch.zeros_like(probs).scatter(-1, experts, weights).to(x.dtype)
    out = torch.zeros_like(x)
    for e in range(cfg.num_experts):
        gate, up = F.linear(x, moe.w13[e]).chunk(2, dim=-1)
        out = out + F.linear(moe.act(gate) * up, moe.w2[e]) * routing[..., e : e + 1]
    return out


class ExportableDecoder(nn.Module):
    """`DecoderLM` weights, a forward in the standard ONNX decoder interface (see module doc)."""

    def __init__(self, model: DecoderLM, num_positions: int) -> None:
        super().__init__()
        self.lm = model
        arch = model.arch
        self.arch = arch
        dtype = model.model.embed_tokens.weight.dtype
        cos, sin = rope_table(arch, num_positions)
        # Constants of the graph: indexed by position_ids, as the native runner indexes them.
        self.register_buffer("cos", cos.to(dtype), persistent=False)
        self.register_buffer("sin", sin.to(dtype), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        arch, body = self.arch, self.lm.model
        x = body.embed_tokens.weight[input_ids]
        if arch.embed_scale is not None:
            x = x * torch.tensor(arch.embed_scale, dtype=x.dtype)
        cos = self.cos[position_ids].unsqueeze(2)  # [B, S, 1, rotary_dim]
        sin = self.sin[position_ids].unsqueeze(2)
        masks = self._masks(attention_mask, position_ids)
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(body.layers):
            window = arch.window(i)
            h = rms_norm(x, layer.input_layernorm.weight, layer.input_layernorm.eps)
            attn, k, v = self._attention(layer.self_attn, h, cos, sin, past[2 * i : 2 * i + 2])
            presents += [k, v]
            attn = self._attend(attn, k, v, masks[window], layer.self_attn.softcap)
            attn = linear(layer.self_attn.o_proj, attn)
            x = self._residual(layer, x, attn)
        x = rms_norm(x, body.norm.weight, body.norm.eps)
        logits = linear(self.lm.lm_head, x)
        if arch.final_softcap is not None:
            logits = torch.tanh(logits / arch.final_softcap) * arch.final_softcap
        return (logits, *presents)

    def _masks(self, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """[B, 1, 1, S, P+S] booleans per window size, built once for all layers."""
        valid = attention_mask > 0
        key_pos = attention_mask.cumsum(-1) - 1
        query = position_ids[:, :, None]
        keys = key_pos[:, None, :]
        base = valid[:, None, :] & (keys <= query)
        windows = set(self.arch.windows) if self.arch.windows else {None}
        return {
            w: (base if w is None else base & (keys > query - w))[:, None, None] for w in windows
        }

    def _attention(self, attn, h, cos, sin, past):
        """q [B, kvh, g, S, d], and the layer's whole K/V (past + new) [B, kvh, P+S, d]."""
        heads, kv_heads, d = attn.heads
        b, s = h.shape[0], h.shape[1]
        qkv = linear(attn.qkv_proj, h)
        q = qkv[..., : heads * d].reshape(b, s, heads, d)
        k = qkv[..., heads * d : (heads + kv_heads) * d].reshape(b, s, kv_heads, d)
        v = qkv[..., (heads + kv_heads) * d :].reshape(b, s, kv_heads, d)
        if attn.qk_norm:
            q = rms_norm(q, attn.q_norm.weight, attn.q_norm.eps)
            k = rms_norm(k, attn.k_norm.weight, attn.k_norm.eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = torch.cat([past[0], k.transpose(1, 2)], dim=2)
        v = torch.cat([past[1], v.transpose(1, 2)], dim=2)
        q = q.reshape(b, s, kv_heads, heads // kv_heads, d).permute(0, 2, 3, 1, 4)
        return q, k, v

    def _attend(self, q, k, v, mask, softcap) -> torch.Tensor:
        """Grouped-query attention without repeating K/V: query heads sharing a KV head are
        one axis of q. Masked scores are set to the dtype's lowest value, not -inf, so that a
        padding row with no visible key gives finite garbage rather than NaN."""
        b, kv_heads, g, s, d = q.shape
        scores = q @ k[:, :, None].transpose(-1, -2) * self.arch.scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        out = probs @ v[:, :, None]  # [B, kvh, g, S, d]
        return out.permute(0, 3, 1, 2, 4).reshape(b, s, kv_heads * g * d)

    def _residual(self, layer, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        def norm(n, t):
            return rms_norm(t, n.weight, n.eps)

        def mlp(t):
            m = layer.mlp
            return dense_experts(m, t) if isinstance(m, MixtureOfExperts) else gated(m, t)

        if layer.sandwich:
            x = x + norm(layer.post_attention_layernorm, attn)
            return x + norm(
                layer.post_feedforward_layernorm, mlp(norm(layer.pre_feedforward_layernorm, x))
            )
        x = x + attn
        return x + mlp(norm(layer.post_attention_layernorm, x))


def gated(mlp: GatedMLP, x: torch.Tensor) -> torch.Tensor:
    gate, up = linear(mlp.gate_up_proj, x).split(mlp.intermediate, dim=-1)
    return linear(mlp.down_proj, mlp.act(gate) * up)
