"""The runner's side of a step: block tables kept from the plans, batches rebuilt from them.

Every place a runner runs (in the engine's process, or one rank of an executor) keeps one
`BatchAssembler`. It applies a `StepPlan` in the engine's order: freed sequences first (the
runner's `release_sequence`, then `finish_sequence` for those gone for good), then the chunks,
each with its whole block table again, as `runner.ScheduledBatch` promises.
"""

from __future__ import annotations

from ..engine.plan import Logits, StepPlan
from ..runner import ScheduledBatch, SeqChunk, capabilities_of


class BatchAssembler:
    def __init__(self, runner: object) -> None:
        self.runner = runner
        caps = capabilities_of(runner)
        self.releases, self.finishes = caps.releases_sequences, caps.finishes_sequences
        self.tables: dict[int, tuple[int, ...]] = {}
        # With KV groups: the tables of groups 1, 2, ... per sequence.
        self.group_tables: dict[int, tuple[tuple[int, ...], ...]] = {}

    def apply(self, plan: StepPlan) -> ScheduledBatch | None:
        """Forget what the plan frees, then the batch to execute (None when it has no chunk)."""
        for seq_id in plan.released:
            table = self.tables.pop(seq_id, None)
            self.group_tables.pop(seq_id, None)
            if self.releases and table:
                self.runner.release_sequence(seq_id, table)  # type: ignore[attr-defined]
        if self.finishes:
            for seq_id in plan.finished:
                self.runner.finish_sequence(seq_id)  # type: ignore[attr-defined]
        if not plan.chunks:
            return None
        chunks = []
        for c in plan.chunks:
            table = self.tables.get(c.seq_id, ())
            if c.new_blocks:
                table = self.tables[c.seq_id] = table + c.new_blocks
            groups: tuple[tuple[int, ...], ...] = ()
            if c.group_new_blocks:
                old = self.group_tables.get(c.seq_id) or ((),) * len(c.group_new_blocks)
                more = tuple(t + new for t, new in zip(old, c.group_new_blocks))
                self.group_tables[c.seq_id] = more
                groups = (table, *more)
            n = len(c.token_ids)
            logits_at = (n - 1,) if c.logits is Logits.LAST else ()
            if c.logits in (Logits.ALL, Logits.VERIFY):
                logits_at = tuple(range(n))
            chunks.append(
                SeqChunk(
                    c.seq_id,
                    c.token_ids,
                    c.start_pos,
                    table,
                    logits_at,
                    c.embed_rows,
                    c.embeds,
                    c.rope_positions,
                    group_tables=groups,
                    verify=c.logits is Logits.VERIFY,
                    adapter=c.adapter,
                )
            )
        return ScheduledBatch(tuple(chunks), plan.block_size)
