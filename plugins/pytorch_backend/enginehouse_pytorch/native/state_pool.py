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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from enginehouse.plugin_api import EnginehouseError, SeqChunk, snapshot_at

from .arch import LinearAttention
from .hybrid import state_bytes_per_sequence
from .linear_attention import LayerState, StateMeta


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
        return LayerState(self.conv[i], self.recurrent[i])

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
class StepStates:
    """The state side of one step: each chunk's live slot, restored from a saved state or
    zeroed where it starts, and the snapshots to save (prefill ones inside the layers, decode
    ones after the step, `save_decodes`)."""

    meta: StateMeta
    decode_saves: tuple[list[int], list[int]] = field(default_factory=lambda: ([], []))

    @classmethod
    def build(
        cls,
        pool: StatePool,
        order: list[SeqChunk],
        num_decode: int,
        group: int,
        block_size: int,
        started: set[int],
    ) -> StepStates:
        """`order`: the step's chunks, decodes first. `started`: the sequences whose live slot
        holds their state (the runner forgets one when the engine releases it)."""
        slots, saves, decode_saves = [], [], ([], [])
        for i, c in enumerate(order):
            # Without its own tables (a runner driven by hand, the kit's driver), every group
            # reads the chunk's block table: its first block is the live slot, nothing saved.
            table, own = c.table(group), bool(c.group_tables)
            live = table[0]
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
            started.add(c.seq_id)
            slots.append(live)
            boundary = snapshot_at(c.start_pos, c.end_pos, block_size)
            save = None
            if own and boundary and len(table) > boundary // block_size:
                save = (boundary - c.start_pos, table[boundary // block_size])
            if i < num_decode:
                if save is not None:
                    decode_saves[0].append(live)
                    decode_saves[1].append(save[1])
            else:
                saves.append(save)
        decodes = slots[:num_decode]
        meta = StateMeta(
            decode_slots=torch.tensor(decodes, device=pool.device) if decodes else None,
            prefill_slots=slots[num_decode:],
            prefill_saves=saves,
        )
        return cls(meta, decode_saves)

    def save_decodes(self, pool: StatePool) -> None:
        """After the step: the decodes' states at the block boundary they reached."""
        pool.copy(*self.decode_saves)
