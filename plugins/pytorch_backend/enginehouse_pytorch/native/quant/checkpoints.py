"""Quantized checkpoints written as the formats' own tools write them, for tests and benchmarks.

`write(src, dst, fmt, **options)` quantizes a float checkpoint's projections (q, k, v, o, gate,
up, down; the embedding, norms and head stay as they are) into one format's tensors and
config.json, and writes `dst`-float beside it: the same model with every projection replaced by
its dequantized weights, in float32, which transformers loads as a plain model. The quantized run
must match transformers on that copy.

The packing here is written field by field from each format's description (see `formats.py`),
independently of the vectorized unpacking the loader uses, so that one checks the other.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PROJECTION = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_fields(values: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
    """Pack non-negative ints into int32 words along `dim`, field i of each word holding
    value order[i] of its group (default: i), the first field in the lowest bits."""
    per = 32 // bits
    v = values.to(torch.int64).movedim(dim, 0)
    rows = v.shape[0]
    padded = -(-rows // per) * per
    if padded != rows:
        v = torch.cat([v, v.new_zeros(padded - rows, *v.shape[1:])])
    order = order or tuple(range(per))
    words = torch.zeros(padded // per, *v.shape[1:], dtype=torch.int64)
    for w in range(padded // per):
        for i in range(per):
            words[w] |= v[w * per + order[i]] << (bits * i)
    words = torch.where(words >= 2**31, words - 2**32, words)  # as int32 bit patterns
    return words.to(torch.int32).movedim(0, dim).contiguous()


def _minmax(w: torch.Tensor, bits: int, sym: bool, dtype=torch.float16):
    """Per-row scale and zero (unsigned codes) for the last dim of w, GPTQ's min-max rules."""
    maxq = 2**bits - 1
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    scale = ((hi - lo) / maxq).clamp_min(1e-8).to(dtype).float()
    zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-lo / scale)
    return scale, zero.clamp(0, maxq)


def _grouped(w: torch.Tensor, group: int, bits: int, sym: bool, dtype=torch.float16):
    """codes [N, K] (unsigned), scales and zeros [N, K / group], and the dequantized weight."""
    n, k = w.shape
    g = w.float().view(n, k // group, group)
    scale, zero = _minmax(g, bits, sym, dtype)
    q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, 2**bits - 1)
    deq = ((q - zero[..., None]) * scale[..., None]).view(n, k)
    return q.view(n, k).to(torch.int64), scale, zero.to(torch.int64), deq


# --- one projection in each format: (tensors by suffix, dequantized float weight) -------------


def gptq(w, bits=4, group=128, sym=True, desc_act=False, v1=True, seed=0):
    n, k = w.shape
    group = k if group == -1 else group
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed)) if desc_act else None
    wp = w if perm is None else w[:, perm]  # quantized in act order: groups of permuted columns
    q, scale, zero, deq = _grouped(wp, group, bits, sym)
    g_idx = torch.arange(k, dtype=torch.int32) // group
    if perm is not None:
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(k)
        q, deq, g_idx = q[:, inverse], deq[:, inverse], g_idx[inverse]
    if v1:  # v1 stores zero - 1; a zero of 0 (a group of one sign) would wrap: none here
        assert bool((zero > 0).all()), "a GPTQ v1 zero point of 0 cannot be stored"
    tensors = {
        "qweight": pack_fields(q.t(), bits, 0),
        "qzeros": pack_fields((zero - 1 if v1 else zero).t(), bits, 1),
        "scales": scale.t().to(torch.float16).contiguous(),
        "g_idx": g_idx.contiguous(),
    }
    return tensors, deq.float()


def awq(w, group=128):
    q, scale, zero, deq = _grouped(w, group, 4, sym=False)
    tensors = {
        "qweight": pack_fields(q.t(), 4, 1, AWQ_ORDER),
        "qzeros": pack_fields(zero.t(), 4, 1, AWQ_ORDER),
        "scales": scale.t().to(torch.float16).contiguous(),
    }
    return tensors, deq


