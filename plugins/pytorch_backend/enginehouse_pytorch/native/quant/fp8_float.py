"""FP8 checkpoints (quant_method "fp8": DeepSeek-V3, Kimi-K2, Qwen3-MoE FP8) where the native
model holds a projection in float: its e4m3 `weight` and `weight_scale_inv` are read as one
dequantized float tensor, as mxfp4.py does for gpt-oss's experts.

Which projections: every one the model keeps as a float parameter rather than a `QuantLinear`
(the loader decides by asking the model, see `weights.load_safetensors`):
- the routed experts of a mixture: they live in stacked tensors (`MixtureOfExperts.w13` / `w2`,
  one matrix per expert), which no quantized kernel reads;
- MLA's `kv_b_proj`: the absorbed decode (mla.py) takes its float W_UK and W_UV per head;
- every projection of a hybrid model (Qwen3-Next FP8: the linear-attention layers read float
  weights), and at tp > 1 where a rank's part of some projection would split a block of
  scales (a head's rows not a multiple of the block): a rank then cuts its part from the
  dequantized tensor (`dequantizes_all` says when).
Attention and dense MLPs (shared experts included) otherwise stay FP8 in `QuantLinear`; at
tp > 1 each rank reads its part of the e4m3 weight and the matching whole blocks of its scales
(`rank_part`), the same rows or columns a float projection's part has.

Memory: a dequantized value takes the model dtype's bytes (bfloat16: 2 against FP8's 1 plus a
float32 scale per block), see docs/quantization.md; `explain` states it (`plugin.fp8_experts_note`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from enginehouse.plugin_api import InvalidModelError

from ..parallel import tensor_reader

WEIGHT, SCALE = "weight", "weight_scale_inv"
# Projections held in float even where others stay FP8 (mla.py's absorbed decode needs it).
FLOAT_MODULES = (".kv_b_proj",)


def dequantize(
    weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, where: str
) -> torch.Tensor:
    """float32 [N, K] from e4m3 `weight` [N, K] and `scale` [ceil(N / bn), ceil(K / bk)] (one
    value per tensor without `block`): w = weight * weight_scale_inv, per block."""
    if weight.dtype != torch.float8_e4m3fn:
        raise InvalidModelError(
            f"{where}.weight is {weight.dtype}; FP8 checkpoints run natively in e4m3 "
            "(torch.float8_e4m3fn) only"
        )
    n, k = weight.shape
    scale = scale.float()
    if block is None:
        if scale.numel() != 1:
            raise InvalidModelError(
                f"{where}.{SCALE} has shape {tuple(scale.shape)}; without weight_block_size "
                "the FP8 format has one scale per tensor"
            )
        return weight.float() * scale.reshape(())
    bn, bk = block
    want = (-(-n // bn), -(-k // bk))
    if tuple(scale.shape) != want:
        raise InvalidModelError(
            f"{where}.{SCALE} has shape {tuple(scale.shape)}; blocks of {bn}x{bk} over the "
            f"weight {(n, k)} need {want}: the checkpoint and quantization_config's "
            "weight_block_size disagree"
        )
    full = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return weight.float() * full


def scan(files: Iterable[Path]) -> set[str]:
    """The checkpoint's FP8 projections (module names): each e4m3 `weight`, checked to have
    its `weight_scale_inv` (from the safetensors headers; no tensor is read)."""
    from safetensors import safe_open

    fp8, scaled = set(), set()
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                module, _, suffix = name.rpartition(".")
                if suffix == SCALE:
                    scaled.add(module)
                elif suffix == WEIGHT and f.get_slice(name).get_dtype() == "F8_E4M3":
                    fp8.add(module)
    if missing := sorted(fp8 - scaled):
        raise InvalidModelError(
            f"the checkpoint has the FP8 weight {missing[0]}.{WEIGHT} but no "
            f"{missing[0]}.{SCALE} (its block scales); every FP8 projection needs them: "
            "is the checkpoint complete?"
        )
    return fp8


def dequantized(
    stream: Iterator[tuple[Path, str, Any]],
    modules: set[str],
    block: tuple[int, int] | None,
) -> Iterator[tuple[Path, str, Any]]:
    """The checkpoint's tensors with each of `modules`' `weight` / `weight_scale_inv` pairs as
    one float `weight`, read as soon as both are seen; its reader cuts a rank's part."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for path, name, read in stream:
        module, _, suffix = name.rpartition(".")
        if module not in modules or suffix not in (WEIGHT, SCALE):
            yield path, name, read
            continue
        halves = pending.setdefault(module, {})
        halves[suffix] = read()
        if len(halves) == 2:
            del pending[module]
            floats = dequantize(halves[WEIGHT], halves[SCALE], block, module)
            yield path, f"{module}.{WEIGHT}", tensor_reader(floats)
    if pending:
        module, halves = next(iter(pending.items()))
        lack = SCALE if WEIGHT in halves else WEIGHT
        raise InvalidModelError(
            f"the FP8 checkpoint lacks {module}.{lack}; the checkpoint is incomplete"
        )


