"""What a native model looks like, read from config.json: one `Arch` per checkpoint.

Every supported family is the same decoder with different switches (biases, norms, windows,
soft-capping, experts), so adding a family means writing one function here that turns its
config into an `Arch`, and, where its checkpoint names differ, a rename rule in `weights.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Rope types implemented in rope.py; anything else is reported by the probe, not guessed.
ROPE_TYPES = ("default", "linear", "llama3", "longrope", "yarn")


class UnsupportedModel(ValueError):
    """The config asks for something the native implementation does not do; says what."""


@dataclass(frozen=True)
class Rope:
    theta: float = 10000.0
    kind: str = "default"
    rotary_dim: int = 0  # 0: the whole head
    params: Mapping[str, Any] = field(default_factory=dict)  # the scaling parameters, as given
    # Qwen2-VL's M-RoPE: how many frequency pairs follow the time, height and width positions.
    mrope_section: tuple[int, ...] = ()


@dataclass(frozen=True)
class MoE:
    num_experts: int
    top_k: int
    intermediate_size: int
    renormalize: bool  # divide the chosen experts' weights by their sum
    layers: tuple[bool, ...] = ()  # per layer: True where the MLP is the mixture
    # gpt-oss (native/gpt_oss.py): router and experts with biases, softmax over the top k
    # chosen logits, the clamped SwiGLU with these (alpha, limit).
    swiglu: tuple[float, float] | None = None


@dataclass(frozen=True)
class Arch:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    rope: Rope
    rms_norm_eps: float = 1e-6
    act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before rope
    norm_plus_one: bool = False  # Gemma: the norm scales by (1 + weight)
    sandwich_norm: bool = False  # Gemma 2: norms after attention and MLP as well
    embed_scale: float | None = None  # Gemma: embeddings times sqrt(hidden_size)
    attn_scale: float | None = None  # default head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    windows: tuple[int | None, ...] = ()  # per layer sliding window, None for full attention
    tie_embeddings: bool = False
    moe: MoE | None = None
    sinks: bool = False  # gpt-oss: a learned logit per head joins each softmax's denominator

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    def window(self, layer: int) -> int | None:
        return self.windows[layer] if self.windows else None

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and (not self.moe.layers or self.moe.layers[layer])


def _rope(config: Mapping[str, Any], head_dim: int) -> Rope:
    """transformers 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`."""
    params = dict(config.get("rope_parameters") or {})
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise UnsupportedModel("per-layer-type rope parameters are not supported natively")
    if not params:
        params = dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or params.get("type") or "default"
    kind = "longrope" if kind == "su" else kind
    kind = "default" if kind == "mrope" else kind  # older Qwen2-VL configs name it a type
    if kind not in ROPE_TYPES:
        raise UnsupportedModel(
            f"rope type {kind!r} is not implemented natively (have: {', '.join(ROPE_TYPES)})"
        )
    if kind == "yarn":  # as transformers reads it: a top-level value comes first
        params["original_max_position_embeddings"] = (
            config.get("original_max_position_embeddings")
            or params.get("original_max_position_embeddings")
            or config.get("max_position_embeddings", 4096)
        )
    factor = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    return Rope(
        theta=float(params.get("rope_theta", 10000.0)),
        kind=kind,
        rotary_dim=int(head_dim * factor),
        params=params,
        mrope_section=tuple(params.get("mrope_section") or ()),
    )


def _layer_windows(config: Mapping[str, Any], layers: int) -> tuple[int | None, ...]:
    window = config.get("sliding_window")
    types = config.get("layer_types")
    if types:
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (window,) * layers if window else ()


def _common(config: Mapping[str, Any], family: str) -> dict[str, Any]:
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    layers = config["num_hidden_layers"]
    return dict(
        family=family,
        vocab_size=config["vocab_size"],
        hidden_size=hidden,
        intermediate_size=config.get("intermediate_size", 4 * hidden),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        max_positions=config.get("max_position_embeddings", 4096),
        rope=_rope(config, head_dim),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        act=config.get("hidden_act") or config.get("hidden_activation") or "silu",
        windows=_layer_windows(config, layers),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def llama(config: Mapping[str, Any]) -> Arch:
    bias = bool(config.get("attention_bias", False))
    return Arch(
        **_common(config, "llama"),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bool(config.get("mlp_bias", False)),
    )


def mistral(config: Mapping[str, Any]) -> Arch:
    return Arch(**_common(config, "mistral"))


def qwen2(config: Mapping[str, Any]) -> Arch:
    return Arch(**_common(config, "qwen2"), qkv_bias=True)


def qwen3(config: Mapping[str, Any]) -> Arch:
    bias = bool(config.get("attention_bias", False))
    return Arch(**_common(config, "qwen3"), qkv_bias=bias, o_bias=bias, qk_norm=True)


def phi3(config: Mapping[str, Any]) -> Arch:
    # The checkpoint already fuses qkv_proj and gate_up_proj, in our layout.
    return Arch(**_common(config, "phi3"))


def gemma2(config: Mapping[str, Any]) -> Arch:
    return Arch(
        **_common(config, "gemma2"),
        norm_plus_one=True,
        sandwich_norm=True,
        embed_scale=config["hidden_size"] ** 0.5,
        attn_scale=config.get("query_pre_attn_scalar", 256) ** -0.5,
        attn_softcap=config.get("attn_logit_softcapping"),
        final_softcap=config.get("final_logit_softcapping"),
    )


def mixtral(config: Mapping[str, Any]) -> Arch:
    moe = MoE(
        num_experts=config["num_local_experts"],
        top_k=config["num_experts_per_tok"],
        intermediate_size=config["intermediate_size"],
        renormalize=True,
    )
    return Arch(**_common(config, "mixtral"), moe=moe)


def qwen3_moe(config: Mapping[str, Any]) -> Arch:
    # transformers 5 writes num_local_experts; released checkpoints say num_experts.
    experts = config.get("num_experts") or config["num_local_experts"]
    step = config.get("decoder_sparse_step", 1)
    dense = set(config.get("mlp_only_layers") or ())
    layers = tuple(
        experts > 0 and i not in dense and (i + 1) % step == 0
        for i in range(config["num_hidden_layers"])
    )
    moe = MoE(
        num_experts=experts,
        top_k=config["num_experts_per_tok"],
        intermediate_size=config["moe_intermediate_size"],
        renormalize=bool(config.get("norm_topk_prob", False)),
        layers=layers,
    )
    bias = bool(config.get("attention_bias", False))
    return Arch(**_common(config, "qwen3_moe"), qkv_bias=bias, o_bias=bias, qk_norm=True, moe=moe)


def gpt_oss(config: Mapping[str, Any]) -> Arch:
    moe = MoE(
        num_experts=config["num_local_experts"],
        top_k=config["num_experts_per_tok"],
        intermediate_size=config["intermediate_size"],
        renormalize=True,  # the softmax over the chosen logits sums to one
        swiglu=(float(config.get("swiglu_alpha", 1.702)), float(config.get("swiglu_limit", 7.0))),
    )
    common = _common(config, "gpt_oss")
    if not config.get("layer_types"):  # transformers' default: every other layer, from the first
        window = config.get("sliding_window", 128)
        common["windows"] = tuple(
            window if i % 2 == 0 else None for i in range(common["num_layers"])
        )
    bias = bool(config.get("attention_bias", True))
    return Arch(**common, qkv_bias=bias, o_bias=bias, moe=moe, sinks=True)


# Architecture name (config.json "architectures") -> how to read its config.
FAMILIES: dict[str, Callable[[Mapping[str, Any]], Arch]] = {
    "LlamaForCausalLM": llama,
    "MistralForCausalLM": mistral,
    "Qwen2ForCausalLM": qwen2,
    "Qwen3ForCausalLM": qwen3,
    "Phi3ForCausalLM": phi3,
    "Gemma2ForCausalLM": gemma2,
    "MixtralForCausalLM": mixtral,
    "Qwen3MoeForCausalLM": qwen3_moe,
    "GptOssForCausalLM": gpt_oss,
}

SUPPORTED_ACTS = ("silu", "gelu_pytorch_tanh", "gelu")


def language_model(
    architecture: str, config: Mapping[str, Any], facts: Mapping[str, Any]
) -> tuple[str, Mapping[str, Any]]:
    """The architecture and config of the text model to run: the model itself, or the language
    model inside a vision-language model, as the vision plugin describes it."""
    if facts.get("is_vlm"):
        text_arch, text_config = facts.get("text_architecture"), facts.get("text_config")
        if not text_arch or not isinstance(text_config, Mapping):
            raise UnsupportedModel(
                f"{architecture} is a vision-language model whose language model is not "
                "described (no text_config the vision plugin could read)"
            )
        return text_arch, text_config
    return architecture, config


def arch_from_config(architecture: str, config: Mapping[str, Any]) -> Arch:
    """The `Arch` of a checkpoint, or `UnsupportedModel` saying what is missing."""
    read = FAMILIES.get(architecture)
    if read is None:
        raise UnsupportedModel(
            f"no native implementation of {architecture} (native: {', '.join(sorted(FAMILIES))})"
        )
    try:
        arch = read(config)
    except KeyError as e:
        raise UnsupportedModel(f"config.json has no {e.args[0]!r}") from None
    qc = config.get("quantization_config")
    mxfp4 = isinstance(qc, Mapping) and str(qc.get("quant_method") or "").lower() == "mxfp4"
    if mxfp4 and arch.family != "gpt_oss":
        raise UnsupportedModel("MXFP4 weights are read natively for gpt-oss's experts only")
    if arch.act not in SUPPORTED_ACTS:
        raise UnsupportedModel(f"activation {arch.act!r} is not implemented natively")
    return arch
