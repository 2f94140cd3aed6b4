"""The image side of a VLM: the model's own processor, and its vision tower and projector.

The tower and projector are transformers' modules of the model's class (`LlavaModel`, ...)
with the language model left out: the text backend runs that. Their weights are streamed from
the checkpoint's safetensors one tensor at a time. Using the model's own processor and modules
keeps the placeholder expansion and the features exactly what transformers computes.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from enginehouse import EngineConfig, ModelSpec
from enginehouse.plugin_api import (
    FetchPolicy,
    InvalidModelError,
    MultiModalData,
    PreparedPrompt,
    RequestError,
    copy_checked,
    missing_weights,
    tensors,
)

from .families import FAMILIES, image_token_id
from .images import decode_image, image_hash, open_images

log = logging.getLogger(__name__)


def _load_processor(path: Path, auto_class: str = "AutoProcessor") -> Any:
    import transformers

    if not any((path / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")):
        raise InvalidModelError(
            f"{path} has no processor_config.json or preprocessor_config.json; a vision-language "
            "model needs its image processor: copy those files from the original repository"
        )
    # Without torchvision transformers falls back to its PIL processors, and says so loudly.
    with _quiet("transformers"):
        return getattr(transformers, auto_class).from_pretrained(path)


@contextlib.contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _vision_only_config(full: Any) -> Any:
    """The VLM's config with an empty language model: building the class then allocates the
    vision side only (the text backend owns the language model)."""
    config = copy.deepcopy(full)
    config.text_config.num_hidden_layers = 0
    config.text_config.vocab_size = 1
    return config


def _checkpoint_names(name: str) -> list[str]:
    """The names a module parameter may have in a checkpoint, across transformers versions."""
    # CLIP's tower is `vision_tower.vision_model.*` in some versions, `vision_tower.*` in others.
    nested, flat = "vision_tower.vision_model.", "vision_tower."
    if name.startswith(nested):
        other = flat + name[len(nested) :]
    elif name.startswith(flat):
        other = nested + name[len(flat) :]
    else:
        other = name
    return list(dict.fromkeys([name, "model." + name, other, "model." + other]))


class HFVisionEncoder:
    """`VisionEncoder` for LLaVA-style models and Gemma 3 (see `enginehouse.multimodal`): the
    model's own processor expands the placeholders; LLaVA's tower features are taken at the
    configured layer (`vision_feature_layer`, `vision_feature_select_strategy`), Gemma 3's
    are pooled and projected by its `multi_modal_projector`."""

    def __init__(self, spec: ModelSpec, config: EngineConfig) -> None:
        family = FAMILIES[spec.architecture]
        assert family.model_class is not None
        self.spec = spec
        self.family = family
        self.fetch_policy = FetchPolicy.of(config)
        # Decoding is where an image costs its memory (up to 4 bytes per pixel): a few at once.
        self._decoding = threading.BoundedSemaphore(config.max_concurrent_image_decodes)
        self.max_pixels = config.max_image_pixels_per_prompt
        token_id = image_token_id(spec.config)
        if token_id is None:
            raise InvalidModelError(
                f"config.json of {spec.model_id} names no image_token_index / image_token_id"
            )
        self.image_token_id = token_id
        self._load_processor()
        self.model: nn.Module | None = None
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    def _load_processor(self) -> None:
        self.processor = _load_processor(self.spec.path)
        self.image_token: str = self.processor.image_token
        self.image_placeholder = self.image_token

    # --- the caller's thread ----------------------------------------------------------------

    def _load(self, sources: Sequence[Any], max_tokens: int | None) -> list[Any]:
        """The decoded images, once their headers show that they fit: the prompt's pixel
        budget, and, where their token count follows from their sizes, the context."""
        opened = open_images(list(sources), self.fetch_policy, self.max_pixels)
        if max_tokens is not None:
            try:
                tokens = self._count_tokens([(image.height, image.width) for image in opened])
            except Exception:  # a processor without the formula: the context check comes later
                tokens = None
            if tokens is not None and tokens >= max_tokens:
                raise RequestError(
                    f"the prompt's {len(opened)} image(s) take {tokens} tokens, but this "
                    f"model's context holds {max_tokens}; send fewer or smaller images"
                )
        decoded = []
        for image, source in zip(opened, sources):
            with self._decoding:
                decoded.append(decode_image(image, source))
        return decoded

    def _count_tokens(self, sizes: list[tuple[int, int]]) -> int | None:
        """Image tokens of images of these (height, width) sizes, from the processor's own
        formula (the one vLLM uses); it may raise where the processor's config lacks what
        the formula needs."""
        counts = self.processor._get_num_multimodal_tokens(image_sizes=sizes)
        return sum(counts.num_image_tokens)

    def prepare(
        self,
        text: str,
        images: Sequence[Any],
        add_special_tokens: bool,
        max_tokens: int | None = None,
    ) -> PreparedPrompt:
        pictures = self._load(images, max_tokens)
        out = self.processor(
            text=[text],
            images=pictures,
            add_special_tokens=add_special_tokens,
            return_tensors="pt",
        )
        ids = out["input_ids"][0].tolist()
        inputs = {"pixel_values": out["pixel_values"]}
        if "image_sizes" in out:
            inputs["image_sizes"] = out["image_sizes"]
            inputs["pixel_values"] = self._patches(out["pixel_values"], out["image_sizes"])
        mm = MultiModalData(
            inputs=inputs,
            image_hashes=tuple(image_hash(p) for p in pictures),
            num_image_tokens=ids.count(self.image_token_id),
            whole_images=self.family.bidirectional_images,
        )
        return PreparedPrompt(ids, mm)

    def _patches(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """LLaVA-NeXT pads every image to the most tiles of its batch: keep each image's real
        tiles, as one [tiles, 3, H, W] tensor, so that prompts batch together."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.spec.config
        counts = [
            image_size_to_num_patches(
                image_size=size.tolist(),
                grid_pinpoints=cfg["image_grid_pinpoints"],
                patch_size=cfg["vision_config"]["image_size"],
            )
            for size in image_sizes
        ]
        return torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)])

    # --- the engine's thread ----------------------------------------------------------------

    def load(self, device: torch.device, dtype: torch.dtype, progress: bool = True) -> None:
        import transformers

        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # transformers before 5.2 kept it here
            from transformers.modeling_utils import no_init_weights

        # From the config the spec already read (nested dicts copied: from_dict may take them).
        config_class = transformers.CONFIG_MAPPING[self.spec.model_type]
        full = config_class.from_dict(copy.deepcopy(dict(self.spec.config)))
        cls = getattr(transformers, self.family.model_class or "")
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with no_init_weights(), torch.device(device):
                model = cls(_vision_only_config(full))
        finally:
            torch.set_default_dtype(default)
        model.language_model = None  # the text backend runs the language model
        self._load_weights(model, progress)
        self.model = model.eval()
        self.device, self.dtype = device, dtype
        self.config = full

    def _load_weights(self, model: nn.Module, progress: bool) -> None:
        params = dict(model.named_parameters())
        wanted = {alias: name for name in params for alias in _checkpoint_names(name)}
        filled: set[str] = set()
        files = [self.spec.path / f for f in self.spec.weight_files if f.endswith(".safetensors")]
        for path, key, read in tensors(files, progress, "Loading vision weights"):
            if key in wanted:  # else the language model's, or unused
                copy_checked(params[wanted[key]], read(), key, path)
                filled.add(wanted[key])
        missing = sorted(set(params) - filled)
        if missing:
            raise missing_weights("vision weights", missing)

    def _feature_args(self) -> dict[str, Any]:
        """LLaVA's choice of the tower's layer and tokens (Gemma 3 has none: its projector
        pools the last layer)."""
        names = ("vision_feature_layer", "vision_feature_select_strategy")
        return {n: getattr(self.config, n) for n in names if hasattr(self.config, n)}

    @torch.inference_mode()
    def encode(self, batch: Sequence[MultiModalData]) -> list[torch.Tensor]:
        assert self.model is not None, "load() first"
        # Every prompt's tensors concatenated along images: one pass of the tower for all.
        # All of them on the tower's device: Qwen2-VL computes its positions from image_grid_thw.
        kwargs = {
            key: torch.cat([mm.inputs[key] for mm in batch]).to(self.device)
            for key in batch[0].inputs
        }
        kwargs["pixel_values"] = kwargs["pixel_values"].to(self.dtype)
        features = self.model.get_image_features(**kwargs, **self._feature_args(), return_dict=True)
        features = getattr(features, "pooler_output", features)  # older versions: the features
        if not isinstance(features, torch.Tensor):
            features = torch.cat(list(features))
        features = features.reshape(-1, features.shape[-1])  # Gemma 3: [images, tokens, d]
        return list(torch.split(features, [mm.num_image_tokens for mm in batch]))

    def close(self) -> None:
        self.model = None


