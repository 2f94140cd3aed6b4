"""All-reduce and gather for CPU ranks of one machine through the standard library's shared
memory, for the small tensors of a decode step.

Why: through gloo a collective costs ~0.06 ms when both ranks arrive together, but a rank that
arrives first and waits is woken ~3.6 ms later on a 2-core KVM guest (median, measured with
0.3 ms of work between collectives; a blocked pipe reader there wakes in 0.05 ms, so the delay
is gloo's waiting, not the kernel's). A decode step of tp=2 makes 18 collectives, and its
ranks never arrive together: 21 ms of its 28 ms went to waiting (benchmarks/tp_step.py,
benchmarks/RESULTS.md). Here a rank that waits never sleeps: it spins on a counter in shared
memory, yielding its core now and then, so the other rank's write is seen within
microseconds.

Layout: per rank, a counter (the collectives it has entered) and two data buffers used in
turn. Rank r copies its tensor into its buffer for collective n (n % 2), then sets its counter
to n; the readers wait for every counter to reach n and read. A rank can be at most one
collective ahead of the slowest (it waits for everyone's counter), so the buffer it writes next
is never one a slower rank still reads. Every rank sums the buffers in rank order, so every
rank holds the same bits. Stores become visible in program order on x86 (TSO), which the
counter-after-data protocol relies on: other machines keep gloo.
"""

from __future__ import annotations

import logging
import os
import platform
import struct
import time
from multiprocessing import shared_memory

import numpy as np
import torch

log = logging.getLogger(__name__)

COUNTER = struct.Struct("<Q")
HEADER = 64  # a counter per cache line
MAX_BYTES = 4 << 20  # per buffer: [32, 16000] float32 logits slices (2 MB) fit
SPINS_PER_YIELD = 64


def usable(world_size: int, local_world_size: int) -> bool:
    """Every rank on this machine, on a CPU whose stores are seen in order, and not turned
    off (ENGINEHOUSE_SHM_COLLECTIVES=0)."""
    if os.environ.get("ENGINEHOUSE_SHM_COLLECTIVES", "1").lower() in ("0", "false", "no", "off"):
        return False
    return (
        world_size > 1
        and world_size == local_world_size
        and platform.machine()
        in (
            "x86_64",
            "AMD64",
        )
    )


class ShmCollectives:
    def __init__(
        self, rank: int, world: int, name: str | None = None, timeout: float = 120.0
    ) -> None:
        self.rank, self.world, self.timeout = rank, world, timeout
        self.region = HEADER + 2 * MAX_BYTES
        size = world * self.region
        self.shm = shared_memory.SharedMemory(name=name, create=name is None, size=size)
        if name is not None:
            _untrack(self.shm)
        self.buf = np.frombuffer(self.shm.buf, dtype=np.uint8)
        if name is None:
            self.buf[:] = 0
        self.count = 0

    @classmethod
    def join(cls, rank: int, world: int, timeout: float = 120.0) -> ShmCollectives | None:
        """Rank 0 creates the segment and tells the others its name (through torch.distributed,
        once); every rank attaches. None on every rank when any rank could not (no /dev/shm,
        say): then they all keep torch.distributed's collectives. `timeout`: how long a rank
        waits for the others in one collective (EngineConfig.distributed_timeout)."""
        import torch.distributed as dist

        mine = _try(lambda: cls(rank, world, timeout=timeout)) if rank == 0 else None
        names = [mine.shm.name if mine is not None else None]
        dist.broadcast_object_list(names, src=0)
        if rank != 0 and names[0] is not None:
            mine = _try(lambda: cls(rank, world, names[0], timeout))
        ok = torch.tensor([int(mine is not None)])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank attached, or none uses it
        if ok.item() == 1:
            return mine
        if mine is not None:
            mine.close()
        return None

    def fits(self, x: torch.Tensor) -> bool:
        """A CPU tensor numpy can add (bfloat16 goes through gloo), small enough."""
        small = x.numel() * x.element_size() <= MAX_BYTES
        return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float16) and small

    def _counter(self, rank: int) -> int:
        return COUNTER.unpack_from(self.shm.buf, rank * self.region)[0]

    def _data(self, rank: int, n: int, nbytes: int) -> np.ndarray:
        start = rank * self.region + HEADER + (n % 2) * MAX_BYTES
        return self.buf[start : start + nbytes]

    def _enter(self, x: torch.Tensor) -> tuple[int, int, np.ndarray]:
        """Copy `x` in and announce it: (its collective number, its size, its bytes)."""
        self.count += 1
        mine = x.detach().contiguous().numpy().view(np.uint8).reshape(-1)
        self._data(self.rank, self.count, mine.size)[:] = mine
        COUNTER.pack_into(self.shm.buf, self.rank * self.region, self.count)
        return self.count, mine.size, mine

    def _wait(self, n: int, ranks: range) -> None:
        spins, deadline = 0, time.monotonic() + self.timeout
        while any(self._counter(r) < n for r in ranks):
            spins += 1
            if spins % SPINS_PER_YIELD == 0:
                os.sched_yield()  # runnable all the while: never a sleep the other rank must end
                if time.monotonic() > deadline:
                    late = [r for r in ranks if self._counter(r) < n]
                    raise RuntimeError(
                        f"ranks {late} did not reach collective {n} within {self.timeout:g} s"
                    )

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """`x` summed over the ranks, in place."""
        n, nbytes, _ = self._enter(x)
        self._wait(n, range(self.world))
        parts = [self._data(r, n, nbytes).view(x.numpy().dtype) for r in range(self.world)]
        total = parts[0].copy()
        for part in parts[1:]:
            total += part
        x.copy_(torch.from_numpy(total.reshape(x.shape)))
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """On rank 0, every rank's `x` side by side along the last dimension; None elsewhere
        (they do not wait)."""
        n, nbytes, _ = self._enter(x)
        if self.rank != 0:
            return None
        self._wait(n, range(self.world))
        dtype = x.numpy().dtype
        parts = [
            torch.from_numpy(self._data(r, n, nbytes).view(dtype).reshape(x.shape).copy())
            for r in range(self.world)
        ]
        return torch.cat(parts, dim=-1)

    def close(self) -> None:
        del self.buf
        try:
            self.shm.close()
        except BufferError:
            pass
        if self.rank == 0:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


def _try(make):
    try:
        return make()
    except OSError as e:
        log.warning("no shared memory for the collectives (%s): gloo carries them", e)
        return None


def _untrack(shm: shared_memory.SharedMemory) -> None:
    """Python's resource tracker would unlink a segment this process only attached to when it
    exits (bpo-39959); rank 0 owns it."""
    try:
        from multiprocessing import resource_tracker

        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    except Exception:
        pass
