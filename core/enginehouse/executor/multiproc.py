"""The "mp" executor: one worker process per rank on this machine.

Each worker is `python -m enginehouse.executor.worker FD`, a fresh interpreter (not a fork of
this one, whose threads and CUDA state a fork would copy; not multiprocessing's spawn either,
which re-runs the user's main module). It talks to the driver over one end of a socket pair
it inherits, so there is no port to open and nothing else can connect. The message is the
pickled call; tensors in it (image embeddings) and the logits travel by value.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import subprocess
import sys
import time
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from typing import Any

from .base import DistributedExecutor, RankError, StepError, hung
from .shm import ShmBroadcast
from .worker import RankInit

log = logging.getLogger(__name__)
STOP_GRACE_S = 5.0  # how long `close` waits for ranks to exit before killing them


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env() -> dict[str, str]:
    """This process's environment, with its import path: a worker imports what the driver
    does (plugins put on sys.path at run time included)."""
    paths = [p for p in sys.path if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


class MultiprocExecutor(DistributedExecutor):
    kind = "mp"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.procs: list[subprocess.Popen] = []
        self.conns: list[Connection] = []
        self.broadcast: ShmBroadcast | None = None
        # What crossed to the ranks and back, for benchmarks (`counters`).
        self.sent_bytes = self.received_bytes = self.messages = 0
        self.transport_seconds = 0.0
        self._failures: list[str] = []  # the current step's failures, by rank
        # Steps sent, as every rank counts them, and the ones that failed as a batch: another
        # rank's late report of a failed step is expected, of a completed one is not.
        self._steps = 0
        self._failed_steps: set[int] = set()

    def _rendezvous(self) -> tuple[str, list[tuple[int, int]]]:
        from ..device import missing_gpus

        problem = missing_gpus(self.config)
        if problem:
            raise RankError(problem)
        n = self.world_size
        return f"tcp://127.0.0.1:{free_port()}", [(rank, n) for rank in range(n)]

    def _start(self, inits: list[RankInit]) -> list[dict[str, Any]]:
        try:
            self.broadcast = ShmBroadcast(readers=len(inits))
            inits = [replace(init, broadcast=self.broadcast.handle()) for init in inits]
        except OSError as e:  # no /dev/shm, say: every plan goes over the sockets
            log.warning("no shared memory for the step broadcast (%s): using the sockets", e)
        for _ in inits:
            mine, theirs = socket.socketpair()
            proc = subprocess.Popen(
                [sys.executable, "-m", "enginehouse.executor.worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                start_new_session=True,  # the terminal's Ctrl-C goes to the driver alone
                env=_worker_env(),
            )
            theirs.close()
            self.procs.append(proc)
            self.conns.append(Connection(mine.detach()))
        for conn, init in zip(self.conns, inits):
            conn.send_bytes(pickle.dumps(init))
        # Loading may take long (a first build of the CPU kernels): no hang limit here,
        # but a rank that dies or fails still ends the start at once.
        return self._collect("start", timeout=None)

    def _call_all(self, method: str, args: tuple) -> list[Any]:
        payload = pickle.dumps((method, args))
        for rank, conn in enumerate(self.conns):
            try:
                conn.send_bytes(payload)
            except OSError:
                raise RankError(self._death(rank, method)) from None
        return self._collect(method, self.config.distributed_timeout)

    def _broadcast(self, method: str, args: tuple) -> None:
        started = time.perf_counter()
        self._steps += method in ("execute", "step")
        payload = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        shared = self.broadcast is not None and self.broadcast.fits(payload)
        if shared:
            assert self.broadcast is not None
            try:
                self.broadcast.write(payload, self.config.distributed_timeout)
            except TimeoutError:
                raise RankError(
                    hung(self.broadcast.lagging(), method, self.config.distributed_timeout)
                ) from None
        frame = b"" if shared else payload
        for rank, conn in enumerate(self.conns):
            try:
                conn.send_bytes(frame)
            except OSError:
                raise RankError(self._death(rank, method)) from None
        self.sent_bytes += len(payload) if shared else len(payload) * len(self.conns)
        self.messages += 1
        self.transport_seconds += time.perf_counter() - started

    def _ask_rank0(self, method: str, args: tuple) -> None:
        started = time.perf_counter()  # the transport's own time: pickling, writing, reading
        payload = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.conns[0].send_bytes(payload)
        except OSError:
            raise RankError(self._death(0, method)) from None
        self.sent_bytes += len(payload)
        self.transport_seconds += time.perf_counter() - started

    def _wait_rank0(self) -> Any:
        # Named "execute" in errors: the step as a whole, whichever part a rank was in.
        reply = self._collect("execute", self.config.distributed_timeout, only=0)[0]
        if self._failures:
            failures, self._failures = self._failures, []
            self._failed_steps.add(self._steps)
            raise StepError("; ".join(failures))
        return reply

    def counters(self) -> dict[str, float]:
        return {
            "transport_messages": self.messages,
            "transport_sent_bytes": self.sent_bytes,
            "transport_received_bytes": self.received_bytes,
            "transport_seconds": self.transport_seconds,
        }

    def _collect(self, method: str, timeout: float | None, only: int | None = None) -> list[Any]:
        """One reply from every rank (from rank `only` alone where given: the others then
        speak only to report a failed step), or the first failure named by rank."""
        want = set(range(len(self.conns))) if only is None else {only}
        replies: dict[int, Any] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(replies) < len(want):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = self._ready(left)
            if not ready:
                # A hung rank stalls the others in their collectives: all of them are named
                # (in a step, every rank: those that do not answer it may be the stuck ones).
                silent = range(len(self.conns)) if only is not None else want - replies.keys()
                raise RankError(hung(sorted(silent), method, timeout))
            for rank, conn in enumerate(self.conns):
                if conn in ready:
                    status, value = self._receive(rank, conn, method)
                    if status == "ok" and rank in want:
                        replies[rank] = value
                    elif status == "failed":
                        step, why = value
                        self._step_failed(rank, step, why, replies if only is not None else None)
                    else:
                        raise RankError(f"rank {rank} failed in {method}: {value}")
        return [replies[r] for r in sorted(want)]

    def _step_failed(self, rank: int, step: int, why: str, replies: dict | None) -> None:
        """A rank's report that a step failed. While the driver waits for that step (`replies`
        given), it fails the step's batch; a late report of a step that failed as a batch is
        dropped; one of a step rank 0 completed means the ranks no longer agree."""
        if replies is not None and step == self._steps:
            self._failures.append(f"rank {rank}: {why}")
            if rank == 0:
                replies[rank] = None
        elif step not in self._failed_steps:
            raise RankError(f"rank {rank} failed a step rank 0 completed: {why}")

    def _ready(self, timeout: float | None) -> list[Connection]:
        """The connections with something to read; one rank's is polled directly (a selector
        for one socket costs tens of microseconds a step)."""
        if len(self.conns) == 1:
            return self.conns if self.conns[0].poll(timeout) else []
        return wait(self.conns, timeout)  # type: ignore[return-value]

    def _receive(self, rank: int, conn: Connection, method: str) -> tuple[str, Any]:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            raise RankError(self._death(rank, method)) from None
        started = time.perf_counter()
        message = pickle.loads(data)
        self.transport_seconds += time.perf_counter() - started
        self.received_bytes += len(data)
        return message

    def _death(self, rank: int, method: str) -> str:
        proc = self.procs[rank]
        try:
            code = proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            code = None
        how = f"exit code {code}" if code is not None else "its connection closed"
        if code is not None and code < 0:
            how = f"killed by signal {-code}"
        return f"rank {rank} (pid {proc.pid}) died during {method} ({how})"

    def _stop(self, graceful: bool) -> None:
        if graceful:
            for conn in self.conns:
                try:
                    conn.send_bytes(pickle.dumps(("close", ())))
                except OSError:
                    pass
        deadline = time.monotonic() + (STOP_GRACE_S if graceful else 0.0)
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []
        if self.broadcast is not None:
            self.broadcast.close(unlink=True)
            self.broadcast = None

    def __del__(self) -> None:  # a pipeline dropped without close(): leave no process behind
        for proc in getattr(self, "procs", []):
            if proc.poll() is None:
                proc.kill()
