"""Continuous batching: which sequences run this step, and how many of their tokens.

Each step has a token budget. Running sequences go first (one token each when decoding, the next
chunk of their prompt otherwise), then waiting ones join while budget, batch slots and KV blocks
last. When blocks run out, the newest running sequence is preempted: its blocks are freed and it
waits to be recomputed from its tokens, so it still ends with the tokens it would have produced.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from ..runner import SeqChunk
from .block_manager import BlockManager
from .sequence import Sequence, Status


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_batch_size: int,
        max_tokens: int,
        on_release: Callable[[Sequence], None] | None = None,
    ) -> None:
        self.bm = block_manager
        # Told before a sequence's computed blocks are freed (the runner's `release_sequence`).
        self.on_release = on_release
        self.max_batch_size = max_batch_size
        self.max_tokens = max_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Take `seq` out of the queues and free its blocks (finish or abort)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)
        seq.status = Status.FINISHED
        seq.mm, seq.mm_embeds = None, None  # the images' memory goes with the request

    def _free(self, seq: Sequence) -> None:
        if self.on_release is not None and seq.block_table:
            self.on_release(seq)
        self.bm.free_seq(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.num_computed = 0
        seq.prompt_logprob_sum = 0.0  # a score-only request scores everything again
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _chunk(self, seq: Sequence, n: int) -> SeqChunk:
        start = seq.num_computed
        reaches_end = start + n == seq.num_tokens
        if seq.scores_prompt:
            logits_at = tuple(range(n))  # every position scores the token after it
        else:
            logits_at = (n - 1,) if reaches_end else ()
        embed_rows, embeds = seq.embeds_between(start, start + n)
        return SeqChunk(
            seq_id=seq.seq_id,
            token_ids=tuple(seq.token_ids[start : start + n]),
            start_pos=start,
            block_table=tuple(seq.block_table),
            logits_at=logits_at,
            embed_rows=embed_rows,
            embeds=embeds,
            rope_positions=seq.rope_positions(start, start + n),
        )

    def schedule(self) -> list[tuple[Sequence, SeqChunk]]:
        budget = self.max_tokens
        batch: list[tuple[Sequence, SeqChunk]] = []
        preempted = False
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_tokens - seq.num_computed, budget)
            if n <= 0:
                continue
            while not self.bm.can_allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.bm.allocate(seq, n)
            batch.append((seq, self._chunk(seq, n)))
            budget -= n
        # Admitting new work right after a preemption would only thrash the cache.
        while self.waiting and not preempted and budget > 0:
            if len(self.running) >= self.max_batch_size:
                break
            seq = self.waiting[0]
            if seq.num_computed == 0 and not seq.scores_prompt:
                # Scoring needs logits at every position, so it cannot skip cached ones.
                seq.num_computed = self.bm.match_prefix(seq)
                if not seq.admitted:
                    seq.cached_tokens = seq.num_computed
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.bm.can_allocate(seq, n):
                self.bm.free_seq(seq)  # give back the prefix blocks it had taken
                seq.num_computed = 0
                break
            self.waiting.popleft()
            self.bm.allocate(seq, n)
            seq.status = Status.RUNNING
            seq.admitted = True
            self.running.append(seq)
            batch.append((seq, self._chunk(seq, n)))
            budget -= n
        return batch
