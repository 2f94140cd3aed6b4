"""One rank of a sharded model: the worker side of every executor.

`RankWorker` sets up torch.distributed for its rank, builds the runner through the plugin that
offered the backend (the same hook `pipeline()` calls at tp=1) and answers the driver's calls.
The "mp" executor runs it in a process of its own (`python -m enginehouse.executor.worker FD`,
talking over an inherited socket); the "ray" executor runs it inside an actor.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from ..config import EngineConfig
from ..runner import RunnerContext, missing_members
from ..spec import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankInit:
    """What a rank needs to start: the model, the settings, its place, where to rendezvous."""

    plugin: str
    backend: str
    spec: ModelSpec
    config: EngineConfig
    context: RunnerContext
    dist_url: str  # tcp://host:port of rank 0's rendezvous
    progress: bool = False


def dist_backend(config: EngineConfig) -> str:
    """NCCL between GPUs, gloo between CPUs."""
    from ..device import resolve_device

    return "nccl" if resolve_device(config).type == "cuda" else "gloo"


class RankWorker:
    def __init__(self, init: RankInit) -> None:
        self.init = init
        self.runner: Any = None

    def setup(self) -> dict[str, Any]:
        """Join the process group, build and load this rank's runner; return what the driver
        needs to know of it."""
        init, ctx = self.init, self.init.context
        backend = dist_backend(init.config)
        if backend == "nccl":
            torch.cuda.set_device(ctx.local_rank)
        else:
            _share_cores(ctx.local_rank, ctx.local_world_size)
        torch.distributed.init_process_group(
            backend,
            init_method=init.dist_url,
            rank=ctx.rank,
            world_size=ctx.world_size,
            timeout=timedelta(seconds=init.config.distributed_timeout),
        )
        from ..plugins import get_plugins

        self.runner = get_plugins().call_one(
            init.plugin,
            "create_runner",
            backend=init.backend,
            spec=init.spec,
            config=init.config,
            context=ctx,
        )
        if self.runner is None or missing_members(self.runner):
            lacks = ", ".join(missing_members(self.runner)) if self.runner else "everything"
            raise RuntimeError(
                f"plugin {init.plugin!r} built no runner for rank {ctx.rank} (it lacks {lacks})"
            )
        self.runner.load(init.progress and ctx.rank == 0)
        return {
            "kv_spec": self.runner.kv_spec,
            "release_sequence": hasattr(self.runner, "release_sequence"),
            "threads": torch.get_num_threads(),
            "collectives": torch.distributed.get_backend(),
        }

    def call(self, method: str, args: tuple) -> Any:
        if method == "plan_kv_blocks":
            from ..engine.llm_engine import plan_kv_blocks

            config, session_len = args
            return plan_kv_blocks(self.runner, config, session_len, self.init.context)
        result = getattr(self.runner, method)(*args)
        if method != "execute":
            return result
        # Only rank 0's logits are used (the others send nothing back). They travel as a
        # numpy array, in host memory: the driver needs no device of its own, and a numpy
        # array pickles in half the time of a tensor (benchmarks/tensor_parallel.py).
        return result.float().cpu().numpy() if self.init.context.rank == 0 else None

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _share_cores(local_rank: int, local_world_size: int) -> None:
    """CPU ranks on one machine split its cores between them, so their threads do not fight
    (each rank's torch then takes its share, `device.use_all_cores`)."""
    if local_world_size == 1 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < local_world_size:
        return
    per = len(cores) // local_world_size
    os.sched_setaffinity(0, cores[local_rank * per : (local_rank + 1) * per])


def _die_with_parent() -> None:
    """Linux: this process is killed when the driver dies, even one stuck in a collective."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere the closed socket ends the worker at its next receive


def serve(conn: Any) -> None:
    """The "mp" worker's loop: one (method, args) message in, one ("ok" | "error", value) out."""

    def reply(status: str, value: Any) -> None:
        conn.send_bytes(pickle.dumps((status, value)))

    worker = RankWorker(pickle.loads(conn.recv_bytes()))
    try:
        reply("ok", worker.setup())
    except BaseException as e:
        reply("error", _describe(e))
        return
    while True:
        try:
            method, args = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):  # the driver is gone
            break
        if method == "close":
            worker.close()
            reply("ok", None)
            break
        try:
            reply("ok", worker.call(method, args))
        except Exception as e:
            reply("error", _describe(e))


def _describe(e: BaseException) -> str:
    """One line for the driver's error (the whole traceback goes to this rank's stderr)."""
    log.error("%s", "".join(traceback.format_exception(e)))
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"


def main() -> None:
    from multiprocessing.connection import Connection

    _die_with_parent()
    # Ctrl-C belongs to the driver, which closes the ranks itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="[rank worker] %(message)s")
    serve(Connection(int(sys.argv[1])))


if __name__ == "__main__":
    main()
