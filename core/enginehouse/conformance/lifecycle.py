"""`close()`: the weights and the cache are let go."""

from __future__ import annotations

import torch

from ..config import format_size
from .memory import reachable_bytes
from .result import Mismatch, NotApplicable
from .target import Target

KEPT_AT_MOST = 2**16  # a few small tensors (a rope table's scalars, say) may stay


def close(t: Target) -> str:
    runner = t.runner
    cuda = runner.kv_spec.device.type == "cuda"
    before = reachable_bytes(runner)
    on_device = torch.cuda.memory_allocated(runner.kv_spec.device) if cuda else 0
    runner.close()
    after = reachable_bytes(runner)
    if before == 0:
        raise NotApplicable("the runner holds no torch or numpy memory the kit can see")
    if after > max(KEPT_AT_MOST, before // 100):
        raise Mismatch(
            f"after close() the runner still holds {format_size(after)} of tensors (of "
            f"{format_size(before)} before), most of it in {_largest_holder(runner)}"
        )
    freed = f"close() let go of {format_size(before - after)} of tensors"
    if before - t.kv_bytes < KEPT_AT_MOST:  # only the cache: the weights live elsewhere
        freed += " (the KV cache; weights outside torch and numpy memory, if any, go unseen)"
    if cuda:
        freed += f" ({format_size(on_device - torch.cuda.memory_allocated())} on the GPU)"
    return freed


def _largest_holder(runner: object) -> str:
    sizes = {name: reachable_bytes(v) for name, v in vars(runner).items()}
    name = max(sizes, key=sizes.get)  # type: ignore[arg-type]
    return f"self.{name} ({format_size(sizes[name])})"
