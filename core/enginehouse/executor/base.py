"""The driver's side of a sharded model: one call, every rank, and failures named by rank."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from ..errors import EnginehouseError
from ..runner import KVSpec, RunnerContext, ScheduledBatch

if TYPE_CHECKING:
    from ..backends import BackendDecision
    from ..config import EngineConfig
    from ..spec import ModelSpec
    from .worker import RankInit

log = logging.getLogger(__name__)


class RankError(EnginehouseError):
    """A rank died, hung or failed; the executor is down and says which rank and why."""


def hung(ranks: list[int], method: str, timeout: float) -> str:
    """The error for ranks that did not answer within `distributed_timeout`."""
    which = f"rank{'s' if len(ranks) > 1 else ''} {' and '.join(map(str, ranks))}"
    return (
        f"{which} did not answer {method} within {timeout:g} s "
        "(EngineConfig.distributed_timeout): hung, or far too slow"
    )


class DistributedExecutor:
    """A `ModelRunner` whose work is done by `config.tp` ranks elsewhere.

    Subclasses start the ranks (`_start`), call a method on every rank and collect one reply
    from each (`_call_all`), and stop them (`_stop`), raising `RankError` for a rank that dies,
    hangs past
    `config.distributed_timeout` or cannot be reached. After the first failure the executor
    is down: it stops every rank and every later call raises at once with the first reason.
    """

    kind = ""  # "mp" or "ray"

    def __init__(self, decision: BackendDecision, spec: ModelSpec, config: EngineConfig) -> None:
        verdict = decision.chosen_verdict
        self.plugin, self.backend = verdict.plugin, verdict.name
        self.spec, self.config = spec, config
        self.world_size = config.tp
        self.kv_spec: KVSpec = KVSpec(block_size=1, bytes_per_block=1)  # rank 0's, after load
        self.down: str | None = None
        self._releases = False
        self.collectives = ""

    # --- what subclasses provide ------------------------------------------------------------

    def _start(self, inits: list[RankInit]) -> list[dict[str, Any]]:
        """Start every rank with its `RankInit`; return each rank's `RankWorker.setup()`."""
        raise NotImplementedError

    def _call_all(self, method: str, args: tuple) -> list[Any]:
        """Call `method` on every rank; every rank's result, in rank order."""
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
        self._releases = infos[0]["release_sequence"]
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

    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        logits = self._call("execute", batch)[0]
        # Ray hands back a read-only view of its object store; the sampler writes in place.
        return torch.from_numpy(logits if logits.flags.writeable else logits.copy())

    def release_sequence(self, seq_id: int, block_table: tuple[int, ...]) -> None:
        if self._releases:
            self._call("release_sequence", seq_id, block_table)

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
