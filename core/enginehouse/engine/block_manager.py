"""Backend-agnostic KV block bookkeeping: block tables, reference counts, the prefix cache.

Blocks hold `block_size` tokens. A full block is registered under a key made of its parent
block's hash, its tokens and the hashes of any images whose tokens it holds
(`Sequence.block_extra`), so a later sequence that starts with the same tokens can share it.
The first block's parent is the sequence's LoRA adapter load (0 for the base model), so
sequences of different adapters never share KV.
Freed blocks keep their contents and stay findable until they are reused, least recently freed
first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence as Seq

from .sequence import Sequence

BlockKey = tuple[int, tuple[int, ...], tuple]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_key: list[BlockKey | None] = [None] * num_blocks
        self.cached: dict[BlockKey, int] = {}
        # Free blocks in the order they were freed: reuse (and evict) from the front.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _key(self, parent: int, tokens: Seq[int], extra: tuple = ()) -> BlockKey:
        return (parent, tuple(tokens), extra)

    def _take(self, block: int) -> None:
        if self.ref_count[block] == 0:
            del self.free[block]
        self.ref_count[block] += 1

    def match_prefix(self, seq: Sequence) -> int:
        """Share the longest cached prefix of `seq`'s tokens; returns how many tokens it covers.

        At least one token is always left to compute, so that its logits can be sampled.
        """
        if not self.prefix_caching or seq.block_table:
            return 0
        bs, parent = self.block_size, _root(seq)
        for i in range((seq.num_tokens - 1) // bs):
            key = self._key(parent, seq.token_ids[i * bs : (i + 1) * bs], seq.block_extra(i, bs))
            block = self.cached.get(key)
            if block is None:
                break
            self._take(block)
            seq.block_table.append(block)
            parent = hash(key)
            seq.block_hashes.append(parent)
        return len(seq.block_table) * bs

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = self.blocks_for(seq.num_computed + num_new_tokens) - len(seq.block_table)
        return need <= len(self.free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow `seq`'s block table to hold `num_new_tokens` more tokens."""
        need = self.blocks_for(seq.num_computed + num_new_tokens) - len(seq.block_table)
        if need > len(self.free):
            raise RuntimeError("allocate() without can_allocate(): out of KV blocks")
        for _ in range(need):
            block, _ = self.free.popitem(last=False)
            old = self.block_key[block]
            if old is not None and self.cached.get(old) == block:
                del self.cached[old]  # evict: its contents are about to be overwritten
            self.block_key[block] = None
            self.ref_count[block] = 1
            seq.block_table.append(block)

    def commit(self, seq: Sequence) -> None:
        """Register the blocks `seq` has completely computed so later sequences can share them."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        parent = seq.block_hashes[-1] if seq.block_hashes else _root(seq)
        for i in range(len(seq.block_hashes), seq.num_computed // bs):
            key = self._key(parent, seq.token_ids[i * bs : (i + 1) * bs], seq.block_extra(i, bs))
            block = seq.block_table[i]
            if key not in self.cached:
                self.cached[key] = block
                self.block_key[block] = key
            parent = hash(key)
            seq.block_hashes.append(parent)

    def free_seq(self, seq: Sequence) -> None:
        # Tail blocks first, so that a sequence's shared head outlives its private tail.
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None
        seq.block_table.clear()
        seq.block_hashes.clear()


def _root(seq: Sequence) -> int:
    """The parent of a sequence's first block: its adapter's, so that KV computed with one
    adapter is never found by a sequence of another (or of the base model, 0)."""
    return 0 if not seq.adapter_load_id else hash(("lora", seq.adapter_load_id))
