"""Proposals from a draft head on the target's hidden states (EAGLE-3, EAGLE, MTP), in the runner.

As in vLLM v1, the head lives beside the target (native_runner.py): every forward of the target
keeps, per sequence, the hidden states the head reads (EAGLE-3: the inputs of three layers,
concatenated; EAGLE and MTP: the last hidden state after the final norm) for the positions the
head has not taken in yet. `propose` (the engine asks before each step, `propose_tokens`) then
runs the head, per decoding sequence:
1. catch-up: the positions p the target computed since the head's last call, each with the
   target's hidden state at p and the embedding of token p + 1 (one chunk per sequence, the
   last one the sequence's newest token); its last row proposes the first token;
2. K - 1 more rounds, one row per sequence, each reading the head's own previous output as the
   hidden state and the token it proposed as the input: the next proposal.
Proposals are greedy (the target's verification keeps the output exact whatever they are).

The head's KV (one layer) lives in a paged cache of its own with the target's block tables:
slot s of the head's cache belongs to the token in slot s of the target's, so its size is one
layer's share of the target's cache (counted in `KVSpec.bytes_per_block`), prefix-cache hits
find the head's KV of a cached prompt there too, and blocks freed by the target are free for it.
The rounds' positions past the sequence's allocated blocks go to scratch blocks after the
target's (`max_batch_size` sequences times enough blocks for K tokens): nothing is kept there,
as the next call's catch-up writes the accepted positions again with the target's hidden states.
A prefix hit whose head KV was never written (the first sequence with that prompt never
proposed) reads stale rows there: acceptance may drop, the output stays exact.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from enginehouse.plugin_api import DraftRequest

from . import cpu_decode, mla
from .attention import StepMeta, decode_metadata, prefill_metadata
from .draft_heads import LoadedHead, load_head, read_tensor
from .kv_cache import allocate
from .rope import rope_table


@dataclasses.dataclass
class _Seq:
    """What the head keeps of one sequence: the target's hidden states from `start` on, and
    how far its own KV was written with the target's hidden states (`head_len`)."""

    start: int
    hidden: torch.Tensor
    head_len: int


