"""One rank of a sharded model: the worker side of every executor.

`RankWorker` sets up torch.distributed for its rank, builds the runner through the plugin that
offered the backend (the same hook `pipeline()` calls at tp=1) and answers the driver's calls.
A step is `execute` (every rank: apply the step's plan, run the forward pass) then `sample`
(rank 0 only: sample its logits with the grammar bitmask the driver filled meanwhile), so that
only token ids travel back; a step with no grammar is one `step` call doing both. The "mp"
executor runs it in a process of its own (`python -m enginehouse.executor.worker FD`, the
plans read from a shared-memory broadcast); the "ray" executor runs it inside an actor.
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
from ..runner import RunnerContext
from ..spec import ModelSpec
from .local import LocalExecutor

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
    broadcast: tuple | None = None  # the "mp" executor's `ShmBroadcast.handle()`


def dist_backend(config: EngineConfig) -> str:
    """The collectives the platform's ranks use: NCCL between GPUs, gloo between CPUs, what
    a plugin's platform declares on its devices."""
    from ..platforms import platform_of

    return platform_of(config.device)[0].collective_backend


class RankWorker:
    def __init__(self, init: RankInit) -> None:
        self.init = init
        self.local: LocalExecutor | None = None  # the runner, its batch assembler, a sampler
        self.failed: str | None = None  # the current step's error, until `sample` reports it
        self.steps = 0  # steps executed: a failure names its step, as the driver counts them

    def setup(self) -> dict[str, Any]:
        """Join the process group, build and load this rank's runner; return what the driver
        needs to know of it."""
        init, ctx = self.init, self.init.context
        from ..platforms import platform_of

        platform = platform_of(init.config.device)[0]
        backend = platform.collective_backend
        if platform.device_per_rank:
            platform.set_device(ctx.local_rank)
        else:
            _share_cores(ctx.local_rank, ctx.local_world_size)
        torch.distributed.init_process_group(
            backend,
            init_method=init.dist_url,
            rank=ctx.rank,
            world_size=ctx.world_size,
            timeout=timedelta(seconds=init.config.distributed_timeout),
        )
        from ..pipeline import create_runner
        from ..plugins import get_plugins

        runner = create_runner(
            init.plugin, init.backend, init.spec, init.config, ctx, get_plugins()
        )
        self.local = LocalExecutor(runner)
        runner.load(init.progress and ctx.rank == 0)
        return {
            "kv_spec": runner.kv_spec,
            "capabilities": self.local.capabilities,
            "threads": torch.get_num_threads(),
            "collectives": torch.distributed.get_backend(),
        }

    def call(self, method: str, args: tuple) -> Any:
        assert self.local is not None
        if method == "plan_kv_blocks":
            from ..engine.kv_plan import plan_kv_blocks

            config, session_len = args
            return plan_kv_blocks(self.local.runner, config, session_len, self.init.context)
        if method == "execute":
            return self.execute(*args)
        if method == "sample":
            return self.sample(*args)
        if method == "step":  # execute, then (rank 0) sample at once: no bitmask to wait for
            failed = self.execute(*args)
            return self.sample(None) if self.init.context.rank == 0 else failed
        return getattr(self.local, method)(*args)

    def execute(self, plan: Any) -> str | None:
        """Run the step's forward pass; its error, if any (rank 0 reports it at `sample`)."""
        assert self.local is not None
        self.failed = None
        self.steps += 1
        try:
            self.local.execute(plan)
        except Exception as e:
            self.failed = _describe(e)
        return self.failed

    def sample(self, bitmask: Any) -> Any:
        """Rank 0: the step's tokens (only rank 0 has the whole logits)."""
        assert self.local is not None
        if self.failed is not None:
            raise StepFailed(self.failed)
        return self.local.sample(bitmask)

    def close(self) -> None:
        if self.local is not None:
            self.local.close()
            self.local = None
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class StepFailed(Exception):
    """The step's forward pass failed on this rank (reported, not raised, by `execute`)."""


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
    """The "mp" worker's loop. Each message is a pickled (method, args): most come through
    the shared-memory broadcast (an empty frame on the socket says one is waiting), the rest
    (too large for a slot, or for rank 0 alone) on the socket itself. Every call is answered
    with ("ok", value), ("failed", (step, why)) when a step failed (the driver fails that batch and
    goes on) or ("error", why) when anything else did; `execute` is answered only where it
    fails, and only on ranks other than 0 (rank 0 answers at `sample`); `step` (`execute`
    then `sample`, for a step with no grammar to wait for) is answered by rank 0 alone."""

    def reply(status: str, value: Any) -> None:
        conn.send_bytes(pickle.dumps((status, value)))

    init = pickle.loads(conn.recv_bytes())
    worker = RankWorker(init)
    rank = init.context.rank
    broadcast = None
    try:
        if init.broadcast is not None:
            from .shm import ShmBroadcast

            broadcast = ShmBroadcast.attach(*init.broadcast)
        reply("ok", worker.setup())
    except BaseException as e:
        reply("error", _describe(e))
        return
    while True:
        try:
            frame = conn.recv_bytes()
            message = broadcast.read(rank) if not frame and broadcast is not None else frame
            method, args = pickle.loads(message)
            del message
        except (EOFError, OSError):  # the driver is gone
            break
        if method == "close":
            worker.close()
            if broadcast is not None:
                broadcast.close()
            reply("ok", None)
            break
        try:
            result = worker.call(method, args)
        except StepFailed as e:
            reply("failed", (worker.steps, str(e)))
            continue
        except Exception as e:
            if method in ("sample", "step"):
                reply("failed", (worker.steps, _describe(e)))
            else:
                reply("error", _describe(e))
            continue
        if method not in ("execute", "step") or (method == "step" and rank == 0):
            reply("ok", result)
        elif result is not None and rank != 0:
            reply("failed", (worker.steps, result))


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
