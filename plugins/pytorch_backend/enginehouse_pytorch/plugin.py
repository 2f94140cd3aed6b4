"""Hooks of the pytorch plugin: the `transformers` backend, and the native `pytorch` one."""

from __future__ import annotations

from enginehouse import BackendProbe, EngineConfig, ModelSpec, hookimpl
from enginehouse.plugin_api import RunnerContext, build_from_table, format_size

ENGINEHOUSE_CONTRACT = "1.0"  # the plugin contract this plugin is written for

TRANSFORMERS_PRIORITY = 10  # the universal fallback: any native backend should outrank it
NATIVE_PRIORITY = 100


# Causal LMs of transformers that keep no per-sequence transformers Cache: the runner continues
# each sequence one step at a time through the cache its forward returns, so these cannot run.
NO_KV_CACHE = {
    "rwkv": "RWKV keeps its recurrent state in a `state` argument, not a transformers Cache",
    "xlnet": "XLNet carries memories (`mems`), not a transformers Cache",
    "reformer": "Reformer caches LSH buckets (`past_buckets_states`), not a transformers Cache",
    "openai-gpt": "GPT-1 has no KV cache in transformers",
    "recurrent_gemma": "RecurrentGemma keeps its recurrent state in its modules, not in a Cache",
    "gemma4_assistant": "a draft model that reads its target model's KV (`shared_kv_states`)",
    "gemma4_unified_assistant": (
        "a draft model that reads its target model's KV (`shared_kv_states`)"
    ),
}


def _causal_lm_classes() -> set[str]:
    # The name table only, not the model code: cheap next to loading any model.
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def probe_transformers(spec: ModelSpec, config: EngineConfig) -> BackendProbe:
    def verdict(supported: bool, reason: str) -> BackendProbe:
        return BackendProbe("transformers", supported, TRANSFORMERS_PRIORITY, reason)

    if not spec.weight_files:
        return verdict(False, f"no weight files (*.safetensors, *.bin) in {spec.path}")
    problem = transformers_quantization(spec, config)
    if problem:
        return verdict(False, problem)
    if config.kv_cache_dtype != "auto":
        return verdict(
            False,
            f"kv_cache_dtype={config.kv_cache_dtype!r}: a quantized KV cache is the native "
            "pytorch backend's; the transformers runner keeps transformers' float cache",
        )
    if spec.is_vlm:
        return verdict(
            False,
            "a vision-language model: the transformers runner takes text only; the native "
            "pytorch backend runs the supported VLM families",
        )
    arch = spec.architecture
    no_cache = NO_KV_CACHE.get(spec.config.get("model_type", ""))
    if no_cache:
        return verdict(
            False,
            f"{arch} cannot run on the transformers backend, which continues each sequence "
            f"through a transformers Cache: {no_cache}",
        )
    if arch in _causal_lm_classes():
        return verdict(True, f"transformers has {arch} (AutoModelForCausalLM); slower than native")
    remote = spec.config.get("auto_map", {}).get("AutoModelForCausalLM")
    if remote:
        if config.trust_remote_code:
            return verdict(True, f"runs the model's own code ({remote}), trust_remote_code=True")
        return verdict(False, f"{arch} is code from the model's repo; pass trust_remote_code=True")
    return verdict(False, f"transformers has no causal-LM class {arch!r}")


# What transformers' quantizer of each method needs installed to load a checkpoint.
QUANTIZER_PACKAGES = {
    "gptq": ("optimum", "gptqmodel"),
    "awq": ("gptqmodel", "accelerate"),
    "compressed-tensors": ("compressed_tensors",),
    "fp8": ("accelerate",),
}


def transformers_quantization(spec: ModelSpec, config: EngineConfig) -> str | None:
    """Why the transformers backend cannot take this quantization, or None when it can."""
    import importlib.util

    if config.quantization:
        return (
            f"quantization={config.quantization!r} (at load) is done by the native pytorch "
            "backend only"
        )
    qc = spec.config.get("quantization_config")
    if not isinstance(qc, dict) or not qc:
        return None
    method = str(qc.get("quant_method") or "").lower()
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    if method not in AUTO_QUANTIZER_MAPPING:
        return f"transformers has no quantizer for quant_method {method!r}"
    missing = [p for p in QUANTIZER_PACKAGES.get(method, ()) if not importlib.util.find_spec(p)]
    if missing:
        return f"transformers loads {method} checkpoints with {', '.join(missing)}: not installed"
    if method == "fp8" and not _fp8_gpu(config):
        return (
            "transformers runs FP8 checkpoints on GPUs of compute capability 8.9+ only; "
            "elsewhere it dequantizes them to bfloat16, a different model"
        )
    return None