def held_in_float(
    params: dict[str, torch.Tensor],
    rename: Callable[[str], str] | None,
    prefixes,
) -> Callable[[str], bool]:
    """Whether the model keeps a checkpoint module's weight as a float parameter (a plain
    `Linear`, the stacked experts) rather than a `QuantLinear` that reads its own codes."""
    from ..weights import _renamed, target

    def check(module: str) -> bool:
        name = f"{module}.{WEIGHT}"
        ours = _renamed(rename(name) if rename else name, prefixes)
        if ours is None:
            return False
        if ours in params:
            return True
        where = target(ours)
        return where is not None and where[0] in params

    return check


# --- sharding FP8 projections (tp > 1) -------------------------------------------------------


def rank_cuts(arch, size: int) -> tuple[list[int], list[int]]:
    """The sizes a rank's part of a sharded FP8 projection begins and ends at (multiples of
    them): rows of q (or q_b), K/V and the MLPs' gate/up; columns of o_proj and down."""
    mla, d, heads = arch.mla, arch.head_dim, arch.num_heads // size
    if mla is not None:  # kv_b_proj is float (FLOAT_MODULES); the latent projections whole
        rows, cols = [heads * mla.qk_head_dim], [heads * mla.v_head_dim]
    else:
        q_rows = heads * d * (2 if arch.attn_output_gate else 1)
        rows, cols = [q_rows, max(1, arch.num_kv_heads // size) * d], [heads * d]
    moe = arch.moe
    mlps = [moe.shared_intermediate_size, moe.shared_expert_size] if moe else []
    if moe is None or (moe.layers and not all(moe.layers)):
        mlps.append(arch.intermediate_size)
    for full in mlps:
        if full:
            rows.append(full // size)
            cols.append(full // size)
    return rows, cols


def shards_whole_blocks(arch, size: int, block: tuple[int, int] | None) -> bool:
    """Whether every rank's part of every FP8 projection is whole blocks of scales (per-tensor
    scales always are), so that the projections can stay FP8 when sharded."""
    if block is None:
        return True
    rows, cols = rank_cuts(arch, size)
    return all(r % block[0] == 0 for r in rows) and all(c % block[1] == 0 for c in cols)


def dequantizes_all(arch, size: int, block: tuple[int, int] | None) -> str | None:
    """Why every FP8 projection is dequantized at load (None: only those held in float)."""
    if arch.linear is not None:
        return "a hybrid model's layers take float weights"
    if size > 1 and not shards_whole_blocks(arch, size, block):
        return "to be sharded: a rank's part would split a block of scales"
    return None


def rank_part(tp, pname: str, shard: int | None, read, block: tuple[int, int] | None, name: str):
    """This rank's part of a sharded FP8 projection's checkpoint tensor (`pname` as
    "<module>.<suffix>"): the e4m3 weight cut as a float one would be (`parallel.rank_tensor`),
    its scales cut along the same dimension in whole blocks."""
    from ..parallel import rank_tensor

    module, _, suffix = pname.rpartition(".")
    weight = f"{module}.{WEIGHT}"
    if suffix != SCALE and suffix != "weight_scale":
        return rank_tensor(tp, weight if suffix == WEIGHT else pname, shard, None, read)

    def scales(part=None) -> torch.Tensor:
        t = read()
        # One scale for the tensor, or a projection every rank holds whole (the latent
        # ones). A fused checkpoint tensor (Phi-3's qkv_proj) is cut from a whole read too,
        # which would cut scales as values: its shape check (formats.py) then names it.
        if block is None or t.numel() == 1 or part is None:
            return t
        dim, begin, end = part
        b = block[dim]
        first, last = begin // b, -(-end // b)
        if begin % b or (end % b and last != t.shape[dim]):
            raise InvalidModelError(
                f"{name}: this rank's part [{begin}, {end}) along dim {dim} does not cover "
                f"whole FP8 blocks of {b}; run it at tp=1"
            )
        return t.narrow(dim, first, last - first)

    return rank_tensor(tp, weight, shard, None, scales)
