"""The driver's side of a sharded model: one call, every rank, and failures named by rank."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from ..engine.plan import StepPlan
from ..engine.sampler import SamplerOutput
from ..errors import EnginehouseError
from ..runner import KVSpec, RunnerCapabilities, RunnerContext

if TYPE_CHECKING:
    from ..backends import BackendDecision
    from ..config import EngineConfig
    from ..spec import ModelSpec
    from .worker import RankInit

log = logging.getLogger(__name__)


class RankError(EnginehouseError):
    """A rank died, hung or failed; the executor is down and says which rank and why."""


class StepError(EnginehouseError):
    """One step failed on a rank (a bad input reaching a kernel, say): that batch fails, the
    ranks stay up and the next step runs."""


def hung(ranks: list[int], method: str, timeout: float) -> str:
    """The error for ranks that did not answer within `distributed_timeout`."""
    which = f"rank{'s' if len(ranks) > 1 else ''} {' and '.join(map(str, ranks))}"
    return (
        f"{which} did not answer {method} within {timeout:g} s "
        "(EngineConfig.distributed_timeout): hung, or far too slow"
    )


class DistributedExecutor:
    """What the engine core drives when `config.tp` ranks elsewhere do the work.

    It offers what `LocalExecutor` offers in process (`plan_kv_blocks`, `allocate_kv`,
    `execute(plan)`, `sample(bitmask)`, `close`). Subclasses start the ranks (`_start`), call a
    method on every rank and collect one reply from each (`_call_all`), send a step's plan to
    every rank (`_broadcast`, no reply unless a rank fails), send rank 0 alone the grammar's
    bitmask (`_ask_rank0`) and wait for its answer (`_wait_rank0`), and stop them (`_stop`),
    raising `RankError` for a rank that dies, hangs past `config.distributed_timeout` or
    cannot be reached, and `StepError` for a step that failed. After a `RankError` the
    executor is down: it stops every rank and every later call raises at once with the first
    reason; after a `StepError` it goes on.
    """

    kind = ""  # "mp" or "ray"

    def __init__(self, decision: BackendDecision, spec: ModelSpec, config: EngineConfig) -> None:
        verdict = decision.chosen_verdict
        self.plugin, self.backend = verdict.plugin, verdict.name
        self.spec, self.config = spec, config
        self.world_size = config.tp
        self.kv_spec: KVSpec = KVSpec(block_size=1, bytes_per_block=1)  # rank 0's, after load
        self.capabilities = RunnerCapabilities()  # rank 0's runner's, after load
        self.down: str | None = None
        self.collectives = ""
        self._sampling = False  # the current step waits for a separate `sample` call

    # --- what subclasses provide ------------------------------------------------------------

    def _start(self, inits: list[RankInit]) -> list[dict[str, Any]]:
        """Start every rank with its `RankInit`; return each rank's `RankWorker.setup()`."""
        raise NotImplementedError

    def _call_all(self, method: str, args: tuple) -> list[Any]:
        """Call `method` on every rank; every rank's result, in rank order."""
        raise NotImplementedError

    def _broadcast(self, method: str, args: tuple) -> None:
        """Send `method` to every rank without waiting: ranks answer only when they fail, and
        that failure surfaces at the next `_call_rank0`."""
        raise NotImplementedError

    def _ask_rank0(self, method: str, args: tuple) -> None:
        """Send `method` to rank 0 alone (its answer comes at `_wait_rank0`)."""
        raise NotImplementedError

    def _wait_rank0(self) -> Any:
        """Rank 0's answer to the step (a `step`, or a `sample`); a failure any rank reported
        since the last call raises `StepError`."""
        raise NotImplementedError

    def _stop(self, graceful: bool) -> None:
        """Stop every rank (asking them to close first when `graceful`); never raises."""
        raise NotImplementedError

    def _rendezvous(self) -> tuple[str, list[tuple[int, int]]]:
        """torch.distributed's init URL (on rank 0's machine), and for each rank its local
        rank and the number of ranks on its machine."""
        raise NotImplementedError

    # --- the runner contract ----------------------------------------------------------------

    def load(self, progress: bool = True) -> None:
        from .worker import RankInit

        url, places = self._guarded(self._rendezvous)
        inits = [
            RankInit(
                self.plugin,
                self.backend,
                self.spec,
                self.config,
                RunnerContext.for_model(
                    self.spec,
                    self.config,
                    rank=rank,
                    world_size=self.world_size,
                    local_rank=local_rank,
                    local_world_size=local_size,
                ),
                url,
                progress,
            )
            for rank, (local_rank, local_size) in enumerate(places)
        ]
        infos = self._guarded(self._start, inits)
        self.kv_spec = infos[0]["kv_spec"]
        self.capabilities = infos[0]["capabilities"]
        self.collectives = infos[0]["collectives"]  # "gloo" or "nccl"
        log.info(
            "%d ranks started (%s executor, %s), %s threads each",
            self.world_size,
            self.kind,
            self.collectives,
            infos[0]["threads"],
        )

    def plan_kv_blocks(self, config: EngineConfig, session_len: int) -> int:
        """Each rank plans from the memory it has left; the smallest plan holds for all."""
        return min(self._call("plan_kv_blocks", config, session_len))

    def allocate_kv(self, num_blocks: int) -> None:
        self._call("allocate_kv", num_blocks)

    def execute(self, plan: StepPlan) -> None:
        """Every rank runs the step's forward pass on its shard (returns at once). A step with
        no grammar to wait for is one message: rank 0 samples as soon as its forward ends."""
        self._sampling = bool(plan.sampling.constrained)  # then rank 0 waits for the bitmask
        self._guarded(self._broadcast, "execute" if self._sampling else "step", (plan,))

    def sample(self, bitmask: np.ndarray | None = None) -> SamplerOutput:
        """Rank 0 samples the step's logits where they are; only token ids come back."""
        if self._sampling:
            self._guarded(self._ask_rank0, "sample", (bitmask,))
        return self._guarded(self._wait_rank0)

    def propose_tokens(self, requests: list[Any]) -> list[list[int]]:
        """(`drafts_tokens`) Rank 0's runner drafts: its head and the hidden states it keeps
        are there (every rank's forward computes them; the others keep none)."""
        self._guarded(self._ask_rank0, "propose_tokens", (requests,))
        return self._guarded(self._wait_rank0)

    def load_adapter(self, slot: int, adapter: Any) -> None:
        """Every rank loads its shard of the adapter (`runner.load_adapter`)."""
        self._call("load_adapter", slot, adapter)

    def unload_adapter(self, slot: int) -> None:
        self._call("unload_adapter", slot)

    def describe(self) -> dict[str, Any]:
        return {"executor": self.kind, "ranks": self.world_size, "collectives": self.collectives}

    def counters(self) -> dict[str, float]:
        """What crossed between the driver and the ranks (for benchmarks); none by default."""
        return {}

    def close(self) -> None:
        if self.down is None:
            self.down = "the pipeline was closed"
            self._stop(graceful=True)

    # --- failures ---------------------------------------------------------------------------

    def _call(self, method: str, *args: Any) -> list[Any]:
        return self._guarded(self._call_all, method, args)

    def _guarded(self, fn, *args: Any) -> Any:
        if self.down is not None:
            raise RankError(f"the {self.kind} executor is down ({self.down}); start a new pipeline")
        try:
            return fn(*args)
        except RankError as e:
            self.down = str(e)
            log.error("stopping every rank: %s", e)
            self._stop(graceful=False)
            raise
