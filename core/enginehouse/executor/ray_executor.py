"""The "ray" executor: one Ray actor per rank, placed on a running Ray cluster.

A placement group reserves one bundle per rank (a GPU, or a CPU) before any actor starts, so
either every rank gets its place or the start fails with what is missing; "PACK" keeps ranks
on as few machines as fit them. The driver connects to the cluster named by RAY_ADDRESS, else
to the one `ray start --head` started on this machine, else starts one here (`connect_ray`).
The calls and their results travel through Ray's object store.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import replace
from typing import Any

from .base import DistributedExecutor, RankError, StepError, hung
from .worker import RankInit, RankWorker, StepFailed

log = logging.getLogger(__name__)
PLACEMENT_TIMEOUT_S = 60.0
STOP_GRACE_S = 5.0


def _on_gpus(config: Any) -> bool:
    """Whether each rank takes a GPU of its own (Ray's "GPU" resource): the cuda platform's."""
    from ..platforms import platform_of

    platform = platform_of(config.device)[0]
    return platform.device_per_rank and platform.name == "cuda"


class RankActor:
    """`RankWorker` as a Ray actor (wrapped by `ray.remote` when the executor starts)."""

    def __init__(self) -> None:
        self.worker: RankWorker | None = None

    def place(self) -> tuple[str, int]:
        """This actor's machine, and a free port there (rank 0's is the rendezvous)."""

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, init: RankInit) -> dict[str, Any]:
        if _on_gpus(init.config):
            # Ray shows each actor only its own GPU (CUDA_VISIBLE_DEVICES): it is cuda:0 here.
            init = replace(init, context=replace(init.context, local_rank=0))
        self.worker = RankWorker(init)
        return self.worker.setup()

    def call(self, method: str, args: tuple) -> Any:
        assert self.worker is not None
        return self.worker.call(method, args)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


class RayExecutor(DistributedExecutor):
    kind = "ray"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.actors: list[Any] = []
        self.group: Any = None
        self._executing: list[Any] = []  # the current step's `execute` on every rank
        self._answer: Any = None  # rank 0's `sample`, when the step waited for a bitmask

    def _rendezvous(self) -> tuple[str, list[tuple[int, int]]]:
        ray = connect_ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        gpu = _on_gpus(self.config)
        bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
        self.group = placement_group([bundle] * self.world_size, strategy="PACK")
        try:
            ray.get(self.group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RankError(
                f"the Ray cluster has no room for tp={self.world_size} ranks of {bundle} "
                f"within {PLACEMENT_TIMEOUT_S:g} s (`ray status` shows what it has); add "
                "machines or lower tp"
            ) from None
        actor = ray.remote(RankActor)
        for rank in range(self.world_size):
            strategy = PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=rank
            )
            options = {"num_cpus": 1, "num_gpus": 1 if gpu else 0}
            self.actors.append(actor.options(scheduling_strategy=strategy, **options).remote())
        places = self._get([a.place.remote() for a in self.actors], "place", PLACEMENT_TIMEOUT_S)
        ips = [ip for ip, _ in places]
        host, port = places[0]
        local = [(ips[:rank].count(ip), ips.count(ip)) for rank, ip in enumerate(ips)]
        return f"tcp://{host}:{port}", local

    def _start(self, inits: list[RankInit]) -> list[dict[str, Any]]:
        refs = [a.setup.remote(init) for a, init in zip(self.actors, inits)]
        return self._get(refs, "start", None)

    def _call_all(self, method: str, args: tuple) -> list[Any]:
        refs = [a.call.remote(method, args) for a in self.actors]
        return self._get(refs, method, self.config.distributed_timeout)

    def _broadcast(self, method: str, args: tuple) -> None:
        import ray

        shared = ray.put(args)  # once, in the object store; Ray hands every rank the value
        self._executing = [a.call.remote(method, shared) for a in self.actors]

    def _ask_rank0(self, method: str, args: tuple) -> None:
        self._answer = self.actors[0].call.remote(method, args)

    def _wait_rank0(self) -> Any:
        timeout = self.config.distributed_timeout
        executing, self._executing = self._executing, []
        answer, self._answer = self._answer, None
        results = self._get(executing, "execute", timeout)
        # Rank 0's answer: to `sample` when one was sent, else to the step itself.
        result = results[0] if answer is None else self._get([answer], "sample", timeout)[0]
        failures = [f"rank {r}: {why}" for r, why in enumerate(results) if r > 0 and why]
        if failures:
            raise StepError("; ".join(failures))
        return result

    def _get(self, refs: list[Any], method: str, timeout: float | None) -> list[Any]:
        """Every rank's result, or the first failure named by rank."""
        import ray

        deadline = None if timeout is None else time.monotonic() + timeout
        results = []
        for rank, ref in enumerate(refs):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                results.append(ray.get(ref, timeout=left))
            except ray.exceptions.GetTimeoutError:
                raise RankError(hung([rank], method, timeout)) from None
            except ray.exceptions.RayActorError as e:
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise RankError(f"rank {rank} (a Ray actor) died during {method}: {why}") from None
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if getattr(e, "cause", None) is not None else e
                if isinstance(cause, StepFailed):
                    raise StepError(f"rank {rank}: {cause}") from None
                raise RankError(
                    f"rank {rank} failed in {method}: {type(cause).__name__}: {cause}"
                ) from None
        return results

    def _stop(self, graceful: bool) -> None:
        try:
            import ray
        except ImportError:
            return
        if graceful and self.actors:
            refs = [a.close.remote() for a in self.actors]
            ray.wait(refs, num_returns=len(refs), timeout=STOP_GRACE_S)
        for actor in self.actors:
            ray.kill(actor)
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.group)
        self.actors, self.group = [], None


def connect_ray() -> Any:
    """Ray, connected: to the cluster of RAY_ADDRESS when it is set (one-line errors), else to
    the one `ray start` started on this machine, else to a new one on this machine alone (as
    vLLM and LMDeploy do)."""
    try:
        import ray
    except ImportError:
        raise RankError(
            "distributed_executor_backend='ray' needs Ray: pip install 'enginehouse[distributed]'"
        ) from None
    with _CONNECTING:  # replicas start on several threads: one of them connects
        if not ray.is_initialized():
            _init(ray)
    return ray


_CONNECTING = threading.Lock()


def _init(ray: Any) -> None:
    address = os.environ.get("RAY_ADDRESS")
    if address is None:
        try:
            ray.init(address="auto", log_to_driver=True)
        except ConnectionError:  # no cluster here: start one, for this process
            log.warning("no Ray cluster is running here; starting one on this machine")
            ray.init(log_to_driver=True)
        return
    try:
        _check_reachable(address)
        ray.init(address=address, log_to_driver=True)
    except Exception as e:  # ConnectionError, or Ray's own for a bad address
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RankError(
            f"could not reach a Ray cluster at {address!r} ({first}); start one with "
            "`ray start --head` on this machine (and `ray start --address=HEAD:6379` on the "
            "others), or set RAY_ADDRESS"
        ) from None


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT that does not answer fails here in seconds; Ray itself retries for
    minutes before it gives up (measured: 14 minutes for a closed port)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", or a form Ray reads itself
    with socket.create_connection((host, int(port)), timeout=timeout):
        pass
