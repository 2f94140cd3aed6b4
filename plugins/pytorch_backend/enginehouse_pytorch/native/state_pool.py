"""Per-sequence state slots of linear-attention layers: a fixed pool, one slot per sequence.

A linear-attention layer's memory does not grow with the context: each running sequence
holds one slot (its conv state and recurrent state in every linear layer) from its first
prompt token until the engine releases it (finished, aborted or preempted). The pool has one
slot per sequence the engine may run at once (`max_batch_size`), allocated up front, and its
bytes come out of the KV budget. A sequence's first chunk (position 0) takes a free slot and
zeroes it, so a preempted sequence recomputed from position 0 starts from a fresh state.
"""

from __future__ import annotations

import torch

from enginehouse.plugin_api import EnginehouseError

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
        self.free = list(range(slots - 1, -1, -1))  # popped from the end: slot 0 first
        self.owner: dict[int, int] = {}  # seq_id -> slot

    @staticmethod
    def bytes_for(linear: LinearAttention, slots: int, dtype: torch.dtype) -> int:
        return state_bytes_per_sequence(linear, dtype.itemsize) * slots

    @property
    def nbytes(self) -> int:
        return self.conv.nbytes + self.recurrent.nbytes

    def layer(self, i: int) -> LayerState:
        """The states of the i-th linear layer (counting linear layers only)."""
        return LayerState(self.conv[i], self.recurrent[i])

    def _slot(self, seq_id: int, start_pos: int) -> int:
        slot = self.owner.get(seq_id)
        if start_pos == 0:  # a new sequence, or one recomputed after preemption
            if slot is None:
                if not self.free:
                    raise EnginehouseError(
                        f"no free linear-attention state slot for sequence {seq_id}: all "
                        f"{len(self.owner)} are held (more running sequences than "
                        "max_batch_size, or a released sequence the runner was not told of)"
                    )
                slot = self.owner[seq_id] = self.free.pop()
            self.conv[:, slot].zero_()
            self.recurrent[:, slot].zero_()
        elif slot is None:
            raise EnginehouseError(
                f"sequence {seq_id} continues at position {start_pos} but has no saved "
                "linear-attention state (states are only kept from position 0 on)"
            )
        return slot

    def metadata(self, order: list, num_decode: int) -> StateMeta:
        """The slots of the step's sequences, in the runner's order (decodes first)."""
        slots = [self._slot(c.seq_id, c.start_pos) for c in order]
        decodes = slots[:num_decode]
        return StateMeta(
            decode_slots=torch.tensor(decodes, device=self.device) if decodes else None,
            prefill_slots=slots[num_decode:],
        )

    def release(self, seq_id: int) -> None:
        slot = self.owner.pop(seq_id, None)
        if slot is not None:
            self.free.append(slot)

    def release_all(self) -> None:
        for seq_id in list(self.owner):
            self.release(seq_id)
