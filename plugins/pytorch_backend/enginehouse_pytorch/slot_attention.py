"""Batched attention for transformers models over per-sequence KV slots.

transformers lets a model's attention layers call a registered attention function. Ours keeps
each sequence's keys and values in its own contiguous slot of a preallocated tensor per layer
and attends chunk by chunk, so one forward pass serves a whole engine step: prompts packed
without padding, decodes of many sequences, and prefill chunks that continue earlier ones.
The linear layers see every token at once, which is where batching pays.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from enginehouse import ScheduledBatch

ATTENTION_NAME = "enginehouse_slots"
ATTRIBUTE = "_enginehouse_slots"  # set on a model's modules: the storage their layers use
PLAIN_LAYERS = {"full_attention", "sliding_attention"}


@dataclass(frozen=True)
class Chunk:
    slot: int
    start: int  # position of the chunk's first token in its sequence
    offset: int  # index of its first token in the packed batch
    length: int


@dataclass(frozen=True)
class LayerKV:
    """What one attention layer receives per token: (heads, size) of its keys and of its
    values (sizes differ in multi-head latent attention; one head is multi-query)."""

    key: tuple[int, int]
    value: tuple[int, int]


class SlotKV:
    """K/V storage of shape [slots, heads, context, size] per attention layer."""

    def __init__(
        self,
        layers: Mapping[int, LayerKV],
        slots: int,
        context: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        def empty(heads: int, size: int) -> torch.Tensor:
            # torch.empty: pages are touched only when written, so unused slots cost no memory.
            return torch.empty((slots, heads, context, size), dtype=dtype, device=device)

        # By the modules' layer_idx: hybrid models may leave gaps.
        self.keys = {i: empty(*kv.key) for i, kv in layers.items()}
        self.values = {i: empty(*kv.value) for i, kv in layers.items()}
        # Positions below finite_upto[slot] hold written or zeroed values. Batched decoding
        # reads past a short row's end (masked out), and masked garbage must still not be
        # NaN: 0 * NaN is NaN.
        self.finite_upto = [0] * slots
        self.chunks: list[Chunk] = []

    def prepare(self, batch: ScheduledBatch, device: torch.device) -> None:
        """Index tensors for one step, shared by every layer. A sequence's slot is its only
        block (the runner's block size is the whole context)."""
        chunks, offset = [], 0
        for c in batch.chunks:
            chunks.append(Chunk(c.block_table[0], c.start_pos, offset, len(c.token_ids)))
            offset += len(c.token_ids)
        self.chunks = [c for c in chunks if c.length > 1]
        self.singles = [c for c in chunks if c.length == 1]  # decodes, mostly
        lengths = torch.tensor([c.length for c in chunks])
        self.token_slots = torch.tensor([c.slot for c in chunks]).repeat_interleave(lengths)
        self.token_slots = self.token_slots.to(device)
        self.token_positions = batch.positions.to(device)
        self.single_tokens = torch.tensor([c.offset for c in self.singles], device=device)
        self.single_slots = torch.tensor([c.slot for c in self.singles], device=device)
        self.single_lengths = torch.tensor([c.start + 1 for c in self.singles], device=device)
        self.span = max((c.start + 1 for c in self.singles), default=0)
        self._masks: dict[int | None, torch.Tensor] = {}
        for c in chunks:  # a sequence writes its slot from position 0 on, without gaps
            self.finite_upto[c.slot] = max(self.finite_upto[c.slot], c.start + c.length)
        self.to_zero = []
        if len(self.singles) > 1:
            for c in self.singles:
                if self.finite_upto[c.slot] < self.span:
                    self.to_zero.append((c.slot, self.finite_upto[c.slot], self.span))
                    self.finite_upto[c.slot] = self.span

    def _single_mask(self, window: int | None) -> torch.Tensor:
        """[rows, 1, 1, span]: each single token sees its own sequence's keys (in its window)."""
        if window not in self._masks:
            k_pos = torch.arange(self.span, device=self.single_lengths.device).unsqueeze(0)
            lengths = self.single_lengths.unsqueeze(1)
            mask = k_pos < lengths
            if window:
                mask &= k_pos >= lengths - window
            self._masks[window] = mask[:, None, None, :]
        return self._masks[window]

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None,
        window: int | None,
    ) -> torch.Tensor:
        """Store this step's K/V, then attend: all single tokens in one batched call (padded
        to the longest context and masked), longer chunks one by one over their slot."""
        keys, values = self.keys[layer], self.values[layer]
        keys[self.token_slots, :, self.token_positions] = key[0].transpose(0, 1)
        values[self.token_slots, :, self.token_positions] = value[0].transpose(0, 1)
        gqa = keys.shape[1] != query.shape[1]
        out = query.new_empty((*query.shape[:3], values.shape[-1]))
        if len(self.singles) == 1:  # one decode: attend over a view of its slot, no mask
            c = self.singles[0]
            first = _first_key(c, window)
            k = keys[c.slot : c.slot + 1, :, first : c.start + 1]
            v = values[c.slot : c.slot + 1, :, first : c.start + 1]
            out[:, :, c.offset : c.offset + 1] = _decode(
                query[:, :, c.offset : c.offset + 1], k, v, None, scaling
            )
        elif self.singles:
            for slot, start, end in self.to_zero:
                keys[slot, :, start:end].zero_()
                values[slot, :, start:end].zero_()
            q = query[0, :, self.single_tokens].transpose(0, 1).unsqueeze(2)
            # index_select on the sliced view copies rows far faster than advanced indexing.
            k = keys[:, :, : self.span].index_select(0, self.single_slots)
            v = values[:, :, : self.span].index_select(0, self.single_slots)
            o = _decode(q, k, v, self._single_mask(window), scaling)
            out[0, :, self.single_tokens] = o.squeeze(2).transpose(0, 1)
        for c in self.chunks:
            end, new = c.start + c.length, slice(c.offset, c.offset + c.length)
            first = _first_key(c, window)
            mask, causal = _mask(c, first, window, query.device)
            out[:, :, new] = F.scaled_dot_product_attention(
                query[:, :, new],
                keys[c.slot : c.slot + 1, :, first:end],
                values[c.slot : c.slot + 1, :, first:end],
                attn_mask=mask,
                is_causal=causal,
                scale=scaling,
                enable_gqa=gqa,
            )
        return out.transpose(1, 2).contiguous()


