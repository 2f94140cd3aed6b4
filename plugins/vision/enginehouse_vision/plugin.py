"""Hooks of the vision plugin: recognise vision-language models, and build their image encoder.

`detect_architecture` says which encoder handles a VLM (or why none does) and describes the
language model inside it (`text_architecture`, `text_config`, `text_weight_prefixes`), so that
a text backend such as the native `pytorch` one can run that part and take the image
embeddings for the placeholder positions.
"""

from __future__ import annotations

from typing import Any

from enginehouse import EngineConfig, ModelSpec, hookimpl

from .families import FAMILIES, image_token_id, text_model

ENGINEHOUSE_CONTRACT = "1.0"  # the plugin contract this plugin is written for


@hookimpl
def detect_architecture(spec: ModelSpec) -> dict[str, Any] | None:
    family = FAMILIES.get(spec.architecture)
    vision_config = spec.config.get("vision_config")
    if family is None and not isinstance(vision_config, dict):
        return None
    facts: dict[str, Any] = {
        "is_vlm": True,
        "vision_family": family.name if family else spec.model_type,
        "vision_config": dict(vision_config) if isinstance(vision_config, dict) else None,
        "image_token_id": image_token_id(spec.config),
    }
    if family is None:
        known = ", ".join(sorted(FAMILIES))
        facts["vision_unsupported"] = f"no image encoder for {spec.architecture} (known: {known})"
    elif family.model_class is None:
        facts["vision_unsupported"] = family.unsupported
    else:
        facts["vision_encoder"] = family.name
    if family is not None and family.bidirectional_images:
        facts["image_attention"] = "bidirectional"  # the runner unmasks each image's tokens
    text = text_model(spec.config, family)
    if text is not None and family is not None:
        facts["text_architecture"], facts["text_config"] = text
        facts["text_weight_prefixes"] = dict(family.text_prefixes)
    return facts


@hookimpl
def create_vision_encoder(spec: ModelSpec, config: EngineConfig):
    if not spec.facts.get("vision_encoder"):
        return None
    from .encoder import HFVisionEncoder, QwenVLEncoder

    if FAMILIES[spec.architecture].mrope:
        return QwenVLEncoder(spec, config)
    return HFVisionEncoder(spec, config)