def _fp8_gpu(config: EngineConfig) -> bool:
    import torch

    if config.device == "cpu" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability() >= (8, 9)


def probe_native(spec: ModelSpec, config: EngineConfig) -> BackendProbe:
    # arch.py and quant/scheme.py are small, torch-free modules: cheap enough for a probe.
    from .native.arch import UnsupportedModel, arch_from_config, language_model
    from .native.draft_support import draft_refusal
    from .native.quant.scheme import check_shapes, read_scheme

    def verdict(
        supported: bool, reason: str, verifies: bool = True, lora: bool = True, drafts: str = ""
    ) -> BackendProbe:
        return BackendProbe(
            "pytorch",
            supported,
            NATIVE_PRIORITY,
            reason,
            tensor_parallel=True,
            # NativeRunner and HybridRunner declare it (speculative decoding; the hybrid one
            # keeps a state per verified position and resumes from the accepted one).
            verifies_tokens=verifies,
            lora=lora,
            # DraftingRunner (draft_runner.py): a draft head, where `drafts` gives no reason
            # against it.
            drafts_tokens=verifies and not drafts,
            draft_reason=drafts,
        )

    encoder = spec.facts.get("vision_encoder")
    if spec.is_vlm and not encoder:
        why = spec.facts.get("vision_unsupported") or (
            "no installed plugin encodes its images; pip install 'enginehouse[vision]'"
        )
        return verdict(False, f"a vision-language model: {why}")
    try:
        arch = arch_from_config(*language_model(spec.architecture, spec.config, spec.facts))
        scheme = read_scheme(spec.config, config.quantization, config.quantization_group_size)
        if scheme is not None:
            check_shapes(scheme, arch)
            if arch.linear is not None and scheme.method != "fp8":  # FP8: dequantized at load
                raise UnsupportedModel("quantized hybrid (linear-attention) models: not yet")
        sharding = tensor_parallel(arch, scheme, config)
        if config.kv_cache_dtype != "auto" and arch.mla is not None:
            raise UnsupportedModel(
                f"kv_cache_dtype={config.kv_cache_dtype!r}: the {arch.family} latent cache is "
                "kept in the model's dtype natively; use kv_cache_dtype='auto'"
            )
    except UnsupportedModel as e:
        return verdict(False, str(e))
    if not any(f.endswith(".safetensors") for f in spec.weight_files):
        return verdict(False, "the native loader reads *.safetensors only; this has none")
    window = " with sliding window" if any(arch.windows) else ""
    moe = f", {arch.moe.num_experts} experts" if arch.moe else ""
    images = f", images through the {encoder} encoder" if encoder else ""
    if spec.facts.get("image_attention") == "bidirectional":
        images += " (an image's tokens attend to each other both ways in the prefill)"
    # A hybrid model's layer groups and their memory replace the kernels' line (torch ops).
    cache = cache_kind(arch)
    if arch.linear is not None:
        cache = hybrid_line(arch, spec, config)
    return verdict(
        True,
        f"native {arch.family} implementation{window}{moe}: {cache}{images}"
        + cpu_dtypes(config)
        + f"; {weights_line(scheme, arch, spec, config)}"
        + sharding
        + kv_cache_line(arch, spec, config),
        # The hybrid runner has no LoRA (see HybridRunner.capabilities).
        lora=arch.linear is None,
        drafts=draft_refusal(arch),
    )


def cache_kind(arch) -> str:
    """The KV cache's kind, as `explain` says it."""
    if arch.mla is None:
        return "paged KV cache, fused kernels"
    heads = arch.num_heads * (arch.mla.qk_head_dim + arch.mla.v_head_dim)
    return (
        f"paged latent cache (kind mla: {arch.mla.cache_width} values per token and layer, "
        f"against {heads} for its heads' keys and values), attention in torch ops"
    )


