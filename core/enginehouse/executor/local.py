"""The runner in the engine's own process (tp=1, no executor): the same steps as a rank's.

`LocalExecutor` is what the engine core drives at tp=1. It does what rank 0 of an executor
does, in process: applies the step's plan (`BatchAssembler`), runs the runner, and samples the
logits where they are (`Sampler`), so that the core only ever sees token ids.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..config import EngineConfig
from ..engine.kv_plan import plan_kv_blocks
from ..engine.plan import StepPlan
from ..engine.sampler import Sampler, SamplerOutput
from ..runner import DraftRequest, KVSpec, ModelRunner, RunnerCapabilities, capabilities_of
from .assembler import BatchAssembler


class LocalExecutor:
    kind = "in-process"

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.capabilities: RunnerCapabilities = capabilities_of(runner)
        self.assembler = BatchAssembler(runner)
        self.sampler = Sampler()
        self._step: tuple[StepPlan, torch.Tensor | None] | None = None

    @property
    def kv_spec(self) -> KVSpec:
        return self.runner.kv_spec

    def plan_kv_blocks(self, config: EngineConfig, session_len: int) -> int:
        return plan_kv_blocks(self.runner, config, session_len)

    def allocate_kv(self, num_blocks: int) -> None:
        self.runner.allocate_kv(num_blocks)

    def execute(self, plan: StepPlan) -> None:
        """Run the step's forward pass (logits kept for `sample`)."""
        self._step = None
        batch = self.assembler.apply(plan)
        logits = self.runner.execute(batch) if batch is not None else None
        self._step = (plan, logits)

    def sample(self, bitmask: np.ndarray | None = None) -> SamplerOutput:
        """Sample the step `execute` ran; the grammar's bitmask comes now, filled meanwhile."""
        assert self._step is not None, "sample() without execute()"
        (plan, logits), self._step = self._step, None
        return self.sampler.sample(logits, plan.sampling, bitmask)

    def propose_tokens(self, requests: list[DraftRequest]) -> list[list[int]]:
        """The runner's proposals (`drafts_tokens`: a draft head on the target's states)."""
        return self.runner.propose_tokens(requests)  # type: ignore[attr-defined]

    def load_adapter(self, slot: int, adapter: Any) -> None:
        self.runner.load_adapter(slot, adapter)  # type: ignore[attr-defined]

    def unload_adapter(self, slot: int) -> None:
        self.runner.unload_adapter(slot)  # type: ignore[attr-defined]

    def close(self) -> None:
        self._step = None
        self.runner.close()

    def describe(self) -> dict[str, Any]:
        return {"executor": self.kind, "ranks": 1}

    def counters(self) -> dict[str, float]:
        return {}
