"""The native decoder: every supported family is this model with its `Arch` switches.

Checkpoint names are kept (model.layers.N.self_attn..., lm_head) except where projections are
fused (`qkv_proj`, `gate_up_proj`, the experts' `w13`/`w2`); `weights.py` maps the rest.
"""

from __future__ import annotations

import torch
from torch import nn

from . import cpu_decode, cpu_step
from .arch import Arch
from .attention import StepMeta, TorchAttention
from .deepseek_moe import SharedExpertsMoE
from .gpt_oss import GptOssMoE
from .layers import GatedMLP, Linear, MixtureOfExperts, RMSNorm, empty
from .linear_attention import GatedDeltaNet
from .mla import LatentAttention
from .parallel import TensorParallel
from .rope import apply_rope

KVCache = tuple[torch.Tensor, torch.Tensor]
Embeds = tuple[torch.Tensor, torch.Tensor]  # packed rows, and the embeddings that replace them


class Attention(nn.Module):
    def __init__(
        self, arch: Arch, layer: int, kernel: type[TorchAttention], tp: TensorParallel
    ) -> None:
        super().__init__()
        h, kvh, d = tp.heads, tp.kv_heads, arch.head_dim  # this rank's heads
        self.tp = tp
        # Qwen3-Next's q_proj makes each head's query and its output gate side by side.
        self.gated = arch.attn_output_gate
        self.sizes = [(2 if self.gated else 1) * h * d, kvh * d, kvh * d]
        self.qkv_proj = Linear(arch.hidden_size, self.sizes, arch.qkv_bias)
        self.o_proj = Linear(h * d, [arch.hidden_size], arch.o_bias)
        if arch.qk_norm:
            # Gemma 3's q/k norms scale by (1 + weight) as its other norms do; Qwen3's do not.
            self.q_norm = RMSNorm(d, arch.rms_norm_eps, arch.norm_plus_one)
            self.k_norm = RMSNorm(d, arch.rms_norm_eps, arch.norm_plus_one)
        self.heads = (h, kvh, d)
        self.window = arch.window(layer)
        self.softcap = arch.attn_softcap
        self.qk_norm = arch.qk_norm
        self.attn = kernel(h, kvh, d, arch.scale)
        if arch.sinks:  # gpt-oss; handed to the kernel by DecoderLM.finish_loading
            self.sinks = empty(h)
        self.fused_rope = False  # set by DecoderLM.finish_loading
        self.kv_group = 0  # the runner's KV group of this layer: its step metadata and rope

    def forward(self, x: torch.Tensor, meta: StepMeta, cache: KVCache) -> torch.Tensor:
        meta = meta.group(self.kv_group)
        if self.gated:
            return self.forward_gated(x, meta, cache)
        h, kvh, d = self.heads
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        v = qkv[:, (h + kvh) * d :].view(t, kvh, d)
        if self.qk_norm:
            q, k = qkv[:, : h * d].view(t, h, d), qkv[:, h * d : (h + kvh) * d].view(t, kvh, d)
            q, k = (
                apply_rope(self.q_norm(q), meta.cos, meta.sin),
                apply_rope(self.k_norm(k), meta.cos, meta.sin),
            )
        else:
            # q and k side by side are one tensor of h + kvh heads: rotate them in one go.
            qk = apply_rope(qkv[:, : (h + kvh) * d].view(t, h + kvh, d), meta.cos, meta.sin)
            q, k = qk[:, :h], qk[:, h:]
        out = self.attn(meta, q, k, v, cache, self.window, self.softcap)
        return self.tp.all_reduce(self.o_proj(out))

    def forward_gated(self, x: torch.Tensor, meta: StepMeta, cache: KVCache) -> torch.Tensor:
        """Qwen3-Next's gated attention: the output times sigmoid of a per-head gate."""
        h, kvh, d = self.heads
        t = x.shape[0]
        q_gate, k, v = self.qkv_proj(x).split(self.sizes, dim=1)
        q, gate = q_gate.view(t, h, 2 * d).chunk(2, dim=-1)
        q = apply_rope(self.q_norm(q), meta.cos, meta.sin)
        k = apply_rope(self.k_norm(k.view(t, kvh, d)), meta.cos, meta.sin)
        out = self.attn(meta, q, k, v.view(t, kvh, d), cache, self.window, self.softcap)
        out = out * torch.sigmoid(gate.reshape(t, h * d))
        return self.tp.all_reduce(self.o_proj(out))

    def forward_fused(self, x: torch.Tensor, meta: StepMeta, cache: KVCache) -> torch.Tensor:
        """`forward` with rope and the K/V store as one C++ op."""
        meta = meta.group(self.kv_group)
        h, kvh, d = self.heads
        qkv = self.qkv_proj(x)
        if meta.prefills:  # a prefill attends over its own K/V: rotated in place in qkv
            t = qkv.shape[0]
            cpu_decode.rope_store(qkv, meta.cos, meta.sin, cache, meta.slots, h, kvh, True)
            q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=1)
            q, k, v = q.view(t, h, d), k.view(t, kvh, d), v.view(t, kvh, d)
            out = self.attn.attend(meta, q, k, v, cache, self.window, self.softcap)
        else:
            q = cpu_decode.rope_store(qkv, meta.cos, meta.sin, cache, meta.slots, h, kvh)
            out = self.attn.decode(meta, q, cache, self.window, self.softcap)
        return self.tp.all_reduce(self.o_proj(out))


