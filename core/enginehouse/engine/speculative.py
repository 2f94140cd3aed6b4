"""Speculative decoding: propose tokens cheaply, verify them all in one forward of the target.

Before each step the engine asks its proposer for up to K tokens after every decoding
sequence's last token (`Sequence.draft_ids`). The scheduler runs the last token and the
proposals as one chunk (`Logits.VERIFY`: logits at each of the K + 1 positions), and the
sampler, where the logits are, walks them in order (`Sampler._verify`): a greedy row keeps a
proposal while it equals the target's argmax; a sampled row keeps proposal d with probability
p(d) and otherwise draws from p with d taken out (rejection sampling with the residual
distribution of Leviathan et al. 2023 / Chen et al. 2023, for a proposer that is
deterministic, q = one-hot(d): the residual max(0, p - q) is p without d). Either way, the
tokens follow the target's own distribution exactly. Each step gives the accepted proposals
plus one token of the target's (the correction, or a bonus when all were kept).

A sequence's computed length and prefix-cache keys advance only over accepted tokens; the
rejected proposals' KV slots lie past its computed length and are overwritten next step.
A grammar checks every proposal before it is scheduled (proposals past the first one it
refuses are dropped) and gives one bitmask row per verified position (`fill_verify_bitmask`),
rolled back afterwards: the grammar only ever walks the tokens the target accepted.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from typing import Any, Protocol

import numpy as np

from ..config import EngineConfig
from ..errors import EnginehouseError
from ..runner import DraftRequest
from ..speculative_config import HEAD_METHODS, SpeculativeConfig
from .grammar import GrammarState, xgrammar
from .ngram import lookup
from .sequence import Sequence


class Proposer(Protocol):
    """Drafts tokens for decoding sequences (engine thread only)."""

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        """For each sequence, up to `limits[i]` tokens to follow its last token."""

    def finish(self, seq_ids: Seq[int]) -> None:
        """The sequences are gone: drop what the proposer keeps for them."""

    def close(self) -> None: ...


class NgramProposer:
    """Prompt lookup (`engine.ngram`): no model, proposals from the sequence's own tokens."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.min_n = int(config.prompt_lookup_min or 1)
        self.max_n = int(config.prompt_lookup_max or self.min_n)

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        return [lookup(s.token_ids, k, self.min_n, self.max_n) for s, k in zip(seqs, limits)]

    def finish(self, seq_ids: Seq[int]) -> None:
        pass

    def close(self) -> None:
        pass


class HeadProposer:
    """A draft head on the target's hidden states (EAGLE-3, EAGLE, MTP): the runner drafts
    (`propose_tokens`, as vLLM v1 keeps its EAGLE proposer in the model runner), since the
    hidden states and the head's KV are where the target runs; the engine hands it each
    decoding sequence's tokens and block table and checks the proposals (grammars) as any."""

    def __init__(self, spec: SpeculativeConfig, capabilities: Any, core: Any) -> None:
        executor = getattr(core, "executor", None)
        if not getattr(capabilities, "drafts_tokens", False):
            raise EnginehouseError(
                f"speculative_config method {spec.method!r} runs a draft head on the target's "
                "hidden states, but this backend's runner does not (it does not declare "
                "RunnerCapabilities(drafts_tokens=True)); use the native 'pytorch' backend, or "
                "method 'ngram' / 'draft_model'"
            )
        if not callable(getattr(executor, "propose_tokens", None)):
            raise EnginehouseError(
                f"speculative_config method {spec.method!r}: this engine's executor cannot ask "
                "its runner for proposals (it has no propose_tokens); use method 'ngram' / "
                "'draft_model'"
            )
        self.executor = executor

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        requests = [
            DraftRequest(s.seq_id, s.token_ids, s.num_computed, tuple(s.block_table), k)
            for s, k in zip(seqs, limits)
        ]
        return self.executor.propose_tokens(requests)

    def finish(self, seq_ids: Seq[int]) -> None:
        pass  # the runner hears of finished sequences with the step (finish_sequence)

    def close(self) -> None:
        pass


