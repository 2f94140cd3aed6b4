"""LoRA adapters in PEFT's format: read, check against the base model, and hand to a runner.

A PEFT LoRA adapter is a folder with `adapter_config.json` (rank `r`, `lora_alpha`,
`use_rslora`, `target_modules`...) and `adapter_model.safetensors` holding, for each adapted
projection, `...layers.N.self_attn.q_proj.lora_A.weight` ([r, in]) and `....lora_B.weight`
([out, r]). The adapted projection computes W x + scale * B A x, with scale = alpha / r
(rsLoRA: alpha / sqrt(r)).

Everything a backend needs is checked here, once, before any runner sees the adapter: a base
model that does not match (hidden size, layer count, projection sizes), a rank above
`max_lora_rank`, a target module other than the attention and MLP projections, DoRA,
embedding adapters, extra trained modules. Each error names the file and the reason.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import EnginehouseError, ModelNotFoundError
from .resolve import resolve_model

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# The projections an adapter may target: the attention's and the gated MLP's, separately or
# as the fused tensors some checkpoints store (Phi-3's qkv_proj and gate_up_proj).
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
MLP = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
TARGETS = ATTENTION + MLP
_KEY = re.compile(
    r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)


class AdapterError(EnginehouseError, ValueError):
    """An adapter that cannot be served: its files, or a mismatch with the base model."""


@dataclass
class LoraModule:
    """One adapted projection of one layer: `a` is [r, in], `b` is [out, r] (PEFT's)."""

    layer: int
    name: str  # the checkpoint's projection name: q_proj ... down_proj, qkv_proj, gate_up_proj
    a: torch.Tensor
    b: torch.Tensor


@dataclass
class LoraAdapter:
    """A checked adapter, ready for a runner's `load_adapter` (picklable: it travels to the
    ranks of an executor as it is)."""

    name: str
    source: str  # the path or hub id it came from
    rank: int
    scale: float  # alpha / r, or alpha / sqrt(r) with rsLoRA
    modules: list[LoraModule] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules)


@dataclass(frozen=True)
class BaseShape:
    """The sizes of the base model that an adapter's tensors must match."""

    num_layers: int
    hidden: int
    q: int  # query heads x head_dim
    kv: int  # KV heads x head_dim
    intermediate: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> BaseShape:
        """From a model's config.json (a VLM's text_config where it has one)."""
        c = config.get("text_config") or config
        hidden, heads = c["hidden_size"], c["num_attention_heads"]
        head_dim = c.get("head_dim") or hidden // heads
        kv_heads = c.get("num_key_value_heads") or heads
        return cls(
            c["num_hidden_layers"],
            hidden,
            heads * head_dim,
            kv_heads * head_dim,
            c.get("intermediate_size") or 0,
        )

    def sizes(self, module: str) -> tuple[int, int]:
        """(in, out) features of a projection."""
        h, q, kv, i = self.hidden, self.q, self.kv, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "qkv_proj": (h, q + 2 * kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "gate_up_proj": (h, 2 * i),
            "down_proj": (i, h),
        }[module]


