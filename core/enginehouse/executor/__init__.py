"""Where the runner runs: in the engine's process, or as the ranks of a sharded model.

The engine core drives an executor with the same calls whichever it is: `plan_kv_blocks`,
`allocate_kv`, then per step `execute(plan)` (the step's `StepPlan`, a diff) and
`sample(bitmask)` (the step's token ids), and `close`.

- `local.py`: `LocalExecutor`, the runner in this process (tp=1, the default);
- `assembler.py`: the runner's side of a step: block tables kept, batches rebuilt;
- `worker.py`: one rank: torch.distributed set up, its runner built by the owning plugin, the
  step's logits sampled on rank 0;
- `base.py`: the driver's side of the ranks, shared: calls on every rank, failures named by rank;
- `multiproc.py` ("mp"): worker processes on this machine, plans through shared memory;
- `shm.py`: that shared-memory broadcast;
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
