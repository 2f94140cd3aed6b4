"""MXFP4 checkpoints (gpt-oss): the experts' weights as 4-bit e2m1 codes with an e8m0 scale per
32 values, dequantized at load into the model's dtype.

A checkpoint stores, for each expert projection `X` (gate_up_proj, down_proj), `X_blocks`
(uint8 [experts, rows, groups, 16]: two codes per byte, the low nibble first) and `X_scales`
(uint8 [experts, rows, groups]: the power of two of each group of 32, biased by 127). A row
is one output unit, so the values are [experts, out, in]; transformers' layout of the
parameter is [experts, in, out], its transpose. The layout and nibble order are those of
transformers' integrations/mxfp4.py (and OpenAI's reference).

Dequantized, the experts take the float dtype's bytes (bfloat16: 16 bits a value against
MXFP4's 4.25), see docs/quantization.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from enginehouse.plugin_api import InvalidModelError

from .parallel import tensor_reader

GROUP = 32  # values per scale
# The 16 e2m1 values by code: sign bit 3, then exponent (2 bits) and mantissa (1 bit).
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCKS, SCALES = "_blocks", "_scales"


def is_mxfp4(config: dict[str, Any]) -> bool:
    qc = config.get("quantization_config") or {}
    return str(qc.get("quant_method") or "").lower() == "mxfp4"


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 [experts, in, out] from blocks [experts, out, groups, 16] (or [.., groups * 16])
    and scales [experts, out, groups]."""
    blocks = blocks.reshape(*scales.shape, -1)
    if blocks.shape[-1] * 2 != GROUP:
        raise InvalidModelError(
            f"MXFP4 blocks of {blocks.shape[-1]} bytes per scale; the format has {GROUP // 2}"
        )
    table = torch.tensor(E2M1, dtype=torch.float32)
    low, high = table[(blocks & 0x0F).long()], table[(blocks >> 4).long()]
    values = torch.stack([low, high], dim=-1).flatten(-2)  # low nibble first
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
    return values.flatten(-2).transpose(1, 2).contiguous()


def dequantized(stream: Iterator[tuple[Path, str, Any]]) -> Iterator[tuple[Path, str, Any]]:
    """The checkpoint's tensors with each `X_blocks` / `X_scales` pair as one float `X`.

    A pair is read as soon as both halves are seen (the file of a pair stays open only while
    it is being read), dequantized once, and its reader cuts a rank's part from the result.
    """
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for path, name, read in stream:
        suffix = BLOCKS if name.endswith(BLOCKS) else SCALES if name.endswith(SCALES) else None
        if suffix is None:
            yield path, name, read
            continue
        base = name[: -len(suffix)]
        halves = pending.setdefault(base, {})
        halves[suffix] = read()
        if len(halves) == 2:
            del pending[base]
            yield path, base, tensor_reader(dequantize(halves[BLOCKS], halves[SCALES]))
    if pending:
        base, halves = next(iter(pending.items()))
        have = next(iter(halves))
        lack = SCALES if have == BLOCKS else BLOCKS
        raise InvalidModelError(
            f"MXFP4 checkpoint has {base}{have} but no {base}{lack}; the checkpoint is incomplete"
        )
