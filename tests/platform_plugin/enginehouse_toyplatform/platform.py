"""`toydev`: a device whose tensors live in host memory, under a name of its own.

A real platform (XPU, NPU, MPS...) answers the same questions from its own runtime; this one
answers them from the CPU, so that the tests run anywhere.
"""

from __future__ import annotations

import torch

from enginehouse.plugin_api import Platform, host_free_memory


class ToyDevPlatform(Platform):
    name = "toydev"
    collective_backend = "gloo"  # what its ranks use at tp > 1 (a real one: "xccl", "hccl")
    device_per_rank = False  # its ranks share the host, as CPU ranks do
    graph_capture = False
    description = "a CPU-backed toy device (enginehouse-toyplatform)"

    def device_count(self) -> int:
        return 1

    def torch_device(self, index: int | None = None) -> torch.device:
        return torch.device("cpu")  # its tensors are CPU tensors

    def free_memory(self, device: torch.device) -> int:
        return host_free_memory()

    def preferred_dtype(self, checkpoint_dtype: str) -> str:
        return "float32"
