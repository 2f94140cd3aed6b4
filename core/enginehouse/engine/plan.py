"""One engine step as the runner's side receives it: a diff, not the whole state.

A sequence's block table is sent as it grows (its new block ids only); the runner's side keeps
the tables (`executor.assembler.BatchAssembler`) and rebuilds each step's `ScheduledBatch` from
them. Under an executor the plan is pickled once and read by every rank, so its size is what
crosses processes each step: a decode row is a few ints, whatever the context length.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from .sampler import SamplingBatch


class Logits(enum.IntEnum):
    """Which positions of a chunk return logits."""

    NONE = 0
    LAST = 1
    ALL = 2  # every position (prompt scoring)
    # Every position of a chunk that ends with proposed tokens (speculative decoding): the
    # runner attends each position as a decode row (`SeqChunk.verify`).
    VERIFY = 3

    def rows(self, n: int) -> int:
        return (0, 1, n, n)[self]


@dataclass(frozen=True)
class ChunkPlan:
    """One sequence's part of a step (see `runner.SeqChunk`), with its block table as a diff."""

    seq_id: int
    token_ids: tuple[int, ...]
    start_pos: int
    new_blocks: tuple[int, ...]  # appended to the table the runner's side keeps for seq_id
    logits: Logits
    embed_rows: tuple[int, ...] = ()
    embeds: torch.Tensor | None = field(default=None, compare=False, repr=False)
    rope_positions: torch.Tensor | None = field(default=None, compare=False, repr=False)
    # With KV groups: the new blocks of groups 1, 2, ... (`new_blocks` are group 0's).
    group_new_blocks: tuple[tuple[int, ...], ...] = ()
    adapter: int = 0  # the LoRA adapter slot (0: the base model)

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)

    @property
    def num_rows(self) -> int:
        return self.logits.rows(len(self.token_ids))


@dataclass
class StepPlan:
    """A step's chunks, what changed since the last step, and its sampling."""

    chunks: list[ChunkPlan] = field(default_factory=list)
    # Sequences whose blocks were freed since the last step (finished, aborted or preempted):
    # their tables go, and the runner is told (`release_sequence`) before any chunk runs.
    released: list[int] = field(default_factory=list)
    # Sequences gone for good (never on preemption): the sampler's and runner's state goes.
    finished: list[int] = field(default_factory=list)
    sampling: SamplingBatch = field(default_factory=SamplingBatch)
    block_size: int = 16
