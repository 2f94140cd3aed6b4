"""Speculative decoding's counters in `/metrics`, as vLLM names and labels them.

`spec_decode_num_drafts` (verifying steps of one sequence), `spec_decode_num_draft_tokens`
(tokens proposed), `spec_decode_num_accepted_tokens` (kept) and
`spec_decode_num_accepted_tokens_per_pos` (kept at each proposal position, labelled
`position`, from 0), read from the engine's `stats()` at scrape time; only when the engine
speculates (`EngineConfig.speculative_config`). Acceptance rate = accepted / draft tokens; mean
accepted length = 1 + accepted / drafts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily

SPEC_SERIES = (
    ("spec_decode_num_drafts", "Speculative proposals verified (one per sequence and step)."),
    ("spec_decode_num_draft_tokens", "Speculative tokens proposed."),
    ("spec_decode_num_accepted_tokens", "Speculative tokens accepted by the target."),
)


def spec_decode_families(
    prefix: str, stats: Mapping[str, Any], model: str
) -> Iterator[CounterMetricFamily]:
    if "spec_decode_num_drafts" not in stats:
        return
    for name, doc in SPEC_SERIES:
        family = CounterMetricFamily(prefix + name, doc, labels=["model_name"])
        family.add_metric([model], stats.get(name, 0))
        yield family
    per_pos = CounterMetricFamily(
        prefix + "spec_decode_num_accepted_tokens_per_pos",
        "Speculative tokens accepted at each proposal position (0 is the first).",
        labels=["model_name", "position"],
    )
    for position, count in enumerate(stats.get("spec_decode_num_accepted_tokens_per_pos", [])):
        per_pos.add_metric([model, str(position)], count)
    yield per_pos
