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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from enginehouse import EngineConfig, ModelSpec
from enginehouse.errors import InvalidModelError
from enginehouse.multimodal import MultiModalData, PreparedPrompt

from .families import FAMILIES, TEXT_WEIGHT_PREFIXES, image_token_id
from .images import image_hash, load_image

log = logging.getLogger(__name__)


def _load_processor(path: Path) -> Any:
    from transformers import AutoProcessor

    if not any((path / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")):
        raise InvalidModelError(
            f"{path} has no processor_config.json or preprocessor_config.json; a vision-language "
            "model needs its image processor: copy those files from the original repository"
        )
    # Without torchvision transformers falls back to its PIL processors, and says so loudly.
    logger = logging.getLogger("transformers.image_processing_utils_fast")
    with _quiet("transformers"), _quiet(logger.name):
        return AutoProcessor.from_pretrained(path)


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
    names = [name, "model." + name]
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        inner = "vision_tower.vision_model." + name[len("vision_tower.") :]
        names += [inner, "model." + inner]
    return names


class HFVisionEncoder:
    """`VisionEncoder` for LLaVA-style models (see `enginehouse.multimodal`)."""

    def __init__(self, spec: ModelSpec, config: EngineConfig) -> None:
        family = FAMILIES[spec.architecture]
        assert family.model_class is not None
        self.spec = spec
        self.family = family
        self.allowed_domains = list(config.allowed_media_domains)
        token_id = image_token_id(spec.config)
        if token_id is None:
            raise InvalidModelError(
                f"config.json of {spec.model_id} names no image_token_index / image_token_id"
            )
        self.image_token_id = token_id
        self.processor = _load_processor(spec.path)
        self.image_token: str = self.processor.image_token
        self.model: nn.Module | None = None
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    # --- the caller's thread ----------------------------------------------------------------

    def prepare(self, text: str, images: Sequence[Any], add_special_tokens: bool) -> PreparedPrompt:
        pictures = [load_image(source, self.allowed_domains) for source in images]
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
        from transformers.initialization import no_init_weights

        full = transformers.AutoConfig.from_pretrained(self.spec.path)
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
        from safetensors import safe_open
        from tqdm.auto import tqdm

        params = dict(model.named_parameters())
        wanted = {alias: name for name in params for alias in _checkpoint_names(name)}
        filled: set[str] = set()
        files = [self.spec.path / f for f in self.spec.weight_files if f.endswith(".safetensors")]
        for path in tqdm(files, desc="Loading vision weights", disable=not progress):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key.startswith(tuple(TEXT_WEIGHT_PREFIXES)) or key not in wanted:
                        continue
                    name = wanted[key]
                    tensor = f.get_tensor(key)
                    if tensor.shape != params[name].shape:
                        raise InvalidModelError(
                            f"{key} in {path.name} has shape {tuple(tensor.shape)}, the model "
                            f"expects {tuple(params[name].shape)} from config.json"
                        )
                    with torch.no_grad():
                        params[name].copy_(tensor)
                    filled.add(name)
        missing = sorted(set(params) - filled)
        if missing:
            raise InvalidModelError(
                f"the checkpoint lacks vision weights: {missing[0]}"
                f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; is it complete?"
            )

    @torch.inference_mode()
    def encode(self, batch: Sequence[MultiModalData]) -> list[torch.Tensor]:
        assert self.model is not None, "load() first"
        cfg = self.config
        kwargs: dict[str, Any] = {
            "pixel_values": torch.cat([mm.inputs["pixel_values"] for mm in batch]).to(
                self.device, self.dtype
            ),
            "vision_feature_layer": cfg.vision_feature_layer,
            "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        }
        if "image_sizes" in batch[0].inputs:
            kwargs["image_sizes"] = torch.cat([mm.inputs["image_sizes"] for mm in batch])
        features = self.model.get_image_features(**kwargs, return_dict=True).pooler_output
        if not isinstance(features, torch.Tensor):
            features = torch.cat(list(features))
        return list(torch.split(features, [mm.num_image_tokens for mm in batch]))

    def close(self) -> None:
        self.model = None
