"""Backend-agnostic KV block bookkeeping: block tables, reference counts, the prefix cache.

Blocks hold `block_size` tokens. A full block is registered under a key made of its parent
block's hash, its tokens and the hashes of any images whose tokens it holds
(`Sequence.block_extra`), so a later sequence that starts with the same tokens can share it.
The first block's parent is the sequence's LoRA adapter load (0 for the base model), so
sequences of different adapters never share KV.
Freed blocks keep their contents and stay findable until they are reused, least recently freed
first.

A runner with KV groups (`KVSpec.groups`, see `enginehouse.kv_groups`) gets one pool of blocks
per group and each sequence one table per group (group 0's is `Sequence.block_table`). In a
sliding-window group the blocks that fall wholly out of the window are freed while the sequence
runs (`drop_out_of_window`): they go back to the pool, still findable, and the table keeps their
ids (the runner never reads them), so a sequence holds at most its window's blocks there.

The prefix rule with groups: a hit is the longest run of whole blocks at the start of the
prompt for which every group has what the next token reads, a full (or latent) group every
block before it, a sliding group only the blocks of the `window - 1` positions before it (its
earlier entries are placeholders, never read). A group with per-sequence state ("state")
turns prefix caching off unless it saves snapshots (`KVGroup.snapshots`); then a hit also
needs the state saved at its last block (see `enginehouse.kv_groups` for the whole scheme):
a chunk that reaches a block boundary gets one more block of the group for the state there
(`allocate`), registered under that block's key and let go of when the step is committed,
so saved states are evictable blocks of the group's pool like any freed block.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence as Seq

from ..kv_groups import KVGroup, prefix_rule, snapshot_at
from .sequence import Sequence

BlockKey = tuple[int, tuple[int, ...], tuple]
# What a sliding group's table holds for a block a prefix hit did not need: never read.
PLACEHOLDER = 0


class BlockPool:
    """One group's blocks: reference counts, the prefix cache, the free list."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        self.block_key: list[BlockKey | None] = [None] * num_blocks
        self.cached: dict[BlockKey, int] = {}
        # Free blocks in the order they were freed: reuse (and evict) from the front.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def take(self, block: int) -> None:
        if self.ref_count[block] == 0:
            del self.free[block]
        self.ref_count[block] += 1

    def pop(self) -> int:
        """A free block for new contents (its cache entry goes: it is about to be written)."""
        block, _ = self.free.popitem(last=False)
        old = self.block_key[block]
        if old is not None and self.cached.get(old) == block:
            del self.cached[old]
        self.block_key[block] = None
        self.ref_count[block] = 1
        return block

    def release(self, block: int) -> None:
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            self.free[block] = None

    def register(self, key: BlockKey, block: int) -> None:
        if key not in self.cached:
            self.cached[key] = block
            self.block_key[block] = key


