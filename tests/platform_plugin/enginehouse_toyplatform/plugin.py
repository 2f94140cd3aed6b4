"""The hooks enginehouse finds through the `enginehouse` entry point `toyplatform`."""

from __future__ import annotations

from typing import Any

from enginehouse.plugin_api import LogitsProcessor, ModelFamily, ModelSpec, Platform, hookimpl

# The enginehouse plugin contract this plugin was written for: a core of another major
# version refuses to load it, naming both versions.
ENGINEHOUSE_CONTRACT = "1.0"


@hookimpl
def register_platforms() -> list[Platform]:
    from .platform import ToyDevPlatform

    return [ToyDevPlatform()]


@hookimpl
def register_model_families() -> list[ModelFamily]:
    from .family import TOY_LLAMA

    return [TOY_LLAMA]


@hookimpl
def detect_architecture(spec: ModelSpec) -> dict[str, Any] | None:
    """Our config names the context `max_seq_len`, which the core does not read: say it."""
    if spec.architecture != "ToyLlamaForCausalLM":
        return None
    return {"context_length": spec.config.get("max_seq_len")}


@hookimpl
def register_logits_processors() -> list[type[LogitsProcessor]]:
    from .processor import ToyBanProcessor

    return [ToyBanProcessor]
