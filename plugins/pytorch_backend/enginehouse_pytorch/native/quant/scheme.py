"""Which quantization a model runs with: read from config.json's `quantization_config`, or asked
for with `EngineConfig.quantization`. Torch-free, so that the probe can call it.

`read_scheme` returns a `QuantScheme` (or None for a float model) and raises `UnsupportedModel`
naming the field and value it cannot run; `check_shapes` then checks the scheme against the
model's projection sizes. What each method's tensors look like is `formats.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..arch import Arch, UnsupportedModel

METHODS = ("gptq", "awq", "compressed-tensors", "fp8")
NAMES = {"gptq": "GPTQ", "awq": "AWQ", "compressed-tensors": "compressed-tensors", "fp8": "FP8"}
DEFAULT_INT4_GROUP = 32  # llama.cpp's Q4_0 grouping: RTN without calibration needs small groups


@dataclass(frozen=True)
class QuantScheme:
    method: str  # one of METHODS, or "int8" / "int4" (quantized at load)
    bits: int
    kind: str  # the codes: "u8", "u4" or "f8" (see qweight.py)
    group: int | None  # inputs per scale; None: one scale per output channel (whole input)
    symmetric: bool = True
    at_load: bool = False
    act_order: bool = False  # GPTQ desc_act / compressed-tensors actorder: columns in g_idx
    zero_offset: int = 0  # GPTQ v1 checkpoints store zero - 1
    block: tuple[int, int] | None = None  # FP8 (rows, inputs) per scale
    fmt: str = ""  # the tensor layout within the method (compressed-tensors' format)
    activations: str | None = None  # the checkpoint's activation quantization, run in float
    head: bool = False  # quantize lm_head at load (checkpoints say per tensor)

    def describe(self) -> str:
        """e.g. "GPTQ 4-bit, group 128, asymmetric (zero points), act-order (g_idx)"."""
        if self.at_load:
            group = f"group {self.group}" if self.group else "per output channel"
            return f"{self.method} weight-only at load ({group}, symmetric)"
        name = NAMES[self.method]
        if self.kind == "f8":
            if self.block:
                grain = f"{self.block[0]}x{self.block[1]} blocks"
            else:
                grain = "per output channel" if self.fmt == "channel" else "per tensor"
            text = f"{name} e4m3, {grain}" if self.method == "fp8" else f"{name} FP8 e4m3, {grain}"
        else:
            group = f"group {self.group}" if self.group else "per output channel"
            sym = "symmetric" if self.symmetric else "asymmetric (zero points)"
            text = f"{name} {self.bits}-bit, {group}, {sym}"
            if self.act_order:
                text += ", act-order (g_idx)"
            if self.method == "gptq":
                text += ", zero points v1" if self.zero_offset else ", zero points v2"
        if self.activations:
            text += f"; activations stay float (the checkpoint's {self.activations} not applied)"
        return text


def read_scheme(
    config: Mapping[str, Any], quantization: str | None = None, group: int | None = None
):
    """The scheme for a checkpoint's config.json and `EngineConfig.quantization`, or None."""
    qc = config.get("quantization_config")
    if qc is not None and not isinstance(qc, Mapping):
        raise UnsupportedModel("config.json's quantization_config is not an object")
    if qc and quantization:
        raise UnsupportedModel(
            f"the checkpoint is already quantized ({_method(qc)}); drop quantization="
            f"{quantization!r} to run it as it is"
        )
    if quantization:
        return at_load(quantization, group)
    if group is not None:
        raise UnsupportedModel("quantization_group_size is set but quantization is not")
    if not qc:
        return None
    method = _method(qc)
    if method == "mxfp4":  # gpt-oss's experts, dequantized at load by mxfp4.py: no projection
        return None
    readers = {"gptq": _gptq, "awq": _awq, "compressed-tensors": _compressed, "fp8": _fp8}
    if method not in readers:
        raise UnsupportedModel(
            f"quantization_config.quant_method {method!r} is not supported natively "
            f"(supported: {', '.join(METHODS)})"
        )
    return readers[method](qc)


