"""Hooks of the tensorrt plugin: the `tensorrt` and `onnxruntime` backends, and the
`enginehouse tensorrt export` command. Heavy modules (torch export, onnxruntime, tensorrt) are
imported only when a runner is built or the command runs."""

from __future__ import annotations

from enginehouse import BackendProbe, EngineConfig, ModelSpec, hookimpl
from enginehouse.plugin_api import RunnerContext, build_from_table

ENGINEHOUSE_CONTRACT = "1.0"  # the plugin contract this plugin is written for


@hookimpl
def probe_backend(spec: ModelSpec, config: EngineConfig) -> list[BackendProbe]:
    from .probe import probe_backends

    return probe_backends(spec, config)


RUNNERS = {
    "onnxruntime": "enginehouse_tensorrt.ort_runner:OrtRunner",
    "tensorrt": "enginehouse_tensorrt.trt_runner:TrtRunner",
}


@hookimpl
def create_runner(backend: str, spec: ModelSpec, config: EngineConfig, context: RunnerContext):
    return build_from_table(RUNNERS, backend, spec, config, context)


@hookimpl
def register_commands(cli) -> None:
    from .cli import tensorrt

    cli.add_command(tensorrt)
