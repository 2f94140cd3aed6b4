"""The in-process engine client: an `LLMEngine` on a private asyncio loop in a daemon thread.

Engine steps run on one worker thread (the step thread) so that the loop stays responsive while
the model computes; the loop only starts the step thread when work arrives. Once started, the
step thread runs steps back to back while there is work: requests and aborts from any thread
queue up and join at its next step, and each step's outputs go straight to their sinks. No
step waits for a trip through the loop thread (two thread wake-ups a step: ~0.2 ms, 4% of a
batch-1 step on 2 cores, benchmarks/RESULTS.md). Callers use whichever side suits them:
`stream()` from plain (or Jupyter) code, `astream()` from any asyncio loop. Each request hands
its outputs to a thread-safe sink, so results reach the caller's thread or loop directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..config import GenerationConfig
from ..errors import RequestError
from ..multimodal import MultiModalData
from ..runner import ModelRunner
from .client import EngineClient, Sink
from .grammar import Constraint
from .llm_engine import LLMEngine
from .sequence import RequestOutput

log = logging.getLogger(__name__)


class AsyncEngine(EngineClient):
    def __init__(self, engine: LLMEngine, executor: ThreadPoolExecutor | None = None) -> None:
        """`executor`: the one-thread executor that runs the steps; pass the one the model was
        loaded on, so that all torch work stays on one thread (see `pipeline()`)."""
        self.engine = engine
        self.config = engine.config
        self.session_len = engine.session_len
        self.kv_spec = engine.executor.kv_spec
        self.vision = engine.vision
        self.checks = engine.core.checks
        engine.core.on_grammar_ready = self._grammar_ready
        self._sinks: dict[str, Sink] = {}  # touched by the step thread only
        # Adds and aborts from any thread, run by the step thread before its next step; a
        # `together()` batch is one entry, so no step sees half of it.
        self._requests: deque[Callable[[], None]] = deque()
        self._closed = False
        self._held = threading.local()  # per caller thread: adds held back by `together()`
        self._step_started: float | None = None  # monotonic time; None between steps
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="enginehouse-step")
        self.loop = asyncio.new_event_loop()
        self._wake = asyncio.Event()
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name="enginehouse-loop", daemon=True
        )
        self._thread.start()
        started.wait()

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self._task = self.loop.create_task(self._step_loop())
        self.loop.call_soon(started.set)
        self.loop.run_forever()

    async def _step_loop(self) -> None:
        while not self._closed:
            if not self._requests and not self.engine.can_step():
                # A request queued after this check sets _wake after the clear: none is lost.
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self.loop.run_in_executor(self._executor, self._run_steps)
            except Exception:  # finish_all itself failed: keep the loop alive for new requests
                log.exception("the engine failed to end its requests")

    def _run_steps(self) -> None:
        """On the step thread: steps back to back while there is work."""
        while not self._closed:
            self._take_requests()
            if not self.engine.can_step():
                return
            self._step_started = time.monotonic()
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug in the engine itself: fail its requests, keep serving
                log.exception("engine step failed")
                error = f"engine step failed: {type(e).__name__}: {e}"
                outputs = self.engine.finish_all("error", error)
            finally:
                self._step_started = None
            for out in outputs:
                self._deliver(out)

    def _take_requests(self) -> None:
        while self._requests:
            try:
                self._requests.popleft()()
            except Exception:  # an abort of a request that is gone, say: the others go on
                log.exception("could not take a queued request")

    def _queue(self, request: Callable[[], None]) -> None:
        self._requests.append(request)
        self.loop.call_soon_threadsafe(self._wake.set)

    def step_running_for(self) -> float:
        """Seconds the current engine step has been running (0.0 between steps): how a health
        check tells a stuck engine from a busy one. Safe to call from any thread."""
        started = self._step_started
        return 0.0 if started is None else time.monotonic() - started

    def _grammar_ready(self) -> None:
        # Called from the compile thread: a request waiting for its grammar can now run.
        try:
            self.loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # the loop has closed
            pass

    def _deliver(self, out: RequestOutput) -> None:
        sink = self._sinks.pop(out.request_id) if out.finished else self._sinks.get(out.request_id)
        if sink is None:
            return
        try:
            sink(out)
        except Exception:  # a consumer that went away must not stop the others
            log.exception("could not deliver output of request %s", out.request_id)

    def submit(
        self,
        prompt_ids: list[int],
        params: GenerationConfig,
        sink: Sink,
        request_id: str | None = None,
        score_only: bool = False,
        mm: MultiModalData | None = None,
    ) -> str:
        """Queue a request; raises `RequestError` at once when it cannot be served."""
        if self._closed:
            raise RuntimeError("the engine is closed")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._sinks:
            raise RequestError(f"request id {request_id!r} is already in use; give a unique one")
        self.validate(prompt_ids, params, score_only, mm)

        def add() -> None:
            # On the step thread, the engine knows exactly the ids that have a sink: it refuses
            # an id another request took since the check above.
            try:
                self.engine.add_request(request_id, prompt_ids, params, score_only, mm)
            except RequestError as e:
                sink(RequestOutput(request_id, finished=True, finish_reason="error", error=str(e)))
                return
            self._sinks[request_id] = sink

        held = getattr(self._held, "adds", None)
        if held is None:
            self._queue(add)
        else:
            held.append(add)
        return request_id

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Requests submitted inside reach the engine at once, so that its next step sees them
        all (a list of prompts is one batch from its first step)."""
        self._held.adds = adds = []
        try:
            yield
        finally:
            self._held.adds = None
            if adds and not self._closed:
                self._queue(lambda: [add() for add in adds])

    def abort(self, request_id: str) -> None:
        """Stop a request; its blocks are freed at the next step and it ends with 'abort'."""

        if not self._closed:
            self._queue(lambda: self.engine.abort(request_id))

    def call(self, fn: Callable[[], object]) -> object:
        """Run `fn` on the loop thread and wait for its result (for stats and tests)."""
        future = asyncio.run_coroutine_threadsafe(_call(fn), self.loop)
        return future.result()

    def adapter_call(self, op: str, *args: Any) -> Any:
        """On the step thread, between steps: a slot's tensors never change under a forward."""
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(self.engine.core.adapter_call(op, *args))
            except BaseException as e:
                future.set_exception(e)

        if self._closed:
            raise RuntimeError("the engine is closed")
        self._queue(run)
        return future.result()

    @property
    def runner(self) -> ModelRunner | None:
        return self.engine.runner

    def compile_grammar(self, constraint: Constraint) -> Future:
        return self.engine.grammars.compile(constraint)

    def stats(self) -> dict[str, Any]:
        return self.call(self.engine.stats)  # type: ignore[return-value]

    def describe(self) -> dict[str, Any]:
        return {"replicas": 1, **self.engine.executor.describe()}

    def is_running(self) -> bool:
        return not self._closed and self.loop.is_running()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.loop.call_soon_threadsafe(self._wake.set)
        asyncio.run_coroutine_threadsafe(_wait(self._task), self.loop).result()
        # Requests still in flight or queued end with 'abort', so that no caller waits forever
        # (the step thread has stopped: this runs alone).
        self.call(self._abort_all)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        # The engine's own close (grammars, executor, runner) runs on the step thread, where
        # the model was loaded.
        self._executor.submit(self._close_engine).result()
        self._executor.shutdown(wait=True)
        self.loop.close()

    def _close_engine(self) -> None:
        self.engine.close()
        if self.vision is not None:
            self.vision.close()

    def _abort_all(self) -> None:
        self._take_requests()
        for out in self.engine.finish_all("abort"):
            self._deliver(out)


async def _call(fn: Callable[[], object]) -> object:
    return fn()


async def _wait(task: asyncio.Task) -> None:
    await asyncio.gather(task, return_exceptions=True)
