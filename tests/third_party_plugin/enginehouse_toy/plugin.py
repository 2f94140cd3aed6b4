"""The hooks enginehouse finds through the `enginehouse` entry point `toy`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from enginehouse.plugin_api import BackendProbe, hookimpl

if TYPE_CHECKING:
    from enginehouse.plugin_api import EngineConfig, ModelSpec, RunnerContext

    from .runner import ToyRunner

# The enginehouse plugin contract this plugin was written for (docs/plugins.md, "Contract
# versions and deprecations"): a core of another major version refuses to load it.
ENGINEHOUSE_CONTRACT = "1.0"
BACKEND = "toy"


@hookimpl
def probe_backend(spec: ModelSpec, config: EngineConfig) -> BackendProbe:
    supported = spec.model_type == "toy"
    reason = (
        "model_type is 'toy'"
        if supported
        else f"only runs model_type 'toy', this is {spec.model_type!r}"
    )
    return BackendProbe(name=BACKEND, supported=supported, priority=1, reason=reason)


@hookimpl
def create_runner(
    backend: str, spec: ModelSpec, config: EngineConfig, context: RunnerContext
) -> ToyRunner | None:
    if backend != BACKEND:
        return None  # not ours (the core only asks the plugin that offered the backend)
    from .runner import ToyRunner  # imported here so that probing stays cheap

    return ToyRunner(spec, config)


@hookimpl
def register_tool_parsers() -> list[type]:
    from .parsers import ToyToolParser

    return [ToyToolParser]


@hookimpl
def register_reasoning_parsers() -> list[type]:
    from .parsers import ToyReasoningParser

    return [ToyReasoningParser]
