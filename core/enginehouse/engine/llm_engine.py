"""`LLMEngine`: the engine core and its output processor, stepped together in one thread.

The synchronous engine that tests and `AsyncEngine` drive: `step()` runs one core step and
turns its `CoreOutput`s into `RequestOutput`s, aborting in the core any request that a stop
string ended. Other threads hand it requests and aborts through `add_request` / `abort`, which
only queue them; the next step picks them up.
"""

from __future__ import annotations

from typing import Any

from ..config import EngineConfig, GenerationConfig
from ..multimodal import MultiModalData, VisionEncoder
from ..spec import ModelSpec
from .core import EngineCore
from .kv_plan import plan_kv_blocks
from .output import OutputProcessor
from .requests import EngineRequest, eos_token_ids
from .sequence import CoreOutput, RequestOutput

__all__ = ["LLMEngine", "as_executor", "eos_token_ids", "plan_kv_blocks"]


def as_executor(runner: Any) -> Any:
    """What the engine core drives: an executor as it is, a bare runner in this process."""
    from ..executor.base import DistributedExecutor
    from ..executor.local import LocalExecutor

    if isinstance(runner, (LocalExecutor, DistributedExecutor)):
        return runner
    return LocalExecutor(runner)


class LLMEngine:
    def __init__(
        self,
        runner: Any,
        tokenizer: Any,
        spec: ModelSpec,
        config: EngineConfig,
        vision: VisionEncoder | None = None,
    ) -> None:
        self.core = EngineCore(as_executor(runner), tokenizer, spec, config, vision)
        self.outputs = OutputProcessor(tokenizer)

    # The core's parts, for callers and tests that look at them.
    @property
    def executor(self) -> Any:
        return self.core.executor

    @property
    def runner(self) -> Any:
        """The runner, where it runs in this process (None under an executor)."""
        return getattr(self.core.executor, "runner", None)

    @property
    def config(self) -> EngineConfig:
        return self.core.config

    @property
    def session_len(self) -> int:
        return self.core.session_len

    @property
    def vision(self) -> VisionEncoder | None:
        return self.core.vision

    @property
    def grammars(self) -> Any:
        return self.core.grammars

    @property
    def block_manager(self) -> Any:
        return self.core.block_manager

    @property
    def scheduler(self) -> Any:
        return self.core.scheduler

    @property
    def num_blocks(self) -> int:
        return self.core.num_blocks

    @property
    def eos_ids(self) -> frozenset[int]:
        return self.core.eos_ids

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: GenerationConfig,
        score_only: bool = False,
        mm: MultiModalData | None = None,
    ) -> None:
        self.core.add_request(EngineRequest(request_id, list(prompt_ids), params, score_only, mm))
        self.outputs.add(request_id, prompt_ids, params)

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    def has_work(self) -> bool:
        return self.core.has_work()

    def can_step(self) -> bool:
        return self.core.can_step()

    def stats(self) -> dict[str, int]:
        return self.core.stats()

    def step(self) -> list[RequestOutput]:
        return self._process(self.core.step())

    def finish_all(self, reason: str, error: str | None = None) -> list[RequestOutput]:
        return self._process(self.core.finish_all(reason, error))

    def _process(self, outputs: list[CoreOutput]) -> list[RequestOutput]:
        done = []
        for core in outputs:
            out, stopped = self.outputs.process(core)
            if stopped:
                self.core.abort(core.request_id)  # a stop string ended it here
            if out is not None:
                done.append(out)
        return done

    def close(self) -> None:
        self.core.close()
