"""Platforms: the kinds of device a model runs on, each declared through the
`register_platforms` hook. `cpu` and `cuda` are the core's own (its default plugin registers
them); a plugin brings another (`EngineConfig(device="xpu")`) the same way.

A platform answers what the core must know of a device and nothing else: its name, where its
tensors live (`torch_device`), how many devices it sees and how much memory is free on one,
which torch.distributed backend its ranks use, the dtype `dtype="auto"` means on it, and
whether it captures graphs of decode steps. The device check of `EngineConfig`, the KV
planning and the executors' process groups ask the platform, never torch.cuda.
"""

from __future__ import annotations

import logging
import os
import re
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .plugins import PluginHost

log = logging.getLogger(__name__)
DEVICE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::(\d+))?")


class Platform:
    """A kind of device. Subclass it, set the attributes and override what differs; return an
    instance from the `register_platforms` hook."""

    name: str = ""  # what EngineConfig(device=...) names: "xpu", or "xpu:N" for device N
    collective_backend: str = "gloo"  # torch.distributed's backend between its ranks
    device_per_rank: bool = False  # True: each tp rank takes a device of its own (GPUs)
    graph_capture: bool = False  # captures graphs of decode steps (CUDA graphs and the like)
    description: str = ""

    def is_available(self) -> bool:
        """Whether this machine has the device at all (its driver, its torch build)."""
        return True

    def device_count(self) -> int:
        """How many devices of this kind this process sees."""
        return 1

    def torch_device(self, index: int | None = None) -> torch.device:
        """The torch device its tensors live on: device `index`, or the default one."""
        return torch.device(self.name if index is None else f"{self.name}:{index}")

    def free_memory(self, device: torch.device) -> int:
        """Bytes free now on `device` (one of `torch_device`'s), for the KV cache budget."""
        raise NotImplementedError(f"platform {self.name!r} does not say its free memory")

    def preferred_dtype(self, checkpoint_dtype: str) -> str:
        """What dtype='auto' runs in, given the checkpoint's dtype ("float32", "bfloat16"...)."""
        return checkpoint_dtype if checkpoint_dtype != "float32" else "bfloat16"

    def set_device(self, index: int) -> None:
        """Make device `index` this process's current one (a rank, before its process group)."""

    def describe(self) -> dict[str, Any]:
        """What `enginehouse plugins` and `explain` show of it."""
        return {
            "name": self.name,
            "available": self.is_available(),
            "devices": self.device_count() if self.is_available() else 0,
            "collectives": self.collective_backend,
            "device_per_rank": self.device_per_rank,
            "graph_capture": self.graph_capture,
            "description": self.description,
        }


def host_free_memory() -> int:
    """MemAvailable from the kernel (what the CPU and CPU-backed platforms can use)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class CpuPlatform(Platform):
    name = "cpu"
    collective_backend = "gloo"
    description = "the host's cores; ranks of one machine share its memory and split its cores"

    def torch_device(self, index: int | None = None) -> torch.device:
        return torch.device("cpu")

    def free_memory(self, device: torch.device) -> int:
        return host_free_memory()

    def preferred_dtype(self, checkpoint_dtype: str) -> str:
        # Half-precision matmuls are far slower on CPUs without bf16/fp16 units (10-400x here).
        return "float32"


class CudaPlatform(Platform):
    name = "cuda"
    collective_backend = "nccl"
    device_per_rank = True
    graph_capture = True
    description = "NVIDIA GPUs through torch.cuda; one GPU per rank"

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def device_count(self) -> int:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0

    def free_memory(self, device: torch.device) -> int:
        return torch.cuda.mem_get_info(device)[0]

    def set_device(self, index: int) -> None:
        torch.cuda.set_device(index)


CPU, CUDA = CpuPlatform(), CudaPlatform()
BUILTIN: dict[str, Platform] = {"cpu": CPU, "cuda": CUDA}


def registered(host: PluginHost | None = None) -> dict[str, tuple[str, Platform]]:
    """Every platform the plugins declare: name -> (plugin, platform), the built-ins first.

    A plugin cannot take a name already taken (a built-in's, or an earlier plugin's): the
    first keeps it and the clash is logged."""
    from .plugins import first_by_name, get_plugins

    if host is None:
        host = get_plugins()
    cached = getattr(host, "_platforms", None)
    if cached is not None:
        return cached
    # The core's own platforms first, so that no plugin can take their names.
    answers = sorted(
        host.call_each("register_platforms"), key=lambda r: r[0] != "enginehouse.default"
    )
    found = first_by_name(answers, "platform", lambda platform: platform.name)
    host._platforms = found  # type: ignore[attr-defined]
    return found


def split_device(device: str) -> tuple[str, int | None]:
    """'xpu:1' -> ('xpu', 1); 'cpu' -> ('cpu', None); ValueError when it is no device name."""
    m = DEVICE.fullmatch(device)
    if m is None:
        raise ValueError(f"{device!r} is not a device name; write it as 'name' or 'name:N'")
    return m[1], int(m[2]) if m[2] is not None else None


def platform_of(device: str, host: PluginHost | None = None) -> tuple[Platform, int | None]:
    """The platform an `EngineConfig.device` names, and the device index it gives.

    'auto' is CUDA where torch sees a GPU, else the CPU: it never picks a plugin's platform,
    which is asked for by name. `cpu` and `cuda` need no plugins loaded."""
    if device == "auto":
        return (CUDA if CUDA.is_available() else CPU), None
    name, index = split_device(device)
    if name in BUILTIN:
        return BUILTIN[name], index
    platforms = registered(host)
    if name not in platforms:
        raise ValueError(unknown_device(device, platforms))
    return platforms[name][1], index


def unknown_device(device: str, platforms: dict[str, Any]) -> str:
    names = ", ".join(["auto", *sorted(set(platforms) | set(BUILTIN))])
    return (
        f"unknown device {device!r}: no platform of that name (have: {names}); a new kind of "
        "device comes from a plugin that registers its platform (docs/plugins.md, 'Bring "
        "your own device'), asked for as 'name' or 'name:N'"
    )