def make_proposer(config: EngineConfig, capabilities: Any, target: Any) -> Proposer | None:
    """The proposer `config.speculative_config` asks for (None without one). Refuses a backend
    that does not declare `verifies_tokens`: speculation must not fall back silently."""
    spec = config.speculative_config
    if spec is None:
        return None
    if not getattr(capabilities, "verifies_tokens", False):
        raise EnginehouseError(
            "speculative_config is set, but this backend cannot verify several tokens of a "
            "sequence in one step (its runner does not declare RunnerCapabilities("
            "verifies_tokens=True)); use the native 'pytorch' backend, or drop "
            "speculative_config"
        )
    if spec.method == "ngram":
        return NgramProposer(spec)
    if spec.method in HEAD_METHODS:
        return HeadProposer(spec, capabilities, target)
    from .draft_model import DraftModelProposer

    return DraftModelProposer(spec, config, target)


def draft_limit(seq: Sequence, k: int) -> int:
    """How many proposals are worth checking for `seq`: none past its length limits (the
    step adds the accepted ones and one more token)."""
    left = seq.params.max_new_tokens - seq.num_generated - 1
    return max(0, min(k, left, seq.max_len - seq.num_tokens))


def grammar_prefix(grammar: GrammarState, drafts: list[int]) -> list[int]:
    """The longest prefix of `drafts` the grammar accepts, ending at a token that completes
    it; the grammar is left as it was."""
    saved, taken = grammar.utf8_state, 0
    for token in drafts:
        if not grammar.accept(token):
            break
        taken += 1
        if grammar.terminated:
            break
    if taken:
        grammar.matcher.rollback(taken)
    grammar.utf8_state = saved
    return drafts[:taken]


def fill_verify_bitmask(
    walks: list[tuple[GrammarState, list[int], list[int]]], num_rows: int
) -> tuple[np.ndarray, list[float]]:
    """The grammar bitmask of a step that verifies proposals: for each constrained sequence
    (its grammar, its bitmask rows, its proposals), row j allows what may follow its first j
    proposals (which the grammar accepts: `grammar_prefix` checked them); then the grammar is
    rolled back. Also the seconds each sequence's grammar took, once per row."""
    xgr = xgrammar()
    bitmask = xgr.allocate_token_bitmask(num_rows, walks[0][0].utf8.vocab_size)
    took: list[float] = []
    for grammar, rows, drafts in walks:
        start = time.perf_counter()
        saved, taken = grammar.utf8_state, 0
        for j, row in enumerate(rows):
            grammar.fill(bitmask, row)
            bitmask[row] &= grammar.utf8.bits[grammar.utf8_state]
            if j < len(drafts) and j + 1 < len(rows):
                grammar.accept(drafts[j])
                taken += 1
        if taken:
            grammar.matcher.rollback(taken)
        grammar.utf8_state = saved
        took.extend([time.perf_counter() - start] * len(rows))
    return bitmask.numpy(), took


class SpecStats:
    """Counters of proposals and acceptances, under vLLM's names (`stats()`, `/metrics`)."""

    def __init__(self, k: int) -> None:
        self.num_drafts = 0  # verified proposals (one per sequence and step)
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_pos = [0] * k  # position j: proposals whose first j + 1 were kept

    def count(self, proposed: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        for j in range(accepted):
            self.accepted_per_pos[j] += 1

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "spec_decode_num_drafts": self.num_drafts,
            "spec_decode_num_draft_tokens": self.num_draft_tokens,
            "spec_decode_num_accepted_tokens": self.num_accepted_tokens,
            "spec_decode_num_accepted_tokens_per_pos": list(self.accepted_per_pos),
        }
        return with_ratios(out)


def with_ratios(stats: dict[str, Any]) -> dict[str, Any]:
    """Add the acceptance rate (accepted / proposed tokens) and the mean accepted length
    (tokens per verifying step: 1 + accepted / proposals, vLLM's definition) to counters,
    also after they were summed over replicas."""
    drafts = stats.get("spec_decode_num_drafts")
    if drafts is None:
        return stats
    proposed = stats.get("spec_decode_num_draft_tokens", 0)
    accepted = stats.get("spec_decode_num_accepted_tokens", 0)
    stats["spec_decode_acceptance_rate"] = accepted / proposed if proposed else 0.0
    stats["spec_decode_mean_accepted_length"] = 1 + accepted / drafts if drafts else 0.0
    return stats
