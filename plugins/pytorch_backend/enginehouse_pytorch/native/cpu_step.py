"""A whole decode step on the CPU as one C++ call, for steps of a few rows.

At batch 1 a step reads every weight once and computes little with it, so what it costs beyond
the weights' memory traffic is overhead: nine ops per layer, each a trip through Python, the
module machinery and the dispatcher. `DecodeStep` hands all layers to `cpu_decode`'s
`decode_layers` at once (the same kernels, in the same order, with the same roundings as the
separate fused ops, so the numbers are the same). It applies to a dense decoder (a gated SiLU or
GELU-tanh MLP, rope over whole heads; q/k norms, Gemma's sandwich norms, embedding scale and
soft-caps allowed) with packed float32 or bfloat16 projections and the C++ paged attention
without sinks; mixtures of experts and sharded models keep the per-op path. Layers may sit in
several KV groups (sliding-window layers beside full ones, kv_cache.py): each layer reads its
group's slots, block tables and rope table. Speculative verify rows of one sequence go to the
attention together (`query_starts`: its K/V read once).
`DecodeRunner` goes one further for the runner: a decode-only batch goes from its chunks' integers
to float32 logits in one call (embedding rows, layers, head), skipping the step's metadata
tensors. Measurements: benchmarks/RESULTS.md, issues 14, 24 and 25.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import cpu_decode
from .attention import StepMeta
from .cpu_kernels import CpuPagedAttention
from .layers import GatedMLP, Linear

if TYPE_CHECKING:
    from enginehouse import ScheduledBatch

    from .model import DecoderLM, KVCache


def _bias(linear: Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().float().contiguous()


ACTIVATIONS = {"silu": False, "gelu_pytorch_tanh": True}  # name -> decode_layers' `gelu`


def _fits(model: DecoderLM) -> bool:
    """Every layer is one `decode_layers` handles: q/k/v attention over whole-head rope (q/k
    norms allowed, one soft-cap for every layer), a gated SiLU or GELU-tanh MLP (sandwich norms
    allowed), projections packed for small steps, the C++ paged attention without sinks."""
    arch = model.arch
    # A sharded model (tensor parallel) reduces partial sums between its projections, which
    # this call would skip.
    if model.tp.active or arch.mla is not None or arch.linear is not None:
        return False
    if arch.act not in ACTIVATIONS:
        return False
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        rope = arch.layer_rope(i)
        whole = (rope.rotary_dim or arch.head_dim) == arch.head_dim
        if not (whole and not attn.gated and isinstance(mlp, GatedMLP)):
            return False
        if attn.softcap != model.model.layers[0].self_attn.softcap:  # one cap for all layers
            return False
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if not all(type(m) is Linear and m.small is not None for m in linears):
            return False
        if not isinstance(attn.attn, CpuPagedAttention) or attn.attn.sinks is not None:
            return False
    return True


class DecodeStep:
    """The decoder's layers and final norm for a decode-only step of up to `SMALL_ROWS` rows."""

    def __init__(self, model: DecoderLM) -> None:
        weights: list[torch.Tensor | None] = []
        self.windows: list[int] = []
        self.groups: list[int] = []  # each layer's KV group (the runner sets `kv_group` first)
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for norm, pair in (
                (layer.input_layernorm, (attn.qkv_proj, attn.o_proj)),
                (layer.post_attention_layernorm, (mlp.gate_up_proj, mlp.down_proj)),
            ):
                weights.append(norm.weight.detach())
                for linear in pair:
                    weights += [linear.small, _bias(linear)]
            # Gemma: q/k norms, and the sandwich's norms before and after the MLP (or None).
            extra = [
                getattr(attn, "q_norm", None) if attn.qk_norm else None,
                getattr(attn, "k_norm", None) if attn.qk_norm else None,
                getattr(layer, "pre_feedforward_layernorm", None) if layer.sandwich else None,
                getattr(layer, "post_feedforward_layernorm", None) if layer.sandwich else None,
            ]
            weights += [None if norm is None else norm.weight.detach() for norm in extra]
            self.windows.append(attn.window or 0)
            self.groups.append(attn.kv_group)
        weights.append(model.model.norm.weight.detach())
        self.weights = weights
        first = model.model.layers[0].self_attn
        self.heads, self.kv_heads, _ = first.heads
        self.scale = first.attn.scale
        self.softcap = first.softcap or 0.0
        self.eps = model.model.norm.eps
        self.gelu = ACTIVATIONS[model.arch.act]
        self.embed_scale = model.arch.embed_scale or 0.0

    @staticmethod
    def applies(x: torch.Tensor, meta: StepMeta) -> bool:
        return not meta.prefills and x.shape[0] <= cpu_decode.SMALL_ROWS

    def __call__(self, x: torch.Tensor, meta: StepMeta, kv: list[KVCache]) -> torch.Tensor:
        caches = [t for pair in kv for t in pair]
        metas = meta.by_group or [meta]
        rows, d = x.shape[0], meta.cos.shape[-1]
        cos = torch.stack([m.cos.reshape(rows, d) for m in metas])
        sin = torch.stack([m.sin.reshape(rows, d) for m in metas])
        width = max(m.block_tables.shape[1] for m in metas)
        tables = torch.stack(
            [F.pad(m.block_tables, (0, width - m.block_tables.shape[1])) for m in metas]
        )
        return torch.ops.enginehouse_decode.decode_layers(
            x,
            self.weights,
            caches,
            cos,
            sin,
            torch.stack([m.slots for m in metas]),
            tables,
            meta.context_lens,
            meta.query_starts,
            self.groups,
            meta.block_size,
            self.heads,
            self.kv_heads,
            self.windows,
            self.eps,
            self.scale,
            self.softcap,
            self.gelu,
        )


