"""Images in prompts: finding them, and the contract of the plugin that turns them into vectors.

The core never decodes an image itself (it does not depend on Pillow). It pulls the images out
of a prompt, renders the text with the model's image placeholder where each image was, and hands
text and images to the `VisionEncoder` that the `create_vision_encoder` hook built. That gives
back the prompt's token ids, with each placeholder expanded to as many image tokens as the model's
own processor makes, and a `MultiModalData` the engine later turns into embeddings for those
positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from .config import EngineConfig
from .errors import RequestError

# The image part the chat templates of VLMs expect (transformers' format).
IMAGE_PART = {"type": "image"}


@dataclass
class MultiModalData:
    """A prompt's images, preprocessed: what the encoder needs to embed them, and their hashes.

    `inputs` is whatever the encoder's processor produced (pixel values, image sizes, grids).
    `image_hashes` identify the images' contents, in order: they are part of the prefix-cache
    key of every KV block that holds image tokens, so different images never share blocks.
    """

    inputs: dict[str, Any]
    image_hashes: tuple[str, ...]
    num_image_tokens: int = 0  # placeholder positions after expansion
    # Multimodal rotary positions (Qwen2-VL's M-RoPE): [3, prompt length] positions (time,
    # height, width) for the prompt, and the shift of every later position (`p + delta`).
    rope_positions: torch.Tensor | None = None
    rope_delta: int = 0
    # The model's image tokens attend to each other both ways in the prefill (Gemma 3): the
    # scheduler then never ends a prefill chunk inside an image, so that every image's tokens
    # are computed in one step (vLLM's `disable_chunked_mm_input`).
    whole_images: bool = False


def image_runs(positions: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive image positions: one image's tokens (a model
    whose images are separated by text tokens, as Gemma 3's are by start/end of image)."""
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


@dataclass
class PreparedPrompt:
    """A prompt ready for the engine: token ids, and its images when it has any."""

    token_ids: list[int]
    mm: MultiModalData | None = None


@runtime_checkable
class VisionEncoder(Protocol):
    """What a vision plugin returns from `create_vision_encoder`.

    `image_token` is the token a prompt carries once per image before expansion, and
    `image_token_id` the id every expanded image position has. `image_placeholder` is the text
    that stands for one image where the chat template does not write it (often `image_token`
    itself; Qwen2-VL wraps it in vision start and end tokens). `prepare` runs on the caller's
    thread; `load` and `encode` on the engine's step thread.
    """

    image_token: str
    image_token_id: int
    image_placeholder: str

    def prepare(
        self,
        text: str,
        images: Sequence[Any],
        add_special_tokens: bool,
        max_tokens: int | None = None,
    ) -> PreparedPrompt:
        """Load the images, run the model's processor, expand the placeholders.

        Raise `RequestError` before decoding any image when the images break the config's
        limits (`max_image_pixels_per_prompt`), or when their tokens alone would fill
        `max_tokens` (the context) where the processor can count them from the image sizes."""

    def load(self, device: torch.device, dtype: torch.dtype, progress: bool = True) -> None:
        """Load the vision tower and projector on the language model's device and dtype."""

    def encode(self, batch: Sequence[MultiModalData]) -> list[torch.Tensor]:
        """One `[num_image_tokens, hidden_size]` tensor per prompt, in the LM's dtype."""

    def close(self) -> None:
        """Free the weights."""


@dataclass
class SplitPrompt:
    """A prompt with its images taken out: the text or messages, and the images in order."""

    prompt: Any
    images: list[Any] = field(default_factory=list)


PART_TYPES = ("text", "image", "image_url")  # "image": transformers' part; the others OpenAI's


def read_part(part: Any, allowed: tuple[str, ...] = PART_TYPES) -> tuple[str, Any]:
    """("text", the text) or ("image", the image or its URL) for one message content part;
    `RequestError` naming what is wrong with it otherwise."""
    kind = part.get("type") if isinstance(part, Mapping) else None
    if kind is None:
        raise RequestError(f"a content part must be a dict with a 'type', got {part!r:.60}")
    if kind not in allowed:
        raise RequestError(
            f"content parts of type {kind!r} are not supported; use "
            + " or ".join(repr(a) for a in allowed)
        )
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise RequestError("a text content part needs a string 'text'")
        return "text", part["text"]
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, Mapping) else url
        if not isinstance(url, str):
            raise RequestError("an image_url part needs {'image_url': {'url': '...'}}")
        return "image", url
    image = part.get("image", part.get("url"))
    if image is None:
        raise RequestError("an image part needs the image: {'type': 'image', 'image': ...}")
    return "image", image


def _split_content(content: Any, images: list[Any]) -> Any:
    """Message content with image parts replaced by `IMAGE_PART`; images appended to `images`."""
    if not isinstance(content, Sequence) or isinstance(content, str):
        return content
    parts = []
    for part in content:
        kind, value = read_part(part)
        if kind == "image":
            images.append(value)
            parts.append(dict(IMAGE_PART))
        else:
            parts.append({"type": "text", "text": value})
    return parts


def split_images(prompt: Any) -> SplitPrompt:
    """Take the images out of a `(text, image or images)` tuple or of a message list."""
    if isinstance(prompt, tuple) and len(prompt) == 2 and isinstance(prompt[0], str):
        text, imgs = prompt
        many = isinstance(imgs, (list, tuple))
        return SplitPrompt(text, list(imgs) if many else [imgs])
    if isinstance(prompt, Sequence) and not isinstance(prompt, str):
        if all(isinstance(m, Mapping) and "role" in m for m in prompt):
            images: list[Any] = []
            messages = [{**m, "content": _split_content(m.get("content"), images)} for m in prompt]
            return SplitPrompt(messages, images)
    return SplitPrompt(prompt)


def flatten_parts(messages: list[dict[str, Any]], placeholder: str) -> list[dict[str, Any]]:
    """For templates that take string content: parts joined by newlines, each image its
    placeholder."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            texts = [placeholder if p["type"] == "image" else p["text"] for p in content]
            m = {**m, "content": "\n".join(texts)}
        out.append(m)
    return out


def image_prompt(text: str, num_images: int, image_token: str, placeholder: str) -> str:
    """A raw (untemplated) prompt with its images: their placeholders first, unless the text
    already places them."""
    if num_images and image_token not in text:
        return (placeholder + "\n") * num_images + text
    return text


def check_placeholders(text: str, num_images: int, image_token: str) -> None:
    found = text.count(image_token)
    if found != num_images:
        raise RequestError(
            f"the prompt has {num_images} image(s) but {found} image placeholder(s) "
            f"{image_token!r}; give one image per placeholder"
        )


def check_image_count(num_images: int, config: EngineConfig) -> None:
    """Refuse a prompt with more images than `limit_mm_per_prompt` allows, before any loads."""
    limit = config.max_images_per_prompt
    if num_images > limit:
        raise RequestError(
            f"the prompt has {num_images} images, more than the {limit} allowed per prompt; "
            "send fewer, or raise the limit: EngineConfig(limit_mm_per_prompt={'image': N}), "
            "--limit-mm-per-prompt '{\"image\": N}'"
        )
