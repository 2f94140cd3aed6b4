"""The `draft_model` proposer: a small model sharing the target's tokenizer drafts K tokens.

The draft is found, probed and loaded like any model (`pipeline`'s resolver and backends), in
the engine's process at tp=1, with a KV cache of its own and its own block bookkeeping (no
prefix cache). Each step it catches up on the tokens it has not seen (the prompt the first
time; later the target's last token and any proposals it did not compute), then decodes
greedily, one batched forward per proposed token. Its greedy choice is a deterministic
proposal, which the target's rejection sampling keeps exact (engine/speculative.py). What it
computed past the tokens the target accepted is dropped: its KV there is overwritten. A draft
with a recurrent state (a "state" KV group: Qwen3-Next, Qwen3.5) cannot be rewound: after a
rejected proposal it recomputes the sequence from its start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import EngineConfig
from ..errors import InvalidModelError
from ..runner import ScheduledBatch, SeqChunk, capabilities_of
from ..speculative_config import SpeculativeConfig
from .block_manager import BlockManager
from .kv_plan import plan_kv_blocks
from .sequence import Sequence

log = logging.getLogger(__name__)


@dataclass
class _DraftSeq:
    """What the draft keeps of one sequence: the tokens whose KV it holds, and its blocks
    (the fields `BlockManager` reads)."""

    seq_id: int  # the target's sequence's
    token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    group_tables: list[list[int]] = field(default_factory=list)  # groups 1..: BlockManager's
    dropped: list[int] = field(default_factory=list)
    sent_group_blocks: list[int] = field(default_factory=list)

    @property
    def num_computed(self) -> int:
        return len(self.token_ids)


class DraftModelProposer:
    def __init__(self, spec_config: SpeculativeConfig, config: EngineConfig, core: Any) -> None:
        from ..pipeline import build_runner, decide_backend, load_tokenizer, read_spec

        self.config = config.model_copy(
            update={
                "speculative_config": None,
                "tp": 1,
                "dp": 1,
                "distributed_executor_backend": None,
            }
        )
        spec = read_spec(spec_config.model, spec_config.revision)  # type: ignore[arg-type]
        check_vocabulary(spec, core, load_tokenizer if spec.tokenizer_files else None)
        decision = decide_backend(spec, self.config)
        self.runner = build_runner(decision, spec, self.config, progress=False)
        try:
            caps = capabilities_of(self.runner)
            self.releases = caps.releases_sequences
            self.finishes = caps.finishes_sequences
            blocks = plan_kv_blocks(self.runner, self.config, core.session_len)
            self.runner.allocate_kv(blocks)
        except BaseException:
            self.runner.close()
            raise
        kv = self.runner.kv_spec
        self.block_size = kv.block_size
        counts: int | list[int] = blocks
        if kv.groups:  # one pool per KV group, shared out as the runner shares them
            cfg = self.config
            plans = kv.group_blocks(
                blocks, core.session_len, cfg.max_num_batched_tokens, cfg.max_batch_size
            )
            counts = [p.blocks for p in plans]
        self.groups = len(kv.groups)
        self.blocks = BlockManager(counts, self.block_size, False, kv.groups)
        # A recurrent state holds one position: it cannot take back rejected proposals.
        self.rewinds = not any(g.kind == "state" for g in kv.groups)
        self.seqs: dict[int, _DraftSeq] = {}
        log.info("draft model %s: %d KV blocks of %d", spec.model_id, blocks, self.block_size)

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in seqs]
        # Round 0 catches each sequence up and drafts its first token; round r its r + 1-th.
        active = [i for i, (s, k) in enumerate(zip(seqs, limits)) if self._prepare(s, k)]
        pending = {i: seqs[i].token_ids[self.seqs[seqs[i].seq_id].num_computed :] for i in active}
        for r in range(max(limits, default=0)):
            active = [i for i in active if r < limits[i]]
            if not active:
                break
            chunks = []
            for i in active:
                state = self.seqs[seqs[i].seq_id]
                tokens = pending[i]
                chunks.append(
                    SeqChunk(
                        seqs[i].seq_id,
                        tuple(tokens),
                        state.num_computed,
                        tuple(state.block_table),
                        (len(tokens) - 1,),
                        group_tables=self._tables(state),
                    )
                )
                state.token_ids.extend(tokens)
            logits = self.runner.execute(ScheduledBatch(tuple(chunks), self.block_size))
            for i, token in zip(active, logits.argmax(dim=-1).tolist()):
                drafts[i].append(token)
                pending[i] = [token]
        return drafts

    def _prepare(self, seq: Sequence, k: int) -> bool:
        """Drop what the draft computed past the sequence's tokens, and make room for this
        step's proposals; False where its KV cache is full (no proposals this step)."""
        state = self.seqs.setdefault(seq.seq_id, _DraftSeq(seq.seq_id))
        keep = _common_prefix(state.token_ids, seq.token_ids, seq.num_tokens - 1)
        if keep < state.num_computed and not self.rewinds:
            keep = 0  # recompute from the start (the runner starts a fresh state at 0)
        del state.token_ids[keep:]
        # Positions up to num_tokens - 1 + (k - 1): the last proposal is never fed back.
        new = seq.num_tokens - state.num_computed + k - 1
        if not self.blocks.can_allocate(state, new):  # type: ignore[arg-type]
            return False
        self.blocks.allocate(state, new)  # type: ignore[arg-type]
        return True

    def _tables(self, state: _DraftSeq) -> tuple[tuple[int, ...], ...]:
        """Each KV group's table (none for a draft with one implicit group)."""
        if not self.groups:
            return ()
        return tuple(tuple(self.blocks.table(state, g)) for g in range(self.groups))  # type: ignore[arg-type]

    def finish(self, seq_ids: Any) -> None:
        for seq_id in seq_ids:
            state = self.seqs.pop(seq_id, None)
            if state is None:
                continue
            if self.releases and state.block_table:
                self.runner.release_sequence(seq_id, tuple(state.block_table))  # type: ignore
            if self.finishes:
                self.runner.finish_sequence(seq_id)  # type: ignore[attr-defined]
            self.blocks.free_seq(state)  # type: ignore[arg-type]

    def close(self) -> None:
        self.seqs.clear()
        self.runner.close()