def kv_cache_line(arch, spec: ModelSpec, config: EngineConfig) -> str:
    """The KV cache's bytes per token (this rank's, in its storage: `kv_cache_dtype`) and,
    for a model with KV groups (sliding-window layers), the plan per group."""
    from enginehouse.plugin_api import (
        RunnerContext,
        available_memory,
        resolve_device,
        resolve_dtype,
    )

    from .native import kv_cache, kv_quant

    try:
        device = resolve_device(config)
        dtype = resolve_dtype(config, spec, device)
    except RuntimeError:
        return ""
    kv_heads = max(1, arch.num_kv_heads // config.tp)
    kind = config.kv_cache_dtype
    head = kv_quant.head_bytes(kind, arch.head_dim, dtype)
    element = str(dtype).removeprefix("torch.") if kind == "auto" else kind
    scales = {"int8": ", a scale per token and head", "fp8": " e4m3, per-tensor scales"}
    every_layer = 2 * arch.num_layers * kv_heads * head  # full attention in every layer
    if arch.mla is not None:  # every head's keys and values, as multi-head attention keeps
        per_head = arch.mla.qk_head_dim + arch.mla.v_head_dim
        every_layer = arch.num_layers * arch.num_heads * per_head * dtype.itemsize
    groups, per_token = special_groups(arch, config, kv_heads, head, dtype.itemsize)
    if not groups:
        per_token = every_layer
        groups = kv_cache.kv_groups(arch, kv_heads, head)
    line = f"; KV cache {per_token} B/token ({element}{scales.get(kind, '')})"
    if not groups:
        return line
    budget = config.kv_cache_memory
    if isinstance(budget, float):  # estimated as explain's runtime plan does
        budget = int(max(0, available_memory(device) - spec.weight_bytes) * budget)
    session_len = RunnerContext.for_model(spec, config).session_len
    block_size = config.block_size or 16  # native_runner's DEFAULT_BLOCK_SIZE
    plan = kv_cache.plan_line(
        groups,
        budget,
        block_size,
        session_len,
        config.max_batch_size,
        config.max_num_batched_tokens,
        element,
        every_layer,
    )
    return f"{line}; {plan}"


def special_groups(arch, config: EngineConfig, kv_heads: int, head: int, itemsize: int):
    """The KV groups of a latent (one "mla" group) or hybrid ("full" and "state") cache, as
    their runners declare them, and the bytes per token of the paged ones; ((), 0) otherwise."""
    from enginehouse.plugin_api import KVGroup

    if arch.mla is not None:
        per_token = arch.num_layers * arch.mla.cache_width * itemsize
        return (
            KVGroup("mla", tuple(range(arch.num_layers)), bytes_per_token=per_token),
        ), per_token
    if arch.linear is not None:
        from .native.hybrid import hybrid_groups
        from .native.parallel import TensorParallel

        linear = arch.linear
        if config.tp > 1:  # each rank's heads, as the runner's TensorParallel gives them
            linear = TensorParallel(arch, 0, config.tp).linear
        caching = config.enable_prefix_caching
        groups = hybrid_groups(arch, linear, kv_heads, head, itemsize, caching)
        return groups, groups[0].bytes_per_token
    return (), 0


def tensor_parallel(arch, scheme, config: EngineConfig) -> str:
    """At tp > 1, how the model splits ('' at tp=1); `UnsupportedModel` where it cannot."""
    from .native.arch import UnsupportedModel
    from .native.parallel import check_divisible

    tp = config.tp
    if tp == 1:
        return ""
    check_divisible(arch, tp)
    if scheme is not None and scheme.method != "fp8":
        raise UnsupportedModel(
            f"quantized weights ({scheme.describe()}) are not sharded natively yet; "
            "run them at tp=1"
        )
    kv = arch.num_kv_heads
    kv_split = f"{kv // tp} KV heads" if kv >= tp else f"1 KV head (replicated on {tp // kv})"
    if arch.mla is not None:
        kv_split = "the whole latent cache"
    return (
        f"; tensor parallel over {tp} ranks: {arch.num_heads // tp} heads and {kv_split} "
        f"per rank, MLP and vocabulary split ({config.executor} executor)"
    )


def hybrid_line(arch, spec: ModelSpec, config: EngineConfig) -> str:
    """A hybrid model's layer groups and where prefix hits resume (their memory plan is
    `kv_cache_line`'s)."""
    from .native.hybrid import describe

    return describe(arch, config.enable_prefix_caching)


def weights_line(scheme, arch, spec: ModelSpec, config: EngineConfig) -> str:
    """The quantization and the memory the weights take, e.g. for `enginehouse explain`."""
    from enginehouse.plugin_api import resolve_device, resolve_dtype

    from .native.quant.scheme import weight_bytes

    try:
        device = resolve_device(config)
        dtype = resolve_dtype(config, spec, device)
    except RuntimeError:  # an absent CUDA device: the runner says so when it is built
        dtype, device = None, None
    size = 2 if dtype is not None and dtype.itemsize == 2 else 4
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    total = format_size(weight_bytes(scheme, arch, size))
    if scheme is None:
        return f"weights {total} in {name}" + mxfp4_note(arch, spec, size, name)
    plain = format_size(weight_bytes(None, arch, size))
    if scheme.method == "fp8":  # quant/fp8_float.py
        from .native.quant.fp8_float import dequantizes_all

        if why := dequantizes_all(arch, config.tp, scheme.block):
            return f"{scheme.describe()}: dequantized at load ({why}), weights {plain} in {name}"
    return f"{scheme.describe()}: weights about {total} ({name}: {plain})" + fp8_experts_note(
        scheme, arch, size, name
    )


def fp8_experts_note(scheme, arch, float_bytes: int, dtype: str) -> str:
    """For an FP8 mixture of experts: the routed experts' memory once dequantized at load
    (quant/fp8_float.py), and as stored (a byte a value and a float32 scale per block)."""
    moe = arch.moe
    if scheme.method != "fp8" or moe is None:
        return ""
    layers = sum(moe.layers) if moe.layers else arch.num_layers
    values = layers * moe.num_experts * 3 * moe.intermediate_size * arch.hidden_size
    per_scale = scheme.block[0] * scheme.block[1] if scheme.block else values
    held, stored = format_size(values * float_bytes), format_size(values + 4 * values // per_scale)
    return (
        f" besides the routed experts; FP8 experts dequantized at load: {held} in {dtype} "
        f"({stored} as FP8)"
    )


def mxfp4_note(arch, spec: ModelSpec, float_bytes: int, dtype: str) -> str:
    """For an MXFP4 checkpoint (gpt-oss): the experts' memory once dequantized at load, and
    as stored (4 bits a value and one scale byte per 32)."""
    qc = spec.config.get("quantization_config")
    if not isinstance(qc, dict) or str(qc.get("quant_method") or "").lower() != "mxfp4":
        return ""
    moe = arch.moe
    values = arch.num_layers * moe.num_experts * 3 * moe.intermediate_size * arch.hidden_size
    held, stored = format_size(values * float_bytes), format_size(values * 17 // 32)
    return f"; MXFP4 experts dequantized at load: {held} in {dtype} ({stored} as MXFP4)"


def cpu_dtypes(config: EngineConfig) -> str:
    """What a CPU run computes in, and whether this CPU makes dtype='bfloat16' worth asking."""
    if config.device.startswith("cuda"):
        return ""
    from .native.cpu_build import cpu_flags, has_bf16

    if has_bf16():
        units = "AMX" if "amx_bf16" in cpu_flags() else "AVX512-BF16"
        return (
            f"; on the CPU: float32 by default, dtype='bfloat16' runs on its bf16 units "
            f"({units}), faster but not token-exact"
        )
    return "; on the CPU: float32 (no bf16 units here: dtype='bfloat16' would be emulated)"


@hookimpl
def probe_backend(spec: ModelSpec, config: EngineConfig) -> list[BackendProbe]:
    return [probe_native(spec, config), probe_transformers(spec, config)]


RUNNERS = {
    "pytorch": "enginehouse_pytorch.draft_runner:pytorch_runner",
    "transformers": "enginehouse_pytorch.hf_runner:TransformersRunner",
}


@hookimpl
def create_runner(backend: str, spec: ModelSpec, config: EngineConfig, context: RunnerContext):
    return build_from_table(RUNNERS, backend, spec, config, context)


@hookimpl
def register_model_families() -> list:
    """The native families register through the same hook as other plugins' (arch.FAMILIES)."""
    from .native.families import own_families

    return own_families()


@hookimpl
def register_commands(cli) -> None:
    from .cli import pytorch

    cli.add_command(pytorch)
