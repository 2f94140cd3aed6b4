"""Where the ranks of a sharded model run (`EngineConfig.tp`, `distributed_executor_backend`).

At tp=1 there is no executor: the engine drives the runner in its own process, as before.
Otherwise an executor stands in for the runner (it meets `ModelRunner`): the scheduler, block
manager and sampler stay in this process, the driver, and every step's `ScheduledBatch` goes to
every rank; each rank runs the same step on its shard and rank 0 sends back the logits.

- `worker.py`: one rank: torch.distributed set up, its runner built by the owning plugin;
- `base.py`: the driver's side, shared: calls on every rank, failures named by rank;
- `multiproc.py` ("mp"): worker processes on this machine, over socket pairs;
- `ray_executor.py` ("ray"): one Ray actor per rank, placed by a placement group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import DistributedExecutor, RankError

if TYPE_CHECKING:
    from ..backends import BackendDecision
    from ..config import EngineConfig
    from ..spec import ModelSpec

__all__ = ["DistributedExecutor", "RankError", "make_executor"]


def make_executor(
    decision: BackendDecision, spec: ModelSpec, config: EngineConfig
) -> DistributedExecutor:
    """The executor `config` asks for (`config.executor` is 'mp' or 'ray'), not yet started."""
    if config.executor == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(decision, spec, config)
    from .multiproc import MultiprocExecutor

    return MultiprocExecutor(decision, spec, config)
