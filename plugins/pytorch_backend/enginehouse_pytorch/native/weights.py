"""Stream a checkpoint's safetensors into a native model, tensor by tensor.

Each file is memory-mapped and read one tensor at a time, converted to the model's dtype and
copied into its parameter (or its slice of a fused parameter), so peak memory stays near the
model's own size. Sharded checkpoints are just several files; the index file only names them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from enginehouse.plugin_api import copy_checked, missing_weights, tensors

from .mxfp4 import dequantized
from .parallel import TensorParallel, rank_tensor

log = logging.getLogger(__name__)

# Checkpoint name pattern -> (our parameter name, which shard of a fused parameter).
# Group 1 of a pattern with an expert number is the expert.
_FUSED = [
    (re.compile(r"\.self_attn\.([qkv])_proj\."), ".self_attn.qkv_proj.", {"q": 0, "k": 1, "v": 2}),
    (re.compile(r"\.mlp\.(gate|up)_proj\."), ".mlp.gate_up_proj.", {"gate": 0, "up": 1}),
    (
        re.compile(r"\.shared_experts\.(gate|up)_proj\."),  # DeepSeek's shared experts
        ".shared_experts.gate_up_proj.",
        {"gate": 0, "up": 1},
    ),
    (
        re.compile(r"\.linear_attn\.in_proj_(qkv|z|b|a)\."),  # Qwen3.5
        ".linear_attn.in_proj.",
        {"qkv": 0, "z": 1, "b": 2, "a": 3},
    ),
    (
        re.compile(r"\.shared_expert\.(gate|up)_proj\."),  # Qwen3-Next's shared expert
        ".shared_expert.gate_up_proj.",
        {"gate": 0, "up": 1},
    ),
]
_EXPERT = re.compile(
    r"\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w3|w2|gate_proj|up_proj|down_proj)\.weight$"
)
_EXPERT_SHARD = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1, "w2": None, "down_proj": None}
_RENAMES = [
    (".block_sparse_moe.gate.", ".mlp.gate."),
    (".mlp.experts.gate_up_proj", ".mlp.w13"),  # transformers 5's fused expert layout
    (".mlp.experts.down_proj", ".mlp.w2"),
]
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")
# Fused parameters and the checkpoint tensors that fill them, for error messages.
_FUSED_FROM = {
    ".qkv_proj.": "q_proj, k_proj and v_proj, or a fused qkv_proj",
    ".gate_up_proj.": "gate_proj and up_proj, or a fused gate_up_proj",
    ".w13": "each expert's gate and up projections (w1/w3 or gate_proj/up_proj)",
    ".w2": "each expert's down projection (w2 or down_proj)",
}


def target(name: str) -> tuple[str, int | None, int | None] | None:
    """(parameter name, expert or None, shard or None) for a checkpoint tensor name."""
    if _IGNORED.search(name):
        return None
    if m := _EXPERT.search(name):
        which = m.group(2)
        param = "w2" if _EXPERT_SHARD[which] is None else "w13"
        return name[: m.start()] + f".mlp.{param}", int(m.group(1)), _EXPERT_SHARD[which]
    for pattern, fused, shards in _FUSED:
        if m := pattern.search(name):
            return name[: m.start()] + fused + name[m.end() :], None, shards[m.group(1)]
    for old, new in _RENAMES:
        name = name.replace(old, new)
    return name, None, None


def _destination(model: nn.Module, param: torch.Tensor, name: str, expert, shard) -> torch.Tensor:
    dest = param.data if expert is None else param.data[expert]
    if shard is None:
        return dest
    if expert is not None:  # an expert's gate (0) or up (1) half of w13
        half = dest.shape[0] // 2
        return dest[shard * half : (shard + 1) * half]
    owner = model.get_submodule(name.rsplit(".", 1)[0])
    assert hasattr(owner, "shards")  # a Linear, or a quantized one
    begin, end = owner.shards[shard], owner.shards[shard + 1]
    return dest[begin:end]


def _offer(model: nn.Module, pname: str, shard: int | None, read, name: str, tp=None) -> bool:
    """Hand a tensor to the layer that reads its own checkpoint tensors (`take`), if any;
    with an active `tp`, this rank's part of it (FP8 only: `quant/fp8_float.rank_part`)."""
    owner_name, _, suffix = pname.rpartition(".")
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        return False
    if not hasattr(owner, "take"):
        return False
    if tp is not None and tp.active:
        from .quant.fp8_float import rank_part

        owner.take(suffix, shard, rank_part(tp, pname, shard, read, owner.scheme.block, name), name)
        return True
    owner.take(suffix, shard, read(), name)
    return True


