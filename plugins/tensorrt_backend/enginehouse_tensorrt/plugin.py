"""Hooks of the tensorrt plugin. Both backends answer 'not implemented yet' until they exist."""

from __future__ import annotations

from enginehouse import BackendProbe, EngineConfig, ModelSpec, hookimpl

NOT_YET = "not implemented yet: the ONNX export and {what} runner are planned, not built"


@hookimpl
def probe_backend(spec: ModelSpec, config: EngineConfig) -> list[BackendProbe]:
    return [
        BackendProbe("tensorrt", False, 50, NOT_YET.format(what="TensorRT engine")),
        BackendProbe("onnxruntime", False, 5, NOT_YET.format(what="ONNX Runtime")),
    ]
