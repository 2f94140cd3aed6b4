"""The "mp" executor: one worker process per rank on this machine.

Each worker is `python -m enginehouse.executor.worker FD`, a fresh interpreter (not a fork of
this one, whose threads and CUDA state a fork would copy; not multiprocessing's spawn either,
which re-runs the user's main module). It talks to the driver over one end of a socket pair
it inherits, so there is no port to open and nothing else can connect. The message is the
pickled call; tensors in it (image embeddings) and the logits travel by value.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection, wait
from typing import Any

from .base import DistributedExecutor, RankError, hung
from .worker import RankInit

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

    def _rendezvous(self) -> tuple[str, list[tuple[int, int]]]:
        from ..device import missing_gpus

        problem = missing_gpus(self.config)
        if problem:
            raise RankError(problem)
        n = self.world_size
        return f"tcp://127.0.0.1:{free_port()}", [(rank, n) for rank in range(n)]

    def _start(self, inits: list[RankInit]) -> list[dict[str, Any]]:
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

    def _collect(self, method: str, timeout: float | None) -> list[Any]:
        """One reply from every rank, or the first failure named by rank."""
        replies: dict[int, Any] = {}
        pending = dict(enumerate(self.conns))
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait(list(pending.values()), left)
            if not ready:
                # A hung rank stalls the others in their collectives: all of them are named.
                raise RankError(hung(list(pending), method, timeout))
            for rank, conn in [(r, c) for r, c in pending.items() if c in ready]:
                del pending[rank]
                try:
                    status, value = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    raise RankError(self._death(rank, method)) from None
                if status != "ok":
                    raise RankError(f"rank {rank} failed in {method}: {value}")
                replies[rank] = value
        return [replies[r] for r in range(len(self.conns))]

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

    def __del__(self) -> None:  # a pipeline dropped without close(): leave no process behind
        for proc in getattr(self, "procs", []):
            if proc.poll() is None:
                proc.kill()
