"""Run the choices of one API request on the engine and bring their outputs to the server's loop.

Each choice is one engine request. Outputs arrive on the engine's loop thread and are handed to
the server's event loop with `call_soon_threadsafe`, where metrics are recorded and the handler
reads them in arrival order. Whoever stops reading early (a client that went away, an error)
aborts the choices still running, which frees their KV blocks at the engine's next step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import Request

from ..config import GenerationConfig
from ..engine import RequestOutput
from ..multimodal import PreparedPrompt
from ..pipeline import Pipeline
from ..response import Response
from .metrics import ServerMetrics

log = logging.getLogger(__name__)


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


class Generation:
    """The engine requests behind one API request: started together, read as one stream."""

    def __init__(self, pipe: Pipeline, metrics: ServerMetrics, request_id: str) -> None:
        self.pipe = pipe
        self.metrics = metrics
        self.request_id = request_id
        self.arrival = time.perf_counter()
        self._queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()
        self._running: dict[str, int] = {}  # engine request id -> choice index
        self._last_token: dict[int, float] = {}
        self._to_read = 0

    def start(
        self, choices: list[tuple[PreparedPrompt, GenerationConfig]], score_only: bool = False
    ) -> None:
        """Submit every choice; raises `RequestError` before submitting any when one is bad.
        `score_only`: score the prompts, generate nothing (echo with max_tokens=0)."""
        for prompt, config in choices:
            self.pipe.engine.validate(prompt.token_ids, config, score_only, prompt.mm)
        loop = asyncio.get_running_loop()
        try:
            with self.pipe.engine.together():  # every choice joins the same engine step
                for index, (prompt, config) in enumerate(choices):

                    def sink(out: RequestOutput, index: int = index) -> None:
                        try:
                            loop.call_soon_threadsafe(self._receive, index, out)
                        except RuntimeError:  # the server's loop has closed; nobody listens
                            pass

                    rid = self.pipe.engine.submit(
                        prompt.token_ids,
                        config,
                        sink,
                        f"{self.request_id}-{index}",
                        score_only=score_only,
                        mm=prompt.mm,
                    )
                    self._running[rid] = index
                    self._to_read += 1
        except BaseException:  # the engine closed under us: stop what did start
            self.abort()
            raise

    def _receive(self, index: int, out: RequestOutput) -> None:
        """Queue the output, and record metrics (even for outputs nobody reads any more): a
        metric that fails is logged and loses no output."""
        if out.finished:
            self._running.pop(out.request_id, None)
        self._queue.put_nowait((index, out))
        try:
            self._record(index, out)
        except Exception:
            log.exception("could not record the metrics of request %s", out.request_id)

    def _record(self, index: int, out: RequestOutput) -> None:
        now = time.perf_counter()
        new_tokens = len(out.token_ids)
        if new_tokens:
            last = self._last_token.get(index)
            if last is None:
                self.metrics.first_token(now - self.arrival)
            self.metrics.tokens(new_tokens, None if last is None else (now - last) / new_tokens)
            self._last_token[index] = now
        if out.finished:
            self.metrics.finished(
                out.finish_reason or "abort",
                out.input_token_len,
                out.generate_token_len,
                out.cached_tokens,
                now - self.arrival,
                out.timing,
            )

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, delta) pairs until every choice has finished."""
        try:
            while self._to_read:
                index, out = await self._queue.get()
                if out.finished:
                    self._to_read -= 1
                yield index, out
        finally:
            self.abort()

    async def collect(self, n: int) -> list[Response]:
        """The whole answer of each of the `n` choices."""
        results = [Response(index=i) for i in range(n)]
        async for index, out in self.outputs():
            results[index].extend(Response.from_output(index, out))
        return results

    def abort(self) -> None:
        """Stop the choices still running (a no-op once all have finished)."""
        for rid in list(self._running):
            self.pipe.engine.abort(rid)
        self._running.clear()


async def _until_disconnected(request: Request) -> None:
    # The body has been read, so the next message is the disconnect (or nothing, until then).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`, cancelling it (and so aborting its generation) if the client leaves.

    Streaming responses get this from Starlette; a non-streaming handler would otherwise
    keep generating for nobody.
    """
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()
