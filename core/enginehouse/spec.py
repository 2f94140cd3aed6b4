"""Read a model folder once into a frozen `ModelSpec`; nothing downstream re-parses its files."""

from __future__ import annotations

import copyreg
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypedDict

from .errors import InvalidModelError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
# Keys different families use for their context length, most specific first.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
EMPTY: Mapping[str, Any] = MappingProxyType({})


def _frozen(d: dict[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


# A spec travels to the ranks of a sharded model (enginehouse.executor) pickled; read-only
# mappings pickle as what they wrap.
copyreg.pickle(MappingProxyType, lambda m: (_frozen, (dict(m),)))


class ModelFacts(TypedDict, total=False):
    """The facts plugins exchange through `detect_architecture` (`ModelSpec.facts`).

    Every key is optional; plugins may add keys of their own. The core's default plugin answers
    the first six (and `quantization`) from config.json; any plugin may refine them, and the
    core then uses the refined value (`ModelSpec.with_facts`). The vision plugin answers the
    rest for VLMs.
    """

    architecture: str  # the class to run (config.json's first `architectures` entry)
    family: str | None  # config.json's model_type
    is_vlm: bool  # a vision-language model
    context_length: int | None  # the model's context; the default session length
    dtype: str  # the checkpoint's dtype ("float32", "bfloat16", ...)
    trust_remote_code_needed: bool  # config.json has an auto_map (code from the repo)
    native_impl: str  # deprecated (contract 1.0, goes in 1.1): use register_model_families
    vision_family: str  # which VLM family (llava, qwen2_vl, ...)
    vision_config: dict[str, Any] | None  # the vision tower's config
    vision_encoder: str  # the encoder that handles the images
    vision_unsupported: str  # why no encoder handles them
    image_token_id: int | None  # the placeholder token an image expands into
    text_architecture: str  # the language model inside a VLM: its class,
    text_config: dict[str, Any]  # its config (transformers' defaults filled in),
    text_weight_prefixes: dict[str, str | None]  # checkpoint prefix -> text-model prefix
    quantization: str | None  # a quantized checkpoint's scheme in words ("gptq 4-bit, group 128")


FACT_FIELDS = ("context_length", "dtype")  # facts that refine a ModelSpec field of that name


@dataclass(frozen=True)
class ModelSpec:
    """Everything the files of a model folder say, read once.

    `facts` is empty when read and filled by the `detect_architecture` hooks
    (see `enginehouse.detect`); use `spec.with_facts(...)` to get the updated copy.
    """

    model_id: str
    path: Path
    config: Mapping[str, Any]
    generation_config: Mapping[str, Any]
    architectures: tuple[str, ...]
    model_type: str
    tokenizer_files: tuple[str, ...]
    weight_files: tuple[str, ...]
    weight_bytes: int
    dtype: str
    context_length: int | None
    revision: str | None = None
    facts: Mapping[str, Any] = field(default_factory=lambda: EMPTY)

    @property
    def architecture(self) -> str:
        """The class to run: config.json's, unless a plugin refined it."""
        return self.facts.get("architecture") or self.architectures[0]

    @property
    def is_vlm(self) -> bool:
        return bool(self.facts.get("is_vlm", False))

    def with_facts(self, facts: Mapping[str, Any]) -> ModelSpec:
        """A copy with these facts; `context_length` and `dtype` take the facts' values."""
        refined = {k: facts[k] for k in FACT_FIELDS if facts.get(k) is not None}
        return replace(self, facts=_frozen(dict(facts)), **refined)


@dataclass(frozen=True)
class BackendProbe:
    """A backend's answer to "can you run this model?" (see the `probe_backend` hook)."""

    name: str
    supported: bool
    priority: int = 0
    reason: str = ""
    plugin: str = ""  # filled in by the core: which plugin answered
    # The backend shards the model over `config.tp` ranks (see RunnerContext). At tp > 1 the
    # core turns a supported verdict without it into "no tensor parallelism".
    tensor_parallel: bool = False
    # Its runner verifies several tokens of a sequence in one step (declares
    # RunnerCapabilities(verifies_tokens=True)): with `config.speculative_config` the core
    # turns a supported verdict without it into "no speculative decoding".
    verifies_tokens: bool = False
    # Its runner drafts tokens from the target's hidden states (declares
    # RunnerCapabilities(drafts_tokens=True)) for this model: speculative_config's draft-head
    # methods ('eagle', 'eagle3', 'mtp') need it; `draft_reason` says why not where it cannot.
    drafts_tokens: bool = False
    draft_reason: str = ""
    # The backend's runner takes LoRA adapters (it declares RunnerCapabilities(lora=True)):
    # what `explain` shows, and what `pipeline(adapters=...)` checks before loading.
    lora: bool = False


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidModelError(f"{path} is not valid JSON ({e}); fix or re-download it") from e
    if not isinstance(data, dict):
        raise InvalidModelError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _weight_files(folder: Path) -> tuple[str, ...]:
    # A sharded checkpoint's index names its shards: other files beside them (Mistral repos
    # also ship consolidated.safetensors) are copies of the same weights, not more weights.
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            shards = sorted(set(_read_json(folder / index).get("weight_map", {}).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise InvalidModelError(
                    f"{folder / index} names {len(missing)} weight file(s) that are not in the "
                    f"folder (first: {missing[0]}); download the missing shards again"
                )
            return tuple(shards)
    # Prefer safetensors; fall back to PyTorch pickles only when no safetensors exist.
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth"):
        names = sorted(p.name for p in folder.glob(pattern) if not p.name.startswith("training"))
        if names:
            return tuple(names)
    return ()


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    # Vision-language configs keep the language model's settings in a nested text_config.
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def _context_length(config: Mapping[str, Any]) -> int | None:
    for source in (config, _text_config(config)):
        for key in CONTEXT_KEYS:
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def read_model_spec(
    path: str | Path, model_id: str | None = None, revision: str | None = None
) -> ModelSpec:
    """Read config.json, generation_config.json, tokenizer and weight file names once."""
    folder = Path(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InvalidModelError(
            f"{folder} has no config.json, so it is not a Hugging Face model folder; "
            "point enginehouse at the folder that holds config.json and the weights"
        )
    config = _read_json(config_path)
    architectures = config.get("architectures")
    if not architectures or not isinstance(architectures, list):
        raise InvalidModelError(
            f"{config_path} has no 'architectures' list, so enginehouse cannot tell which "
            'model class to run; add one, e.g. "architectures": ["LlamaForCausalLM"]'
        )
    gen_path = folder / "generation_config.json"
    generation_config = _read_json(gen_path) if gen_path.is_file() else {}
    weights = _weight_files(folder)
    text = _text_config(config)
    # transformers 5 writes "dtype", older versions "torch_dtype"; a VLM keeps it in text_config.
    dtype = next(
        (c[k] for c in (config, text) for k in ("dtype", "torch_dtype") if c.get(k)), "float32"
    )
    return ModelSpec(
        model_id=model_id or str(folder),
        path=folder,
        config=_frozen(config),
        generation_config=_frozen(generation_config),
        architectures=tuple(str(a) for a in architectures),
        model_type=str(config.get("model_type", "")),
        tokenizer_files=tuple(n for n in TOKENIZER_FILES if (folder / n).is_file()),
        weight_files=weights,
        weight_bytes=sum((folder / n).stat().st_size for n in weights),
        dtype=str(dtype),
        context_length=_context_length(config),
        revision=revision,
    )
