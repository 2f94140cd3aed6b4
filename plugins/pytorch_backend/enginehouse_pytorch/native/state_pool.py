"""The linear-attention layers' states: the blocks of the engine's "state" KV group.

A linear-attention layer's memory does not grow with the context: each running sequence holds
one slot (its conv state and recurrent state in every linear layer). The slots are the blocks
of the runner's "state" `KVGroup`, so the engine's block manager hands them out and plans their
memory with the full-attention layers' blocks: a sequence's live slot is entry 0 of its table
in the group (`SeqChunk.table(g)`).

With prefix caching the group saves snapshots (`KVGroup.snapshots`, see
`enginehouse.kv_groups`): a chunk that reaches a block boundary has one more entry in its
table, at `boundary // block_size`, the slot to copy the state there into; and a sequence whose
first chunk starts past position 0 (a prefix hit) finds the saved state to start from at entry
`start // block_size`. `StepStates` reads both off the step's chunks.

Speculative decoding: a verify chunk (a sequence's last token and K proposals) runs the
recurrence token by token and keeps the state after each of its K + 1 positions in a scratch
(`VerifyScratch`, allocated per step: one state per verified token). Only the sampler knows how
many proposals it accepted, and it runs after the step (on rank 0 alone at tp > 1); the
sequence's next chunk says it: it starts right after the last accepted token, so its first step
copies the state at `next start - 1` from the scratch into the live slot (`Verified`), before
anything reads it. A verify chunk saves a snapshot only at a boundary right after its first
token (never past a proposal, which may be rejected: the engine's rule, `BlockManager.allocate`),
from the scratch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from enginehouse.plugin_api import EnginehouseError, SeqChunk, snapshot_at

from .arch import LinearAttention
from .hybrid import state_bytes_per_sequence
from .linear_attention import DecodeStep, LayerState, StateMeta, VerifyScratch


class StatePool:
    def __init__(
        self, linear: LinearAttention, slots: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        layers = sum(linear.layers)
        k, heads = linear.conv_kernel - 1, linear.num_v_heads
        self.conv = torch.zeros(layers, slots, linear.conv_dim, k, dtype=dtype, device=device)
        shape = (layers, slots, heads, linear.head_k_dim, linear.head_v_dim)
        self.recurrent = torch.zeros(shape, dtype=torch.float32, device=device)
        self.device = device

    @staticmethod
    def bytes_for(linear: LinearAttention, slots: int, dtype: torch.dtype) -> int:
        return state_bytes_per_sequence(linear, dtype.itemsize) * slots

    @property
    def num_slots(self) -> int:
        return self.conv.shape[1]

    @property
    def nbytes(self) -> int:
        return self.conv.nbytes + self.recurrent.nbytes

    def layer(self, i: int) -> LayerState:
        """The states of the i-th linear layer (counting linear layers only)."""
        return LayerState(self.conv[i], self.recurrent[i], i)

    def scratch(self, rows: int) -> VerifyScratch:
        """Room for the states after `rows` verified tokens (every linear layer)."""
        conv, rec = self.conv, self.recurrent
        return VerifyScratch(
            conv.new_empty(conv.shape[0], rows, *conv.shape[2:]),
            rec.new_empty(rec.shape[0], rows, *rec.shape[2:]),
        )

    def restore(self, scratch: VerifyScratch, rows: list[int], dst: list[int]) -> None:
        """Every linear layer's states of scratch rows `rows` into slots `dst`."""
        if rows:
            r, d = torch.tensor(rows, device=self.device), torch.tensor(dst, device=self.device)
            self.conv[:, d] = scratch.conv[:, r]
            self.recurrent[:, d] = scratch.recurrent[:, r]

    def zero(self, slot: int) -> None:
        self.conv[:, slot].zero_()
        self.recurrent[:, slot].zero_()

    def copy(self, src: list[int], dst: list[int]) -> None:
        """Every linear layer's states of slots `src` into slots `dst`."""
        if src:
            s, d = torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)
            self.conv[:, d] = self.conv[:, s]
            self.recurrent[:, d] = self.recurrent[:, s]


@dataclass
class Verified:
    """A verify chunk's states after each of its positions (scratch rows `row` .. `row +
    count - 1`), held until the sequence's next chunk says how many tokens were accepted."""

    scratch: VerifyScratch
    row: int
    start: int  # the chunk's start_pos
    count: int  # its tokens

    def row_before(self, start: int, seq_id: int) -> int:
        """The scratch row of the state a chunk starting at `start` continues from."""
        at = start - 1 - self.start
        if not 0 <= at < self.count:
            raise EnginehouseError(
                f"sequence {seq_id} resumes at position {start}, outside the {self.count} "
                f"tokens it verified from position {self.start}"
            )
        return self.row + at