def resolve_adapter(source: str | os.PathLike[str], revision: str | None = None) -> Path:
    """The adapter's folder: a local folder as it is, a hub id through the models' resolver."""
    try:
        path = resolve_model(source, revision).path
    except ModelNotFoundError as e:
        raise AdapterError(f"adapter {os.fspath(source)!r} not found: {e}") from None
    return path


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(
            f"{folder} has no {CONFIG_FILE}: not a PEFT adapter folder (save one with "
            "PeftModel.save_pretrained)"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: cannot read it: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return config


def check_config(config: Mapping[str, Any], path: Path, max_rank: int) -> tuple[int, float]:
    """The adapter's (rank, scale), or `AdapterError` for what we cannot serve."""
    kind = config.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise AdapterError(f"{path}: peft_type {kind!r} is not supported; only LoRA adapters are")
    if config.get("use_dora"):
        raise AdapterError(f"{path}: DoRA adapters (use_dora) are not supported; use plain LoRA")
    if config.get("lora_bias"):
        raise AdapterError(f"{path}: LoRA adapters with a bias (lora_bias) are not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise AdapterError(
                f"{path}: {key} (a rank or alpha per module) is not supported; "
                "use one r and lora_alpha for all modules"
            )
    if config.get("modules_to_save"):
        raise AdapterError(
            f"{path}: modules_to_save {config['modules_to_save']} are not supported: only "
            f"LoRA on {', '.join(TARGETS)} can be served"
        )
    targets = config.get("target_modules")
    if isinstance(targets, list):
        _check_targets(targets, path)
    rank = int(config.get("r", 8))
    if rank > max_rank:
        raise AdapterError(
            f"{path}: rank {rank} is above max_lora_rank {max_rank}; raise it "
            "(EngineConfig(max_lora_rank=...), --max-lora-rank)"
        )
    alpha = float(config.get("lora_alpha", 8))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, scale


def _check_targets(targets: list[str], path: Path) -> None:
    for t in targets:
        leaf = t.rsplit(".", 1)[-1]
        if leaf in ("embed_tokens", "wte", "word_embeddings"):
            raise AdapterError(f"{path}: embedding adapters (target {t!r}) are not supported")
        if leaf not in TARGETS:
            raise AdapterError(
                f"{path}: target module {t!r} is not supported; an adapter may target "
                f"{', '.join(TARGETS)}"
            )


def read_weights(path: Path, shape: BaseShape, rank: int) -> list[LoraModule]:
    """Every adapted projection's A and B, checked against the base model's sizes."""
    from safetensors import safe_open

    if not path.is_file():
        bin_file = path.with_name("adapter_model.bin")
        hint = " (only adapter_model.bin: save with safe_serialization=True)"
        raise AdapterError(f"{path} is missing{hint if bin_file.exists() else ''}")
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            m = _KEY.search(key)
            if m is None:
                raise AdapterError(f"{path}: {_unsupported(key)}")
            layer, module, side = int(m.group(1)), m.group(3), m.group(4)
            if module not in TARGETS:
                raise AdapterError(
                    f"{path}: {key}: target module {module!r} is not supported; an adapter "
                    f"may target {', '.join(TARGETS)}"
                )
            if layer >= shape.num_layers:
                raise AdapterError(
                    f"{path}: {key} is for layer {layer}, but the base model has "
                    f"{shape.num_layers} layers: the adapter was made for another base model"
                )
            halves.setdefault((layer, module), {})[side] = f.get_tensor(key)
    modules = []
    for (layer, module), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise AdapterError(f"{path}: layer {layer} {module} has no {missing}")
        a, b = pair["A"], pair["B"]
        _check_shapes(path, layer, module, a, b, shape, rank)
        modules.append(LoraModule(layer, module, a, b))
    if not modules:
        raise AdapterError(f"{path} holds no LoRA weights")
    return modules


def _unsupported(key: str) -> str:
    if "lora_embedding" in key:
        return f"{key}: embedding adapters are not supported"
    if "lora_magnitude" in key:
        return f"{key}: DoRA adapters are not supported; use plain LoRA"
    return (
        f"{key} is not a LoRA weight of an attention or MLP projection; an adapter may "
        f"target {', '.join(TARGETS)}"
    )


def _check_shapes(
    path: Path, layer: int, module: str, a: torch.Tensor, b: torch.Tensor, shape, rank: int
) -> None:
    want_in, want_out = shape.sizes(module)
    where = f"{path}: layer {layer} {module}"
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise AdapterError(
            f"{where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not pair"
        )
    if a.shape[0] != rank:
        raise AdapterError(f"{where}: rank {a.shape[0]} differs from r={rank} in {CONFIG_FILE}")
    if a.shape[1] != want_in or b.shape[0] != want_out:
        raise AdapterError(
            f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} expect a projection of "
            f"{a.shape[1]} -> {b.shape[0]} features, but the base model's is {want_in} -> "
            f"{want_out} (hidden size {shape.hidden}): the adapter was made for another base model"
        )


def load_adapter(
    name: str,
    source: str | os.PathLike[str],
    base_config: Mapping[str, Any],
    max_rank: int,
    revision: str | None = None,
) -> LoraAdapter:
    """Read and check a PEFT LoRA adapter for the model whose config.json is `base_config`."""
    if not name or not isinstance(name, str):
        raise AdapterError(f"an adapter needs a non-empty name, got {name!r}")
    folder = resolve_adapter(source, revision)
    config_path = folder / CONFIG_FILE
    rank, scale = check_config(read_config(folder), config_path, max_rank)
    modules = read_weights(folder / WEIGHTS_FILE, BaseShape.from_config(base_config), rank)
    return LoraAdapter(name, os.fspath(source), rank, scale, modules)
