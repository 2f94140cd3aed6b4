"""KV layer groups: the plan across groups, the block manager's pools and sliding windows, and
the native runner's sliding-window models keeping memory bounded by the window."""

from __future__ import annotations

import itertools

import pytest

from enginehouse.config import GenerationConfig
from enginehouse.engine.block_manager import BlockManager
from enginehouse.engine.plan import StepPlan
from enginehouse.engine.scheduler import Scheduler
from enginehouse.engine.sequence import Sequence
from enginehouse.executor.assembler import BatchAssembler
from enginehouse.kv_groups import KVGroup, split_blocks, total_blocks
from enginehouse.runner import KVSpec

_ids = itertools.count()
FULL = KVGroup("full", (0,), bytes_per_token=100)
SLIDING = KVGroup("sliding", (1, 2, 3), bytes_per_token=300, window=8)


def make_seq(tokens: list[int], max_len: int = 256) -> Sequence:
    n = next(_ids)
    return Sequence(n, f"r{n}", list(tokens), GenerationConfig(), frozenset(), max_len)


def computed(bm: BlockManager, seq: Sequence, n: int) -> None:
    bm.drop_out_of_window(seq)
    bm.allocate(seq, n)
    seq.num_computed += n
    bm.commit(seq)


# --- groups and the plan ------------------------------------------------------------------


def test_group_declarations_are_checked() -> None:
    with pytest.raises(ValueError, match="kind 'ring'"):
        KVGroup("ring", (0,), bytes_per_token=1)
    with pytest.raises(ValueError, match="window exactly when"):
        KVGroup("full", (0,), bytes_per_token=1, window=4)
    with pytest.raises(ValueError, match="bytes_per_seq"):
        KVGroup("state", (0,))


def test_blocks_per_sequence_are_bounded_by_the_window() -> None:
    # session 256, chunks of 16, blocks of 4: full 64 blocks; sliding (8 - 1 + 16) / 4 + 1.
    assert FULL.blocks_per_seq(256, 16, 4) == 64
    assert SLIDING.blocks_per_seq(256, 16, 4) == 7
    assert SLIDING.blocks_per_seq(20, 16, 4) == 5  # never more than the whole context
    assert KVGroup("state", (4,), bytes_per_seq=999).blocks_per_seq(256, 16, 4) == 1


def test_plan_shares_the_budget_by_what_a_sequence_holds() -> None:
    groups = (FULL, SLIDING)
    seq_bytes = 64 * 400 + 7 * 1200  # one sequence at full context, both groups
    total = total_blocks(groups, 10 * seq_bytes, 4, 256, 64, 16)
    plans = split_blocks(groups, total, 4, 256, 16)
    assert [p.blocks for p in plans] == [640, 70]
    assert sum(p.bytes for p in plans) <= 10 * seq_bytes
    # With full attention in all four layers the same budget fits fewer sequences.
    assert 10 * seq_bytes // (64 * 4 * 1000) < 10
    # One full group: the budget over one block's bytes, as without groups.
    assert total_blocks((FULL,), 4000, 4, 256, 64, 16) == 10
    # The engine's cap: no more than max_batch_size sequences at full context.
    assert total_blocks(groups, 10**12, 4, 256, 2, 16) == 2 * (64 + 7)


def test_a_state_group_takes_its_slots_for_max_batch_size_sequences_first() -> None:
    state = KVGroup("state", (1, 2), bytes_per_seq=5000, snapshots=True)
    groups = (FULL, state)
    # 8 sequences' slots (two each with snapshots) first, then the full group's blocks of 400 B.
    budget = 16 * 5000 + 100 * 400
    total = total_blocks(groups, budget, 4, 256, 8, 16)
    assert total == 16 + 100
    plans = split_blocks(groups, total, 4, 256, 16, max_batch_size=8)
    assert [p.blocks for p in plans] == [100, 16]
    assert sum(p.bytes for p in plans) == budget
    with pytest.raises(ValueError, match="max_batch_size"):
        split_blocks(groups, total, 4, 256, 16)


def test_kvspec_without_groups_is_unchanged() -> None:
    kv = KVSpec(block_size=16, bytes_per_block=1024)
    assert kv.groups == () and kv.cache_dtype == "auto"


# --- the block manager --------------------------------------------------------------------


def grouped(full: int = 64, sliding: int = 16, caching: bool = True) -> BlockManager:
    return BlockManager([full, sliding], 4, caching, (FULL, SLIDING))


def test_sliding_blocks_out_of_the_window_are_freed_and_reused() -> None:
    bm = grouped()
    seq = make_seq(list(range(100)))
    computed(bm, seq, 20)  # a 20-token prompt: 5 blocks in each group
    assert bm.used_per_group() == [5, 5]
    for _ in range(60):  # decode well past several windows
        computed(bm, seq, 1)
        # The next token reads positions > pos - 8: at most 3 blocks of 4 (plus the new one).
        assert bm.used_per_group()[1] <= 3
    assert bm.used_per_group()[0] == 20  # the full group keeps everything
    # The sliding table keeps the freed ids: position arithmetic stays the same.
    assert len(seq.group_tables[0]) == len(seq.block_table) == 20
    bm.free_seq(seq)
    assert bm.used_per_group() == [0, 0] and not any(bm.pools[1].ref_count)


