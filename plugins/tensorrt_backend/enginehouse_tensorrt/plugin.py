"""Hooks of the tensorrt plugin: the `tensorrt` and `onnxruntime` backends, and the
`enginehouse tensorrt export` command. Heavy modules (torch export, onnxruntime, tensorrt) are
imported only when a runner is built or the command runs."""

from __future__ import annotations

from enginehouse import BackendProbe, EngineConfig, ModelSpec, hookimpl


@hookimpl
def probe_backend(spec: ModelSpec, config: EngineConfig) -> list[BackendProbe]:
    from .probe import probe_backends

    return probe_backends(spec, config)


@hookimpl
def create_runner(backend: str, spec: ModelSpec, config: EngineConfig):
    if backend == "onnxruntime":
        from .ort_runner import OrtRunner

        return OrtRunner(spec, config)
    if backend == "tensorrt":
        from .trt_runner import TrtRunner

        return TrtRunner(spec, config)
    return None


@hookimpl
def register_commands(cli) -> None:
    from .cli import tensorrt

    cli.add_command(tensorrt)