class QwenVLEncoder(HFVisionEncoder):
    """`VisionEncoder` for Qwen2-VL and Qwen2.5-VL.

    The image processor resizes each image to a grid of 14-pixel patches; each image pad token
    becomes one token per 2x2 patches, as Qwen2-VL's processor does. (That processor is not
    loaded itself: its video half needs torchvision.) The prompt also gets its multimodal
    rotary positions: text tokens count up on all three axes, an image's tokens take their
    row and column on the height and width axes, and the text after an image continues past
    the largest position used.
    """

    def _load_processor(self) -> None:
        from transformers import AutoTokenizer

        self.image_processor = _load_processor(self.spec.path, "AutoImageProcessor")
        self.tokenizer = AutoTokenizer.from_pretrained(self.spec.path)
        cfg = self.spec.config
        self.merge = int(cfg["vision_config"].get("spatial_merge_size", 2))
        token = self.tokenizer.convert_ids_to_tokens
        self.image_token = token(self.image_token_id)
        start, end = cfg.get("vision_start_token_id"), cfg.get("vision_end_token_id")
        self.image_placeholder = (
            f"{token(start)}{self.image_token}{token(end)}" if start and end else self.image_token
        )

    def _count_tokens(self, sizes: list[tuple[int, int]]) -> int | None:
        patches = self.image_processor.get_number_of_image_patches
        return sum(patches(h, w, {}) // self.merge**2 for h, w in sizes)

    def prepare(
        self,
        text: str,
        images: Sequence[Any],
        add_special_tokens: bool,
        max_tokens: int | None = None,
    ) -> PreparedPrompt:
        pictures = self._load(images, max_tokens)
        with _quiet("transformers"):
            out = self.image_processor(images=pictures, return_tensors="pt")
        grids = out["image_grid_thw"]
        pieces = text.split(self.image_token)
        counts = [int(g.prod()) // self.merge**2 for g in grids]
        expanded = pieces[0] + "".join(
            self.image_token * n + piece for n, piece in zip(counts, pieces[1:])
        )
        ids = self.tokenizer.encode(expanded, add_special_tokens=add_special_tokens)
        positions, delta = self._rope_positions(ids, grids)
        mm = MultiModalData(
            inputs={"pixel_values": out["pixel_values"], "image_grid_thw": grids},
            image_hashes=tuple(image_hash(p) for p in pictures),
            num_image_tokens=ids.count(self.image_token_id),
            rope_positions=positions,
            rope_delta=delta,
        )
        return PreparedPrompt(ids, mm)

    def _rope_positions(self, ids: list[int], grids: torch.Tensor) -> tuple[torch.Tensor, int]:
        parts, start, i, grid = [], 0, 0, iter(grids.tolist())
        while i < len(ids):
            if ids[i] == self.image_token_id:
                t, h, w = next(grid)
                h, w = h // self.merge, w // self.merge
                axes = torch.meshgrid(
                    torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"
                )
                parts.append(torch.stack([a.flatten() for a in axes]) + start)
                start += max(h, w)
                i += t * h * w
            else:
                j = i
                while j < len(ids) and ids[j] != self.image_token_id:
                    j += 1
                parts.append(torch.arange(start, start + j - i).expand(3, -1))
                start += j - i
                i = j
        positions = torch.cat(parts, dim=1)
        return positions, int(positions.max()) + 1 - len(ids)

    def _feature_args(self) -> dict[str, Any]:
        return {}