def test_a_prefix_hit_takes_only_the_windows_blocks() -> None:
    bm = grouped()
    first = make_seq(list(range(40)))
    computed(bm, first, 40)
    bm.free_seq(first)
    second = make_seq(list(range(40)) + [7, 7])
    # 10 blocks are cached in the full group; the sliding one still finds its freed blocks
    # (not reused yet): the hit covers all 40 tokens, the sliding table only the window.
    assert bm.match_prefix(second) == 40
    assert second.dropped == [0, 8]  # position 40 reads 33..39: blocks 8 and 9
    assert bm.used_per_group() == [10, 2]
    bm.free_seq(second)
    assert bm.used_per_group() == [0, 0]


def test_no_prefix_hit_where_the_sliding_blocks_are_gone() -> None:
    bm = grouped(sliding=8)
    first = make_seq(list(range(40)))
    for _ in range(40):
        computed(bm, first, 1)  # one token at a time: freed sliding blocks get reused
    bm.free_seq(first)
    hog = make_seq([500 + i for i in range(32)])
    computed(bm, hog, 28)  # takes (and overwrites) most sliding blocks, the window's too
    second = make_seq(list(range(40)) + [1])
    hit = bm.match_prefix(second)
    # Whatever it is, the sliding group holds every block the hit's next token reads.
    window_blocks = second.group_tables[0][second.dropped[1] :]
    assert len(window_blocks) == hit // 4 - second.dropped[1]
    assert hit < 40


def test_a_state_group_turns_prefix_caching_off() -> None:
    state = KVGroup("state", (1,), bytes_per_seq=4096)
    bm = BlockManager([32, 4], 4, True, (FULL, state))
    assert not bm.prefix_caching
    seq = make_seq(list(range(30)))
    computed(bm, seq, 30)
    assert len(seq.group_tables[0]) == 1  # one state slot, however long the sequence
    assert bm.used_per_group() == [8, 1]
    bm.free_seq(seq)
    assert bm.used_per_group() == [0, 0]


SAVED = KVGroup("state", (1,), bytes_per_seq=4096, snapshots=True)


def test_a_state_group_saves_at_the_last_boundary_and_a_hit_resumes_there() -> None:
    bm = BlockManager([32, 6], 4, True, (FULL, SAVED))
    assert bm.prefix_caching and SAVED.blocks_per_seq(256, 16, 4) == 2
    first = make_seq(list(range(30)))
    bm.allocate(first, 30)
    # The live slot, placeholders, and the block for the state after position 27 at entry 7.
    state = first.group_tables[0]
    assert len(state) == 8 and bm.used_per_group() == [8, 2]
    first.num_computed = 30
    bm.commit(first)
    assert bm.used_per_group() == [8, 1]  # the saved state is cached, no longer held
    assert len(bm.pools[1].cached) == 1
    # Shares 29 tokens: the full group has 7 blocks cached, the state is saved after the 7th.
    second = make_seq(list(range(29)) + [99, 98, 97])
    assert bm.match_prefix(second) == 28
    live, *rest = second.group_tables[0]
    assert live != state[0] and rest[-1] == state[7] and len(rest) == 7
    assert second.dropped == [0, 0]
    # Shares 22 tokens: 5 blocks cached, but no state saved after any of them: no hit.
    third = make_seq(list(range(22)) + [99] * 10)
    assert bm.match_prefix(third) == 0 and third.group_tables[0] == []
    bm.free_seq(first)
    bm.free_seq(second)  # the restored-from state too: it was pending until a commit
    assert bm.used_per_group() == [0, 0] and not any(bm.pools[1].ref_count)


def test_no_hit_without_a_free_live_slot_besides_the_saved_state() -> None:
    bm = BlockManager([32, 2], 4, True, (FULL, SAVED))
    first = make_seq(list(range(30)))
    computed(bm, first, 30)  # its live slot, and the saved state: the pool's only free block
    second = make_seq(list(range(30)))
    assert bm.match_prefix(second) == 0  # the saved state cannot be its own live slot
    assert second.group_tables[0] == [] and bm.used_per_group() == [8, 1]
    bm.free_seq(first)
    assert bm.match_prefix(second) == 28  # now there is room
    bm.free_seq(second)
    assert bm.used_per_group() == [0, 0]


def test_chunks_save_each_boundary_they_end_past_and_skip_when_no_block_is_free() -> None:
    bm = BlockManager([32, 3], 4, True, (FULL, SAVED))
    seq = make_seq(list(range(30)))
    for n in (6, 6, 1, 1):  # ends 6, 12, 13, 14: boundaries 4, 12, none, none
        computed(bm, seq, n)
    assert len(bm.pools[1].cached) == 2
    other = make_seq(list(range(12)) + [50, 51])
    assert bm.match_prefix(other) == 12  # resumes after the third block
    # Three state blocks: two live slots and one free (holding a saved state) for a chunk.
    computed(bm, other, 2)
    hog = make_seq([7] * 9)
    computed(bm, hog, 9)  # its live slot evicts a saved state; no block left for its own
    assert bm.used_per_group()[1] == 3
    computed(bm, seq, 2)  # reaches 16: no free block, nothing saved, no error
    for s in (seq, other, hog):
        bm.free_seq(s)
    assert bm.used_per_group() == [0, 0]


