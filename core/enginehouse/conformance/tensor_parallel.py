"""The same checks at tp=2, for a backend that says it shards: the one place to wire them.

Until the engine has tensor parallelism (`EngineConfig.tp`, issue 12) there is nothing to
compare, and the check says so rather than pass.
"""

from __future__ import annotations

from ..config import EngineConfig
from .result import NotApplicable

TP = 2


def tensor_parallel(backend: str) -> str:
    """Whether `backend` at tp=2 computes what it computes at tp=1 (to be wired with issue 12:
    build it with EngineConfig(tp=2) through the executor, run the contract's batches on both,
    compare the logits and tokens with `compare.compare_streams`)."""
    if "tp" not in EngineConfig.model_fields:
        raise NotApplicable(
            f"this enginehouse has no tensor parallelism (EngineConfig.tp): nothing to compare "
            f"at tp={TP} yet"
        )
    raise NotApplicable(
        f"the tp={TP} comparison (logits and tokens at tp={TP} = tp=1, for a backend that says "
        "it shards) is not written yet"
    )
