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
earlier entries are placeholders, never read). A group with per-sequence state turns prefix
caching off (`kv_groups.prefix_rule`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence as Seq

from ..kv_groups import KVGroup, prefix_rule
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
        bs = self.block_size
        for g, pool in enumerate(self.pools):
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

    def _cached_keys(self, seq: Sequence) -> list[BlockKey]:
        """The keys of `seq`'s leading whole blocks (all but its last token), up to the first
        one a full-attention group has not cached: no hit can reach past it."""
        full = [p for g, p in enumerate(self.pools) if self._window(g) is None]
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
        ends at the hit to reach back to its window's first block."""
        sliding = [g for g in range(len(self.pools)) if self._window(g) is not None]
        runs = {}  # per sliding group: run[k] = cached blocks in a row ending at block k - 1
        for g in sliding:
            run = [0]
            for key in keys:
                run.append(run[-1] + 1 if key in self.pools[g].cached else 0)
            runs[g] = run
        for blocks in range(len(keys), 0, -1):
            pos = blocks * self.block_size
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

    def commit(self, seq: Sequence) -> None:
        """Register the blocks `seq` has completely computed so later sequences can share them."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        parent = seq.block_hashes[-1] if seq.block_hashes else _root(seq)
        for i in range(len(seq.block_hashes), seq.num_computed // bs):
            key = self._key(parent, seq.token_ids[i * bs : (i + 1) * bs], seq.block_extra(i, bs))
            for g, pool in enumerate(self.pools):
                pool.register(key, self.table(seq, g)[i])
            parent = hash(key)
            seq.block_hashes.append(parent)

    def free_seq(self, seq: Sequence) -> None:
        self._prepare(seq)
        # Tail blocks first, so that a sequence's shared head outlives its private tail.
        for g, pool in enumerate(self.pools):
            table = self.table(seq, g)
            for block in reversed(table[seq.dropped[g] :]):
                pool.release(block)
            table.clear()
            seq.dropped[g] = 0
        seq.block_hashes.clear()


def _root(seq: Sequence) -> int:
    """The parent of a sequence's first block: its adapter's, so that KV computed with one
    adapter is never found by a sequence of another (or of the base model, 0)."""
    return 0 if not seq.adapter_load_id else hash(("lora", seq.adapter_load_id))
