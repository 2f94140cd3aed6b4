"""The KV cache as a set of layer groups, each of its own kind (the runner contract's `KVGroup`).

A runner that keeps one kind of KV for every layer declares nothing more than `KVSpec` (one
implicit full-attention group). A runner whose layers keep different things declares
`KVSpec(groups=...)`, one `KVGroup` per kind of layer:

- "full": paged KV of every position, as a plain decoder keeps it.
- "sliding": paged KV of a sliding-window layer. Only the last `window - 1` positions before a
  token are read, so the blocks that fall wholly out of the window are freed while the sequence
  runs (the block manager does it) and memory per sequence stays bounded by the window. Its
  block table keeps the ids of the freed blocks: a runner must never read a position more than
  `window - 1` before the token it computes.
- "mla": multi-head latent attention's cache (one compressed latent and one rope key per
  token): paged exactly like "full", only its `bytes_per_token` differ.
- "state": a fixed-size slot per sequence (linear-attention or state-space layers' recurrent
  state): `bytes_per_seq` instead of bytes per token. Each running sequence holds one block of
  the group's pool, its live state slot: entry 0 of its table in the group. A state describes
  one position only, so a prefix hit can resume only where a copy of it was saved:
  - without `snapshots`, nothing is saved and a model with the group gets no prefix hits
    (`prefix_rule` says why);
  - with `snapshots` (and prefix caching on), the block manager gives a chunk that reaches a
    block boundary one more block of the group, at entry `b // block_size` of the table, where
    `b` is the last boundary the chunk reaches (`snapshot_at`); the runner copies the state
    after position `b - 1` into it (mid-chunk where `b` falls inside the chunk). Once the step
    ran, the block is registered in the prefix cache under the key of the full-attention block
    that ends at `b`, and the sequence lets go of it: saved states are cached, evictable blocks
    of the group's pool, never more than its free blocks. A prefix hit is cut back to the
    longest run of cached blocks whose last one has a saved state; the new sequence's table
    then has that state at entry `hit // block_size`, and the runner copies it into the live
    slot before its first chunk (which starts at the hit). Other entries are placeholders,
    never read. A sequence holds at most two blocks of the group (`blocks_per_seq`).

Every group is paged with the spec's `block_size`; each has its own pool of blocks and each
sequence its own block table per group (`SeqChunk.table(g)`). `total_blocks` turns a memory
budget into blocks and `split_blocks` shares them between the groups: a state group first
gets its slots for `max_batch_size` running sequences (two each with snapshots), since a
sequence cannot run without one; the paged groups share the rest in proportion to what one
sequence at full context holds in each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

KINDS = ("full", "sliding", "mla", "state")


@dataclass(frozen=True)
class KVGroup:
    """One kind of layer's cache: its `kind` (see `KINDS`), its layers (model layer indices),
    and what one token (paged kinds) or one sequence ("state") takes across those layers."""

    kind: str
    layers: tuple[int, ...]
    bytes_per_token: int = 0  # "full", "sliding", "mla": across the group's layers
    window: int | None = None  # "sliding": a token sees the `window` positions up to itself
    bytes_per_seq: int = 0  # "state": one sequence's state across the group's layers
    # "state": the runner saves the state at block boundaries on request (see the module), so
    # prefix hits can resume from it.
    snapshots: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"KVGroup kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if (self.kind == "sliding") != (self.window is not None):
            raise ValueError("a KVGroup has a window exactly when its kind is 'sliding'")
        if self.window is not None and self.window < 1:
            raise ValueError(f"a sliding window of {self.window} tokens; give one >= 1")
        if self.kind == "state" and self.bytes_per_seq <= 0:
            raise ValueError("a 'state' KVGroup needs bytes_per_seq > 0")
        if self.snapshots and self.kind != "state":
            raise ValueError("only a 'state' KVGroup saves snapshots")
        if self.kind != "state" and self.bytes_per_token <= 0:
            raise ValueError(f"a {self.kind!r} KVGroup needs bytes_per_token > 0")

    @property
    def paged(self) -> bool:
        return self.kind != "state"

    def block_bytes(self, block_size: int) -> int:
        """Bytes of one block of this group's pool (a state group's block is one state)."""
        return self.bytes_per_token * block_size if self.paged else self.bytes_per_seq

    def blocks_per_seq(self, session_len: int, max_chunk: int, block_size: int) -> int:
        """The most blocks one sequence holds at once in this group: its whole context for
        full attention, the window and the largest chunk for a sliding one, one state (and the
        snapshot a step is saving, where the group saves them)."""
        if not self.paged:
            return 2 if self.snapshots else 1
        whole = math.ceil(session_len / block_size)
        if self.window is None:
            return whole
        # A chunk's first token reads window - 1 earlier positions, its last one writes; the
        # window's first block may start anywhere inside a block, hence the one more.
        return min(whole, math.ceil((self.window - 1 + max_chunk) / block_size) + 1)

    def first_needed(self, pos: int) -> int:
        """The first position a token at `pos` reads (0 for full attention)."""
        return 0 if self.window is None else max(0, pos - self.window + 1)

    def describe(self) -> str:
        if self.kind == "sliding":
            return f"sliding window {self.window}"
        names = {"full": "full attention", "mla": "latent attention (mla)", "state": "state"}
        return names[self.kind]


@dataclass(frozen=True)
class GroupPlan:
    """One group's share of the KV blocks, and what that holds (for `explain` and stats)."""

    group: KVGroup
    blocks: int
    blocks_per_seq: int
    block_bytes: int

    @property
    def bytes(self) -> int:
        return self.blocks * self.block_bytes

    @property
    def tokens(self) -> int:
        """Tokens the pool holds (sequences for a state group)."""
        return self.blocks * (self.block_size if self.group.paged else 1)

    block_size: int = 16


