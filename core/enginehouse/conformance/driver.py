"""Drives a runner the way the engine does, one hand-built `ScheduledBatch` at a time.

The engine decides which sequence runs with which, when a prompt is split and which blocks a
sequence gets; the contract checks need to choose those themselves, so this module plays the
scheduler and the block manager on a small scale: block tables, chunks, `release_sequence`
before a sequence's blocks are reused, greedy tokens. Blocks are handed out shuffled, and freed
ones again first (last in, first out), so a runner that reads a block it no longer owns reads
someone else's KV.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ..runner import ModelRunner, ScheduledBatch, SeqChunk, capabilities_of
from .result import Mismatch, NotApplicable


@dataclass
class Seq:
    """One sequence as the driver tracks it: its tokens, blocks and the logits it was given."""

    seq_id: int
    tokens: list[int]
    num_prompt: int
    label: str
    blocks: list[int] = field(default_factory=list)
    computed: int = 0
    rows: list[torch.Tensor] = field(default_factory=list)  # logits of each generated token

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.num_prompt :]


class Driver:
    """Hand-made steps over a runner whose KV cache holds `num_blocks` blocks."""

    def __init__(
        self,
        runner: ModelRunner,
        num_blocks: int,
        vocab_size: int,
        banned: Iterable[int] = (),
        shuffled: bool = True,
    ) -> None:
        self.runner = runner
        self.block_size = runner.kv_spec.block_size
        self.vocab_size = vocab_size
        # Shuffled, a runner that assumes a sequence's blocks are contiguous (block_table[0] *
        # block_size + position) reads the wrong slots. References are computed unshuffled, on
        # blocks 0, 1, 2, ... as a fresh engine hands them out, where such a runner is right.
        self.free = list(range(num_blocks - 1, -1, -1))  # pop() takes block 0 first
        if shuffled:
            random.Random(num_blocks).shuffle(self.free)
        self.banned = sorted(banned)  # never picked greedily (EOS, as min_new_tokens does)
        self._ids = itertools.count(10_000)  # apart from the engine's own ids, which start at 0

    def new(self, prompt: Sequence[int], label: str, seq_id: int | None = None) -> Seq:
        sid = next(self._ids) if seq_id is None else seq_id
        return Seq(sid, list(prompt), len(prompt), label)

    def take(self, n: int) -> list[int]:
        if n > len(self.free):
            raise NotApplicable(
                f"the kit's sequences need {n} more KV blocks than the {len(self.free)} free; "
                "give the engine more KV memory (kv_cache_memory) or a smaller block_size"
            )
        return [self.free.pop() for _ in range(n)]

    def chunk(self, seq: Seq, n: int | None = None, logits_at: Sequence[int] | None = None):
        """The next `n` uncomputed tokens of `seq` (all of them by default) as a `SeqChunk`.
        Without `logits_at`, logits are asked at the last token only when it ends the known
        tokens, as the engine asks."""
        n = len(seq.tokens) - seq.computed if n is None else n
        end = seq.computed + n
        seq.blocks += self.take(math.ceil(end / self.block_size) - len(seq.blocks))
        if logits_at is None:
            logits_at = (n - 1,) if end == len(seq.tokens) else ()
        return SeqChunk(
            seq_id=seq.seq_id,
            token_ids=tuple(seq.tokens[seq.computed : end]),
            start_pos=seq.computed,
            block_table=tuple(seq.blocks),
            logits_at=tuple(logits_at),
        )

    def step(self, pairs: Sequence[tuple[Seq, SeqChunk]]) -> list[torch.Tensor]:
        """Run one batch; returns each chunk's logits rows. A chunk whose last token ends its
        sequence's known tokens appends the greedy next token, as the engine samples."""
        batch = ScheduledBatch(tuple(c for _, c in pairs), self.block_size)
        logits = self.runner.execute(batch)
        check_logits(logits, batch, self.vocab_size)
        out, row = [], 0
        for seq, chunk in pairs:
            rows = logits[row : row + len(chunk.logits_at)].detach().float().cpu()
            row += len(chunk.logits_at)
            seq.computed = chunk.end_pos
            last = len(chunk.token_ids) - 1
            if chunk.end_pos == len(seq.tokens) and chunk.logits_at[-1:] == (last,):
                seq.rows.append(rows[-1])
                seq.tokens.append(self.pick(rows[-1]))
            out.append(rows)
        return out

    def pick(self, row: torch.Tensor) -> int:
        if self.banned:
            row = row.clone()
            row[self.banned] = -math.inf
        return int(row.argmax())

    def release(self, seq: Seq, keep: int = 0, finished: bool = True) -> list[int]:
        """The engine's order: `release_sequence` (and `finish_sequence` when the sequence is
        gone for good), where the runner declares them, then the blocks go back (the first
        `keep` stay out of the free list, as prefix-cached blocks do). Returns the kept
        blocks."""
        caps = capabilities_of(self.runner)
        if caps.releases_sequences:
            self.runner.release_sequence(seq.seq_id, tuple(seq.blocks))  # type: ignore[attr-defined]
        if finished and caps.finishes_sequences:
            self.runner.finish_sequence(seq.seq_id)  # type: ignore[attr-defined]
        kept, freed = seq.blocks[:keep], seq.blocks[keep:]
        self.give(freed)
        seq.blocks, seq.computed = [], 0
        return kept

    def give(self, blocks: Sequence[int]) -> None:
        self.free.extend(reversed(blocks))  # the tail is handed out first, as freed last

    # --- whole generations -------------------------------------------------------------------

    def alone(self, prompt: Sequence[int], n: int, label: str) -> Seq:
        """`n` greedy tokens after `prompt`, the sequence alone in every step."""
        seq = self.new(prompt, label)
        while len(seq.generated) < n:
            self.step([(seq, self.chunk(seq))])
        self.release(seq)
        return seq

    def together(self, prompts: Sequence[Sequence[int]], n: int, labels: Sequence[str]):
        """Every prompt prefilled in one step, then decoded together."""
        seqs = [self.new(p, label) for p, label in zip(prompts, labels)]
        while len(seqs[0].generated) < n:
            self.step([(s, self.chunk(s)) for s in seqs])
        for s in seqs:
            self.release(s)
        return seqs

    def staggered(self, prompts: Sequence[Sequence[int]], n: int, labels: Sequence[str]):
        """One new prompt admitted per step while the earlier ones decode (prefills and
        decodes in one batch, every batch different)."""
        seqs = [self.new(p, label) for p, label in zip(prompts, labels)]
        running: list[Seq] = []
        waiting = list(seqs)
        while running or waiting:
            if waiting:
                running.append(waiting.pop(0))
            self.step([(s, self.chunk(s)) for s in running])
            for s in [s for s in running if len(s.generated) >= n]:
                running.remove(s)
                self.release(s)
        return seqs


def check_logits(logits: object, batch: ScheduledBatch, vocab_size: int) -> None:
    """`execute`'s promise: float logits [len(batch.logits_indices), vocab_size]."""
    rows = len(batch.logits_indices)
    if not isinstance(logits, torch.Tensor):
        raise Mismatch(f"execute returned a {type(logits).__name__}, not a torch.Tensor")
    if tuple(logits.shape) != (rows, vocab_size):
        asked = ", ".join(f"seq {c.seq_id}: {list(c.logits_at)}" for c in batch.chunks)
        raise Mismatch(
            f"execute returned logits of shape {tuple(logits.shape)} for a batch asking "
            f"{rows} rows ({asked}); expected ({rows}, {vocab_size})"
        )
    if not logits.is_floating_point():
        raise Mismatch(f"execute returned {logits.dtype} logits; they must be a float dtype")
    if rows and not bool(torch.isfinite(logits).all()):
        raise Mismatch("execute returned NaN or infinite logits")
