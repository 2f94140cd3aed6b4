"""The one protocol `Pipeline` and the server use to reach an engine, wherever it runs.

An `EngineClient` takes requests and hands each one's outputs to a sink; it knows the model's
shape (context length, KV layout, image encoder) so that prompts are checked before they
travel. Three kinds:

- `AsyncEngine` (async_engine.py): the engine core on a thread of this process (the default);
- `ProcessClient` (process_client.py): the engine core in a child process of its own;
- `DataParallelClient` (data_parallel.py): N `ProcessClient` replicas behind one front, each
  with its own ranks (`EngineConfig.dp`).

`stream` and `astream` are written once here, on `submit` and `abort`.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from typing import Any

from ..config import EngineConfig, GenerationConfig
from ..errors import RequestError
from ..multimodal import MultiModalData, VisionEncoder
from ..runner import KVSpec, ModelRunner
from .grammar import Constraint
from .requests import RequestChecks
from .sequence import RequestOutput

Sink = Callable[[RequestOutput], None]


class EngineClient:
    """What every engine client offers. Subclasses implement the methods that raise."""

    config: EngineConfig
    session_len: int  # the context length the engine enforces: prompt and output together
    kv_spec: KVSpec  # the KV layout, dtype and device (rank 0's under an executor)
    checks: RequestChecks  # what a request must satisfy: checked here, before it travels
    # The image side of a vision-language model (None for a text model). In this process it
    # prepares prompts (its processor); it encodes images only where the core runs.
    vision: VisionEncoder | None = None

    @property
    def runner(self) -> ModelRunner | None:
        """The backend's runner where it runs in this process; None where it runs elsewhere."""
        return None

    def submit(
        self,
        prompt_ids: list[int],
        params: GenerationConfig,
        sink: Sink,
        request_id: str | None = None,
        score_only: bool = False,
        mm: MultiModalData | None = None,
    ) -> str:
        """Queue a request; its outputs go to `sink`. Raises `RequestError` at once when it
        cannot be served. Returns its request id."""
        raise NotImplementedError

    def together(self) -> contextlib.AbstractContextManager[None]:
        """Requests submitted inside reach the engine at once (one batch from its first step)."""
        return contextlib.nullcontext()

    def abort(self, request_id: str) -> None:
        """Stop a request; it ends with 'abort' and its KV blocks are freed."""
        raise NotImplementedError

    def validate(
        self,
        prompt_ids: list[int],
        params: GenerationConfig,
        score_only: bool = False,
        mm: MultiModalData | None = None,
    ) -> None:
        """Raise `RequestError` for a request `submit` would refuse; queues nothing."""
        self.checks.validate(prompt_ids, params, score_only, mm)
        if params.adapter is not None and params.adapter not in self.adapter_names:
            loaded = ", ".join(sorted(self.adapter_names)) or "none is loaded"
            raise RequestError(f"unknown adapter {params.adapter!r}; loaded: {loaded}")

    def check_length(self, prompt_len: int, score_only: bool = False) -> None:
        """Raise `RequestError` when a prompt of this length does not fit the context."""
        self.checks.check_length(prompt_len, score_only)

    def compile_grammar(self, constraint: Constraint) -> Future:
        """The constraint compiled where the engine core runs (cached there); its error, a
        `RequestError`, names what is wrong with the schema, regex or grammar."""
        raise NotImplementedError

    def adapter_call(self, op: str, *args: Any) -> Any:
        """LoRA adapters where the engine core runs (`EngineCore.adapter_call`): `load`
        (name, source), `unload` (name), `list` ()."""
        raise NotImplementedError

    @property
    def adapter_names(self) -> set[str]:
        """The adapters loaded through this client (requests naming another are refused here,
        before they travel)."""
        return self.__dict__.setdefault("_adapter_names", set(self.config.lora_modules))

    def load_adapter(self, name: str, source: str) -> None:
        self.adapter_call("load", name, source)
        self.adapter_names.add(name)

    def unload_adapter(self, name: str) -> None:
        self.adapter_call("unload", name)
        self.adapter_names.discard(name)

    def adapters(self) -> list[dict[str, Any]]:
        return self.adapter_call("list")

    def stats(self) -> dict[str, Any]:
        """The engine's counters (running, waiting, KV blocks, preemptions, steps), summed
        over replicas where there are several."""
        raise NotImplementedError

    def replica_stats(self) -> list[dict[str, Any]]:
        """Each replica's counters (one entry for a single engine)."""
        return [self.stats()]

    def describe(self) -> dict[str, Any]:
        """Where the engine runs: its executor ("in-process", "mp" or "ray"), the ranks of
        each replica, their collectives, and the replicas."""
        raise NotImplementedError

    def step_running_for(self) -> float:
        """Seconds the longest-running current engine step has taken (0.0 between steps)."""
        return 0.0

    def is_running(self) -> bool:
        """Whether the engine still takes requests."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # --- written once for every client ------------------------------------------------------

    def stream(
        self, prompt_ids: list[int], params: GenerationConfig, score_only: bool = False
    ) -> Iterator[RequestOutput]:
        """Outputs of one request, for synchronous code. Leaving the loop early aborts it."""
        q: queue.Queue[RequestOutput] = queue.Queue()
        rid = self.submit(prompt_ids, params, q.put, score_only=score_only)
        finished = False
        try:
            while not finished:
                out = q.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(rid)

    async def astream(
        self, prompt_ids: list[int], params: GenerationConfig, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request, for code on any asyncio loop. Cancelling it aborts it."""
        caller = asyncio.get_running_loop()
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        rid = self.submit(
            prompt_ids, params, lambda o: caller.call_soon_threadsafe(q.put_nowait, o), request_id
        )
        finished = False
        try:
            while not finished:
                out = await q.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(rid)