class Drafter:
    """`active`: this rank runs the head (rank 0). The other ranks of a sharded target run
    the same per-op forward (the collectives must match) and keep nothing."""

    def __init__(self, runner: Any, method: str, folder: str | None, k: int, active: bool) -> None:
        self.method, self.k, self.active = method, k, active
        self.device, self.dtype = runner.device, runner.dtype
        self.block_size = runner.block_size
        self.max_seqs = runner.config.max_batch_size
        self.aux: tuple[int, ...] | None = None
        self.cache: Any = None
        self.seqs: dict[int, _Seq] = {}
        if active:
            self._load(runner, method, folder, k)

    def _load(self, runner: Any, method: str, folder: str | None, k: int) -> None:

        def make(build):
            default = torch.get_default_dtype()
            torch.set_default_dtype(self.dtype)
            try:
                with torch.device(self.device):
                    return build()
            finally:
                torch.set_default_dtype(default)

        loaded: LoadedHead = load_head(method, folder, runner.arch, runner.spec, make)
        self.head, self.arch = loaded.head, loaded.arch
        self.embed = None if loaded.embed is None else loaded.embed.to(self.device, self.dtype)
        self.aux = getattr(self.head, "aux", None)
        cos, sin = rope_table(self.arch, max(runner.context, 1) + k + 1)
        self.cos, self.sin = cos.to(self.device, self.dtype), sin.to(self.device, self.dtype)
        # Sharded, the target's embedding and head hold this rank's part of the vocabulary:
        # the head reads whole copies (its own rank runs it alone, no collective).
        self.target_embed = self.target_head = None
        if runner.tp.active:
            files = [runner.spec.path / f for f in runner.spec.weight_files]
            files = [f for f in files if f.suffix == ".safetensors"]
            embed = read_tensor(files, "model.embed_tokens.weight")
            self.target_embed = embed.to(self.device, self.dtype)
            if getattr(self.head, "reads_target_head", False):  # EAGLE's, Qwen's MTP
                head = embed if runner.arch.tie_embeddings else read_tensor(files, "lm_head.weight")
                self.target_head = head.to(self.device, self.dtype)

    # --- the cache --------------------------------------------------------------------------

    def bytes_per_token(self) -> int:
        a = self.arch
        if a.mla is not None:
            return a.mla.cache_width * self.dtype.itemsize
        return 2 * a.num_kv_heads * a.head_dim * self.dtype.itemsize

    def allocate(self, num_blocks: int) -> None:
        """The head's cache: the target's blocks, then scratch blocks for the rounds."""
        if not self.active:
            return
        per_seq = math.ceil((self.k + 1) / self.block_size) + 1
        self.scratch = num_blocks
        blocks = num_blocks + self.max_seqs * per_seq
        self.per_seq = per_seq
        a = self.arch
        if a.mla is not None:
            null = blocks * self.block_size
            one = dataclasses.replace(a, num_layers=1)
            self.cache = mla.allocate_cache(one, null + 2, null, self.dtype, self.device)[0]
            self.null_slot, self.layout = null, {"kv_heads": 1, "num_slots": null + 2}
            return
        (group,) = allocate(
            [(None, (0,))],
            [blocks],
            self.block_size,
            a.num_kv_heads,
            a.head_dim,
            self.dtype,
            self.device,
        )
        self.cache = group.layer(0)
        self.null_slot, self.layout = group.null_slot, group.layout

    # --- the target's forward: keep the hidden states the head reads -------------------------

    def target_forward(self, model: Any, ids, meta: StepMeta, kv, embeds) -> torch.Tensor:
        """The target's forward in per-op form (`DecoderLM.forward` without its one-call
        step, which keeps nothing), returning its final hidden states; the rows the head reads
        are kept in `self.captured`."""
        x = model.tp.embed(model.model.embed_tokens.weight, ids)
        if model.arch.embed_scale is not None:
            x = x * torch.tensor(model.arch.embed_scale, dtype=x.dtype)
        if embeds is not None:
            x[embeds[0]] = embeds[1]
        wanted = self.aux if self.aux is not None and self.active else ()
        aux: dict[int, torch.Tensor] = {}
        if model.fused:  # cpu_decode's fused ops: each residual add inside the next norm
            delta = None
            for i, (layer, cache) in enumerate(zip(model.model.layers, kv)):
                if i in wanted:  # a new tensor: `x` is updated in place by the next norm
                    aux[i] = x.clone() if delta is None else x + delta
                x, delta = layer.forward_fused(x, delta, meta, cache)
            norm = model.model.norm
            out = cpu_decode.add_rms_norm(x, delta, norm.weight, norm.eps)  # x += delta
        else:
            for i, (layer, cache) in enumerate(zip(model.model.layers, kv)):
                if i in wanted:
                    aux[i] = x
                x = layer(x, meta, cache)
            out = model.model.norm(x)
        if len(kv) in wanted:
            aux[len(kv)] = x
        if self.active:
            self.captured = out if self.aux is None else torch.cat([aux[i] for i in self.aux], -1)
        return out

    def observe(self, order: Sequence[Any]) -> None:
        """Keep each chunk's rows of `captured` under its sequence (positions start_pos ...);
        a chunk that starts before what is kept (rejected proposals, a recompute) replaces it."""
        if not self.active:
            return
        at = 0
        for c in order:
            n = len(c.token_ids)
            rows = self.captured[at : at + n]
            at += n
            s = self.seqs.get(c.seq_id)
            if s is None or not s.start <= c.start_pos <= s.start + len(s.hidden):
                head_len = c.start_pos if s is None else min(s.head_len, c.start_pos)
                self.seqs[c.seq_id] = _Seq(c.start_pos, rows.clone(), head_len)
                continue
            keep = s.hidden[: c.start_pos - s.start]
            s.hidden = torch.cat([keep, rows])
            s.head_len = min(s.head_len, c.start_pos)
        self.captured = None

    def finish(self, seq_id: int) -> None:
        self.seqs.pop(seq_id, None)

    # --- proposals --------------------------------------------------------------------------

    @torch.inference_mode()
    def propose(self, model: Any, requests: Sequence[DraftRequest]) -> list[list[int]]:
        """Up to `num_drafts` tokens for each request (none where the head has not seen the
        sequence's last computed position)."""
        out: list[list[int]] = [[] for _ in requests]
        if not self.active:
            return out
        self._bind(model)
        work = self._plan(requests)
        if not work:
            return out
        tokens, hidden = self._catch_up(work)
        for (i, *_), t in zip(work, tokens):
            out[i].append(t)
        # The rounds: one row per sequence that wants more, reading the head's own output.
        for j in range(1, max(r.num_drafts for _, r, _ in work)):
            live = [w for w, (_, r, _) in enumerate(work) if j < r.num_drafts]
            chunks = [(work[w][1].num_computed - 1 + j, 1, work[w][2]) for w in live]
            index = torch.tensor(live, device=self.device)
            inputs = [out[work[w][0]][-1] for w in live]
            rows, last = self._run(chunks, inputs, hidden[index])
            hidden = hidden.clone()
            hidden[index] = last
            for w, t in zip(live, self.head.propose(rows, self.target_logits).tolist()):
                out[work[w][0]].append(t)
        return out

    def _bind(self, model: Any) -> None:
        """The target's embedding table and logits as the head reads them (whole copies when
        the target is sharded)."""
        self.embed_table = self.embed
        if self.embed_table is None:
            self.embed_table = self.target_embed
        if self.embed_table is None:
            self.embed_table = model.model.embed_tokens.weight
        head = self.target_head
        self.target_logits = model.logits if head is None else (lambda rows: rows @ head.T)

    def _plan(self, requests: Sequence[DraftRequest]) -> list[tuple[int, DraftRequest, tuple]]:
        """(index, request, block table with this call's scratch blocks) of each request the
        head can answer: it holds the hidden state of the last computed position."""
        work = []
        for i, r in enumerate(requests[: self.max_seqs]):
            s = self.seqs.get(r.seq_id)
            if s is None or r.num_drafts <= 0:
                continue
            if not s.start < r.num_computed <= s.start + len(s.hidden):
                continue
            scratch = self.scratch + len(work) * self.per_seq
            work.append(
                (i, r, tuple(r.block_table) + tuple(range(scratch, scratch + self.per_seq)))
            )
        return work

    def _catch_up(self, work: list) -> tuple[list[int], torch.Tensor]:
        """The head over the positions the target computed since its last call (at least the
        last one), one chunk per sequence: the first proposals, and the hidden state each
        sequence's next round reads."""
        chunks, hidden, tokens = [], [], []
        for _, r, table in work:
            s = self.seqs[r.seq_id]
            first = max(min(s.head_len, r.num_computed - 1), s.start)
            hidden.append(s.hidden[first - s.start : r.num_computed - s.start])
            tokens.extend(r.token_ids[first + 1 : r.num_computed + 1])
            chunks.append((first, r.num_computed - first, table))
            # The head's KV holds the computed positions now; the last one's hidden state is
            # kept, for a next call that finds nothing new.
            keep = r.num_computed - 1
            s.hidden, s.start, s.head_len = s.hidden[keep - s.start :], keep, r.num_computed
        rows, last = self._run(chunks, tokens, self.head.first_hidden(torch.cat(hidden)))
        ends = torch.tensor([n for _, n, _ in chunks]).cumsum(0).to(self.device) - 1
        return self.head.propose(rows[ends], self.target_logits).tolist(), last[ends]

    def _run(
        self, chunks: list[tuple[int, int, tuple[int, ...]]], tokens: list[int], hidden
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The head over `chunks` (start position, length, block table), packed in order."""
        ids = torch.tensor(tokens, device=self.device)
        embeds = self.embed_table[ids]
        return self.head(embeds, hidden, self._meta(chunks), self.cache)

    def _meta(self, chunks: list[tuple[int, int, tuple[int, ...]]]) -> StepMeta:
        """The step metadata of the head's chunks: single-token ones as decode rows (they come
        first: `_run`'s callers order them so), longer ones as prefill chunks."""
        bs = self.block_size
        positions = [p for start, n, _ in chunks for p in range(start, start + n)]
        slots = [t[p // bs] * bs + p % bs for s, n, t in chunks for p in range(s, s + n)]
        pos = torch.tensor(positions, device=self.device)
        decodes = [c for c in chunks if c[1] == 1]
        meta = StepMeta(
            num_decode=len(decodes) if len(decodes) == len(chunks) else 0,
            slots=torch.tensor(slots, device=self.device),
            cos=self.cos[pos][:, None],
            sin=self.sin[pos][:, None],
        )
        if meta.num_decode:
            tables = [t for _, _, t in chunks]
            lens = [start + 1 for start, _, _ in chunks]
            decode_metadata(
                meta, tables, lens, bs, {None}, self.device, self.null_slot, **self.layout
            )
            return meta
        offset = 0
        for start, n, table in chunks:
            meta.prefills.append(
                prefill_metadata(
                    (offset, offset + n), start, table, bs, {None}, self.device, **self.layout
                )
            )
            offset += n
        return meta
