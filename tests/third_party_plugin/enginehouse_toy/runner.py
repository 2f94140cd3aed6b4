"""`ToyRunner`: a deterministic "checker" model that really uses the paged KV cache.

Its KV cache stores token ids, one int64 slot per token. Every next token is a function of the
whole context, read back from the cache through the block table the engine hands over, so a
block table that points at the wrong, unwritten or overwritten slots yields a wrong token (the
tests compare against `reference_next`) or, where the runner can tell, a `RuntimeError`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from enginehouse.plugin_api import (
    EngineConfig,
    KVSpec,
    ModelSpec,
    RunnerCapabilities,
    ScheduledBatch,
    SeqChunk,
    kv_slot,
)

EMPTY = -1  # a slot nothing has written yet
TOP_LOGIT = 10.0  # the reference token: a clear margin over everything else
SECOND_LOGIT = 9.0  # a runner-up likely enough that sampling visibly differs from greedy


def reference_next(ctx: Sequence[int], vocab_size: int) -> int:
    """The greedy next token after `ctx`: depends on every token and its position."""
    return (sum((i + 1) * t for i, t in enumerate(ctx)) * 31 + len(ctx)) % vocab_size


def reference_logits(ctx: Sequence[int], vocab_size: int) -> torch.Tensor:
    """One row of `execute`'s output: `reference_next` on top, a runner-up, the rest at 0."""
    top = reference_next(ctx, vocab_size)
    logits = torch.zeros(vocab_size)
    logits[top] = TOP_LOGIT
    # An offset of 1..vocab_size-1, so the runner-up is never the top token itself.
    logits[(top + 1 + len(ctx) % (vocab_size - 1)) % vocab_size] = SECOND_LOGIT
    return logits


class ToyRunner:
    # It keeps, per sequence, the tokens it computed: dropped when the blocks are freed.
    capabilities = RunnerCapabilities(releases_sequences=True)

    def __init__(self, spec: ModelSpec, config: EngineConfig) -> None:
        self.vocab_size = int(spec.config["vocab_size"])
        block_size = config.block_size
        if block_size is None:  # the user did not choose: the model's own, or 4
            block_size = int(spec.config.get("block_size", 4))
        # One int64 per token: bytes_per_block lets the engine size the cache from a budget.
        self.kv_spec = KVSpec(
            block_size=block_size, bytes_per_block=block_size * 8, prefix_caching=True
        )
        self.storage = torch.empty(0, dtype=torch.long)
        # Tokens each sequence has itself computed, by position: what its cache must hold.
        # Dropped when the engine releases the sequence (`release_sequence`).
        self._seen: dict[int, dict[int, int]] = {}
        self.released: list[int] = []  # sequence ids, in the order the engine released them

    def load(self, progress: bool = True) -> None:
        pass  # no weights

    def allocate_kv(self, num_blocks: int) -> None:
        self.storage = torch.full((num_blocks * self.kv_spec.block_size,), EMPTY, dtype=torch.long)

    def close(self) -> None:
        self.storage = torch.empty(0, dtype=torch.long)
        self._seen.clear()

    def release_sequence(self, seq_id: int, block_table: tuple[int, ...]) -> None:
        """The engine freed this sequence's blocks (finished, aborted or preempted)."""
        self._seen.pop(seq_id, None)
        self.released.append(seq_id)

    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        bs = self.kv_spec.block_size
        for chunk in batch.chunks:  # the contract, checked before anything is written
            n = len(chunk.token_ids)
            if not n or not all(0 <= i < n for i in chunk.logits_at):
                raise RuntimeError(
                    f"seq {chunk.seq_id}: a chunk of {n} tokens cannot give "
                    f"logits at {chunk.logits_at}"
                )
            if len(chunk.block_table) * bs < chunk.end_pos:
                raise RuntimeError(
                    f"seq {chunk.seq_id}: block table of {len(chunk.block_table)} blocks does "
                    f"not cover positions up to {chunk.end_pos - 1}"
                )
        self.storage[batch.slot_mapping] = batch.input_ids
        for chunk in batch.chunks:
            seen = self._seen.setdefault(chunk.seq_id, {})
            seen.update(zip(range(chunk.start_pos, chunk.end_pos), chunk.token_ids))
        rows = [
            reference_logits(self._context(chunk, chunk.start_pos + i), self.vocab_size)
            for chunk in batch.chunks
            for i in chunk.logits_at
        ]
        return torch.stack(rows) if rows else torch.empty(0, self.vocab_size)

    def _context(self, chunk: SeqChunk, pos: int) -> list[int]:
        """Positions 0..pos of `chunk`'s sequence, read back through its block table."""
        bs = self.kv_spec.block_size
        slots = [kv_slot(chunk.block_table, p, bs) for p in range(pos + 1)]
        ctx = self.storage[slots].tolist()
        unwritten = [p for p, t in enumerate(ctx) if t == EMPTY]
        if unwritten:
            raise RuntimeError(
                f"seq {chunk.seq_id}: block table {chunk.block_table} points at unwritten KV "
                f"slots for positions {unwritten}"
            )
        seen = self._seen[chunk.seq_id]
        wrong = [p for p, t in enumerate(ctx) if seen.get(p, t) != t]
        if wrong:
            raise RuntimeError(
                f"seq {chunk.seq_id}: KV of positions {wrong} was overwritten (block table "
                f"{chunk.block_table})"
            )
        return ctx
