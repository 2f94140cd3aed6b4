"""Speculative verification for a kernel that takes several queries per sequence.

A verify chunk (a sequence's last token and its K proposals, `SeqChunk.verify`) attends as
K + 1 decode rows, each with its own table and length (`native_runner._decode_rows`). The torch
path attends each row on its own, re-reading its context; the C++ CPU kernel groups a
sequence's rows by `StepMeta.query_starts` (`cpu_step.query_starts`) and reads its K/V once. A
kernel whose class says `multi_query = True` (`TritonAttention`) instead takes one table and
length per sequence and `StepMeta.queries` saying which rows are its queries: the kernel reads
each K/V tile once for all of a sequence's queries, causal among them. (Two forms of the same
grouping, one per kernel's interface.)
"""

from __future__ import annotations

import torch

from enginehouse import SeqChunk

from .attention import Queries, StepMeta


def wants_queries(kernel: type, decodes: list[SeqChunk]) -> bool:
    """Whether this step's decode rows go to the kernel as queries per sequence: a kernel that
    takes them, and a chunk verifying more than one token."""
    multi = getattr(kernel, "multi_query", False)
    return multi and any(len(c.token_ids) > 1 for c in decodes)


def per_sequence(
    decodes: list[SeqChunk], group: int = 0
) -> tuple[list[tuple[int, ...]], list[int], list[int], list[int]]:
    """Each decode or verify chunk's block table, context length (its last query's position
    + 1: all of the step's K/V are stored before any query attends), first row and count."""
    tables, lens, starts, counts, at = [], [], [], [], 0
    for c in decodes:
        n = len(c.token_ids)
        tables.append(c.table(group))
        lens.append(c.end_pos)
        starts.append(at)
        counts.append(n)
        at += n
    return tables, lens, starts, counts


def fill(meta: StepMeta, decodes: list[SeqChunk], group: int, device: torch.device) -> None:
    """Set `meta`'s tables, lengths and queries per sequence (over the per-row ones)."""
    tables, lens, starts, counts = per_sequence(decodes, group)
    width = max(max(len(t) for t in tables), 1)
    rows = [list(t) + [0] * (width - len(t)) for t in tables]
    meta.block_tables = torch.tensor(rows, dtype=torch.int32).to(device)
    meta.context_lens = torch.tensor(lens, dtype=torch.int32).to(device)
    packed = torch.tensor([starts, counts], dtype=torch.int32).to(device)
    meta.queries = Queries(packed[0], packed[1], max(counts))
