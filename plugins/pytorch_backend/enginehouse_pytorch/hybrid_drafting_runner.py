"""The hybrid runner with its checkpoint's MTP layer (speculative_config method 'mtp' on
Qwen3-Next / Qwen3.5).

`HybridDraftingRunner` is `HybridRunner` (linear-attention states, kept per verified position)
plus `DraftingRunner`'s head handling (`native.drafter.Drafter`): the MTP layer is a
full-attention layer, so its one-layer paged cache follows the full-attention group's (group
0's) block tables and counts in that group's bytes per token; the "state" group is untouched.
"""

from __future__ import annotations

from enginehouse.plugin_api import RunnerCapabilities

from .draft_runner import DraftingRunner
from .hybrid_runner import HybridRunner


class HybridDraftingRunner(DraftingRunner, HybridRunner):
    # HybridRunner's flags (no LoRA) plus the head's (DraftingRunner's).
    capabilities = RunnerCapabilities(
        profiles=True,
        releases_sequences=True,
        verifies_tokens=True,
        drafts_tokens=True,
        finishes_sequences=True,
    )
