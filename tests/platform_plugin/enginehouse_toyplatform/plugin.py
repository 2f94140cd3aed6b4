"""The hooks enginehouse finds through the `enginehouse` entry point `toyplatform`."""

from __future__ import annotations

from enginehouse.plugin_api import LogitsProcessor, ModelFamily, Platform, hookimpl

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
def register_logits_processors() -> list[type[LogitsProcessor]]:
    from .processor import ToyBanProcessor

    return [ToyBanProcessor]
