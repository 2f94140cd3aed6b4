"""CUDA graphs' shape and buffer logic on CPU tensors (native/cuda_graphs.py): which graph a
step takes (sequences padded to a bucket, 1 or K + 1 query rows a sequence), and how the static
buffers are filled (each KV group's slots and tables, padding rows into the scratch slots,
padding sequences empty). The graphs themselves run in tests/test_triton_kernels.py (their
eager stand-in) and benchmarks/gpu_check.py (on a GPU)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from enginehouse import EngineConfig, ScheduledBatch, SeqChunk
from enginehouse_pytorch.native.cuda_graphs import (
    COUNT,
    LENGTH,
    POSITION,
    SLOT,
    START,
    TABLE,
    TOKEN,
    DecodeGraphs,
    StaticInputs,
    graph_batch_sizes,
    query_rows,
    step_queries,
)

NGRAM = {"method": "ngram", "num_speculative_tokens": 3}


def chunk(seq, ids, start, tables, verify=False, logits=None):
    at = logits if logits is not None else (tuple(range(len(ids))) if verify else (len(ids) - 1,))
    return SeqChunk(seq, tuple(ids), start, tables[0], at, verify=verify, group_tables=tables)


def test_query_rows_follow_the_speculative_config():
    assert query_rows(EngineConfig()) == [1]
    assert query_rows(EngineConfig(speculative_config=NGRAM)) == [1, 4]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]


def test_step_queries_takes_decodes_and_verifies_only():
    t = ((0, 1),)
    assert step_queries((chunk(0, [5], 3, t), chunk(1, [6], 9, t))) == 1
    assert step_queries((chunk(0, [5, 6, 7], 3, t, verify=True), chunk(1, [6], 9, t))) == 3
    assert step_queries((chunk(0, [5, 6, 7], 0, t),)) is None  # a prompt
    adapted = SeqChunk(0, (5,), 3, (0,), (0,), adapter=1)
    assert step_queries((adapted,)) is None


def test_static_inputs_pack_groups_and_padding():
    inputs = StaticInputs.make(seqs=4, queries=4, groups=2, width=3, device="cpu")
    bs, scratch = 4, [100, 200]
    full, sliding = (0, 5, 2), (7, 3, 1)
    chunks = (
        chunk(0, [11, 12, 13], 5, (full, sliding), verify=True),  # positions 5, 6, 7
        chunk(1, [21], 9, ((4, 6, 8), (9, 10, 11)), logits=()),  # a decode at 9, no logits
    )
    rows, seqs = inputs.host_rows(chunks, 3, bs, scratch)  # padded to 3 sequences
    assert rows.shape == (12, 4) and seqs.shape == (3, 9)
    assert rows[:3, TOKEN].tolist() == [11, 12, 13]
    assert rows[:3, POSITION].tolist() == [5, 6, 7]
    assert rows[:3, SLOT].tolist() == [5 * 4 + 1, 5 * 4 + 2, 5 * 4 + 3]  # full table: block 5
    assert rows[:3, SLOT + 1].tolist() == [3 * 4 + 1, 3 * 4 + 2, 3 * 4 + 3]  # sliding: block 3
    assert rows[3].tolist() == [0, 0, 100, 200]  # padding row of sequence 0
    assert rows[4].tolist() == [21, 9, 8 * 4 + 1, 11 * 4 + 1]
    assert all(r.tolist() == [0, 0, 100, 200] for r in rows[5:])
    assert seqs[:, LENGTH].tolist() == [8, 10, 0]
    assert seqs[:, START].tolist() == [0, 4, 8]
    assert seqs[:, COUNT].tolist() == [3, 1, 0]  # the padding sequence has no queries
    assert seqs[0, TABLE:].tolist() == [*full, *sliding]
    assert inputs.wanted_rows(chunks) == [0, 1, 2]


def fake_runner(max_batch_size=8, speculative=True):
    cfg = EngineConfig(
        max_batch_size=max_batch_size, speculative_config=NGRAM if speculative else None
    )
    caches = [SimpleNamespace(scratch_slot=60), SimpleNamespace(scratch_slot=61)]
    return SimpleNamespace(
        config=cfg, context=32, block_size=4, caches=caches, device=torch.device("cpu")
    )


def test_shape_for_picks_the_bucket_and_the_query_rows():
    graphs = DecodeGraphs(fake_runner())
    graphs.enabled = True
    t = ((0, 1), (2, 3))
    decodes = [chunk(i, [5], 6, t) for i in range(3)]
    assert graphs.shape_for(ScheduledBatch(tuple(decodes), 4)) == (4, 1)
    mixed = (chunk(9, [5, 6], 6, t, verify=True), *decodes)
    assert graphs.shape_for(ScheduledBatch(mixed, 4)) == (4, 4)
    too_many = tuple(chunk(i, [5], 6, t) for i in range(9))
    assert graphs.shape_for(ScheduledBatch(too_many, 4)) is None
    long_table = ((0,) * 9, (1,) * 9)  # 9 blocks: past the 8 the context needs
    assert graphs.shape_for(ScheduledBatch((chunk(0, [5], 6, long_table),), 4)) is None
    plain = DecodeGraphs(fake_runner(speculative=False))
    plain.enabled = True
    assert plain.shape_for(ScheduledBatch(mixed, 4)) is None  # no verify graphs without K
    assert sorted(graphs.shapes()) == sorted((n, q) for n in (1, 2, 4, 8) for q in (1, 4))
