"""Data parallelism: `EngineConfig.dp` engine replicas behind one client.

Each replica is a `ProcessClient`: an engine core in its own process with its own `tp` ranks
(dp x tp GPUs, replica i on GPUs i*tp ... i*tp + tp - 1; CPU replicas split the cores). A
request goes to the replica with the fewest requests in flight, unless it shares a long enough
prefix with requests a replica has served, which then gets it so that its prefix cache hits
(`Router`). A replica that dies fails only its own requests, naming itself; the others keep
serving. `stats()` sums the replicas; `replica_stats()` gives each.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..config import GenerationConfig
from ..errors import RequestError
from ..multimodal import MultiModalData
from .client import EngineClient, Sink
from .grammar import Constraint
from .process_client import EngineDown, ProcessClient
from .sequence import RequestOutput
from .speculative import with_ratios

log = logging.getLogger(__name__)
PREFIX_ENTRIES = 100_000  # prefix blocks the router remembers, least recently used dropped
MATCH_THRESHOLD = 0.5  # route by prefix when it covers at least this much of the prompt


class Router:
    """Which replica takes a request: prefix affinity first, then the least loaded.

    The router remembers, for the prompts it has routed, each block-aligned prefix and the
    replica that took it, keyed by a chain of stable hashes (blake2b: the same in every
    process and every run, unlike Python's salted `hash()` of strings). A prompt whose known
    prefix covers at least half of it goes where that prefix went (SGLang's cache-aware
    routing does the same), unless that replica is a whole batch busier than the least loaded
    one: then, and for every other prompt, the least loaded replica takes it (ties go round).
    """

    def __init__(self, replicas: int, block_size: int, max_batch_size: int) -> None:
        self.load = [0] * replicas
        self.block_size = block_size
        self.slack = max_batch_size  # how much busier the prefix's replica may be
        self.prefixes: OrderedDict[bytes, int] = OrderedDict()
        self._turn = 0  # ties go round the replicas, starting after the last one chosen

    def _keys(self, prompt_ids: list[int], adapter: str | None = None) -> Iterator[bytes]:
        """The key of each full block of the prompt: a hash of it and every block before (and
        of the LoRA adapter: prompts of different adapters share no KV)."""
        bs, parent = self.block_size, (adapter or "").encode()
        data = array.array("i", prompt_ids).tobytes()  # 4 bytes a token, this machine's order
        step = bs * 4
        for start in range(0, (len(prompt_ids) // bs) * step, step):
            parent = hashlib.blake2b(parent + data[start : start + step], digest_size=16).digest()
            yield parent

    def pick(self, prompt_ids: list[int], alive: list[int], adapter: str | None = None) -> int:
        if not alive:
            raise EngineDown("every replica is down; start a new pipeline")
        n = len(self.load)
        least = min(alive, key=lambda r: (self.load[r], (r - self._turn) % n))
        keys = list(self._keys(prompt_ids, adapter))
        matched, owner = 0, None
        for n, key in enumerate(keys, 1):
            replica = self.prefixes.get(key)
            if replica is None:
                break
            matched, owner = n, replica
        covered = matched * self.block_size / max(1, len(prompt_ids))
        choice = least
        if owner in alive and covered >= MATCH_THRESHOLD:
            if self.load[owner] - self.load[least] <= self.slack:  # type: ignore[index]
                choice = owner  # type: ignore[assignment]
        for key in keys:
            self.prefixes[key] = choice
            self.prefixes.move_to_end(key)
        while len(self.prefixes) > PREFIX_ENTRIES:
            self.prefixes.popitem(last=False)
        self._turn = choice + 1
        return choice


class DataParallelClient(EngineClient):
    def __init__(self, replicas: list[ProcessClient]) -> None:
        self.replicas = replicas
        first = replicas[0]
        self.config, self.session_len, self.kv_spec = first.config, first.session_len, first.kv_spec
        self.vision = first.vision
        self.checks = first.checks
        self.router = Router(len(replicas), first.kv_spec.block_size, first.config.max_batch_size)
        self._where: dict[str, int] = {}  # request id -> replica, while it runs
        self._lock = threading.Lock()  # the router's loads: callers vs the reader threads

    def _alive(self) -> list[int]:
        return [i for i, r in enumerate(self.replicas) if r.is_running()]

    def submit(
        self,
        prompt_ids: list[int],
        params: GenerationConfig,
        sink: Sink,
        request_id: str | None = None,
        score_only: bool = False,
        mm: MultiModalData | None = None,
    ) -> str:
        self.validate(prompt_ids, params, score_only, mm)
        with self._lock:
            if request_id is not None and request_id in self._where:
                raise RequestError(
                    f"request id {request_id!r} is already in use; give a unique one"
                )
            i = self.router.pick(prompt_ids, self._alive(), params.adapter)
            self.router.load[i] += 1

        def done(out: RequestOutput) -> None:
            if out.finished:
                with self._lock:
                    self.router.load[i] -= 1
                    self._where.pop(out.request_id, None)
            sink(out)

        try:
            rid = self.replicas[i].submit(prompt_ids, params, done, request_id, score_only, mm)
        except BaseException:
            with self._lock:
                self.router.load[i] -= 1
            raise
        with self._lock:
            self._where.setdefault(rid, i)
        return rid

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for replica in self.replicas:
                if replica.is_running():
                    stack.enter_context(replica.together())
            yield

    def abort(self, request_id: str) -> None:
        i = self._where.get(request_id)
        if i is not None:
            self.replicas[i].abort(request_id)

    def compile_grammar(self, constraint: Constraint) -> Future:
        """Compiled on one live replica (the others compile it when a request needs it)."""
        alive = self._alive()
        if not alive:
            raise EngineDown("every replica is down; start a new pipeline")
        return self.replicas[alive[0]].compile_grammar(constraint)

    def adapter_call(self, op: str, *args: Any) -> Any:
        """Every replica loads (unloads) the adapter; a load that fails on one is undone on
        those that had taken it."""
        done: list[ProcessClient] = []
        result = None
        for replica in self.replicas:
            try:
                if op == "list":
                    return replica.adapter_call(op)
                if op == "load":
                    replica.load_adapter(*args)
                else:
                    replica.unload_adapter(*args)
            except BaseException:
                for r in done if op == "load" else ():
                    r.unload_adapter(args[0])
                raise
            done.append(replica)
        return result

    def replica_stats(self) -> list[dict[str, Any]]:
        with ThreadPoolExecutor(len(self.replicas)) as pool:
            stats = list(pool.map(_stats_of, self.replicas))
        return [{"replica": i, **s} for i, s in enumerate(stats)]

    def stats(self) -> dict[str, Any]:
        return sum_stats(self.replica_stats())

    def describe(self) -> dict[str, Any]:
        return {**self.replicas[0].describe(), "replicas": len(self.replicas)}

    def is_running(self) -> bool:
        return bool(self._alive())

    def step_running_for(self) -> float:
        return (
            max(r.step_running_for() for r in self.replicas if r.is_running())
            if self._alive()
            else 0.0
        )

    def close(self) -> None:
        with ThreadPoolExecutor(len(self.replicas)) as pool:
            list(pool.map(lambda r: r.close(), self.replicas))


def sum_stats(replicas: list[dict[str, Any]]) -> dict[str, Any]:
    """The replicas' counters added up; `replicas` and `replicas_alive` count them."""
    total: dict[str, Any] = {}
    for s in replicas:
        for key, value in s.items():
            if key in ("replica", "alive"):
                continue
            if isinstance(value, (int, float)):
                total[key] = total.get(key, 0) + value
            elif isinstance(value, list):  # a histogram's bucket counts
                have = total.setdefault(key, [0] * len(value))
                total[key] = [a + b for a, b in zip(have, value)]
    total["replicas"] = len(replicas)
    total["replicas_alive"] = sum(s.get("alive", 1) for s in replicas)
    return with_ratios(total)  # speculative decoding's ratios, of the sums


def _stats_of(replica: ProcessClient) -> dict[str, Any]:
    try:
        return {"alive": int(replica.is_running()), **replica.stats()}
    except Exception as e:  # a replica that cannot answer: counted as down
        log.warning("%s did not give its stats: %s", replica.name, e)
        return {"alive": 0, "kv_blocks_total": replica.num_blocks}


def replica_places(config: Any, dp: int) -> list[tuple[tuple[int, ...] | None, dict[str, str]]]:
    """For each replica: the CPU cores it may use (None: no limit) and its environment (its
    GPUs). GPU replicas take `tp` GPUs each, in order; CPU replicas split this process's cores."""
    from ..device import resolve_device

    if resolve_device(config).type == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(dp * config.tp)]
        return [
            (None, {"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * config.tp : (i + 1) * config.tp])})
            for i in range(dp)
        ]
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < dp:
        return [(None, {}) for _ in range(dp)]
    per = len(cores) // dp
    return [(tuple(cores[i * per : (i + 1) * per]), {}) for i in range(dp)]