@dataclass
class StepStates:
    """The state side of one step: each chunk's live slot, restored from a saved state or
    zeroed where it starts, and the snapshots to save (prefill ones inside the layers, decode
    and verify ones after the step, `save_decodes`)."""

    meta: StateMeta
    decode_saves: tuple[list[int], list[int]] = field(default_factory=lambda: ([], []))
    # Verify chunks' snapshots: (scratch rows, slots).
    scratch_saves: tuple[list[int], list[int]] = field(default_factory=lambda: ([], []))

    @classmethod
    def build(
        cls,
        pool: StatePool,
        order: list[SeqChunk],
        num_decode: int,
        group: int,
        block_size: int,
        started: set[int],
        verified: dict[int, Verified] | None = None,
    ) -> StepStates:
        """`order`: the step's chunks, the `num_decode` decodes and verify chunks first.
        `started`: the sequences whose live slot holds their state (the runner forgets one
        when the engine releases it). `verified`: the sequences whose last step verified
        proposals; this step's verify chunks are added to it."""
        verified = {} if verified is None else verified
        slots, saves = [], []
        for c in order:
            slots.append(_live_slot(pool, c, group, block_size, started, verified))
        decodes = order[:num_decode]
        lens = [len(c.token_ids) for c in decodes]
        rows = sum(n for n in lens if n > 1)
        scratch = pool.scratch(rows) if rows else None
        first_rows, at = [], 0  # each decode chunk's first scratch row (-1: a plain decode)
        for n in lens:
            first_rows.append(at if n > 1 else -1)
            at += n if n > 1 else 0
        decode_saves: tuple[list[int], list[int]] = ([], [])
        scratch_saves: tuple[list[int], list[int]] = ([], [])
        for i, c in enumerate(order):
            table, own = c.table(group), bool(c.group_tables)
            # A verify chunk's boundary counts its first token only (the engine's rule): the
            # proposals' states may be rejected.
            end = c.start_pos + 1 if i < num_decode else c.end_pos
            boundary = snapshot_at(c.start_pos, end, block_size)
            save = None
            if own and boundary and len(table) > boundary // block_size:
                save = (boundary - c.start_pos, table[boundary // block_size])
            if i >= num_decode:
                saves.append(save)
                continue
            if first_rows[i] >= 0:  # a verify chunk: its states go to the scratch
                verified[c.seq_id] = Verified(scratch, first_rows[i], c.start_pos, lens[i])  # type: ignore[arg-type]
                if save is not None:  # the state after `save[0]` tokens of the chunk
                    scratch_saves[0].append(first_rows[i] + save[0] - 1)
                    scratch_saves[1].append(save[1])
            elif save is not None:
                decode_saves[0].append(slots[i])
                decode_saves[1].append(save[1])
        meta = StateMeta(
            decode_steps=_decode_steps(lens, slots[:num_decode], first_rows, pool.device),
            prefill_slots=slots[num_decode:],
            prefill_saves=saves,
            scratch=scratch,
        )
        return cls(meta, decode_saves, scratch_saves)

    def save_decodes(self, pool: StatePool) -> None:
        """After the step: the decodes' and verify chunks' states at the block boundary they
        reached."""
        pool.copy(*self.decode_saves)
        if self.meta.scratch is not None:
            pool.restore(self.meta.scratch, *self.scratch_saves)


def _live_slot(
    pool: StatePool,
    c: SeqChunk,
    group: int,
    block_size: int,
    started: set[int],
    verified: dict[int, Verified],
) -> int:
    """The chunk's live slot, holding the state its first token continues from: zeroed for a
    new sequence, a saved state's copy for a prefix hit, the state at the last accepted token
    for a sequence whose last step verified proposals."""
    # Without its own tables (a runner driven by hand, the kit's driver), every group
    # reads the chunk's block table: its first block is the live slot, nothing saved.
    table, own = c.table(group), bool(c.group_tables)
    live = table[0]
    last = verified.pop(c.seq_id, None)
    if c.start_pos == 0:  # a new sequence, or one recomputed after preemption
        pool.zero(live)
    elif c.seq_id not in started:
        at = c.start_pos // block_size
        if not own or c.start_pos % block_size or len(table) <= at:
            raise EnginehouseError(
                f"sequence {c.seq_id} starts at position {c.start_pos} with no saved "
                "linear-attention state to resume from"
            )
        pool.copy([table[at]], [live])  # a prefix hit: the state saved there
    elif last is not None:
        pool.restore(last.scratch, [last.row_before(c.start_pos, c.seq_id)], [live])
    started.add(c.seq_id)
    return live


def _decode_steps(
    lens: list[int], slots: list[int], first_rows: list[int], device: torch.device
) -> list[DecodeStep]:
    """The decode rows as recurrent steps: step j takes the j-th token of every decode chunk
    that has one (a plain decode's only token at step 0), keeping verify chunks' states."""
    if not lens:
        return []
    if max(lens) == 1:  # decodes only: one step over every row
        return [DecodeStep(slice(0, len(lens)), torch.tensor(slots, device=device))]
    offsets = [sum(lens[:i]) for i in range(len(lens))]
    steps = []
    for j in range(max(lens)):
        take = [i for i, n in enumerate(lens) if n > j]
        which = [k for k, i in enumerate(take) if first_rows[i] >= 0]
        keep = None
        if which:
            scratch_rows = [first_rows[take[k]] + j for k in which]
            keep = (torch.tensor(which, device=device), torch.tensor(scratch_rows, device=device))
        steps.append(
            DecodeStep(
                torch.tensor([offsets[i] + j for i in take], device=device),
                torch.tensor([slots[i] for i in take], device=device),
                keep,
            )
        )
    return steps
