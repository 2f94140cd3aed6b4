"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2) over a paged latent cache.

Per token, the layer projects the hidden state to a compressed latent (`kv_lora_rank` values,
then RMS-normalised) and one rope key (`qk_rope_head_dim`) that every head shares. The cache
keeps exactly that: one row of `kv_lora_rank + qk_rope_head_dim` values per token and layer,
no separate values (a cache group of kind "mla"; DeepSeek-V3: 576 values against 40960 for
the 128 heads' keys (192) and values (128) it stands for). Each head's key and value are
linear in the latent (`kv_b_proj` holds W_UK and W_UV per head): two equal ways to attend.
- prefill expands the chunk's context (its own rows, or with earlier context the rows read
  back from the cache) through `kv_b_proj` into per-head keys and values, and runs torch's
  fused attention: the same products as transformers, for the many query rows of a prompt;
- decode attends in latent space ("absorbed", as DeepSeek's own inference code does): each
  head's query is taken through W_UK (q_nope W_UK, [heads, kv_lora_rank]), scored against the
  cached latents plus the rope part, and the probability-weighted latent is taken through W_UV.
  A step reads the context once for all heads and never expands it, which a decode of one
  query row per sequence needs: expanding would cost heads * (nope + v) * kv_lora_rank per
  context token and step.
Rope covers the rope part of q and k only; DeepSeek's checkpoints rotate (even, odd) pairs
(V2 as complex numbers, V3 when `rope_interleave`), done here in transformers' de-interleaved
form (the same permutation on q and k leaves every score unchanged).

The C++ CPU kernels (cpu_kernels, cpu_decode, cpu_step) and the Triton kernels read K/V heads,
not latents: a model with MLA runs its attention in these torch ops on every device.
Sharded (tensor parallel), each rank holds its heads' slices of q_b_proj (or q_proj),
kv_b_proj and o_proj; the latent projection and the cache are the same on every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .arch import Arch
from .attention import Prefill, StepMeta
from .layers import Linear, RMSNorm
from .parallel import TensorParallel
from .rope import apply_rope

# transformers' DeepSeek builds q_a_layernorm and kv_a_layernorm with the RMSNorm default
# epsilon, not the config's rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def cache_bytes_per_token(arch: Arch, dtype: torch.dtype) -> int:
    """Bytes one token takes in the latent cache across all layers."""
    assert arch.mla is not None
    return arch.num_layers * arch.mla.cache_width * dtype.itemsize


def mha_bytes_per_token(arch: Arch, dtype: torch.dtype) -> int:
    """What the same model would cache as plain multi-head attention (keys of qk_head_dim and
    values of v_head_dim for every head): the figure MLA is compared with."""
    assert arch.mla is not None
    per_head = arch.mla.qk_head_dim + arch.mla.v_head_dim
    return arch.num_layers * arch.num_heads * per_head * dtype.itemsize


def allocate_cache(
    arch: Arch, num_slots: int, null_slot: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """One [num_slots, cache_width] tensor per layer; the null slot (padding reads it) zeroed."""
    assert arch.mla is not None
    cache = torch.empty(
        arch.num_layers, num_slots, arch.mla.cache_width, dtype=dtype, device=device
    )
    cache[:, null_slot].zero_()
    return list(cache.unbind(0))


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rope over (even, odd) pairs of x [tokens, heads, rotary_dim], returned de-interleaved
    (rotated evens, then rotated odds), as transformers' `apply_rotary_pos_emb_interleave`.
    `cos`/`signed_sin` are rows of `rope_table`, whose sin has its first half negated."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half], signed_sin[..., half:]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class LatentAttention(nn.Module):
    """`self_attn` of a DeepSeek layer; `cache` is this layer's [slots, cache_width] tensor."""

    def __init__(self, arch: Arch, tp: TensorParallel) -> None:
        super().__init__()
        mla = arch.mla
        assert mla is not None
        self.mla = mla
        self.tp = tp
        self.heads = h = tp.heads  # this rank's heads
        hidden = arch.hidden_size
        if mla.q_lora_rank is None:
            self.q_proj = Linear(hidden, [h * mla.qk_head_dim])
        else:
            self.q_a_proj = Linear(hidden, [mla.q_lora_rank], arch.qkv_bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(mla.q_lora_rank, [h * mla.qk_head_dim])
        self.kv_a_proj_with_mqa = Linear(hidden, [mla.cache_width], arch.qkv_bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(mla.kv_lora_rank, [h * (mla.qk_nope_head_dim + mla.v_head_dim)])
        self.o_proj = Linear(h * mla.v_head_dim, [hidden], arch.o_bias)
        self.scale = arch.scale
        self.interleave = arch.rope_interleave
        # kv_b_proj's weight per head, split (absorb): [heads, nope, lora] and [heads, v, lora].
        self.w_uk: torch.Tensor | None = None
        self.w_uv: torch.Tensor | None = None

    def absorb(self) -> None:
        """Keep W_UK and W_UV for the latent-space decode; called once the weights are in and
        before `Linear.pack` drops kv_b_proj's plain weight."""
        m = self.mla
        w = self.kv_b_proj.weight.detach()
        w = w.view(self.heads, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
        self.w_uk = w[:, : m.qk_nope_head_dim].contiguous()
        self.w_uv = w[:, m.qk_nope_head_dim :].contiguous()

    def _rotate(self, x: torch.Tensor, meta: StepMeta) -> torch.Tensor:
        if self.interleave:
            return rotate_pairs(x, meta.cos, meta.sin)
        return apply_rope(x, meta.cos, meta.sin)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.mla.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x: torch.Tensor, meta: StepMeta, cache: torch.Tensor) -> torch.Tensor:
        m, h, t = self.mla, self.heads, x.shape[0]
        q = self._query(x).view(t, h, m.qk_head_dim)
        q_nope, q_rope = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        q_rope = self._rotate(q_rope, meta)
        kv = self.kv_a_proj_with_mqa(x)
        latent = self.kv_a_layernorm(kv[:, : m.kv_lora_rank])
        k_rope = self._rotate(kv[:, None, m.kv_lora_rank :], meta)[:, 0]
        rows = torch.cat([latent, k_rope], dim=-1)  # what the cache keeps: [t, cache_width]
        cache.index_copy_(0, meta.slots, rows)
        b = meta.num_decode
        if not meta.prefills:
            out = self.decode(meta, q_nope, q_rope, cache)
        else:
            out = torch.empty(t, h * m.v_head_dim, dtype=x.dtype, device=x.device)
            if b:
                out[:b] = self.decode(meta, q_nope[:b], q_rope[:b], cache)
            for p in meta.prefills:
                out[p.begin : p.end] = self.prefill(p, q_nope, q_rope, rows, cache)
        return self.tp.all_reduce(self.o_proj(out))

    def decode(
        self, meta: StepMeta, q_nope: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor
    ) -> torch.Tensor:
        """One query row per sequence, attended in latent space (see the module docstring)."""
        m, h = self.mla, self.heads
        b, L = q_nope.shape[0], meta.decode_len
        context = cache.index_select(0, meta.decode_gather).view(b, L, m.cache_width)
        q_latent = torch.bmm(q_nope.transpose(0, 1), self.w_uk)  # [h, b, lora]
        query = torch.cat([q_latent.transpose(0, 1), q_rope], dim=-1)  # [b, h, width]
        scores = query @ context.transpose(1, 2) * self.scale  # [b, h, L]
        scores = scores + meta.decode_masks[None][0]  # [b, 1, L]: causal, padding
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
        out_latent = probs @ context[..., : m.kv_lora_rank]  # [b, h, lora]
        out = torch.bmm(out_latent.transpose(0, 1), self.w_uv.transpose(1, 2))  # [h, b, v]
        return out.transpose(0, 1).reshape(b, h * m.v_head_dim)

    def prefill(
        self,
        p: Prefill,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        rows: torch.Tensor,
        cache: torch.Tensor,
    ) -> torch.Tensor:
        """A prompt chunk over its context expanded into per-head keys and values: its own
        rows, or (earlier context, `p.context`) the latents read back from the cache."""
        m, h = self.mla, self.heads
        context = rows[p.begin : p.end] if p.context is None else cache.index_select(0, p.context)
        n, L = p.end - p.begin, context.shape[0]
        kv = self.kv_b_proj(context[:, : m.kv_lora_rank]).view(L, h, -1)
        k_nope, v = kv.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        k_rope = context[:, None, m.kv_lora_rank :].expand(L, h, m.qk_rope_head_dim)
        k = torch.cat([k_nope, k_rope], dim=-1)
        q = torch.cat([q_nope[p.begin : p.end], q_rope[p.begin : p.end]], dim=-1)
        mask = p.masks[None]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scale,
        )[0]
        return out.transpose(0, 1).reshape(n, h * m.v_head_dim)
