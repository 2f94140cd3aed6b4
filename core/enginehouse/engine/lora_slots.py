"""The engine core's LoRA adapters: which name sits in which of the runner's slots.

The runner keeps `EngineConfig.max_loras` slots; the core gives each loaded adapter a free one
(1..max_loras, 0 being the base model) and a load id that seeds its sequences' prefix-cache
keys (`block_manager`), so that KV computed with one adapter is never reused by another, nor by
a later adapter loaded under the same name. An adapter in use by a request cannot be unloaded.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from ..adapters import AdapterError, LoraAdapter, load_adapter
from ..errors import RequestError


@dataclass
class Resident:
    name: str
    slot: int
    load_id: int
    source: str
    rank: int
    nbytes: int
    requests: int = 0  # unfinished requests using it


class AdapterSlots:
    def __init__(self, executor: Any, base_config: dict, max_loras: int, max_rank: int) -> None:
        self.executor = executor
        self.base_config = base_config
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.resident: dict[str, Resident] = {}
        self._load_ids = itertools.count(1)
        self.used = False  # an adapter was ever loaded (the metrics report adapters from then)

    def supported(self) -> bool:
        return bool(getattr(self.executor.capabilities, "lora", False))

    def load(self, name: str, source: str) -> Resident:
        """Read, check and load an adapter into a free slot; `AdapterError` when it cannot."""
        if not self.supported():
            raise AdapterError(
                "this backend does not take LoRA adapters (see `enginehouse explain MODEL`); "
                "use the native pytorch backend"
            )
        if name in self.resident:
            raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first")
        used = {r.slot for r in self.resident.values()}
        free = [s for s in range(1, self.max_loras + 1) if s not in used]
        if not free:
            raise AdapterError(
                f"all {self.max_loras} adapter slots are taken ({', '.join(self.resident)}); "
                "unload one, or raise max_loras (EngineConfig(max_loras=...), --max-loras)"
            )
        adapter: LoraAdapter = load_adapter(name, source, self.base_config, self.max_rank)
        self.executor.load_adapter(free[0], adapter)
        entry = Resident(
            name, free[0], next(self._load_ids), str(source), adapter.rank, adapter.nbytes
        )
        self.resident[name] = entry
        self.used = True
        return entry

    def unload(self, name: str) -> None:
        entry = self.resident.get(name)
        if entry is None:
            raise AdapterError(f"no adapter named {name!r} is loaded{self._known()}")
        if entry.requests:
            raise AdapterError(
                f"adapter {name!r} is in use by {entry.requests} unfinished request(s); "
                "unload it when they have finished"
            )
        self.executor.unload_adapter(entry.slot)
        del self.resident[name]

    def lookup(self, name: str) -> Resident:
        entry = self.resident.get(name)
        if entry is None:
            raise RequestError(f"unknown adapter {name!r}{self._known()}")
        return entry

    def _known(self) -> str:
        names = ", ".join(sorted(self.resident))
        return f"; loaded: {names}" if names else "; none is loaded"

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "name": r.name,
                "source": r.source,
                "rank": r.rank,
                "slot": r.slot,
                "bytes": r.nbytes,
                "running": r.requests,
            }
            for r in self.resident.values()
        ]
