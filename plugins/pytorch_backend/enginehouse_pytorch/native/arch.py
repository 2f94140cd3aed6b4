"""What a native model looks like, read from config.json: one `Arch` per checkpoint.

Every supported family is the same decoder with different switches (biases, norms, windows,
soft-capping, experts), so adding a family means writing one function here that turns its
config into an `Arch`, and, where its checkpoint names differ, a rename rule in `weights.py`.
Another plugin adds one without touching this file through the `register_model_families`
hook (native/families.py looks up both).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
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
    # Qwen3-VL's and Qwen3.5's layout: the axes take turns (t, h, w, t, h, w, ...) over the
    # first 3 * section pairs, not one contiguous run of pairs each.
    mrope_interleaved: bool = False


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
    routing: Routing | None = None  # DeepSeek's router (deepseek_moe.py); None: softmax top-k
    shared_intermediate_size: int = 0  # DeepSeek's shared experts, one gated MLP of this size
    shared_expert_size: int = 0  # Qwen3-Next: a shared expert of this size, sigmoid-gated


@dataclass(frozen=True)
class Routing:
    """DeepSeek's router: V2 scores experts by softmax (greedy, or greedy within the best
    groups), V3 by sigmoid plus a learned bias used for the choice only, within groups ranked
    by their two best experts; the chosen weights are scaled by `scaling`."""

    scoring: str  # "softmax" (V2) or "sigmoid" (V3)
    method: str  # "greedy", "group_limited_greedy" (V2) or "noaux_tc" (V3)
    num_groups: int = 1
    topk_groups: int = 1
    scaling: float = 1.0
    score_bias: bool = False  # V3's e_score_correction_bias


@dataclass(frozen=True)
class MLA:
    """Multi-head latent attention (DeepSeek V2/V3, Kimi K2): the cache holds, per token, the
    normalised latent (`kv_lora_rank`) and one rope key shared by every head (`mla.py`)."""

    q_lora_rank: int | None  # None: a plain q_proj (DeepSeek-V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_width(self) -> int:
        """Values a token keeps per layer: the latent and the rope key, no separate V."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class LinearAttention:
    """Gated DeltaNet layers (Qwen3-Next): a short causal convolution and a recurrent state
    per sequence instead of a KV cache (see linear_attention.py)."""

    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int
    layers: tuple[bool, ...]  # per layer: True where the layer is linear attention
    # Qwen3.5: in_proj_qkv/z/b/a, q|k|v laid out whole; Qwen3-Next: in_proj_qkvz/ba grouped
    # by key head.
    split_projections: bool = False

    @property
    def conv_dim(self) -> int:
        """Channels of the convolution: q, k and v side by side."""
        return 2 * self.num_k_heads * self.head_k_dim + self.num_v_heads * self.head_v_dim


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
    linear: LinearAttention | None = None  # hybrid models: which layers are linear attention
    attn_output_gate: bool = False  # Qwen3-Next: q_proj also makes a sigmoid gate per head
    mla: MLA | None = None  # DeepSeek's latent attention instead of q/k/v heads
    rope_interleave: bool = False  # rope over (even, odd) pairs, as DeepSeek's checkpoints
    # Gemma 3: the rope of the sliding-window layers, where it differs from `rope` (the
    # full-attention layers' one).
    rope_local: Rope | None = None

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    def window(self, layer: int) -> int | None:
        return self.windows[layer] if self.windows else None

    def layer_rope(self, layer: int) -> Rope:
        """The rope of `layer`: `rope_local` for a sliding-window layer where it is set."""
        if self.rope_local is not None and self.window(layer) is not None:
            return self.rope_local
        return self.rope

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and (not self.moe.layers or self.moe.layers[layer])

    def is_linear_layer(self, layer: int) -> bool:
        return self.linear is not None and self.linear.layers[layer]


