"""Engine replicas as Ray actors (`EngineConfig.dp` with `distributed_executor_backend="ray"`).

Each replica's `CoreServer` runs in a `CoreActor`, placed by Ray anywhere on the cluster (a GPU
for a tp=1 replica; a tp > 1 replica's ranks are actors of their own, placed by its executor).
`RayTransport` is the client's side: messages go in with `push` (in order: one thread serves
them) and come back with `pull`, a call that waits up to a second for the next ones, on a
second thread of the actor. Without a running cluster, Ray starts one on this machine, as vLLM
and LMDeploy do.
"""

from __future__ import annotations

import pickle
import queue
import threading
from collections import deque
from typing import Any

from .core_process import CoreInit, CoreServer
from .process_client import Transport

PULL_WAIT_S = 1.0
MAX_PULL = 256  # messages one pull brings back at most


class CoreActor:
    """A `CoreServer` inside a Ray actor: built and served on a thread of its own."""

    def __init__(self) -> None:
        self.outbox: queue.Queue[bytes] = queue.Queue()
        self.server: CoreServer | None = None

    def start(self, init: bytes) -> None:
        self.server = CoreServer(pickle.loads(init), self.outbox.put)
        threading.Thread(target=self.server.run, name="enginehouse-core", daemon=True).start()

    def push(self, data: bytes) -> None:
        assert self.server is not None
        self.server.inbox.put(pickle.loads(data))

    def pull(self, wait: float) -> list[bytes]:
        """The messages the core has sent since the last pull (waits up to `wait` for one)."""
        try:
            out = [self.outbox.get(timeout=wait)]
        except queue.Empty:
            return []
        while len(out) < MAX_PULL:
            try:
                out.append(self.outbox.get_nowait())
            except queue.Empty:
                break
        return out


class RayTransport(Transport):
    def __init__(self, gpus: int, cpus: int = 1) -> None:
        self.gpus, self.cpus = gpus, cpus
        self.actor: Any = None
        self.buffer: deque[bytes] = deque()
        self.dead: str | None = None

    def start(self, init: CoreInit) -> None:
        from ..executor.ray_executor import connect_ray

        ray = connect_ray()
        cls = ray.remote(concurrency_groups={"pull": 1})(CoreActor)
        self.actor = cls.options(num_gpus=self.gpus, num_cpus=self.cpus).remote()
        self.where = f"Ray actor {self.actor._actor_id.hex()[:12]}"
        ray.get(self.actor.start.remote(pickle.dumps(init)))

    def send(self, data: bytes) -> None:
        if self.dead is not None:
            raise EOFError(self.dead)
        self.actor.push.remote(data)  # one caller, one thread: in order

    def poll(self, timeout: float) -> bool:
        import ray

        if self.buffer:
            return True
        try:
            pull = self.actor.pull.options(concurrency_group="pull").remote(min(timeout, 1.0))
            self.buffer.extend(ray.get(pull))
        except ray.exceptions.RayActorError as e:
            self.dead = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise EOFError(self.dead) from None
        return bool(self.buffer)

    def recv(self) -> bytes:
        while not self.buffer:
            self.poll(PULL_WAIT_S)
        return self.buffer.popleft()

    def exit_reason(self) -> str:
        return f"the actor died: {self.dead}" if self.dead else "the actor is gone"

    def stop(self, grace: float) -> None:
        self.kill()  # the client has read the core's "closed" (or given up waiting for it)

    def kill(self) -> None:
        if self.actor is not None:
            import ray

            try:
                ray.kill(self.actor)
            except Exception:
                pass
            self.actor = None