def test_scheduler_sends_each_groups_tables_to_the_runner_side() -> None:
    bm = grouped()
    sched = Scheduler(bm, max_batch_size=4, max_tokens=8)

    class Runner:
        pass

    side = BatchAssembler(Runner())
    seq = make_seq(list(range(30)))
    sched.add(seq)
    for _ in range(8):
        batch = sched.schedule()
        if not batch:
            break
        plan = StepPlan(block_size=4, chunks=[c for _, c in batch])
        got = side.apply(plan)
        (chunk,) = got.chunks
        assert chunk.table(0) == tuple(seq.block_table)
        assert chunk.table(1) == tuple(seq.group_tables[0])
        for s, c in batch:
            s.num_computed = c.end_pos
            bm.commit(s)
        if seq.num_computed == seq.num_tokens:
            seq.token_ids.append(3)  # a decoded token
    assert bm.used_per_group()[1] <= 3


# --- the native runner: sliding-window models past several windows -------------------------


def long_greedy(model, ids: list[int], n: int) -> list[int]:
    import torch

    x = torch.tensor([ids])
    out = model.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False
    )
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("family", ["mistral", "gemma3", "qwen2"])
def test_memory_stays_bounded_by_the_window_past_several_windows(family, models_dir):
    """Two sequences generate 60 tokens each with a window of 8 (blocks of 4): the sliding
    group's blocks in use (from `stats()`, read while the tokens stream) never exceed what the
    windows hold, the freed blocks are reused by the other sequence, and the tokens are
    transformers'. Every decode step runs the C++ one-call decode step (asserted taken): Mistral's
    one sliding group, Qwen2's and Gemma 3's two (each layer reading its group's slots, block
    tables and, for Gemma 3's local layers, rope table)."""
    import random

    import torch
    import transformers as tf
    from transformers import AutoModelForCausalLM

    from enginehouse import GenerationConfig, pipeline
    from enginehouse.testing import TINY, build_model

    common = dict(TINY, vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    common.update(sliding_window=8, tie_word_embeddings=False)
    if family == "mistral":
        config = tf.MistralConfig(**common)
        groups, sliding = ["sliding"], 0
    elif family == "qwen2":  # sliding layers from max_window_layers on
        config = tf.Qwen2Config(**common, use_sliding_window=True, max_window_layers=1)
        groups, sliding = ["full", "sliding"], 1
    else:
        common.update(num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=16)
        config = tf.Gemma3TextConfig(
            **common, layer_types=["sliding_attention"] * 2 + ["full_attention"]
        )
        groups, sliding = ["full", "sliding"], 1
    folder = build_model(models_dir / f"bounded-{family}", config)
    prompts = [random.Random(i).choices(range(5, 512), k=n) for i, n in enumerate([10, 13])]
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    expected = [long_greedy(ref, p, 60) for p in prompts]
    engine = dict(block_size=4, enable_prefix_caching=False, max_num_batched_tokens=16)
    engine.update(max_batch_size=4)
    fixed = GenerationConfig(max_new_tokens=60, min_new_tokens=60)
    with pipeline(str(folder), backend="pytorch", engine_config=engine, progress=False) as pipe:
        assert [g.kind for g in pipe.runner.kv_spec.groups] == groups
        one_call = pipe.runner.decode
        assert one_call is not None
        run, taken = one_call.run, []

        def counted(batch):
            logits = run(batch)
            taken.append(logits is not None)
            return logits

        one_call.run = counted
        got: dict[int, list[int]] = {0: [], 1: []}
        most = 0
        for r in pipe.stream([{"token_ids": p} for p in prompts], fixed):
            got[r.index] += r.token_ids
            most = max(most, pipe.stats()["kv_group_blocks_used"][sliding])
        stats = pipe.stats()
    # Each sequence reads 7 earlier positions and writes one: 3 blocks of 4 (a 16-token prompt
    # chunk takes 5 for its step). Full attention would hold 18 blocks of each sequence.
    assert 0 < most <= 2 * 5
    assert [got[0], got[1]] == expected
    assert stats["kv_blocks_used"] == 0
    assert sum(taken) >= 55, taken  # the decode steps (both sequences in each) went through it


def test_a_group_out_of_blocks_refuses_the_allocation_and_takes_nothing() -> None:
    bm = grouped(full=64, sliding=4)
    seq = make_seq(list(range(40)))
    assert not bm.can_allocate(seq, 20)  # 5 sliding blocks needed, 4 in the pool
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(seq, 20)
    assert bm.used_per_group() == [0, 0]
    computed(bm, seq, 12)  # 3 blocks each, then the window lets the first ones go
    for _ in range(20):
        computed(bm, seq, 1)
    assert bm.used_per_group() == [8, 2]  # position 31 reads 24..31: blocks 6 and 7
