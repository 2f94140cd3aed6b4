"""Hooks of the vision plugin: recognise vision-language models from their config.

Running them (the vision tower, the projector, image inputs) is not implemented yet, so this
plugin only adds facts; `enginehouse explain` shows them and the backends' reasons.
"""

from __future__ import annotations

from typing import Any

from enginehouse import ModelSpec, hookimpl

# Architectures known to be vision-language models even where the config nests differently.
KNOWN_VLMS = {
    "LlavaForConditionalGeneration": "llava",
    "LlavaNextForConditionalGeneration": "llava_next",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
}


@hookimpl
def detect_architecture(spec: ModelSpec) -> dict[str, Any] | None:
    family = KNOWN_VLMS.get(spec.architecture)
    vision_config = spec.config.get("vision_config")
    if family is None and not isinstance(vision_config, dict):
        return None
    return {
        "is_vlm": True,
        "vision_family": family or spec.model_type,
        "vision_config": dict(vision_config) if isinstance(vision_config, dict) else None,
        "vision_encoder": None,  # none implemented yet
    }