def build(model: DecoderLM) -> DecodeStep | None:
    """The one-call step for `model`, or None where some layer needs the per-op path."""
    return DecodeStep(model) if _fits(model) else None


class DecodeRunner:
    """`NativeRunner.execute` for a batch of up to `SMALL_ROWS` plain decodes (one token each,
    logits wanted, no image rows, no multimodal positions): one `decode_logits` call from the
    chunks' integers, or None for the runner's ordinary path."""

    def __init__(self, runner) -> None:
        model: DecoderLM = runner.model
        self.runner = runner
        self.step = model.step
        self.embed = model.model.embed_tokens.weight.detach()
        self.head = model.lm_head.small
        self.vocab = model.lm_head.shards[-1]
        self.final_softcap = model.arch.final_softcap or 0.0
        # One rope table per KV group (Gemma 3's local layers have their own base).
        self.cos = [c.contiguous() for c, _ in runner.ropes]
        self.sin = [s.contiguous() for _, s in runner.ropes]
        self.groups = len(runner.caches)  # KV groups: a slot and a table per row in each

    def run(self, batch: ScheduledBatch) -> torch.Tensor | None:
        chunks = batch.chunks
        if batch.num_tokens > cpu_decode.SMALL_ROWS:
            return None
        bs, groups = batch.block_size, self.groups
        ids, positions, lens = [], [], []
        slots: list[list[int]] = [[] for _ in range(groups)]
        rows: list[list[tuple[int, ...]]] = [[] for _ in range(groups)]
        for c in chunks:
            plain = c.rope_positions is None and c.embeds is None
            every = c.logits_at == tuple(range(len(c.token_ids)))
            if not (plain and every and (c.is_decode or c.verify)):
                return None
            # A verify chunk's tokens are rows of their own, each over its own prefix, read
            # together by the attention (query_starts).
            n = len(c.token_ids)
            ids += c.token_ids
            positions += range(c.start_pos, c.end_pos)
            lens += range(c.start_pos + 1, c.end_pos + 1)
            for g in range(groups):
                slots[g] += c.slots(bs, g)
                rows[g] += [c.table(g)] * n
        width = max(len(t) for group in rows for t in group)
        tables = [b for group in rows for row in group for b in row + (0,) * (width - len(row))]
        step, runner = self.step, self.runner
        return torch.ops.enginehouse_decode.decode_logits(
            self.embed,
            ids,
            positions,
            [s for group in slots for s in group],
            tables,
            width,
            lens,
            query_starts(chunks),
            step.groups,
            self.cos,
            self.sin,
            step.embed_scale,
            step.weights,
            [t for pair in runner.kv for t in pair],
            self.head,
            self.vocab,
            bs,
            step.heads,
            step.kv_heads,
            step.windows,
            step.eps,
            step.scale,
            step.gelu,
            step.softcap,
            self.final_softcap,
        )


def query_starts(chunks) -> list[int]:
    """Each chunk's first row and the end, where some chunk is a verify chunk (its rows are
    attended together, their K/V read once); [] for plain decodes, one row each."""
    if not any(c.verify for c in chunks):
        return []
    starts = [0]
    for c in chunks:
        starts.append(starts[-1] + len(c.token_ids))
    return starts


def decode_runner(runner) -> DecodeRunner | None:
    """The one-call decode path for a CPU runner whose model has a `DecodeStep` and a plain
    head (packed for small steps, no bias); None otherwise."""
    model = getattr(runner, "model", None)
    if model is None or model.step is None:
        return None
    head = model.lm_head
    plain = type(head) is Linear and head.small is not None and head.bias is None
    if not plain or runner.cos.dim() != 2:
        return None
    return DecodeRunner(runner)
