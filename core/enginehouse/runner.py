"""The runner contract: what a backend plugin implements, and the batch it is handed each step."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class KVSpec:
    """How a runner stores KV: the block manager's unit of bookkeeping.

    A runner with contiguous per-sequence caches states `block_size` equal to the context length
    and so gets exactly one block per sequence. `bytes_per_block` turns a memory budget into a
    number of blocks. `prefix_caching` says whether blocks may be shared between sequences.
    """

    block_size: int
    bytes_per_block: int
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    prefix_caching: bool = True


@dataclass(frozen=True)
class SeqChunk:
    """One sequence's part of a step: a prefill chunk, or one decode token.

    `token_ids` are the tokens to compute now, at positions `start_pos ...`; the KV of positions
    before `start_pos` is already in the sequence's blocks. `block_table` covers every position
    up to and including the new ones.
    """

    seq_id: int
    token_ids: tuple[int, ...]
    start_pos: int
    block_table: tuple[int, ...]
    # Positions (0-based within this chunk) whose logits the engine needs back.
    logits_at: tuple[int, ...] = ()
    # Image positions (0-based within this chunk) and their embeddings, one row each: the model
    # takes these rows instead of looking the tokens up. Only runners whose probe accepts
    # vision-language models ever get them.
    embed_rows: tuple[int, ...] = ()
    embeds: torch.Tensor | None = field(default=None, compare=False, repr=False)
    # [3, len(token_ids)] multimodal rotary positions (Qwen2-VL's M-RoPE) when the sequence has
    # them; otherwise every token's position is start_pos + i.
    rope_positions: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)

    @property
    def is_prefill(self) -> bool:
        return self.start_pos == 0 or len(self.token_ids) > 1


@dataclass(frozen=True)
class ScheduledBatch:
    """One engine step. Runners read `chunks`, or the packed tensors built from them on demand."""

    chunks: tuple[SeqChunk, ...]
    block_size: int

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @cached_property
    def input_ids(self) -> torch.Tensor:
        """All new tokens packed without padding, sequence after sequence."""
        return torch.tensor([t for c in self.chunks for t in c.token_ids], dtype=torch.long)

    @cached_property
    def positions(self) -> torch.Tensor:
        return torch.tensor(
            [p for c in self.chunks for p in range(c.start_pos, c.end_pos)], dtype=torch.long
        )

    @cached_property
    def slot_mapping(self) -> torch.Tensor:
        """For each new token, its KV slot: block_id * block_size + offset in the block."""
        bs = self.block_size
        return torch.tensor(
            [
                c.block_table[p // bs] * bs + p % bs
                for c in self.chunks
                for p in range(c.start_pos, c.end_pos)
            ],
            dtype=torch.long,
        )

    @cached_property
    def logits_indices(self) -> torch.Tensor:
        """Rows of the packed tokens whose logits `execute` returns, in this order."""
        out, offset = [], 0
        for c in self.chunks:
            out.extend(offset + i for i in c.logits_at)
            offset += len(c.token_ids)
        return torch.tensor(out, dtype=torch.long)


@runtime_checkable
class ModelRunner(Protocol):
    """What a backend implements; the core's engine drives it.

    `execute` returns float logits of shape [len(batch.logits_indices), vocab_size]: one row per
    position named in the chunks' `logits_at`, in batch order.
    """

    kv_spec: KVSpec

    def load(self, progress: bool = True) -> None:
        """Load the weights (show a progress bar when `progress`)."""

    def allocate_kv(self, num_blocks: int) -> None:
        """Make room for `num_blocks` KV blocks of `kv_spec.block_size` tokens each."""

    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Run one step: write the new tokens' KV into their slots and return the logits."""

    def close(self) -> None:
        """Free the weights and the KV cache."""