def _common_prefix(have: list[int], tokens: list[int], limit: int) -> int:
    """How many leading tokens `have` and `tokens` share, at most `limit`."""
    n = min(len(have), limit)
    if have[:n] == tokens[:n]:
        return n
    a = torch.tensor(have[:n])
    b = torch.tensor(tokens[:n])
    return int((a != b).nonzero()[0, 0])


def check_vocabulary(spec: Any, core: Any, load_tokenizer: Any) -> None:
    """Refuse a draft whose tokens mean something else than the target's: a different
    tokenizer vocabulary (or, without tokenizer files, a different vocabulary size)."""
    target_size = core.vocab_size
    draft_size = int(spec.config.get("vocab_size") or 0)
    if load_tokenizer is not None:
        draft = load_tokenizer(spec, core.config.trust_remote_code)
        if draft.get_vocab() != core.tokenizer.get_vocab():
            raise InvalidModelError(
                f"the draft model {spec.model_id} has a different tokenizer vocabulary "
                f"({len(draft)} tokens) than the target ({len(core.tokenizer)} tokens): a "
                "draft must share the target's tokenizer; pick a smaller model of the same "
                "family, or use {'method': 'ngram'}"
            )
    if draft_size > target_size or (load_tokenizer is None and draft_size != target_size):
        raise InvalidModelError(
            f"the draft model {spec.model_id} has a vocabulary of {draft_size} tokens, the "
            f"target {target_size}: a draft must share the target's tokenizer; pick a smaller "
            "model of the same family, or use {'method': 'ngram'}"
        )
