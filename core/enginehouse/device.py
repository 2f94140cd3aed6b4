"""Where and in which precision a backend runs, from `EngineConfig` and the checkpoint."""

from __future__ import annotations

import os

import torch

from .config import EngineConfig
from .spec import ModelSpec

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(config: EngineConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but torch sees no CUDA device")
    return device


def resolve_dtype(config: EngineConfig, spec: ModelSpec, device: torch.device) -> torch.dtype:
    """'auto': float32 on the CPU (half-precision matmuls are far slower on CPUs without
    bf16/fp16 units, measured 10-400x here); on a GPU the checkpoint's half dtype, else bf16."""
    if config.dtype != "auto":
        return DTYPES[config.dtype]
    if device.type == "cpu":
        return torch.float32
    return DTYPES.get(spec.dtype, torch.bfloat16) if spec.dtype != "float32" else torch.bfloat16


def use_all_cores() -> int:
    """Give torch every core this process may run on (containers often allow fewer)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, cores or 1))
    return torch.get_num_threads()


def available_memory(device: torch.device) -> int:
    """Bytes free now: CUDA's own count on a GPU, MemAvailable from the kernel on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def missing_gpus(config: EngineConfig) -> str | None:
    """Why this machine cannot give each of the `dp` x `tp` ranks a GPU of its own, or None
    when it can (or runs on the CPU, or on a Ray cluster that places the ranks)."""
    need = config.tp * config.dp
    if config.executor == "ray" or need == 1:
        return None
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    on_gpu = config.device.startswith("cuda") or (config.device == "auto" and have > 0)
    if not on_gpu or have >= need:
        return None
    what = f"tp={config.tp}" if config.dp == 1 else f"dp={config.dp} x tp={config.tp}"
    return (
        f"{what} needs {need} GPUs, one per rank, and this machine has {have}; lower "
        "tp or dp, or use distributed_executor_backend='ray' across machines"
    )
