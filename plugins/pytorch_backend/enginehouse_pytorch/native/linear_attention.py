"""Gated DeltaNet linear attention (Qwen3-Next's and Qwen3.5's `linear_attn` layers).

A layer keeps no KV per token: each sequence has a fixed-size state, the last `conv_kernel - 1`
inputs of its short causal convolution and a recurrent matrix [v_heads, k_dim, v_dim] per layer,
held in a slot of `state_pool.StatePool`. A step's decodes update their slots together (the
recurrent form, one token each); a verify chunk (speculative decoding: a sequence's last token
and the K proposals after it) goes through the recurrent form too, one position per
`DecodeStep`, and keeps its states after every position in a `VerifyScratch`, so that the runner
can keep the one at the last accepted token (`state_pool.Verified`); each prefill chunk
continues its sequence's state over its tokens in the chunked form, so a prompt split across
engine steps gives the result of one pass. A prefill chunk asked to save its state at a block
boundary inside it (prefix caching, `StateMeta.prefill_saves`) runs the chunked form in two
parts, split there, and copies the state between them into the snapshot's slot. The recurrence,
for each head, token t with decay g_t <= 0 (log space) and rate beta_t:

    S_t = exp(g_t) S_{t-1} + k_t u_t^T,  u_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t),
    o_t = S_t^T q_t

(q and k L2-normalised, q also scaled by k_dim ** -0.5), then a gated RMSNorm and out_proj.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .arch import Arch
from .attention import StepMeta
from .layers import Linear, empty
from .parallel import TensorParallel

CHUNK = 64  # tokens per block of the chunked form: exp of cumulative decays stays in range


@dataclass
class LayerState:
    """One linear layer's states for every slot of the pool."""

    conv: torch.Tensor  # [slots, conv_dim, conv_kernel - 1], the model's dtype
    recurrent: torch.Tensor  # [slots, v_heads, k_dim, v_dim], float32
    index: int = 0  # which linear layer (counting linear layers only): its row of a scratch


@dataclass
class VerifyScratch:
    """The states after each position of a step's verify chunks, every linear layer: one row
    per verified token (rejected proposals' states included; the runner keeps one)."""

    conv: torch.Tensor  # [linear layers, rows, conv_dim, conv_kernel - 1]
    recurrent: torch.Tensor  # [linear layers, rows, v_heads, k_dim, v_dim], float32


@dataclass
class DecodeStep:
    """One position of the step's decode rows, the recurrent form over every sequence that has
    a token there: each decode at the first step, a verify chunk's K + 1 tokens one per step."""

    rows: torch.Tensor | slice  # the tokens' rows in the step
    slots: torch.Tensor  # their sequences' live slots, long
    # Verify chunks' tokens: (which of `rows`, their scratch rows), to keep the states after.
    keep: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class StateMeta:
    """The state slot of each sequence in the step: the decode rows' (`decode_steps`, decodes
    and verify chunks), then one per prefill chunk (in the order of `StepMeta.prefills`)."""

    decode_steps: list[DecodeStep]
    prefill_slots: list[int]
    # Per prefill chunk: (tokens into the chunk, slot) to save the state after those tokens
    # into, or None.
    prefill_saves: list[tuple[int, int] | None] | None = None
    scratch: VerifyScratch | None = None  # where the verify chunks' states go

    def saves(self) -> list[tuple[int, int] | None]:
        return self.prefill_saves or [None] * len(self.prefill_slots)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def delta_rule_step(q, k, v, g, beta, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of each of B sequences: q, k [B, H, dk], v [B, H, dv], g, beta [B, H],
    state [B, H, dk, dv]. Returns the outputs [B, H, dv] and the new states."""
    state = state * g.exp()[..., None, None]
    remembered = (state * k[..., None]).sum(dim=-2)  # S^T k: what the state predicts for k
    update = (v - remembered) * beta[..., None]
    state = state + k[..., None] * update[..., None, :]
    return (state * q[..., None]).sum(dim=-2), state


def delta_rule_chunk(q, k, v, g, beta, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same recurrence over n tokens of one sequence at once: q, k [H, n, dk], v [H, n, dv],
    g, beta [H, n], state [H, dk, dv]. With G the cumulative decay inside the chunk, the
    updates U solve the unit lower-triangular system (I + A) U = beta V - beta exp(G) K S_0,
    A[t, s] = beta_t exp(G_t - G_s) k_t.k_s for s < t; then
    o_t = exp(G_t) S_0^T q_t + sum_{s<=t} exp(G_t - G_s) (q_t.k_s) u_s."""
    n = q.shape[1]
    cum = g.cumsum(dim=-1)  # [H, n]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    # exp(G_t - G_s) where s <= t, else 0 (masked before exp: the upper part could overflow)
    decay = (cum[:, :, None] - cum[:, None, :]).masked_fill(~causal, float("-inf")).exp()
    a = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)
    system = a + torch.eye(n, dtype=q.dtype, device=q.device)
    rhs = beta[..., None] * v - (beta * cum.exp())[..., None] * (k @ state)
    u = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    out = (cum.exp()[..., None] * q) @ state + ((q @ k.transpose(-1, -2)) * decay) @ u
    last = cum[:, -1:]  # G_n
    tail = (last - cum).exp()[..., None] * k  # each token's key, decayed to the chunk's end
    state = last.exp()[..., None] * state + tail.transpose(-1, -2) @ u
    return out, state


