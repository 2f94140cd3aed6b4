"""Continuous batching: which sequences run this step, and how many of their tokens.

Each step has a token budget. Running sequences go first (one token each when decoding, the next
chunk of their prompt otherwise), then waiting ones join while budget, batch slots and KV blocks
last. A sequence's blocks that fell out of a sliding window are freed before it asks for more
(`BlockManager.drop_out_of_window`). When blocks run out, the newest running sequence is
preempted: its blocks are freed and it waits to be recomputed from its tokens, so it still ends
with the tokens it would have produced.

Each chunk is a `ChunkPlan`: a sequence's block table goes to the runner's side as it grows,
and the sequences whose blocks were freed (`released`) or that are gone for good (`finished`)
since the last step go with the next one.
"""

from __future__ import annotations

import time
from collections import deque

from .block_manager import BlockManager
from .plan import ChunkPlan, Logits
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_tokens: int) -> None:
        self.bm = block_manager
        self.max_batch_size = max_batch_size
        self.max_tokens = max_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Since the last step: sequences whose blocks were freed, and those that are gone.
        self.released: list[int] = []
        self.finished: list[int] = []

    def take_changes(self) -> tuple[list[int], list[int]]:
        """The released and finished sequence ids since the last call, for the next step."""
        released, finished = self.released, self.finished
        self.released, self.finished = [], []
        return released, finished

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
        if seq.admitted:  # the runner's side has seen it
            self.finished.append(seq.seq_id)

    def _free(self, seq: Sequence) -> None:
        if seq.sent_blocks:
            self.released.append(seq.seq_id)
        seq.sent_blocks = 0
        seq.sent_group_blocks = [0] * len(seq.sent_group_blocks)
        self.bm.free_seq(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.num_computed = 0
        seq.draft_ids = []
        seq.prompt_logprob_sum = 0.0  # a score-only request scores everything again
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        seq.num_preemptions += 1

    def _chunk(self, seq: Sequence, n: int) -> ChunkPlan:
        start = seq.num_computed
        drafts = tuple(seq.draft_ids)
        if drafts:
            logits = Logits.VERIFY  # the last token and each proposal predict the next
        elif seq.scores_prompt:
            logits = Logits.ALL  # every position scores the token after it
        else:
            logits = Logits.LAST if start + n == seq.num_tokens else Logits.NONE
        embed_rows, embeds = seq.embeds_between(start, start + n)
        new_blocks = tuple(seq.block_table[seq.sent_blocks :])
        seq.sent_blocks = len(seq.block_table)
        group_new_blocks = []  # with KV groups: those of groups 1, 2, ...
        for g, table in enumerate(seq.group_tables):
            group_new_blocks.append(tuple(table[seq.sent_group_blocks[g] :]))
            seq.sent_group_blocks[g] = len(table)
        return ChunkPlan(
            seq_id=seq.seq_id,
            token_ids=tuple(seq.token_ids[start : start + n]) + drafts,
            start_pos=start,
            new_blocks=new_blocks,
            logits=logits,
            embed_rows=embed_rows,
            embeds=embeds,
            rope_positions=seq.rope_positions(start, start + n + len(drafts)),
            group_new_blocks=tuple(group_new_blocks),
            adapter=seq.adapter_slot,
        )

    def _drafts(self, seq: Sequence, n: int, budget: int) -> list[int]:
        """The proposals scheduled with a decoding sequence's last token: as many as the
        budget holds, none where their blocks would take free ones another sequence needs
        (speculation never preempts)."""
        drafts = seq.draft_ids
        if not drafts or n != 1 or seq.num_tokens - seq.num_computed != 1:
            return []
        drafts = drafts[: budget - n]
        need = self.bm.blocks_for(seq.num_computed + n + len(drafts)) - len(seq.block_table)
        # Leave a block for every running sequence, which may need one this step (group 0's:
        # the blocks of `block_table`).
        if drafts and need > len(self.bm.pools[0].free) - len(self.running):
            return []
        return drafts

    def schedule(self) -> list[tuple[Sequence, ChunkPlan]]:
        budget = self.max_tokens
        batch: list[tuple[Sequence, ChunkPlan]] = []
        preempted = False
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_tokens - seq.num_computed, budget)
            n = seq.whole_images_chunk(seq.num_computed, n)  # 0: its image waits a step
            if n <= 0:
                continue
            self.bm.drop_out_of_window(seq)  # a sliding window's old blocks first
            seq.draft_ids = self._drafts(seq, n, budget)
            while not self.bm.can_allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            if not self.bm.can_allocate(seq, n + len(seq.draft_ids)):
                seq.draft_ids = []  # another KV group (a state snapshot) has no room for them
            n_all = n + len(seq.draft_ids)
            self.bm.allocate(seq, n_all)
            batch.append((seq, self._chunk(seq, n)))
            budget -= n_all
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
            n = seq.whole_images_chunk(seq.num_computed, n)
            if n <= 0 or not self.bm.can_allocate(seq, n):
                self.bm.free_seq(seq)  # give back the prefix blocks it had taken
                seq.num_computed = 0
                break
            self.waiting.popleft()
            seq.draft_ids = []  # a prompt first: proposals come with its decode steps
            self.bm.allocate(seq, n)
            seq.status = Status.RUNNING
            if not seq.admitted:
                seq.scheduled_at = time.monotonic()
            seq.admitted = True
            self.running.append(seq)
            batch.append((seq, self._chunk(seq, n)))
            budget -= n
        return batch