def _method(qc: Mapping[str, Any]) -> str:
    return str(qc.get("quant_method") or qc.get("method") or "").lower()


def at_load(quantization: str, group: int | None = None) -> QuantScheme:
    if quantization == "int8":
        if group is not None:
            raise UnsupportedModel(
                "quantization_group_size applies to int4; int8 has one scale per output channel"
            )
        return QuantScheme("int8", 8, "u8", None, at_load=True, head=True)
    if quantization == "int4":
        return QuantScheme("int4", 4, "u4", group or DEFAULT_INT4_GROUP, at_load=True, head=True)
    raise UnsupportedModel(f"quantization {quantization!r} is not one of int8, int4")


def _group(qc: Mapping[str, Any], *keys: str, default: int = 128) -> int | None:
    value = next((qc[k] for k in keys if qc.get(k) is not None), default)
    if not isinstance(value, int) or isinstance(value, bool) or value == 0 or value < -1:
        raise UnsupportedModel(f"quantization_config.{keys[0]} {value!r} is not a group size")
    return None if value == -1 else value


def _bits(qc: Mapping[str, Any], method: str, allowed: tuple[int, ...], *keys: str) -> int:
    bits = next((qc[k] for k in keys if qc.get(k) is not None), None)
    if bits not in allowed:
        have = " and ".join(str(b) for b in allowed)
        raise UnsupportedModel(
            f"{method} with quantization_config.{keys[0]}={bits!r} is not supported natively "
            f"({have}-bit are)"
        )
    return bits


def _gptq(qc: Mapping[str, Any]) -> QuantScheme:
    bits = _bits(qc, "GPTQ", (4, 8), "bits")
    layout = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if layout not in ("gptq", "gptq_v2"):
        raise UnsupportedModel(
            f"GPTQ checkpoint_format {layout!r} is not supported natively (gptq, gptq_v2 are)"
        )
    pack = str(qc.get("pack_dtype", "int32")).removeprefix("torch.")
    if pack != "int32":
        raise UnsupportedModel(f"GPTQ pack_dtype {pack!r} is not supported natively (int32 is)")
    return QuantScheme(
        "gptq",
        bits,
        "u4" if bits == 4 else "u8",
        _group(qc, "group_size"),
        symmetric=bool(qc.get("sym", True)),
        act_order=bool(qc.get("desc_act", False)),
        zero_offset=1 if layout == "gptq" else 0,
        fmt=layout,
    )


def _awq(qc: Mapping[str, Any]) -> QuantScheme:
    bits = _bits(qc, "AWQ", (4,), "bits", "w_bit")
    layout = str(qc.get("version") or qc.get("format") or "gemm").lower()
    if layout != "gemm":
        raise UnsupportedModel(
            f"AWQ version {layout!r} is not supported natively (the GEMM layout is)"
        )
    if not qc.get("zero_point", True):
        raise UnsupportedModel("AWQ with zero_point=false has no GEMM layout; not supported")
    return QuantScheme(
        "awq", bits, "u4", _group(qc, "group_size", "q_group_size"), symmetric=False, fmt="gemm"
    )


def _fp8(qc: Mapping[str, Any]) -> QuantScheme:
    if str(qc.get("scale_fmt", "float")) != "float":
        raise UnsupportedModel(
            f"FP8 scale_fmt {qc.get('scale_fmt')!r} is not supported natively (float is)"
        )
    block = qc.get("weight_block_size")
    if block is not None:
        if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
            raise UnsupportedModel(f"FP8 weight_block_size {block!r} is not two positive sizes")
        block = (block[0], block[1])
    scheme = str(qc.get("activation_scheme", "dynamic"))
    return QuantScheme(
        "fp8",
        8,
        "f8",
        block[1] if block else None,
        block=block,
        activations=f"{scheme} FP8 activation quantization",
    )