def delta_rule_prefill(q, k, v, g, beta, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`delta_rule_chunk` over a prompt chunk of any length, CHUNK tokens at a time."""
    outs = []
    for begin in range(0, q.shape[1], CHUNK):
        part = slice(begin, begin + CHUNK)
        o, state = delta_rule_chunk(*(t[:, part] for t in (q, k, v, g, beta)), state)
        outs.append(o)
    return torch.cat(outs, dim=1), state


class GatedRMSNorm(nn.Module):
    """RMSNorm of the attention output, times silu of the gate z (Qwen3-Next's RMSNormGated:
    a plain weight, not the (1 + w) of its other norms)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = empty(dim)
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x32.to(x.dtype) * F.silu(gate.float())).to(x.dtype)


class GatedDeltaNet(nn.Module):
    """`model.layers.N.linear_attn`: checkpoint names kept (Qwen3-Next's in_proj_qkvz and
    in_proj_ba; conv1d, A_log, dt_bias, norm, out_proj), except Qwen3.5's in_proj_qkv/z/b/a,
    fused into `in_proj`. Sharded, this rank's key heads and their value heads only."""

    def __init__(self, arch: Arch, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.tp = tp = tp or TensorParallel(arch)
        la = tp.linear  # this rank's heads (all of them at tp=1)
        assert la is not None
        self.la = la
        nk, nv, dk, dv = la.num_k_heads, la.num_v_heads, la.head_k_dim, la.head_v_dim
        self.group = nv // nk  # value heads per key head
        if la.split_projections:  # Qwen3.5: in_proj_qkv, _z, _b and _a fused (weights.py)
            self.in_proj = Linear(arch.hidden_size, [la.conv_dim, nv * dv, nv, nv])
        else:  # Qwen3-Next: both grouped by key head, [q, k, v, z] and [b, a] for each
            self.in_proj_qkvz = Linear(arch.hidden_size, [2 * nk * dk + 2 * nv * dv])
            self.in_proj_ba = Linear(arch.hidden_size, [2 * nv])
        self.conv1d = nn.Module()
        self.conv1d.weight = empty(la.conv_dim, 1, la.conv_kernel)
        self.A_log = empty(nv)
        self.dt_bias = empty(nv)
        self.norm = GatedRMSNorm(dv, arch.rms_norm_eps)
        self.out_proj = Linear(nv * dv, [arch.hidden_size])

    def _project(self, x: torch.Tensor):
        """mixed q|k|v [T, conv_dim] (the convolution's input), z [T, nv, dv], b and a [T, nv]."""
        la, t, r = self.la, x.shape[0], self.group
        dk, dv = la.head_k_dim, la.head_v_dim
        if la.split_projections:
            nv = la.num_v_heads
            mixed, z, b, a = self.in_proj(x).split([la.conv_dim, nv * dv, nv, nv], dim=-1)
            return mixed, z.reshape(t, nv, dv), b, a
        qkvz = self.in_proj_qkvz(x).view(t, la.num_k_heads, -1)
        q, k, v, z = qkvz.split([dk, dk, r * dv, r * dv], dim=-1)
        b, a = self.in_proj_ba(x).view(t, la.num_k_heads, 2 * r).split([r, r], dim=-1)
        mixed = torch.cat([q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)], dim=-1)
        return mixed, z.reshape(t, -1, dv), b.reshape(t, -1), a.reshape(t, -1)

    def _conv(self, mixed: torch.Tensor, meta: StepMeta, state: LayerState) -> torch.Tensor:
        """The causal depthwise convolution, each sequence continuing from its conv state (the
        inputs before this step's tokens; zeros for a fresh sequence), then silu."""
        weight = self.conv1d.weight
        channels, keep = weight.shape[0], weight.shape[-1] - 1
        out = torch.empty_like(mixed)
        lin = meta.linear
        for s in lin.decode_steps:
            window = torch.cat([state.conv[s.slots], mixed[s.rows, :, None]], dim=-1)  # [B, C, K]
            # One output per channel: a product and a sum (F.conv1d costs far more here).
            out[s.rows] = (window * weight[:, 0]).sum(dim=-1)
            state.conv[s.slots] = window[..., 1:]
            if s.keep is not None:
                which, rows = s.keep
                lin.scratch.conv[state.index, rows] = window[which, :, 1:]
        for p, slot, save in zip(meta.prefills, lin.prefill_slots, lin.saves()):
            window = torch.cat([state.conv[slot], mixed[p.begin : p.end].T], dim=-1)
            out[p.begin : p.end] = F.conv1d(window[None], weight, groups=channels)[0].T
            if save is not None:  # the inputs before the boundary: window[:, at : at + keep]
                at, dst = save
                state.conv[dst] = window[:, at : at + keep]
            state.conv[slot] = window[:, window.shape[1] - keep :]
        return F.silu(out)

    def forward(self, x: torch.Tensor, meta: StepMeta, state: LayerState) -> torch.Tensor:
        la, t = self.la, x.shape[0]
        nk, dk, dv = la.num_k_heads, la.head_k_dim, la.head_v_dim
        mixed, z, b, a = self._project(x)
        mixed = self._conv(mixed, meta, state)
        q, k, v = mixed.float().split([nk * dk, nk * dk, la.num_v_heads * dv], dim=-1)
        # Each key head serves `group` consecutive value heads.
        q = l2_normalize(q.view(t, nk, dk)).repeat_interleave(self.group, dim=1) * dk**-0.5
        k = l2_normalize(k.view(t, nk, dk)).repeat_interleave(self.group, dim=1)
        v = v.view(t, -1, dv)
        beta = b.float().sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        out = torch.empty_like(v)
        lin = meta.linear
        for s in lin.decode_steps:
            r = s.rows
            out[r], after = delta_rule_step(
                q[r], k[r], v[r], g[r], beta[r], state.recurrent[s.slots]
            )
            state.recurrent[s.slots] = after
            if s.keep is not None:
                which, rows = s.keep
                lin.scratch.recurrent[state.index, rows] = after[which]
        for p, slot, save in zip(meta.prefills, lin.prefill_slots, lin.saves()):
            # Split where a snapshot is saved: the state between the parts is the one to keep.
            cuts = [p.begin, p.end] if save is None else [p.begin, p.begin + save[0], p.end]
            for begin, end in zip(cuts, cuts[1:]):
                if begin == end:
                    continue
                rows = slice(begin, end)
                o, state.recurrent[slot] = delta_rule_prefill(
                    *(s[rows].transpose(0, 1) for s in (q, k, v, g, beta)),
                    state.recurrent[slot],
                )
                out[rows] = o.transpose(0, 1)
                if save is not None and end == p.begin + save[0]:
                    state.recurrent[save[1]] = state.recurrent[slot]
        out = self.norm(out.to(x.dtype), z)
        return self.tp.all_reduce(self.out_proj(out.reshape(t, -1)))
