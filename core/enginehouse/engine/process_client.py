"""`ProcessClient`: an engine core in a process of its own, reached through a transport.

The far side (`core_process.py`) builds the runner and steps; this side checks requests, keeps
each one's output processing (detokenizer, stop strings), and hands outputs to their sinks
from a reader thread. The transport is a child process on this machine over a socket pair
(`SubprocessTransport`), or a Ray actor anywhere on a cluster (`ray_replica.RayTransport`). A
core that dies, or goes silent past `distributed_timeout` while it has requests, fails only its
own requests, with an error naming it; the client is then down and refuses new requests.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

from ..config import GenerationConfig
from ..errors import EnginehouseError, RequestError
from ..multimodal import MultiModalData, VisionEncoder
from .client import EngineClient, Sink
from .core_process import CoreInit
from .grammar import Constraint
from .output import OutputProcessor
from .requests import EngineRequest, RequestChecks
from .sequence import CoreOutput, RequestOutput

log = logging.getLogger(__name__)
STOP_GRACE_S = 10.0  # how long `close` waits for the child to finish before killing it
STATS_TIMEOUT_S = 10.0


class EngineDown(EnginehouseError):
    """The engine (or this replica of it) has stopped; it says which and why."""


class ProcessClient(EngineClient):
    def __init__(
        self,
        init: CoreInit,
        tokenizer: Any,
        vision: VisionEncoder | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.name = init.name
        self.config = init.config
        self.vision = vision  # its processor prepares prompts here; the child encodes
        self.outputs = OutputProcessor(tokenizer)
        self._sinks: dict[str, Sink] = {}
        self._lock = threading.Lock()  # sinks and output states: submit vs the reader thread
        self._send_lock = threading.Lock()
        self._held = threading.local()  # adds held back by `together()`
        self._replies: dict[int, Future] = {}
        self._tokens = itertools.count()
        self.down: str | None = None
        self._closing = False
        self._ready = threading.Event()
        # Bytes to the core (requests, aborts) and back (each step's outputs), for benchmarks.
        self.sent_bytes = self.received_bytes = 0
        self.transport = transport or SubprocessTransport()
        self._last_heard = time.monotonic()
        # The core is started by the reader thread, which lives as long as this client: a
        # child dies with the thread that started it (PR_SET_PDEATHSIG follows the thread).
        started: Future = Future()
        self._reader = threading.Thread(
            target=self._run, args=(init, started), name=f"enginehouse-{self.name}-reader"
        )
        self._reader.daemon = True
        self._reader.start()
        info = started.result()
        self.kv_spec = info["kv_spec"]
        self.num_blocks = info["num_blocks"]
        self._describe = info["describe"]
        image_token = vision.image_token_id if vision is not None else None
        self.checks = RequestChecks.for_model(init.spec, init.config, tokenizer, image_token)
        self.session_len = self.checks.session_len
        self._ready.set()

    def _run(self, init: CoreInit, started: Future) -> None:
        """The reader thread: start the core, wait until it is ready, then read."""
        try:
            self.transport.start(init)
            started.set_result(self._wait_ready())
        except BaseException as e:
            self.transport.kill()
            started.set_exception(e)
            return
        self._ready.wait()  # the constructor has read what it needs
        self._read()

    @property
    def where(self) -> str:
        """The replica and where it runs, for errors: "replica 1 (pid 4242)"."""
        return f"{self.name} ({self.transport.where})"

    # --- start and stop ---------------------------------------------------------------------

    def _wait_ready(self) -> dict[str, Any]:
        """The core's ready message (loading has no time limit, but a death ends the wait)."""
        try:
            kind, *rest = pickle.loads(self.transport.recv())
        except (EOFError, OSError):
            why = self.transport.exit_reason()
            raise EngineDown(f"{self.name} failed to start ({why})") from None
        if kind == "failed":
            raise EnginehouseError(f"{self.name} failed to start: {rest[0]}")
        return rest[0]

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self.down is None:
            with contextlib.suppress(OSError, EOFError):
                self._send(pickle.dumps(("close",)))
        self._reader.join(timeout=STOP_GRACE_S)  # it ends on the core's "closed"
        self.transport.stop(STOP_GRACE_S)
        self._fail_all(f"{self.name} was closed", reason="abort")

    def __del__(self) -> None:  # dropped without close(): leave no process behind
        transport = getattr(self, "transport", None)
        if transport is not None:
            transport.kill()

    # --- requests ---------------------------------------------------------------------------

    def submit(
        self,
        prompt_ids: list[int],
        params: GenerationConfig,
        sink: Sink,
        request_id: str | None = None,
        score_only: bool = False,
        mm: MultiModalData | None = None,
    ) -> str:
        self._check_up()
        request_id = request_id or uuid.uuid4().hex
        self.validate(prompt_ids, params, score_only, mm)
        with self._lock:
            if request_id in self._sinks:
                raise RequestError(
                    f"request id {request_id!r} is already in use; give a unique one"
                )
            self._sinks[request_id] = sink
            self.outputs.add(request_id, prompt_ids, params)
        request = EngineRequest(request_id, list(prompt_ids), params, score_only, mm)
        held = getattr(self._held, "adds", None)
        if held is not None:
            held.append(request)
        else:
            self._send_message("add", [request])
        return request_id

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        self._held.adds = adds = []
        try:
            yield
        finally:
            self._held.adds = None
            if adds:
                self._send_message("add", adds)

    def abort(self, request_id: str) -> None:
        if self.down is None and not self._closing:
            with contextlib.suppress(OSError, EngineDown):
                self._send_message("abort", request_id)

    def compile_grammar(self, constraint: Constraint) -> Future:
        token, future = self._expect()
        self._send_message("compile", token, constraint)
        return future

    def stats(self) -> dict[str, Any]:
        if self.down is not None:
            return {"kv_blocks_total": self.num_blocks, "down": 1}
        token, future = self._expect()
        self._send_message("stats", token)
        counts = {
            "client_sent_bytes": self.sent_bytes,
            "client_received_bytes": self.received_bytes,
        }
        return {**future.result(timeout=STATS_TIMEOUT_S), **counts}

    def adapter_call(self, op: str, *args: Any) -> Any:
        token, future = self._expect()
        self._send_message("adapter", token, (op, *args))
        return future.result()

    def describe(self) -> dict[str, Any]:
        return {"replicas": 1, **self._describe}

    def is_running(self) -> bool:
        return self.down is None and not self._closing

    def step_running_for(self) -> float:
        """Seconds since the child was last heard from while it has requests: a replica that
        stays silent that long is stuck in a step."""
        with self._lock:
            busy = bool(self._sinks)
        return time.monotonic() - self._last_heard if busy else 0.0

    @property
    def in_flight(self) -> int:
        return len(self._sinks)

    # --- the wire ---------------------------------------------------------------------------

    def _check_up(self) -> None:
        if self._closing:
            raise RuntimeError("the engine is closed")
        if self.down is not None:
            raise EngineDown(f"{self.name} is down ({self.down}); start a new pipeline")

    def _expect(self) -> tuple[int, Future]:
        token, future = next(self._tokens), Future()
        self._replies[token] = future
        return token, future

    def _send_message(self, *message: Any) -> None:
        self._check_up()
        try:
            self._send(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        except (OSError, EOFError):
            why = self.transport.exit_reason()
            raise EngineDown(f"{self.where} is gone ({why})") from None

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            self.transport.send(data)
            self.sent_bytes += len(data)

    def _read(self) -> None:
        """The reader thread: outputs to their sinks, replies to their futures; a death or a
        silence past `distributed_timeout` (while requests wait) fails this client's requests."""
        timeout = self.config.distributed_timeout
        while True:
            try:
                if not self.transport.poll(min(timeout, 1.0)):
                    if self.step_running_for() > timeout:
                        self._hung(timeout)
                        return
                    continue
                data = self.transport.recv()
                self.received_bytes += len(data)
                message = pickle.loads(data)
            except (EOFError, OSError):
                if not self._closing:
                    self._died()
                return
            self._last_heard = time.monotonic()
            if message[0] == "closed":
                return
            self._dispatch(message)

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "outputs":
            for core in message[1]:
                self._deliver(core)
        elif kind in ("compiled", "stats", "adapter"):
            future = self._replies.pop(message[1], None)
            if future is None:
                return
            if kind == "adapter":
                error, result = message[2], message[3]
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)
            elif kind == "stats":
                future.set_result(message[2])
            elif message[2] is None:
                future.set_result(None)
            else:
                future.set_exception(RequestError(message[2]))

    def _deliver(self, core: CoreOutput) -> None:
        with self._lock:
            out, stopped = self.outputs.process(core)
            if out is None:
                return
            sink = (
                self._sinks.pop(out.request_id) if out.finished else self._sinks.get(out.request_id)
            )
        if stopped:
            self.abort(core.request_id)  # a stop string ended it here
        if sink is None:
            return
        try:
            sink(out)
        except Exception:  # a consumer that went away must not stop the others
            log.exception("could not deliver output of request %s", out.request_id)

    def _died(self) -> None:
        self._go_down(f"{self.where} died ({self.transport.exit_reason()})")

    def _hung(self, timeout: float) -> None:
        self._go_down(
            f"{self.where} did not answer within {timeout:g} s "
            "(EngineConfig.distributed_timeout): hung, or far too slow"
        )
        self.transport.kill()

    def _go_down(self, why: str) -> None:
        self.down = why
        log.error("%s; failing its requests", why)
        self._fail_all(why)

    def _fail_all(self, why: str, reason: str = "error") -> None:
        with self._lock:
            sinks, self._sinks = self._sinks, {}
            self.outputs.requests.clear()
        for rid, sink in sinks.items():
            error = why if reason == "error" else None
            try:
                sink(RequestOutput(rid, finished=True, finish_reason=reason, error=error))
            except Exception:
                log.exception("could not deliver the end of request %s", rid)
        replies, self._replies = self._replies, {}
        for future in replies.values():
            if not future.done():
                future.set_exception(EngineDown(why))


