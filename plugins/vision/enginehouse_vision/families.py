"""Which vision-language models this plugin knows, and what their config.json says about the
language model inside them (so that a text backend can run that part natively)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Where each checkpoint layout keeps the language model (checkpoint prefix -> the text model's;
# None: not the language model's). llava-hf checkpoints, and transformers' save_pretrained, write
# `language_model.model.*`; transformers 5's in-memory layout is `model.language_model.*`.
LLAVA_TEXT_PREFIXES: dict[str, str | None] = {
    "language_model.model.": "model.",
    "language_model.lm_head.": "lm_head.",
    "model.language_model.": "model.",
    "lm_head.": "lm_head.",
}
# Qwen2-VL checkpoints keep the language model at the top (`model.layers.*`) next to `visual.*`.
QWEN_VL_TEXT_PREFIXES: dict[str, str | None] = {
    "model.language_model.": "model.",
    "model.visual.": None,
    "model.": "model.",
    "lm_head.": "lm_head.",
}


@dataclass(frozen=True)
class VisionFamily:
    name: str
    # The transformers class that holds the vision tower and projector (its language model is
    # dropped), or None when the family is recognised but not runnable, with `unsupported`.
    model_class: str | None
    text_prefixes: Mapping[str, str | None] = field(default_factory=lambda: LLAVA_TEXT_PREFIXES)
    # The language model's architecture when its text_config names none that runs natively.
    text_architecture: str | None = None
    mrope: bool = False  # multimodal rotary positions (M-RoPE)
    # An image's tokens attend to each other both ways in the prefill, not causally (Gemma 3).
    bidirectional_images: bool = False
    unsupported: str = ""


QWEN_VL = dict(
    text_prefixes=QWEN_VL_TEXT_PREFIXES, text_architecture="Qwen2ForCausalLM", mrope=True
)
QWEN3_5_VL = dict(text_prefixes=QWEN_VL_TEXT_PREFIXES, mrope=True)
FAMILIES = {
    "LlavaForConditionalGeneration": VisionFamily("llava", "LlavaModel"),
    "LlavaNextForConditionalGeneration": VisionFamily("llava_next", "LlavaNextModel"),
    "Qwen2VLForConditionalGeneration": VisionFamily("qwen2_vl", "Qwen2VLModel", **QWEN_VL),
    "Qwen2_5_VLForConditionalGeneration": VisionFamily("qwen2_5_vl", "Qwen2_5_VLModel", **QWEN_VL),
    # Qwen3-VL-style tower; the language model is the hybrid Qwen3.5 text model
    # (Qwen3_5ForCausalLM / Qwen3_5MoeForCausalLM from its text_config), interleaved M-RoPE.
    "Qwen3_5ForConditionalGeneration": VisionFamily("qwen3_5", "Qwen3_5Model", **QWEN3_5_VL),
    "Qwen3_5MoeForConditionalGeneration": VisionFamily(
        "qwen3_5_moe", "Qwen3_5MoeModel", **QWEN3_5_VL
    ),
    # SigLIP tower, average-pooled to mm_tokens_per_image and projected; the language model is
    # Gemma 3's text model (`gemma3_text`), laid out as LLaVA's.
    "Gemma3ForConditionalGeneration": VisionFamily(
        "gemma3", "Gemma3Model", bidirectional_images=True
    ),
}


def image_token_id(config: Mapping[str, Any]) -> int | None:
    value = config.get("image_token_id", config.get("image_token_index"))
    return int(value) if value is not None else None


def text_model(
    config: Mapping[str, Any], family: VisionFamily | None
) -> tuple[str, dict[str, Any]] | None:
    """The language model's architecture and its complete config (transformers' defaults
    filled in: hub configs often state only what differs from them)."""
    text = config.get("text_config")
    if not isinstance(text, Mapping) or "model_type" not in text:
        return None
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = text["model_type"]
    if model_type not in CONFIG_MAPPING:
        return None
    full = CONFIG_MAPPING[model_type](**text).to_dict()
    archs = text.get("architectures") or [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)]
    if family is not None and family.text_architecture:
        archs = [family.text_architecture]
    if archs[0] is None:
        return None
    if "tie_word_embeddings" in config:  # the VLM's own setting is the one its weights follow
        full["tie_word_embeddings"] = config["tie_word_embeddings"]
    return archs[0], full