def _renamed(name: str, prefixes: Mapping[str, str | None] | None) -> str | None:
    """The name with its prefix mapped (a VLM's language model), or None to skip it."""
    if prefixes is None:
        return name
    for old, new in prefixes.items():  # the first prefix that matches decides
        if name.startswith(old):
            return None if new is None else new + name[len(old) :]
    return None


def _fill(dest: torch.Tensor, part: torch.Tensor | None, name: str, path: Path) -> None:
    """A rank's part into its parameter: None leaves zeros, and rows past the part (the last
    rank's vocabulary padding) are zero too."""
    if part is None or part.shape[0] < dest.shape[0]:
        with torch.no_grad():
            dest.zero_()
    if part is not None:
        copy_checked(dest[: part.shape[0]], part, name, path)


def load_safetensors(
    model: nn.Module,
    files: Iterable[Path],
    progress: bool = True,
    prefixes: Mapping[str, str | None] | None = None,
    tp: TensorParallel | None = None,
    rename: Callable[[str], str] | None = None,
    mxfp4: bool = False,
    fp8: Any = None,
) -> None:
    """Fill every parameter of `model` from `files`; raise if any is left unfilled.

    With `prefixes` (checkpoint prefix -> ours), only tensors under one of them are read: the
    language model inside a vision-language checkpoint. With an active `tp`, each tensor's
    part for this rank is read (`parallel.rank_tensor`). With `mxfp4` (gpt-oss's format),
    each pair of `_blocks` and `_scales` tensors is read as its dequantized float tensor.
    `rename` turns a plugin family's checkpoint names into the native ones
    (`ModelFamily.weight_names`). With `fp8` (an FP8 checkpoint's `QuantScheme`), each FP8
    projection the model holds in float (the experts, MLA's kv_b_proj; every one at tp > 1)
    is read dequantized (`quant/fp8_float.py`).
    """
    files = list(files)
    params = dict(model.named_parameters())
    filled: dict[str, int] = {}  # parameter -> number of elements written
    unknown = []
    stream = tensors(files, progress)
    if mxfp4:
        stream = dequantized(stream)
    if fp8 is not None:
        from .quant import fp8_float

        floated = fp8_float.held_in_float(params, rename, prefixes)
        modules = {m for m in fp8_float.scan(files) if floated(m)}
        stream = fp8_float.dequantized(stream, modules, fp8.block)
    for path, name, read in stream:
        ours = _renamed(rename(name) if rename else name, prefixes)
        if ours in params:  # a parameter of that very name (DeepSeek-V2-Lite's own q_proj)
            where: tuple[str, int | None, int | None] | None = (ours, None, None)
        else:
            where = None if ours is None else target(ours)
        if where is None:
            continue
        pname, expert, shard = where
        if pname not in params and _offer(model, pname, shard, read, name, tp):
            continue  # a quantized layer took its own tensor (qweight, scales...)
        if pname not in params:
            if pname != "lm_head.weight":  # a tied head is the embedding itself
                unknown.append(name)
            continue
        dest = _destination(model, params[pname], pname, expert, shard)
        if tp is not None and tp.active:
            _fill(dest, rank_tensor(tp, pname, shard, expert, read), name, path)
            filled[pname] = filled.get(pname, 0) + dest.numel()
            continue
        tensor = read()
        copy_checked(dest, tensor, name, path)
        filled[pname] = filled.get(pname, 0) + tensor.numel()
    if unknown:
        log.warning(
            "ignored %d checkpoint tensors unknown to the model, e.g. %s", len(unknown), unknown[0]
        )
    missing = [n for n, p in params.items() if filled.get(n, 0) < p.numel()]
    if missing:
        parts = next((f" (from {v})" for k, v in _FUSED_FROM.items() if k in missing[0]), "")
        raise missing_weights("weights the model needs", missing, parts)
