"""The core's own plugin: the facts config.json states plainly."""

from __future__ import annotations

from typing import Any

from .hookspecs import hookimpl
from .spec import ModelSpec


@hookimpl(trylast=True)
def detect_architecture(spec: ModelSpec) -> dict[str, Any]:
    vision_config = spec.config.get("vision_config")
    return {
        "architecture": spec.architecture,
        "family": spec.model_type or None,
        "is_vlm": isinstance(vision_config, dict),
        "context_length": spec.context_length,
        "dtype": spec.dtype,
        "trust_remote_code_needed": "auto_map" in spec.config,
    }
