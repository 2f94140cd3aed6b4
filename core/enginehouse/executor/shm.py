"""A one-writer, many-reader broadcast through the standard library's shared memory.

The "mp" executor writes each step's plan here once; every rank reads the same bytes. A ring
of `slots` slots, each `slot_bytes` long: slot `n % slots` holds message `n`. The writer tells
each reader that a message is waiting over the reader's own socket (one empty frame), which is
also how the reader sleeps until then: no spinning on a shared core. A reader records the last
message it read in its own counter in the header, and the writer reuses a slot only once every
reader has passed it. A message larger than a slot does not go through here: the caller sends
it over the sockets instead (`fits`).

Layout: `readers` little-endian uint64 counters (messages read, per reader), then the slots,
each an 8-byte length and the payload.
"""

from __future__ import annotations

import struct
import time
from multiprocessing import shared_memory

COUNTER = struct.Struct("<Q")
HEADER = 8  # a slot's length field
DEFAULT_SLOTS = 8
DEFAULT_SLOT_BYTES = 1 << 20  # a step's plan is far smaller; image embeddings may not be


class ShmBroadcast:
    def __init__(
        self,
        readers: int,
        slots: int = DEFAULT_SLOTS,
        slot_bytes: int = DEFAULT_SLOT_BYTES,
        name: str | None = None,
    ) -> None:
        self.readers, self.slots, self.slot_bytes = readers, slots, slot_bytes
        size = readers * COUNTER.size + slots * (HEADER + slot_bytes)
        create = name is None
        self.shm = shared_memory.SharedMemory(name=name, create=create, size=size if create else 0)
        if not create:
            _untrack(self.shm)  # the writer owns it: a reader must not unlink it on exit
        self.buf = self.shm.buf
        if create:
            self.buf[: readers * COUNTER.size] = bytes(readers * COUNTER.size)
        self.written = 0  # the writer's count of messages written

    @property
    def name(self) -> str:
        return self.shm.name

    def handle(self) -> tuple[str, int, int, int]:
        """What a reader process needs to attach: `ShmBroadcast.attach(*handle)`."""
        return self.name, self.readers, self.slots, self.slot_bytes

    @classmethod
    def attach(cls, name: str, readers: int, slots: int, slot_bytes: int) -> ShmBroadcast:
        return cls(readers, slots, slot_bytes, name=name)

    def fits(self, payload: bytes) -> bool:
        return len(payload) <= self.slot_bytes

    def _slot(self, n: int) -> int:
        return self.readers * COUNTER.size + (n % self.slots) * (HEADER + self.slot_bytes)

    def _read_count(self, reader: int) -> int:
        return COUNTER.unpack_from(self.buf, reader * COUNTER.size)[0]

    def write(self, payload: bytes, timeout: float) -> None:
        """Write the next message; waits (up to `timeout` s) for a reader that is a whole ring
        behind. Raises TimeoutError naming no one: the caller knows which readers lag."""
        n = self.written
        deadline = time.monotonic() + timeout
        while min(self._read_count(r) for r in range(self.readers)) <= n - self.slots:
            if time.monotonic() > deadline:
                raise TimeoutError("a reader fell a whole ring of messages behind")
            time.sleep(0.0005)
        at = self._slot(n)
        self.buf[at + HEADER : at + HEADER + len(payload)] = payload
        COUNTER.pack_into(self.buf, at, len(payload))
        self.written = n + 1

    def lagging(self) -> list[int]:
        """Readers that have not read every message written."""
        return [r for r in range(self.readers) if self._read_count(r) < self.written]

    def read(self, reader: int) -> memoryview:
        """The next message for `reader` (call once per wake-up). The view is valid until the
        writer comes round the ring again, which waits for this reader's next `read`."""
        n = self._read_count(reader)
        at = self._slot(n)
        (length,) = COUNTER.unpack_from(self.buf, at)
        view = self.buf[at + HEADER : at + HEADER + length]
        COUNTER.pack_into(self.buf, reader * COUNTER.size, n + 1)
        return view

    def close(self, unlink: bool = False) -> None:
        try:
            del self.buf
            self.shm.close()
        except BufferError:  # a view of it is still alive somewhere; the OS frees it at exit
            pass
        if unlink:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


def _untrack(shm: shared_memory.SharedMemory) -> None:
    """Python's resource tracker would unlink a segment this process only attached to when it
    exits (bpo-39959); the writer owns it."""
    try:
        from multiprocessing import resource_tracker

        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    except Exception:
        pass