# compressed-tensors: config_groups of {targets, weights: QuantizationArgs, input_activations}.
_CT_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")


def _compressed(qc: Mapping[str, Any]) -> QuantScheme:
    if qc.get("sparsity_config"):
        raise UnsupportedModel("compressed-tensors sparsity_config is not supported natively")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise UnsupportedModel(
            f"compressed-tensors quantization_status {status!r}: the weights are not compressed"
        )
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, Mapping) or not groups:
        raise UnsupportedModel("compressed-tensors quantization_config has no config_groups")
    schemes = set()
    for name, group in groups.items():
        weights = dict(group.get("weights") or {})
        fmt = str(group.get("format") or qc.get("format") or "")
        acts = group.get("input_activations")
        schemes.add(_ct_scheme(name, fmt, weights, acts))
    if len(schemes) > 1:
        raise UnsupportedModel(
            "compressed-tensors config_groups with different weight schemes are not supported "
            "natively (one scheme for every layer is)"
        )
    return schemes.pop()


def _ct_scheme(name: str, fmt: str, w: Mapping[str, Any], acts: Any) -> QuantScheme:
    where = f"compressed-tensors config_groups.{name}.weights"
    if fmt not in _CT_FORMATS[:3]:
        raise UnsupportedModel(
            f"compressed-tensors format {fmt!r} is not supported natively "
            f"({', '.join(_CT_FORMATS[:3])} are)"
        )
    kind_type = w.get("type", "int")
    strategy = w.get("strategy", "tensor")
    bits = w.get("num_bits")
    if w.get("dynamic"):
        raise UnsupportedModel(f"{where}.dynamic is true: weights quantized on the fly")
    activations = None
    if acts:
        a_type, a_bits = acts.get("type", "int"), acts.get("num_bits")
        activations = f"{a_type}{a_bits} activation quantization"
    if kind_type == "float":
        if bits != 8 or fmt != "float-quantized":
            raise UnsupportedModel(f"{where}: float {bits}-bit weights are not supported natively")
        block = None
        group = None
        if strategy == "block":
            bs = w.get("block_structure")
            if not bs or len(bs) != 2:
                raise UnsupportedModel(f"{where}.block_structure {bs!r} is not two sizes")
            block, group = (int(bs[0]), int(bs[1])), int(bs[1])
        elif strategy not in ("tensor", "channel"):
            raise UnsupportedModel(f"{where}.strategy {strategy!r} for FP8 is not supported")
        return QuantScheme(
            "compressed-tensors",
            8,
            "f8",
            group,
            block=block,
            fmt=strategy if strategy != "block" else fmt,
            activations=activations,
        )
    if kind_type != "int":
        raise UnsupportedModel(f"{where}.type {kind_type!r} is not supported natively")
    allowed = (4, 8) if fmt == "pack-quantized" else (8,)
    if bits not in allowed:
        raise UnsupportedModel(
            f"{where}.num_bits {bits!r} in format {fmt} is not supported natively "
            f"({' and '.join(map(str, allowed))}-bit are)"
        )
    if strategy == "group":
        group = w.get("group_size")
        if not isinstance(group, int) or group <= 0:
            raise UnsupportedModel(f"{where}.group_size {group!r} is not a group size")
    elif strategy in ("channel", "tensor"):
        group = None
    else:
        raise UnsupportedModel(f"{where}.strategy {strategy!r} is not supported natively")
    order = w.get("actorder")
    return QuantScheme(
        "compressed-tensors",
        bits,
        "u4" if bits == 4 else "u8",
        group,
        symmetric=bool(w.get("symmetric", True)),
        act_order=order in ("group", "dynamic"),
        fmt=fmt,
        activations=activations,
    )


# --- the scheme against the model's shapes ---------------------------------------------------


