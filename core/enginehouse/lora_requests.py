"""The pipeline's side of LoRA adapters: the adapters it starts with, and which adapter each
prompt of a call runs with (`pipe(prompts, adapter=...)`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from .backends import BackendDecision
from .config import EngineConfig, GenerationConfig
from .errors import BackendError, RequestError

Adapters = Mapping[str, str | os.PathLike[str]] | None
AdapterChoice = str | Sequence[str | None] | None


def with_adapters(config: EngineConfig, adapters: Adapters) -> EngineConfig:
    """`config` with `adapters` (name -> folder or hub id) among those loaded at start."""
    if not adapters:
        return config
    modules = {**config.lora_modules, **{str(k): os.fspath(v) for k, v in adapters.items()}}
    return config.model_copy(update={"lora_modules": modules})


def check_backend(decision: BackendDecision, config: EngineConfig) -> None:
    """A clear error when adapters are asked of a backend that does not take them."""
    if config.lora_modules and not decision.chosen_verdict.lora:
        raise BackendError(
            f"backend {decision.chosen!r} does not take LoRA adapters (`enginehouse explain "
            "MODEL` says which backends do); use backend='pytorch', or merge the adapter into "
            "the model (PEFT's merge_and_unload) and serve the merged model"
        )


def choose(configs: list[GenerationConfig], adapter: AdapterChoice) -> list[GenerationConfig]:
    """Each prompt's config with its adapter: one name for all, or a list, one per prompt."""
    if adapter is None:
        return configs
    if isinstance(adapter, str):
        names: list[Any] = [adapter] * len(configs)
    else:
        names = list(adapter)
        if len(names) != len(configs):
            raise RequestError(f"got {len(names)} adapters for {len(configs)} prompts")
    return [
        c if name is None else c.model_copy(update={"adapter": str(name)})
        for c, name in zip(configs, names)
    ]
