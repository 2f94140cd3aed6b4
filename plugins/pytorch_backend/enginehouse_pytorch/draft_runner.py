"""The native runner with a draft head (speculative_config methods 'eagle3', 'eagle', 'mtp').

`DraftingRunner` is `NativeRunner` plus `native.drafter.Drafter`: its forwards keep the target's
hidden states per sequence (the per-op path: the one-call CPU decode step and CUDA graphs keep
none), its KV budget counts the head's one-layer cache beside the target's, and it declares
`drafts_tokens`: the engine asks `propose_tokens` for each decoding sequence's next tokens
before a step. At tp > 1 every rank runs that per-op forward (the collectives match) and
rank 0 alone keeps the hidden states and runs the (unsharded) head, with whole copies of the
target's embedding (and EAGLE's lm_head): the executor asks rank 0
(`DistributedExecutor.propose_tokens`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from enginehouse import EngineConfig, ModelSpec
from enginehouse.plugin_api import (
    DraftRequest,
    InvalidModelError,
    RunnerCapabilities,
    RunnerContext,
)

from .hybrid_runner import native_runner
from .native.arch import arch_from_config, language_model
from .native.draft_heads import HEAD_METHODS, head_bytes_per_token
from .native.draft_support import draft_refusal
from .native.drafter import Drafter
from .native_runner import NativeRunner

log = logging.getLogger(__name__)


class DraftingRunner(NativeRunner):
    capabilities = RunnerCapabilities(
        profiles=True,
        verifies_tokens=True,
        lora=True,
        drafts_tokens=True,
        finishes_sequences=True,  # the head forgets a finished sequence's hidden states
    )

    def __init__(self, spec: ModelSpec, config: EngineConfig, context: RunnerContext) -> None:
        super().__init__(spec, config, context)
        spec_config = config.speculative_config
        assert spec_config is not None and spec_config.method in HEAD_METHODS
        self.head_method, self.head_folder = spec_config.method, spec_config.model
        self.num_drafts = spec_config.k
        self.rank = context.rank  # rank 0 runs the head (it samples, so it proposes)
        groups = self.kv_spec.groups
        # One paged group (DeepSeek's latent cache) has group 0's table, the one the head's
        # cache follows; several paged groups (sliding windows) do not share one table. A
        # hybrid's "state" group (one slot per sequence, after the paged one) has no table.
        paged = [g for g in groups if g.kind != "state"]
        if len(paged) > 1 or any(g.kind not in ("full", "mla") for g in groups[:1]):
            raise InvalidModelError(
                f"speculative_config method {self.head_method!r}: {self.arch.family} has "
                "sliding-window layers (KV groups), whose block tables the head's cache does "
                "not follow yet; use method 'ngram' or 'draft_model'"
            )
        # The head's one-layer cache shares the target's blocks: count it in every block.
        per_token = head_bytes_per_token(self.head_method, self.head_folder, self.arch, self.dtype)
        if groups:  # a declared group is planned from its own bytes per token
            g = groups[0]
            g = dataclasses.replace(g, bytes_per_token=g.bytes_per_token + per_token)
            groups = (g, *groups[1:])
        self.kv_spec = dataclasses.replace(
            self.kv_spec,
            bytes_per_block=self.kv_spec.bytes_per_block + per_token * self.block_size,
            groups=groups,
        )

    def load(self, progress: bool = True) -> None:
        super().load(progress)
        active = self.rank == 0
        self.drafter = Drafter(self, self.head_method, self.head_folder, self.num_drafts, active)

    def allocate_kv(self, num_blocks: int) -> None:
        super().allocate_kv(num_blocks)
        self.graphs = None  # a captured step keeps no hidden states for the head
        # The head's cache mirrors group 0's blocks (the table it follows).
        self.drafter.allocate(self._group_counts(num_blocks)[0])  # type: ignore[union-attr]

    def profile_run(self, num_tokens: int) -> None:
        super().profile_run(num_tokens)
        self.drafter.seqs.clear()  # type: ignore[union-attr]

    def propose_tokens(self, requests: Sequence[DraftRequest]) -> list[list[int]]:
        """The head's proposals; a failure proposes nothing this step (logged): the target
        decodes on, and at tp > 1 the ranks stay up."""
        try:
            return self.drafter.propose(self.model, requests)  # type: ignore[union-attr]
        except Exception:
            log.exception("the draft head failed; this step proposes nothing")
            return [[] for _ in requests]

    def finish_sequence(self, seq_id: int) -> None:
        self.drafter.finish(seq_id)  # type: ignore[union-attr]

    def close(self) -> None:
        self.drafter = None
        super().close()


def pytorch_runner(spec: ModelSpec, config: EngineConfig, context: RunnerContext) -> NativeRunner:
    """The `pytorch` backend's runner: `DraftingRunner` where speculative_config names a draft
    head (`HybridDraftingRunner` for a hybrid model's MTP layers), else the native (or
    hybrid) runner."""
    spec_config = config.speculative_config
    if spec_config is None or spec_config.method not in HEAD_METHODS:
        return native_runner(spec, config, context)
    arch = arch_from_config(*language_model(spec.architecture, spec.config, spec.facts))
    refusal = draft_refusal(arch, spec_config.method)
    if arch.linear is not None and refusal:
        raise InvalidModelError(refusal)
    if arch.linear is not None:
        from .hybrid_drafting_runner import HybridDraftingRunner

        return HybridDraftingRunner(spec, config, context)
    return DraftingRunner(spec, config, context)
