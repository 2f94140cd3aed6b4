"""Where and in which precision a backend runs, from `EngineConfig` and the checkpoint."""

from __future__ import annotations

import os

import torch

from .config import EngineConfig
from .platforms import CPU, CUDA, platform_of
from .spec import ModelSpec

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(config: EngineConfig) -> torch.device:
    """The torch device `config.device` names, through its platform (platforms.py)."""
    platform, index = platform_of(config.device)
    if not platform.is_available():
        raise RuntimeError(
            f"device={config.device!r} was asked for but this machine has no "
            f"{platform.name} device (torch sees none)"
        )
    return platform.torch_device(index)


def resolve_dtype(config: EngineConfig, spec: ModelSpec, device: torch.device) -> torch.dtype:
    """'auto': what the platform prefers for the checkpoint's dtype (float32 on the CPU, where
    half-precision matmuls without bf16/fp16 units are 10-400x slower; on a GPU the
    checkpoint's half dtype, else bf16). `device` is kept for callers; the platform is
    `config.device`'s."""
    if config.dtype != "auto":
        return DTYPES[config.dtype]
    platform, _ = platform_of(config.device)
    return DTYPES.get(platform.preferred_dtype(spec.dtype), torch.float32)


def use_all_cores() -> int:
    """Give torch every core this process may run on (containers often allow fewer)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, cores or 1))
    return torch.get_num_threads()


def available_memory(device: torch.device) -> int:
    """Bytes free now on a torch device: CUDA's own count on a GPU, MemAvailable from the
    kernel on the CPU (the built-in platforms'; `platform_memory` asks any platform)."""
    return (CUDA if device.type == "cuda" else CPU).free_memory(device)


def platform_memory(config: EngineConfig, device: torch.device) -> int:
    """Bytes free now on `device`, as the platform `config.device` names counts them."""
    return platform_of(config.device)[0].free_memory(device)


def missing_gpus(config: EngineConfig) -> str | None:
    """Why this machine cannot give each of the `dp` x `tp` ranks a GPU of its own, or None
    when it can (or runs on the CPU, or on a Ray cluster that places the ranks)."""
    need = config.tp * config.dp
    if config.executor == "ray" or need == 1:
        return None
    platform, _ = platform_of(config.device)
    if not platform.device_per_rank:
        return None  # ranks share the host (the CPU, a CPU-backed platform)
    have = platform.device_count() if platform.is_available() else 0
    if have >= need:
        return None
    what = f"tp={config.tp}" if config.dp == 1 else f"dp={config.dp} x tp={config.tp}"
    kind = "GPUs" if platform.name == "cuda" else f"{platform.name} devices"
    return (
        f"{what} needs {need} {kind}, one per rank, and this machine has {have}; lower "
        "tp or dp, or use distributed_executor_backend='ray' across machines"
    )