def total_blocks(
    groups: Sequence[KVGroup],
    budget: int,
    block_size: int,
    session_len: int,
    max_batch_size: int,
    max_chunk: int,
) -> int:
    """How many blocks, all groups together, `budget` bytes buy when `split_blocks` shares
    them: a state group's slots for `max_batch_size` sequences first (`state_blocks`), then
    the paged groups' blocks from what is left, never more than `max_batch_size` sequences at
    full context can use."""
    per_seq = [g.blocks_per_seq(session_len, max_chunk, block_size) for g in groups]
    states = state_blocks(groups, max_batch_size)
    left = budget - sum(n * g.block_bytes(block_size) for n, g in zip(states, groups))
    paged = [(n, g) for n, g in zip(per_seq, groups) if g.paged]
    if not paged:
        return sum(states)
    whole = sum(n for n, _ in paged)
    seq_bytes = sum(n * g.block_bytes(block_size) for n, g in paged)
    return sum(states) + min(max(left, 0) * whole // seq_bytes, whole * max_batch_size)


def state_blocks(groups: Sequence[KVGroup], max_batch_size: int | None) -> list[int]:
    """Per group, the blocks a state group takes before the paged groups share the rest:
    what `max_batch_size` running sequences hold (0 for a paged group). A state slot is
    needed to run at all, and no more than `max_batch_size` sequences run at once."""
    if max_batch_size is None:
        if not all(g.paged for g in groups):
            raise ValueError(
                "a 'state' KVGroup's blocks are counted for max_batch_size sequences: pass "
                "KVSpec.group_blocks(..., max_batch_size=config.max_batch_size) as the engine does"
            )
        return [0] * len(groups)
    return [0 if g.paged else g.blocks_per_seq(0, 0, 1) * max_batch_size for g in groups]


def split_blocks(
    groups: Sequence[KVGroup],
    total: int,
    block_size: int,
    session_len: int,
    max_chunk: int,
    max_batch_size: int | None = None,
) -> list[GroupPlan]:
    """Share `total` blocks between the groups (the engine and the runner both call this, so
    they agree): a state group takes its slots for `max_batch_size` sequences
    (`state_blocks`), the paged groups share the rest in proportion to what one sequence at
    full context holds in each (`max_batch_size` is required where there is a state group).
    With one group it gets them all."""
    per_seq = [g.blocks_per_seq(session_len, max_chunk, block_size) for g in groups]
    states = state_blocks(groups, max_batch_size)
    rest = total - sum(states)
    sharing = [n for n, fixed in zip(per_seq, states) if not fixed]
    whole = sum(sharing) or 1
    return [
        GroupPlan(g, fixed or rest * n // whole, n, g.block_bytes(block_size), block_size)
        for g, n, fixed in zip(groups, per_seq, states)
    ]


def sequences_that_fit(plans: Sequence[GroupPlan]) -> int:
    """Sequences at full context the planned pools hold at once (the tightest group's)."""
    return min(p.blocks // p.blocks_per_seq for p in plans)


def snapshot_at(start: int, end: int, block_size: int) -> int:
    """The position whose state a chunk of positions `start .. end - 1` saves: the last block
    boundary it reaches (0: none, the chunk stays inside one block)."""
    boundary = end // block_size * block_size
    return boundary if boundary > start else 0


def prefix_rule(groups: Sequence[KVGroup]) -> str | None:
    """Why prefix hits are impossible for these groups, or None where they work."""
    state = [g for g in groups if g.kind == "state" and not g.snapshots]
    if state:
        return (
            "a recurrent state describes one position only and this runner saves no copies "
            "of it, so a cached prefix cannot be resumed from (prefix caching is off for a "
            "'state' group without snapshots)"
        )
    return None