class Transport:
    """How a `ProcessClient` reaches its core: start it, exchange pickled messages, stop it.
    `recv` raises EOFError once the far side is gone. Used from the reader thread, except
    `send` (any thread, serialised by the client) and `kill` / `stop`."""

    where = "not started"  # for errors: "pid 4242", "Ray actor 3f1c..."

    def start(self, init: CoreInit) -> None:
        raise NotImplementedError

    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def poll(self, timeout: float) -> bool:
        raise NotImplementedError

    def recv(self) -> bytes:
        raise NotImplementedError

    def exit_reason(self) -> str:
        raise NotImplementedError

    def stop(self, grace: float) -> None:
        """Wait up to `grace` seconds for the core to end on its own, then kill it."""
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError


class SubprocessTransport(Transport):
    """A fresh interpreter on this machine (`python -m enginehouse.engine.core_process FD`)
    over one end of a socket pair it inherits: no port to open, nothing else can connect."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.conn: Connection | None = None

    def start(self, init: CoreInit) -> None:
        mine, theirs = socket.socketpair()
        paths = [p for p in sys.path if p]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "enginehouse.engine.core_process", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            start_new_session=True,  # the terminal's Ctrl-C goes to the client alone
            env={**os.environ, "PYTHONPATH": os.pathsep.join(paths), **self.env},
        )
        theirs.close()
        self.conn = Connection(mine.detach())
        self.where = f"pid {self.proc.pid}"
        self.send(pickle.dumps(init))

    def send(self, data: bytes) -> None:
        assert self.conn is not None
        self.conn.send_bytes(data)

    def poll(self, timeout: float) -> bool:
        assert self.conn is not None
        return self.conn.poll(timeout)

    def recv(self) -> bytes:
        assert self.conn is not None
        return self.conn.recv_bytes()

    def exit_reason(self) -> str:
        if self.proc is None:
            return "it never started"
        try:
            code = self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return "its connection closed"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def stop(self, grace: float) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.conn is not None:
            self.conn.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