def _rope(config: Mapping[str, Any], head_dim: int, layer_type: str | None = None) -> Rope:
    """transformers 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`.
    Per-layer-type parameters (Gemma 3) are read for `layer_type` where the reader asks."""
    params = dict(config.get("rope_parameters") or {})
    if params and all(isinstance(v, Mapping) for v in params.values()):
        if layer_type is None or layer_type not in params:
            raise UnsupportedModel("per-layer-type rope parameters are not supported natively")
        params = dict(params[layer_type])
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


def _gemma(config: Mapping[str, Any]) -> dict[str, Any]:
    """What Gemma 2 and 3 share beyond the common fields: (1 + w) and sandwich norms, scaled
    embeddings, the `query_pre_attn_scalar` scale and (Gemma 2's) soft-caps."""
    return dict(
        norm_plus_one=True,
        sandwich_norm=True,
        embed_scale=config["hidden_size"] ** 0.5,
        attn_scale=config.get("query_pre_attn_scalar", 256) ** -0.5,
        attn_softcap=config.get("attn_logit_softcapping"),
        final_softcap=config.get("final_logit_softcapping"),
    )


def gemma2(config: Mapping[str, Any]) -> Arch:
    return Arch(**_common(config, "gemma2"), **_gemma(config))


def gemma3(config: Mapping[str, Any]) -> Arch:
    """Gemma 3's text model: Gemma 2's decoder with q/k norms, no soft-capping, five local
    (sliding-window) layers to one global, each kind with its own rope."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if isinstance(config.get("rope_parameters"), Mapping) and "full_attention" in (
        config.get("rope_parameters") or {}
    ):
        global_rope = _rope(config, head_dim, "full_attention")
        local_rope = _rope(config, head_dim, "sliding_attention")
    else:  # transformers 4 configs: rope_theta (+ rope_scaling) global, rope_local_base_freq
        global_rope = _rope(config, head_dim)
        local_rope = Rope(theta=float(config.get("rope_local_base_freq", 10000.0)))
    common = _common({**config, "rope_parameters": None}, "gemma3")
    common["windows"] = _gemma3_windows(config, common["num_layers"])
    return Arch(
        **{**common, "rope": global_rope},
        rope_local=local_rope,
        qk_norm=True,
        **_gemma(config),
    )


def _gemma3_windows(config: Mapping[str, Any], layers: int) -> tuple[int | None, ...]:
    """`layer_types` where written; older configs give `sliding_window_pattern` (every Nth
    layer global)."""
    if config.get("layer_types"):
        return _layer_windows(config, layers)
    window, every = config.get("sliding_window"), config.get("sliding_window_pattern", 6)
    return tuple(None if (i + 1) % every == 0 else window for i in range(layers))


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


def _linear_attention(config: Mapping[str, Any], split: bool) -> LinearAttention:
    types = config["layer_types"]
    unknown = set(types) - {"linear_attention", "full_attention"}
    if unknown:
        raise UnsupportedModel(f"layer types {sorted(unknown)} are not implemented natively")
    return LinearAttention(
        num_k_heads=config["linear_num_key_heads"],
        num_v_heads=config["linear_num_value_heads"],
        head_k_dim=config["linear_key_head_dim"],
        head_v_dim=config["linear_value_head_dim"],
        conv_kernel=config["linear_conv_kernel_dim"],
        layers=tuple(t == "linear_attention" for t in types),
        split_projections=split,
    )


def qwen3_next(config: Mapping[str, Any]) -> Arch:
    """Qwen3-Next: Gated DeltaNet layers and gated full attention (`layer_types`), zero-centred
    (1 + w) norms, partial rotary, experts with a shared expert."""
    base = qwen3_moe(config)
    moe = base.moe
    if moe is not None:
        shared = config.get("shared_expert_intermediate_size") or 0
        moe = replace(moe, shared_expert_size=shared)
    bias = bool(config.get("attention_bias", False))
    return replace(
        base,
        family="qwen3_next",
        qkv_bias=bias,
        o_bias=bias,
        norm_plus_one=True,
        moe=moe,
        linear=_linear_attention(config, split=False),
        attn_output_gate=True,
    )


def qwen3_5(config: Mapping[str, Any]) -> Arch:
    """Qwen3.5's text model: Qwen3-Next's layers with plain projections and a dense MLP. Its
    multimodal rope (M-RoPE) is plain rope for text, whose three positions are equal."""
    bias = bool(config.get("attention_bias", False))
    common = _common(config, "qwen3_5")
    # transformers' Qwen3.5 interleaves its M-RoPE axes whatever `mrope_interleaved` says.
    common["rope"] = replace(common["rope"], mrope_interleaved=True)
    return Arch(
        **common,
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=True,
        norm_plus_one=True,
        linear=_linear_attention(config, split=True),
        attn_output_gate=True,
    )


def qwen3_5_moe(config: Mapping[str, Any]) -> Arch:
    """Qwen3.5-MoE's text model: every layer's MLP is experts (renormalised) + a shared one."""
    moe = MoE(
        num_experts=config["num_experts"],
        top_k=config["num_experts_per_tok"],
        intermediate_size=config["moe_intermediate_size"],
        renormalize=True,
        shared_expert_size=config.get("shared_expert_intermediate_size") or 0,
    )
    return replace(qwen3_5(config), family="qwen3_5_moe", moe=moe)


def _mla(config: Mapping[str, Any]) -> MLA:
    return MLA(
        q_lora_rank=config.get("q_lora_rank"),
        kv_lora_rank=config["kv_lora_rank"],
        qk_nope_head_dim=config["qk_nope_head_dim"],
        qk_rope_head_dim=config["qk_rope_head_dim"],
        v_head_dim=config["v_head_dim"],
    )


def mla_softmax_scale(mla: MLA, rope: Rope) -> float:
    """DeepSeek's softmax scale: qk_head_dim ** -0.5, times YaRN's mscale squared where the rope
    is scaled and `mscale_all_dim` is set (transformers' `yarn_apply_mscale`): the whole q.k is
    rescaled, not only the rotary part. The yarn frequencies themselves are rope.py's."""
    scale = mla.qk_head_dim**-0.5
    all_dim = rope.params.get("mscale_all_dim") or 0
    factor = float(rope.params.get("factor") or 1.0)
    if rope.kind != "default" and all_dim and factor > 1:
        mscale = 0.1 * all_dim * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


def _deepseek(config: Mapping[str, Any], family: str, routing: Routing, renormalize: bool) -> Arch:
    """DeepSeek V2 and V3: latent attention; a mixture with shared experts from layer
    `first_k_dense_replace` on (transformers 5.25's rule for both)."""
    if config.get("moe_layer_freq", 1) != 1:
        raise UnsupportedModel(
            f"moe_layer_freq={config['moe_layer_freq']}: transformers puts a mixture in every "
            "layer from first_k_dense_replace on, the native backend too; only 1 is supported"
        )
    mla = _mla(config)
    common = _common(config, family)
    rope = _rope(config, mla.qk_rope_head_dim)  # rope covers the rope part of each head only
    common.update(
        head_dim=mla.qk_head_dim,
        num_kv_heads=common["num_heads"],  # no KV heads: the cache is one latent per token
        rope=replace(rope, rotary_dim=mla.qk_rope_head_dim),
    )
    layers = config["num_hidden_layers"]
    experts = config.get("n_routed_experts")
    moe = None
    if experts:
        moe = MoE(
            num_experts=experts,
            top_k=config["num_experts_per_tok"],
            intermediate_size=config["moe_intermediate_size"],
            renormalize=renormalize,
            layers=tuple(i >= config.get("first_k_dense_replace", 0) for i in range(layers)),
            routing=routing,
            shared_intermediate_size=config["moe_intermediate_size"]
            * (config.get("n_shared_experts") or 0),
        )
        if experts % routing.num_groups or routing.topk_groups > routing.num_groups:
            raise UnsupportedModel(
                f"{experts} experts do not split into n_group={routing.num_groups} groups "
                f"of which topk_group={routing.topk_groups} are chosen"
            )
    bias = bool(config.get("attention_bias", False))
    return Arch(
        **common,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bool(config.get("mlp_bias", False)),
        attn_scale=mla_softmax_scale(mla, common["rope"]),
        moe=moe,
        mla=mla,
        rope_interleave=bool(config.get("rope_interleave", True)),
    )


def deepseek_v2(config: Mapping[str, Any]) -> Arch:
    method = config.get("topk_method") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise UnsupportedModel(f"DeepSeek-V2 topk_method {method!r} is not implemented natively")
    grouped = method == "group_limited_greedy"
    routing = Routing(
        scoring="softmax",
        method=method,
        num_groups=config.get("n_group") or 1 if grouped else 1,
        topk_groups=config.get("topk_group") or 1 if grouped else 1,
        scaling=float(config.get("routed_scaling_factor", 1.0)),
    )
    # transformers 5.25's V2 router never renormalises the chosen weights, whatever
    # norm_topk_prob says (the released V2 checkpoints set it false).
    arch = _deepseek(config, "deepseek_v2", routing, renormalize=False)
    return replace(arch, rope_interleave=True)  # V2 rotates (even, odd) pairs, as complex numbers


def deepseek_v3(config: Mapping[str, Any]) -> Arch:
    groups = config.get("n_group") or 1
    if config.get("n_routed_experts") and config["n_routed_experts"] // groups < 2:
        raise UnsupportedModel("DeepSeek-V3 ranks expert groups by their two best: need 2+ each")
    routing = Routing(
        scoring="sigmoid",
        method="noaux_tc",
        num_groups=groups,
        topk_groups=config.get("topk_group") or 1,
        scaling=float(config.get("routed_scaling_factor", 1.0)),
        score_bias=True,
    )
    return _deepseek(config, "deepseek_v3", routing, bool(config.get("norm_topk_prob", True)))


# Architecture name (config.json "architectures") -> how to read its config.
FAMILIES: dict[str, Callable[[Mapping[str, Any]], Arch]] = {
    "LlamaForCausalLM": llama,
    "MistralForCausalLM": mistral,
    "Qwen2ForCausalLM": qwen2,
    "Qwen3ForCausalLM": qwen3,
    "Phi3ForCausalLM": phi3,
    "Gemma2ForCausalLM": gemma2,
    "Gemma3ForCausalLM": gemma3,
    "MixtralForCausalLM": mixtral,
    "Qwen3MoeForCausalLM": qwen3_moe,
    "GptOssForCausalLM": gpt_oss,
    "Qwen3NextForCausalLM": qwen3_next,
    "Qwen3_5ForCausalLM": qwen3_5,
    "Qwen3_5MoeForCausalLM": qwen3_5_moe,
    "DeepseekV2ForCausalLM": deepseek_v2,
    "DeepseekV3ForCausalLM": deepseek_v3,  # also Kimi-K2's architecture
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
    from .families import family_of, native_families, reader_of

    family = family_of(architecture)
    if family is None:
        raise UnsupportedModel(
            f"no native implementation of {architecture} (native: "
            f"{', '.join(sorted(native_families()))}; a plugin adds one with the "
            "register_model_families hook)"
        )
    try:
        arch = reader_of(family)(config)
    except KeyError as e:
        raise UnsupportedModel(f"config.json has no {e.args[0]!r}") from None
    qc = config.get("quantization_config")
    mxfp4 = isinstance(qc, Mapping) and str(qc.get("quant_method") or "").lower() == "mxfp4"
    if mxfp4 and arch.family != "gpt_oss":
        raise UnsupportedModel("MXFP4 weights are read natively for gpt-oss's experts only")
    if arch.act not in SUPPORTED_ACTS:
        raise UnsupportedModel(f"activation {arch.act!r} is not implemented natively")
    return arch