def _first_key(c: Chunk, window: int | None) -> int:
    """The earliest position the chunk's first token sees: all, or its sliding window."""
    return max(0, c.start - window + 1) if window else 0


def _decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scaling) -> torch.Tensor:
    """Attention of one query token per row: [rows, heads, 1, dim] over [rows, kv, len, dim]
    (values may have another size than keys).

    The query heads that share a KV head are folded into that head's query length, so no KV
    is repeated for grouped-query attention (transformers does the same for decoding).
    """
    rows, heads, _, dim = q.shape
    groups = heads // k.shape[1]
    folded = q.reshape(rows, k.shape[1], groups, dim)
    if mask is None:
        out = F.scaled_dot_product_attention(folded, k, v, scale=scaling)
    else:
        # With a padding mask, two matmuls beat SDPA's CPU kernel at one query per row.
        scores = torch.matmul(folded, k.transpose(-1, -2)) * (scaling or dim**-0.5)
        out = torch.matmul(scores.masked_fill(~mask, float("-inf")).softmax(dim=-1), v)
    return out.reshape(rows, heads, 1, v.shape[-1])


def _mask(c: Chunk, first: int, window: int | None, device: torch.device):
    """(mask, is_causal) for a chunk of several tokens: the causal flag for a whole short
    prompt (as transformers' own SDPA path does), else an explicit causal/window mask."""
    if c.start == 0 and (not window or c.length <= window):
        return None, True
    q_pos = torch.arange(c.start, c.start + c.length, device=device).unsqueeze(1)
    k_pos = torch.arange(first, c.start + c.length, device=device).unsqueeze(0)
    mask = k_pos <= q_pos
    if window:
        mask &= k_pos > q_pos - window
    return mask, False


def _attention(
    module: torch.nn.Module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: Any,
):
    slots: SlotKV = getattr(module, ATTRIBUTE)
    return slots.attend(module.layer_idx, query, key, value, scaling, sliding_window), None


def no_mask(*args: Any, **kwargs: Any) -> None:
    return None  # each chunk's mask is built in `_mask`


def register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, _attention)
    AttentionMaskInterface.register(ATTENTION_NAME, no_mask)


def attach(model: Any, slots: SlotKV) -> None:
    """Point every layer of `model` at `slots` and switch it to slot attention."""
    register()
    for module in model.modules():
        if hasattr(module, "layer_idx"):
            setattr(module, ATTRIBUTE, slots)
    model.set_attn_implementation(ATTENTION_NAME)
