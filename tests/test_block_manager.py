"""BlockManager and Scheduler invariants, one by one and under a random walk of operations."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from enginehouse.config import GenerationConfig
from enginehouse.engine.block_manager import BlockManager
from enginehouse.engine.plan import Logits, StepPlan
from enginehouse.engine.scheduler import Scheduler
from enginehouse.engine.sequence import Sequence, Status
from enginehouse.executor.assembler import BatchAssembler
from enginehouse.multimodal import MultiModalData
from enginehouse.runner import kv_slot

_ids = itertools.count()


def make_seq(tokens: list[int], max_len: int = 64) -> Sequence:
    n = next(_ids)
    return Sequence(n, f"r{n}", list(tokens), GenerationConfig(), frozenset(), max_len)


def computed(bm: BlockManager, seq: Sequence, n: int) -> None:
    """What a step does for `seq`: room for `n` more tokens, computed, full blocks shared."""
    bm.allocate(seq, n)
    seq.num_computed += n
    bm.commit(seq)


# --- BlockManager ---------------------------------------------------------------------------


def test_allocate_and_free() -> None:
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    seq = make_seq(list(range(10)))
    assert bm.blocks_for(10) == 3 and bm.can_allocate(seq, 10)
    bm.allocate(seq, 10)
    assert len(seq.block_table) == 3 and bm.num_used == 3
    assert all(bm.ref_count[b] == 1 for b in seq.block_table)
    bm.allocate(seq, 0)  # already covered: nothing new
    assert len(seq.block_table) == 3
    bm.free_seq(seq)
    assert seq.block_table == [] and bm.num_used == 0 and not any(bm.ref_count)


def test_allocate_beyond_the_free_blocks_raises() -> None:
    bm = BlockManager(2, 4, enable_prefix_caching=False)
    seq = make_seq(list(range(9)))
    assert not bm.can_allocate(seq, 9)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(seq, 9)
    assert bm.num_used == 0  # a refused allocation takes nothing


def test_prefix_match_shares_full_blocks_and_leaves_one_token() -> None:
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    tokens = list(range(12))
    first = make_seq(tokens)
    computed(bm, first, 12)
    assert len(bm.cached) == 3
    same = make_seq(tokens)
    # 12 tokens are cached, but the last must be computed for its logits: 2 blocks, 8 tokens.
    assert bm.match_prefix(same) == 8
    assert same.block_table == first.block_table[:2]
    assert [bm.ref_count[b] for b in first.block_table] == [2, 2, 1]
    longer = make_seq(tokens + [99])
    assert bm.match_prefix(longer) == 12
    # A block matches only after the same parents: a change in block 1 stops the match there.
    forked = make_seq([0, 1, 2, 3, 4, 5, 6, 0, 8, 9, 10, 11, 12])
    assert bm.match_prefix(forked) == 4
    # The same tokens with an image in block 0: its key holds the image's hash, so no match.
    other_extra = make_seq(tokens + [99])
    other_extra.mm, other_extra.mm_positions = MultiModalData({}, ("image-hash",)), [2]
    assert bm.match_prefix(other_extra) == 0
    for seq in (first, same, longer, forked, other_extra):
        bm.free_seq(seq)
    assert bm.num_used == 0 and not any(bm.ref_count)


def test_freed_blocks_stay_cached_until_reused() -> None:
    bm = BlockManager(4, 4, enable_prefix_caching=True)
    old = make_seq(list(range(8)))
    computed(bm, old, 8)
    bm.free_seq(old)
    assert bm.match_prefix(again := make_seq(list(range(9)))) == 8
    bm.free_seq(again)
    # Filling the cache evicts the least recently freed blocks; their keys go with them.
    filler = make_seq([50] * 12)
    bm.allocate(filler, 12)
    assert bm.num_free == 1 and len(bm.cached) == 1
    assert bm.match_prefix(make_seq(list(range(9)))) == 4  # the head was freed last, kept


def test_no_sharing_without_prefix_caching() -> None:
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    seq = make_seq(list(range(8)))
    computed(bm, seq, 8)
    assert bm.cached == {} and bm.match_prefix(make_seq(list(range(9)))) == 0


def test_free_puts_the_tail_first_in_line_for_reuse() -> None:
    bm = BlockManager(3, 4, enable_prefix_caching=True)
    seq = make_seq(list(range(12)))
    bm.allocate(seq, 12)
    table = list(seq.block_table)
    bm.free_seq(seq)
    assert list(bm.free) == table[::-1]


# --- Scheduler ------------------------------------------------------------------------------


def test_long_prompt_is_prefilled_in_chunks_within_the_budget() -> None:
    bm = BlockManager(32, 4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_batch_size=4, max_tokens=16)
    seq = make_seq(list(range(40)))
    sched.add(seq)
    sizes = []
    while seq.num_computed < seq.num_tokens:
        ((s, chunk),) = sched.schedule()
        assert s is seq and chunk.start_pos == seq.num_computed
        # Only the chunk that reaches the prompt's end asks for logits.
        assert chunk.logits == (Logits.LAST if chunk.end_pos == 40 else Logits.NONE)
        sizes.append(len(chunk.token_ids))
        seq.num_computed = chunk.end_pos
    assert sizes == [16, 16, 8]


def test_batch_size_limits_running_sequences() -> None:
    bm = BlockManager(64, 4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_batch_size=2, max_tokens=64)
    seqs = [make_seq([i, i]) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    assert [s for s, _ in sched.schedule()] == seqs[:2]
    assert list(sched.waiting) == [seqs[2]] and seqs[2].block_table == []


def test_preemption_frees_the_newest_and_requeues_it_first() -> None:
    bm = BlockManager(4, 4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_batch_size=4, max_tokens=64)
    old, new = make_seq(list(range(8))), make_seq(list(range(8)))
    sched.add(old)
    sched.add(new)
    for seq, chunk in sched.schedule():
        seq.num_computed = chunk.end_pos
    assert bm.num_free == 0
    old.token_ids.append(1)  # a decode step that needs a third block
    new.token_ids.append(1)
    ((seq, _),) = sched.schedule()
    assert seq is old and sched.num_preemptions == 1
    assert list(sched.waiting) == [new] and new.status is Status.WAITING
    assert new.num_computed == 0 and new.block_table == []


def test_a_waiting_sequence_that_does_not_fit_returns_its_prefix_blocks() -> None:
    bm = BlockManager(4, 4, enable_prefix_caching=True)
    sched = Scheduler(bm, max_batch_size=4, max_tokens=64)
    first = make_seq(list(range(12)))
    sched.add(first)
    for seq, chunk in sched.schedule():
        seq.num_computed = chunk.end_pos
        bm.commit(seq)
    second = make_seq(list(range(8)) + [7] * 8)  # 2 cached blocks, then needs 2 more: 1 is free
    sched.add(second)
    assert sched.schedule() == []
    assert second.block_table == [] and second.num_computed == 0
    assert [bm.ref_count[b] for b in first.block_table] == [1, 1, 1]


# --- random walk ----------------------------------------------------------------------------


class Walk:
    """Drives a Scheduler like the engine does, with a fake KV cache of token ids."""

    def __init__(self, rng: random.Random, caching: bool) -> None:
        self.rng = rng
        self.bm = BlockManager(12, 4, enable_prefix_caching=caching)
        self.sched = Scheduler(self.bm, max_batch_size=4, max_tokens=16)
        self.kv: list[int | None] = [None] * (12 * 4)
        self.assembler = BatchAssembler(object())
        self.prefixes = [[rng.randrange(3) for _ in range(12)] for _ in range(3)]

    def live(self) -> list[Sequence]:
        return self.sched.running + list(self.sched.waiting)

    def add(self) -> None:
        # Tokens from a small alphabet after shared prefixes: plenty of prefix cache hits.
        head = self.rng.choice(self.prefixes)[: self.rng.randrange(13)]
        tail = [self.rng.randrange(3) for _ in range(self.rng.randrange(1, 20))]
        self.sched.add(make_seq(head + tail, max_len=40))

    def step(self) -> None:
        bs = self.bm.block_size
        scheduled = self.sched.schedule()
        # The runner's side sees only the plan's diffs: it must rebuild every block table.
        plan = StepPlan([c for _, c in scheduled], *self.sched.take_changes(), block_size=bs)
        batch = self.assembler.apply(plan)
        for (seq, _), chunk in zip(scheduled, batch.chunks if batch else ()):
            assert chunk.block_table == tuple(seq.block_table)
            for slot, token in zip(chunk.slots(bs), chunk.token_ids):
                self.kv[slot] = token
            seq.num_computed = chunk.end_pos
            self.bm.commit(seq)
            if seq.num_computed == seq.num_tokens:  # sampled: one more token, or the end
                seq.token_ids.append(self.rng.randrange(3))
                if seq.num_tokens >= seq.max_len:
                    self.sched.finish(seq)

    def finish(self) -> None:
        if self.sched.running:
            self.sched.finish(self.rng.choice(self.sched.running))

    def abort(self) -> None:
        if self.live():
            self.sched.finish(self.rng.choice(self.live()))

    def preempt(self) -> None:
        if self.sched.running:
            self.sched._preempt(self.rng.choice(self.sched.running))

    def check(self) -> None:
        bm, bs = self.bm, self.bm.block_size
        refs = Counter(b for seq in self.live() for b in seq.block_table)
        for block in range(bm.num_blocks):
            assert bm.ref_count[block] == refs[block], f"block {block}"
            assert (block in bm.free) == (refs[block] == 0), f"block {block}"
        for seq in self.live():
            assert len(set(seq.block_table)) == len(seq.block_table)
            if seq.status is Status.WAITING:
                assert seq.block_table == [] and seq.num_computed == 0
                continue
            assert bm.blocks_for(seq.num_computed) <= len(seq.block_table)
            assert len(seq.block_table) <= bm.blocks_for(seq.num_tokens)
            # The KV the sequence has computed is its own tokens, wherever the blocks came from.
            kv = [self.kv[kv_slot(seq.block_table, p, bs)] for p in range(seq.num_computed)]
            assert kv == seq.token_ids[: seq.num_computed], f"seq {seq.seq_id}"
        for key, block in bm.cached.items():
            assert bm.block_key[block] == key
            assert self.kv[block * bs : (block + 1) * bs] == list(key[1])


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_operations_keep_the_invariants(seed: int, caching: bool) -> None:
    rng = random.Random(seed)
    walk = Walk(rng, caching)
    ops = [walk.add] * 3 + [walk.step] * 6 + [walk.finish, walk.abort, walk.preempt]
    for _ in range(400):
        rng.choice(ops)()
        walk.check()
    while walk.sched.has_work():  # run what is left to the end
        walk.step()
        walk.check()
    assert walk.bm.num_used == 0 and not any(walk.bm.ref_count)
    assert walk.sched.num_preemptions > 0