def compressed(w, bits=4, group=128, sym=True, actorder=False, seed=0):
    """compressed-tensors pack-quantized: signed q stored as q + 2^(bits-1); bfloat16 scales."""
    n, k = w.shape
    group = k if group == -1 else group
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed)) if actorder else None
    wp = w if perm is None else w[:, perm]
    q, scale, zero, deq = _grouped(wp, group, bits, sym, torch.bfloat16)
    g_idx = torch.arange(k, dtype=torch.int32) // group
    if perm is not None:
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(k)
        q, deq, g_idx = q[:, inverse], deq[:, inverse], g_idx[inverse]
    tensors = {
        # Signed q stored as q + offset: the unsigned code itself; zeros likewise.
        "weight_packed": pack_fields(q, bits, 1),
        "weight_scale": scale.to(torch.bfloat16).contiguous(),
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if not sym:
        tensors["weight_zero_point"] = pack_fields(zero, bits, 0)
    if perm is not None:
        tensors["weight_g_idx"] = g_idx.contiguous()
    return tensors, deq.float()


def fp8(w, block=(128, 128)):
    """DeepSeek-style FP8: e4m3 weights and float32 `weight_scale_inv` per block or tensor."""
    n, k = w.shape
    if block is None:
        scale = (w.abs().amax() / 448.0).reshape(())
        full = scale.expand(n, k)
    else:
        bn, bk = block
        rows, cols = -(-n // bn), -(-k // bk)
        scale = torch.zeros(rows, cols)
        for i in range(rows):
            for j in range(cols):
                tile = w[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk]
                scale[i, j] = tile.abs().amax() / 448.0
        full = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    q = (w / full).to(torch.float8_e4m3fn)
    deq = q.float() * full
    return {"weight": q, "weight_scale_inv": scale.float()}, deq


# --- whole checkpoints ------------------------------------------------------------------------


def quantization_config(fmt: str, **o) -> dict:
    if fmt == "gptq":
        return {
            "quant_method": "gptq",
            "bits": o.get("bits", 4),
            "group_size": o.get("group", 128),
            "sym": o.get("sym", True),
            "desc_act": o.get("desc_act", False),
            "checkpoint_format": "gptq" if o.get("v1", True) else "gptq_v2",
            "lm_head": False,
        }
    if fmt == "awq":
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": o.get("group", 128),
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": None,
        }
    if fmt == "compressed":
        bits, group = o.get("bits", 4), o.get("group", 128)
        weights = {
            "num_bits": bits,
            "type": "int",
            "symmetric": o.get("sym", True),
            "strategy": "channel" if group == -1 else "group",
            "group_size": None if group == -1 else group,
            "actorder": "group" if o.get("actorder") else None,
            "dynamic": False,
            "observer": "minmax",
        }
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": weights,
                    "input_activations": None,
                    "format": "pack-quantized",
                }
            },
            "ignore": ["lm_head"],
            "sparsity_config": {},
        }
    if fmt == "fp8":
        block = o.get("block", (128, 128))
        return {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "weight_block_size": list(block) if block else None,
            "modules_to_not_convert": ["lm_head"],
        }
    raise ValueError(f"unknown format {fmt!r}")


WRITERS = {"gptq": gptq, "awq": awq, "compressed": compressed, "fp8": fp8}


def write(src: Path, dst: Path, fmt: str, **options) -> tuple[Path, Path]:
    """Write `dst` (quantized, in `fmt`) and `dst`-float (the dequantized float copy) from the
    float checkpoint `src`; return both folders."""
    dst, ref = Path(dst), Path(f"{dst}-float")
    for folder in (dst, ref):
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = {}
    for f in sorted(Path(src).glob("*.safetensors")):
        tensors.update(load_file(f))
    quantized, dequantized = {}, {}
    for name, t in tensors.items():
        if not PROJECTION.search(name):
            quantized[name] = dequantized[name] = t
            continue
        parts, deq = WRITERS[fmt](t.float(), **options)
        prefix = name.removesuffix(".weight")
        quantized.update({f"{prefix}.{suffix}": v for suffix, v in parts.items()})
        dequantized[name] = deq.to(torch.float32).contiguous()
    save_file(quantized, dst / "model.safetensors", metadata={"format": "pt"})
    save_file(dequantized, ref / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = quantization_config(fmt, **options)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst, ref
