"""The core's own plugin: the facts config.json states plainly, and the built-in platforms."""

from __future__ import annotations

from typing import Any

from .contract import CONTRACT_VERSION
from .hookspecs import hookimpl
from .platforms import CPU, CUDA, Platform
from .spec import ModelSpec

ENGINEHOUSE_CONTRACT = CONTRACT_VERSION


@hookimpl
def register_platforms() -> list[Platform]:
    return [CPU, CUDA]


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
        "quantization": quantization_summary(spec.config),
    }


def quantization_summary(config: dict[str, Any]) -> str | None:
    """A quantized checkpoint's method, bits and group from `quantization_config`, in words
    ("gptq 4-bit, group 128"); backends judge the details in their probes."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or not qc:
        return None
    groups = qc.get("config_groups")  # compressed-tensors: the first group's weights
    if isinstance(groups, dict) and groups:
        qc = {**qc, **(next(iter(groups.values())).get("weights") or {})}
    text = str(qc.get("quant_method") or "unknown method")
    bits = next((qc[k] for k in ("bits", "num_bits", "w_bit") if qc.get(k)), None)
    if bits:
        text += f" {bits}-bit" + (" float" if qc.get("type") == "float" else "")
    group = next((qc[k] for k in ("group_size", "q_group_size") if qc.get(k)), None)
    if group and group != -1:
        text += f", group {group}"
    block = qc.get("weight_block_size") or qc.get("block_structure")
    if block:
        text += ", blocks " + "x".join(str(b) for b in block)
    return text