class BlockManager:
    def __init__(
        self,
        num_blocks: int | Seq[int],
        block_size: int,
        enable_prefix_caching: bool,
        groups: Seq[KVGroup] = (),
    ) -> None:
        """`num_blocks`: one count, or one per group of `groups` (the runner's KV groups)."""
        counts = [num_blocks] if isinstance(num_blocks, int) else list(num_blocks)
        self.groups: list[KVGroup | None] = list(groups) or [None]  # None: the one full group
        if len(counts) != len(self.groups):
            raise ValueError(f"{len(counts)} block counts for {len(self.groups)} KV groups")
        self.pools = [BlockPool(n) for n in counts]
        self.num_blocks = sum(counts)
        self.block_size = block_size
        self.prefix_caching = enable_prefix_caching and prefix_rule(groups) is None
        # Per sequence id: the state-group blocks it holds only until its step is committed
        # (group, block, the table entry it saves or 0 for one restored from).
        self.pending: dict[int, list[tuple[int, int, int]]] = {}
        # Group 0's pool, as the single-group engine knew it (tests read these).
        self.ref_count, self.block_key = self.pools[0].ref_count, self.pools[0].block_key
        self.cached, self.free = self.pools[0].cached, self.pools[0].free

    @property
    def num_free(self) -> int:
        return sum(len(p.free) for p in self.pools)

    @property
    def num_used(self) -> int:
        return sum(p.num_used for p in self.pools)

    def used_per_group(self) -> list[int]:
        return [p.num_used for p in self.pools]

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _key(self, parent: int, tokens: Seq[int], extra: tuple = ()) -> BlockKey:
        return (parent, tuple(tokens), extra)

    def _take(self, block: int) -> None:
        self.pools[0].take(block)

    # --- a sequence's tables ------------------------------------------------------------------

    def table(self, seq: Sequence, group: int) -> list[int]:
        return seq.block_table if group == 0 else seq.group_tables[group - 1]

    def _prepare(self, seq: Sequence) -> None:
        """Give `seq` its per-group tables on first use."""
        n = len(self.groups)
        if len(seq.dropped) != n:
            seq.group_tables = [[] for _ in range(n - 1)]
            seq.dropped = [0] * n
            seq.sent_group_blocks = [0] * (n - 1)

    def _window(self, group: int) -> int | None:
        g = self.groups[group]
        return g.window if g is not None else None

    def _is_state(self, group: int) -> bool:
        g = self.groups[group]
        return g is not None and not g.paged

    def _saves(self, group: int) -> bool:
        """A state group whose snapshots prefix hits resume from."""
        g = self.groups[group]
        return g is not None and g.snapshots and self.prefix_caching

    def _need(self, seq: Sequence, group: int, num_tokens: int) -> int:
        have = len(self.table(seq, group))
        if self._is_state(group):
            return 1 - have if have < 1 else 0
        return max(0, self.blocks_for(num_tokens) - have)

    # --- the engine's calls -------------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> int:
        """Share the longest cached prefix of `seq`'s tokens; returns how many tokens it covers.

        At least one token is always left to compute, so that its logits can be sampled.
        """
        if not self.prefix_caching or seq.block_table:
            return 0
        self._prepare(seq)
        keys = self._cached_keys(seq)
        blocks = self._longest_hit(keys)
        if blocks and not self._restore_states(seq, keys[blocks - 1], blocks):
            blocks = 0
        bs = self.block_size
        for g, pool in enumerate(self.pools):
            if self._is_state(g):
                continue  # `_restore_states` made its table
            table = self.table(seq, g)
            first = self._first_block(g, blocks * bs) if blocks else 0
            table.extend([PLACEHOLDER] * first)
            for key in keys[first:blocks]:
                block = pool.cached[key]
                pool.take(block)
                table.append(block)
            seq.dropped[g] = first
        seq.block_hashes.extend(hash(k) for k in keys[:blocks])
        return blocks * bs

    def _restore_states(self, seq: Sequence, key: BlockKey, blocks: int) -> bool:
        """For a hit of `blocks` blocks ending at `key`: each state group's table gets a new
        live slot (entry 0) and the saved state to start from (entry `blocks`, held until the
        first step is committed). False, taking nothing, where a group has no free slot."""
        states = [g for g in range(len(self.pools)) if self._is_state(g)]
        for g in states:  # a live slot besides the saved block (itself perhaps a free one)
            pool = self.pools[g]
            if len(pool.free) - (pool.cached[key] in pool.free) < 1:
                return False
        for g in states:
            pool = self.pools[g]
            saved = pool.cached[key]
            pool.take(saved)
            self.table(seq, g)[:] = [pool.pop(), *[PLACEHOLDER] * (blocks - 1), saved]
            self.pending.setdefault(seq.seq_id, []).append((g, saved, 0))
        return True

    def _cached_keys(self, seq: Sequence) -> list[BlockKey]:
        """The keys of `seq`'s leading whole blocks (all but its last token), up to the first
        one a full-attention group has not cached: no hit can reach past it."""
        full = [
            p for g, p in enumerate(self.pools) if self._window(g) is None and not self._is_state(g)
        ]
        bs, parent, keys = self.block_size, _root(seq), []
        for i in range((seq.num_tokens - 1) // bs):
            key = self._key(parent, seq.token_ids[i * bs : (i + 1) * bs], seq.block_extra(i, bs))
            if any(key not in pool.cached for pool in full):
                break
            keys.append(key)
            parent = hash(key)
        return keys

    def _first_block(self, group: int, pos: int) -> int:
        """The first block a token at `pos` reads in `group`."""
        window = self._window(group)
        return 0 if window is None else max(0, pos - window + 1) // self.block_size

    def _longest_hit(self, keys: list[BlockKey]) -> int:
        """The most leading blocks every group can resume from (see the module's rule): the
        full groups have all of `keys`; a sliding group needs the run of cached blocks that
        ends at the hit to reach back to its window's first block; a state group, the state
        saved at the hit's last block."""
        states = [p for g, p in enumerate(self.pools) if self._is_state(g)]
        sliding = [g for g in range(len(self.pools)) if self._window(g) is not None]
        runs = {}  # per sliding group: run[k] = cached blocks in a row ending at block k - 1
        for g in sliding:
            run = [0]
            for key in keys:
                run.append(run[-1] + 1 if key in self.pools[g].cached else 0)
            runs[g] = run
        for blocks in range(len(keys), 0, -1):
            pos = blocks * self.block_size
            if any(keys[blocks - 1] not in p.cached for p in states):
                continue
            if all(runs[g][blocks] >= blocks - self._first_block(g, pos) for g in sliding):
                return blocks
        return 0

    def drop_out_of_window(self, seq: Sequence) -> None:
        """Free the blocks of `seq`'s sliding groups that its next token no longer reads."""
        if len(seq.dropped) != len(self.groups):
            return  # no tables yet
        for g, pool in enumerate(self.pools):
            if self._window(g) is None:
                continue
            table = self.table(seq, g)
            first = min(self._first_block(g, seq.num_computed), len(table))
            for i in range(seq.dropped[g], first):
                pool.release(table[i])
            seq.dropped[g] = max(seq.dropped[g], first)

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        self._prepare(seq)
        total = seq.num_computed + num_new_tokens
        return all(self._need(seq, g, total) <= len(pool.free) for g, pool in enumerate(self.pools))

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow `seq`'s block tables to hold `num_new_tokens` more tokens."""
        if not self.can_allocate(seq, num_new_tokens):
            raise RuntimeError("allocate() without can_allocate(): out of KV blocks")
        total = seq.num_computed + num_new_tokens
        for g, pool in enumerate(self.pools):
            table = self.table(seq, g)
            for _ in range(self._need(seq, g, total)):
                table.append(pool.pop())
            if self._saves(g):
                # Not past a verify step's proposals: their states may be rejected.
                self._snapshot(seq, g, total - len(getattr(seq, "draft_ids", ())))

    def _snapshot(self, seq: Sequence, group: int, end: int) -> None:
        """A block for the state at the last block boundary the chunk up to `end` reaches, at
        its table entry, where the group has a free block (a snapshot is never worth
        preempting for: without one, later prefix hits are only shorter)."""
        at = snapshot_at(seq.num_computed, end, self.block_size) // self.block_size
        pool, table = self.pools[group], self.table(seq, group)
        if not at or not pool.free:
            return
        table.extend([PLACEHOLDER] * (at - len(table)))
        table.append(pool.pop())
        self.pending.setdefault(seq.seq_id, []).append((group, table[at], at))

    def commit(self, seq: Sequence) -> None:
        """Register the blocks `seq` has completely computed so later sequences can share them."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        pending = self.pending.pop(seq.seq_id, [])
        saved = {(g, at): block for g, block, at in pending if at}
        parent = seq.block_hashes[-1] if seq.block_hashes else _root(seq)
        for i in range(len(seq.block_hashes), seq.num_computed // bs):
            key = self._key(parent, seq.token_ids[i * bs : (i + 1) * bs], seq.block_extra(i, bs))
            for g, pool in enumerate(self.pools):
                if not self._is_state(g):
                    pool.register(key, self.table(seq, g)[i])
                elif (g, i + 1) in saved:  # the state after this block
                    pool.register(key, saved[g, i + 1])
            parent = hash(key)
            seq.block_hashes.append(parent)
        for g, block, _ in pending:  # saved (or restored from): cached, no longer held
            self.pools[g].release(block)

    def free_seq(self, seq: Sequence) -> None:
        self._prepare(seq)
        # Tail blocks first, so that a sequence's shared head outlives its private tail.
        for g, pool in enumerate(self.pools):
            table = self.table(seq, g)
            # A state group's table holds its live slot; the rest are pending or not held.
            held = table[:1] if self._is_state(g) else table[seq.dropped[g] :]
            for block in reversed(held):
                pool.release(block)
            table.clear()
            seq.dropped[g] = 0
        for g, block, _ in self.pending.pop(seq.seq_id, []):
            self.pools[g].release(block)
        seq.block_hashes.clear()


def _root(seq: Sequence) -> int:
    """The parent of a sequence's first block: its adapter's, so that KV computed with one
    adapter is never found by a sequence of another (or of the base model, 0)."""
    return 0 if not seq.adapter_load_id else hash(("lora", seq.adapter_load_id))