def projection_shapes(arch: Arch) -> dict[str, tuple[list[int], int]]:
    """Each projection's checkpoint output sizes (per fused shard) and input size."""
    h, kvh, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
    attention = {
        "qkv_proj (q_proj, k_proj, v_proj)": ([h * d, kvh * d, kvh * d], arch.hidden_size),
        "o_proj": ([arch.hidden_size], h * d),
    }
    if arch.mla is not None:
        attention = _latent_attention_shapes(arch)
    return {
        **attention,
        "gate_up_proj (gate_proj, up_proj)": (
            [arch.intermediate_size, arch.intermediate_size],
            arch.hidden_size,
        ),
        "down_proj": ([arch.hidden_size], arch.intermediate_size),
        "lm_head": ([arch.vocab_size], arch.hidden_size),
    }


def _latent_attention_shapes(arch: Arch) -> dict[str, tuple[list[int], int]]:
    """DeepSeek's latent attention projections (mla.py)."""
    m, h, hidden = arch.mla, arch.num_heads, arch.hidden_size
    assert m is not None
    if m.q_lora_rank is None:
        query = {"q_proj": ([h * m.qk_head_dim], hidden)}
    else:
        query = {
            "q_a_proj": ([m.q_lora_rank], hidden),
            "q_b_proj": ([h * m.qk_head_dim], m.q_lora_rank),
        }
    return {
        **query,
        "kv_a_proj_with_mqa": ([m.cache_width], hidden),
        "kv_b_proj": ([h * (m.qk_nope_head_dim + m.v_head_dim)], m.kv_lora_rank),
        "o_proj": ([hidden], h * m.v_head_dim),
    }


def check_shapes(scheme: QuantScheme, arch: Arch) -> None:
    """Raise `UnsupportedModel` naming the first projection the scheme cannot cut into groups
    or packs (a group size or bit width that does not divide its sizes)."""
    if arch.moe is not None and scheme.method != "fp8":
        raise UnsupportedModel(
            f"{scheme.describe()} weights of a mixture-of-experts model are not supported "
            "natively (FP8 checkpoints are: their experts are dequantized at load)"
        )
    pack = 32 // scheme.bits
    for name, (outs, k) in projection_shapes(arch).items():
        if name == "lm_head" and not scheme.head:
            continue  # checked when the checkpoint quantizes it (formats.py)
        if scheme.group and k % scheme.group:
            raise UnsupportedModel(
                f"group size {scheme.group} does not divide {k}, the input size of {name}"
                + ("; choose a group size that does (32 divides most)" if scheme.at_load else "")
            )
        if k % 2:
            raise UnsupportedModel(f"{name}'s input size {k} is odd: no kernel takes it")
        if scheme.method in ("gptq", "awq") and scheme.kind != "f8":
            packed = k if scheme.method == "gptq" else min(outs)
            what = "input" if scheme.method == "gptq" else "output"
            if packed % pack:
                raise UnsupportedModel(
                    f"{scheme.bits}-bit {scheme.method.upper()} packs {pack} values per int32, "
                    f"which does not divide {packed}, the {what} size of {name}"
                )
        if scheme.block and k % scheme.block[1]:
            raise UnsupportedModel(
                f"FP8 block width {scheme.block[1]} does not divide {k}, the input size of {name}"
            )


def weight_bytes(scheme: QuantScheme | None, arch: Arch, float_bytes: int) -> int:
    """The memory the weights take as the native backend holds them (about: norms left out)."""
    embed = arch.vocab_size * arch.hidden_size * float_bytes
    total = embed
    for name, (outs, k) in projection_shapes(arch).items():
        n = sum(outs)
        copies = 1 if name == "lm_head" else arch.num_layers
        if name == "lm_head" and arch.tie_embeddings and not (scheme and scheme.head):
            continue  # the embedding itself
        if scheme is None or (name == "lm_head" and not scheme.head):
            total += copies * n * k * float_bytes
            continue
        groups = k // scheme.group if scheme.group else 1
        per_group = 4 if scheme.symmetric or scheme.kind == "f8" else 8  # scale (+ minimum)
        total += copies * (n * k * scheme.bits // 8 + n * groups * per_group)
    return total
