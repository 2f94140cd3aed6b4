"""An engine core in a process of its own: the far side of `ProcessClient`.

`CoreServer` builds the runner (and, at tp > 1, its own ranks), the image encoder and an
`EngineCore`, then serves one client. It runs in `python -m enginehouse.engine.core_process FD`,
a fresh interpreter (as the executor's rank workers are) talking over the socket it inherits,
or inside a Ray actor (`ray_replica.CoreActor`). Messages are pickled tuples:

  client -> core   ("add", [EngineRequest, ...])  ("abort", request_id)
                   ("compile", token, Constraint)  ("stats", token)  ("close",)
  core -> client   ("ready", info)  ("outputs", [CoreOutput, ...])  ("compiled", token, error)
                   ("stats", token, dict)  ("alive",)  ("failed", why)  (start-up failed)

What arrives is queued (`inbox`); the serving thread steps while there is work, sending each
step's outputs as one message, and sleeps on the queue otherwise.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)
HEARTBEAT_S = 2.0


@dataclass(frozen=True)
class CoreInit:
    """What the core process needs to build its engine: the same inputs as `pipeline()`."""

    decision: Any  # BackendDecision
    spec: Any  # ModelSpec
    config: Any  # EngineConfig, with dp=1: this process is one replica
    name: str  # how errors name this engine: "replica 1", ...
    progress: bool = False
    cores: tuple[int, ...] | None = None  # CPU cores this replica may use (CPU replicas split)


class CoreServer:
    def __init__(self, init: CoreInit, send_bytes: Callable[[bytes], None]) -> None:
        self.init, self.send_bytes = init, send_bytes
        self.inbox: queue.Queue[tuple] = queue.Queue()
        self.send_lock = threading.Lock()
        self.core: Any = None

    def send(self, *message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self.send_lock:
            self.send_bytes(data)

    def run(self) -> None:
        """Build, say so (or why not), serve until closed."""
        try:
            info = self.build()
        except BaseException as e:
            from ..executor.worker import _describe

            self.send("failed", _describe(e))
            return
        self.send("ready", info)
        self.serve()
        self.send("closed")

    def build(self) -> dict[str, Any]:
        from ..pipeline import build_runner, build_vision_encoder, load_tokenizer
        from ..plugins import get_plugins
        from .core import EngineCore
        from .llm_engine import as_executor

        init, plugins = self.init, get_plugins()
        tokenizer = load_tokenizer(init.spec, init.config.trust_remote_code)
        runner = build_runner(init.decision, init.spec, init.config, plugins, init.progress)
        vision = None
        try:
            if init.spec.is_vlm:
                vision = build_vision_encoder(init.spec, init.config, plugins, runner)
            self.core = EngineCore(as_executor(runner), tokenizer, init.spec, init.config, vision)
        except BaseException:
            runner.close()
            raise
        self.core.on_grammar_ready = lambda: self.inbox.put(("wake",))
        executor = self.core.executor
        return {
            "kv_spec": executor.kv_spec,
            "num_blocks": self.core.num_blocks,
            "describe": executor.describe(),
            "pid": os.getpid(),
        }

    def serve(self) -> None:
        core = self.core
        while True:
            idle = not core.can_step()
            try:
                # Waiting for grammars only: say so now and then, so that the client does not
                # take the silence for a hung step.
                timeout = HEARTBEAT_S if idle and core.has_work() else None
                message = self.inbox.get(block=idle, timeout=timeout)
            except queue.Empty:
                if idle:
                    self.send("alive")
                message = None
            while message is not None:
                if not self.handle(message):
                    self.shutdown()
                    return
                try:
                    message = self.inbox.get_nowait()
                except queue.Empty:
                    message = None
            if core.can_step():
                self.step()

    def step(self) -> None:
        try:
            outputs = self.core.step()
        except Exception as e:  # a bug in the engine itself: fail its requests, keep serving
            log.exception("engine step failed")
            outputs = self.core.finish_all("error", f"engine step failed: {type(e).__name__}: {e}")
        if outputs:
            self.send("outputs", outputs)

    def handle(self, message: tuple) -> bool:
        """Apply one message; False for the one that ends the process."""
        kind = message[0]
        if kind == "add":
            refused = []
            for request in message[1]:
                try:
                    self.core.add_request(request)
                except Exception as e:
                    refused.append(_refusal(request.request_id, e))
            if refused:
                self.send("outputs", refused)
        elif kind == "abort":
            self.core.abort(message[1])
        elif kind == "compile":
            self.compile(message[1], message[2])
        elif kind == "stats":
            self.send("stats", message[1], self.core.stats())
        elif kind == "adapter":  # LoRA: between steps, as every message is handled
            try:
                reply = (None, self.core.adapter_call(*message[2]))
            except Exception as e:
                reply = (e, None)
            self.send("adapter", message[1], *reply)
        elif kind == "close":
            return False
        return True

    def compile(self, token: int, constraint: Any) -> None:
        def done(future: Any) -> None:
            error = future.exception()
            try:
                self.send("compiled", token, None if error is None else str(error))
            except OSError:
                pass  # the client has gone

        self.core.grammars.compile(constraint).add_done_callback(done)

    def shutdown(self) -> None:
        try:
            outputs = self.core.finish_all("abort")
            if outputs:
                self.send("outputs", outputs)
        except Exception:
            pass
        self.core.close()
        if self.core.vision is not None:
            self.core.vision.close()


def _refusal(request_id: str, error: Exception) -> Any:
    from .sequence import CoreOutput

    return CoreOutput(request_id, finish_reason="error", error=str(error))


def _read(conn: Any, inbox: queue.Queue) -> None:
    """The subprocess's reader thread: every message into the inbox, the client's end
    closing too."""
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            inbox.put(("close",))
            return
        inbox.put(message)
        if message[0] == "close":
            return


def main() -> None:
    from multiprocessing.connection import Connection

    from ..executor.worker import _die_with_parent

    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the client
    logging.basicConfig(level=logging.WARNING, format="[engine core] %(message)s")
    conn = Connection(int(sys.argv[1]))
    init: CoreInit = pickle.loads(conn.recv_bytes())
    if init.cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, init.cores)
    server = CoreServer(init, conn.send_bytes)
    reader = threading.Thread(target=_read, args=(conn, server.inbox), daemon=True)
    reader.start()
    server.run()


if __name__ == "__main__":
    main()