class DecoderLayer(nn.Module):
    def __init__(
        self, arch: Arch, layer: int, kernel: type[TorchAttention], tp: TensorParallel
    ) -> None:
        super().__init__()
        eps, plus_one = arch.rms_norm_eps, arch.norm_plus_one
        # Hybrid models: a linear-attention layer keeps a state slot instead of KV.
        self.linear = arch.is_linear_layer(layer)
        if self.linear:
            self.linear_attn = GatedDeltaNet(arch, tp)
        elif arch.mla is not None:  # DeepSeek: attention over a latent cache, in torch ops
            self.self_attn = LatentAttention(arch, tp)
        else:
            self.self_attn = Attention(arch, layer, kernel, tp)
        if arch.moe is not None and arch.moe.swiglu is not None:  # gpt-oss's mixture
            self.mlp = GptOssMoE(arch.hidden_size, arch.moe, tp)
        elif arch.is_moe_layer(layer) and arch.moe.routing is not None:  # DeepSeek's mixture
            self.mlp = SharedExpertsMoE(arch.hidden_size, arch.moe, arch.act, arch.mlp_bias, tp)
        elif arch.is_moe_layer(layer):
            self.mlp = MixtureOfExperts(arch.hidden_size, arch.moe, arch.act, tp)
        else:
            inter = tp.intermediate(arch.intermediate_size)
            self.mlp = GatedMLP(arch.hidden_size, inter, arch.act, arch.mlp_bias, tp)
        self.input_layernorm = RMSNorm(arch.hidden_size, eps, plus_one)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, eps, plus_one)
        self.sandwich = arch.sandwich_norm
        if arch.sandwich_norm:
            # Gemma 2: post_attention_layernorm normalises the attention output; the MLP has
            # its own norms before and after.
            self.pre_feedforward_layernorm = RMSNorm(arch.hidden_size, eps, plus_one)
            self.post_feedforward_layernorm = RMSNorm(arch.hidden_size, eps, plus_one)

    def forward(self, x: torch.Tensor, meta: StepMeta, cache: KVCache) -> torch.Tensor:
        mixer = self.linear_attn if self.linear else self.self_attn
        attn = mixer(self.input_layernorm(x), meta, cache)
        if self.sandwich:
            x = x + self.post_attention_layernorm(attn)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(
        self, x: torch.Tensor, delta: torch.Tensor | None, meta: StepMeta, cache: KVCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` through `cpu_decode`'s fused ops: each residual add happens inside the
        next norm (`x` is updated in place), so the layer returns its MLP output unadded."""
        norm, post = self.input_layernorm, self.post_attention_layernorm
        h = cpu_decode.add_rms_norm(x, delta, norm.weight, norm.eps)
        if not self.self_attn.fused_rope:
            attn = self.self_attn(h, meta, cache)
        else:
            attn = self.self_attn.forward_fused(h, meta, cache)
        return x, self.mlp(cpu_decode.add_rms_norm(x, attn, post.weight, post.eps))


class Body(nn.Module):
    """`model.*` in the checkpoint: embeddings, layers, final norm."""

    def __init__(self, arch: Arch, kernel: type[TorchAttention], tp: TensorParallel) -> None:
        super().__init__()
        self.embed_tokens = nn.Module()
        self.embed_tokens.weight = empty(tp.vocab, arch.hidden_size)  # this rank's vocabulary
        self.layers = nn.ModuleList(
            DecoderLayer(arch, i, kernel, tp) for i in range(arch.num_layers)
        )
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, arch.norm_plus_one)


class DecoderLM(nn.Module):
    """`kernel` is the attention implementation: torch ops, or the GPU's Triton kernels.
    `tp` is this rank's place when the model is sharded (`parallel.py`)."""

    def __init__(
        self,
        arch: Arch,
        kernel: type[TorchAttention] = TorchAttention,
        tp: TensorParallel | None = None,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.tp = tp = tp or TensorParallel(arch)
        self.model = Body(arch, kernel, tp)
        self.fused = False  # set by finish_loading
        self.step: cpu_step.DecodeStep | None = None  # all layers in one C++ call (CPU decode)
        self.lm_head = Linear(arch.hidden_size, [tp.vocab])
        if arch.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def finish_loading(self, pack: bool = False, fused: bool = False) -> None:
        """After the weights are in: fold Gemma's norm offsets into the weights, and with
        `pack` (CPU) hand every projection to oneDNN (see `Linear.pack`). A tied head is
        packed from the embedding, which stays as it is for the lookup. `fused` (CPU, the
        `cpu_decode` kernels built): small steps use its products and fused ops."""
        # MLA's and linear attention's layers keep the per-op torch path: cpu_decode's fused
        # ops and cpu_step's one-call decode know only q/k/v heads (mla.py, linear_attention.py).
        arch = self.arch
        self.fused = fused and not arch.sandwich_norm and arch.mla is None and arch.linear is None
        for m in self.modules():
            if isinstance(m, LatentAttention):
                m.absorb()  # before its kv_b_proj is packed (pre-order: parents come first)
            if isinstance(m, RMSNorm):
                m.fold()
            elif pack and isinstance(m, Linear):
                m.pack(small_rows=fused)
            elif isinstance(m, Attention):
                # rope over whole heads, no q/k norm in between: one op with the K/V store
                rotary = self.arch.rope.rotary_dim or self.arch.head_dim
                m.fused_rope = self.fused and not m.qk_norm and rotary == self.arch.head_dim
                if self.arch.sinks:
                    m.attn.sinks = m.sinks
            elif isinstance(m, GatedMLP):
                m.fused = self.fused
        self.step = cpu_step.build(self)

    def forward(
        self,
        input_ids: torch.Tensor,
        meta: StepMeta,
        kv: list[KVCache],
        embeds: Embeds | None = None,
    ) -> torch.Tensor:
        x = self.tp.embed(self.model.embed_tokens.weight, input_ids)
        if self.arch.embed_scale is not None:
            # Gemma multiplies by the scale rounded to the weights' dtype, as its reference does.
            x = x * torch.tensor(self.arch.embed_scale, dtype=x.dtype)
        if embeds is not None:  # image positions of a VLM prompt take the vision embeddings
            x[embeds[0]] = embeds[1]
        if self.step is not None and self.step.applies(x, meta):
            return self.step(x, meta, kv)
        if self.fused:
            delta = None
            for layer, cache in zip(self.model.layers, kv):
                x, delta = layer.forward_fused(x, delta, meta, cache)
            norm = self.model.norm
            return cpu_decode.add_rms_norm(x, delta, norm.weight, norm.eps)
        for layer, cache in zip(self.model.layers, kv):
            x = layer(x, meta, cache)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp.gather_logits(self.lm_head(hidden))
        cap = self.arch.final_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
