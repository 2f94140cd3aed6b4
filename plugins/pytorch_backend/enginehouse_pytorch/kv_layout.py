"""What a transformers model keeps per token, measured instead of read from config names.

Families name their attention shape differently (`n_head`, `multi_query`, `head_dim` given or
derived, keys and values of different sizes in multi-head latent attention), so the runner
runs one short forward after loading and records what each attention layer receives and what
transformers' own cache keeps. From that come the KV bytes per token, the slot shapes of the
batched path, and, when slot attention cannot serve the model exactly, the reason why.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from enginehouse.plugin_api import BackendError

from .slot_attention import PLAIN_LAYERS, LayerKV, no_mask

PROBE_NAME = "enginehouse_probe"
PROBE_ATTRIBUTE = "_enginehouse_probe"
PROBE_TOKENS = 2
# Arguments of the attention function that slot attention honours or that change nothing at
# inference. Any other one with a value (attention sinks' `s_aux`, `softcap`, ...) changes the
# result, so the model runs unbatched rather than silently wrong.
UNDERSTOOD = {
    "dropout",
    "scaling",
    "sliding_window",
    "position_ids",
    "cache_position",
    "use_cache",
    "output_attentions",
    "output_router_logits",
}


@dataclass
class KVLayout:
    """What the runner sizes its KV budget and slots from."""

    dtype: torch.dtype
    layers: dict[int, LayerKV] = field(default_factory=dict)  # batched: by `layer_idx`
    # Per token, all layers: what the slots hold (batched) or transformers' cache keeps.
    bytes_per_token: int = 0
    state_bytes: int = 0  # fixed per sequence: recurrent layers' states (unbatched)
    unbatched_reason: str | None = None  # why slot attention cannot run the model, if it can't


@dataclass(frozen=True)
class _Call:
    layer: int | None
    key: torch.Size
    value: torch.Size
    dtype: torch.dtype
    masked: bool  # the model built its own mask or bias although asked for none
    extras: tuple[str, ...]  # arguments slot attention does not implement
    window: int | None


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[_Call] = []

    def attend(self, module, query, key, value, attention_mask, **kwargs: Any) -> torch.Tensor:
        layer = getattr(module, "layer_idx", None)
        self.calls.append(
            _Call(
                layer=layer if isinstance(layer, int) else None,
                key=key.shape,
                value=value.shape,
                dtype=key.dtype,
                masked=attention_mask is not None,
                extras=_not_implemented(kwargs),
                window=kwargs.get("sliding_window"),
            )
        )
        # Plain causal attention, so that later layers see ordinary values.
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            is_causal=query.shape[2] > 1,
            scale=kwargs.get("scaling"),
            enable_gqa=key.shape[1] != query.shape[1],
        )
        return out.transpose(1, 2).contiguous()


def _not_implemented(kwargs: dict[str, Any]) -> tuple[str, ...]:
    """The attention arguments set to something slot attention does not reproduce."""
    return tuple(
        sorted(
            name
            for name, v in kwargs.items()
            if name not in UNDERSTOOD
            and v is not None
            and v is not False
            and not (name == "is_causal" and v is True)  # slot attention is causal
        )
    )


def _probe_attention(module, query, key, value, attention_mask, **kwargs: Any):
    recorder: _Recorder = getattr(module, PROBE_ATTRIBUTE)
    return recorder.attend(module, query, key, value, attention_mask, **kwargs), None


def returned_cache(out: Any) -> Any:
    """The cache a forward pass returned (`cache` in recent transformers, before that
    `past_key_values`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def measure(model: Any) -> KVLayout:
    """Run `PROBE_TOKENS` tokens through `model` with the cache it makes for itself, recording
    each attention call (when the model takes a custom attention function)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    recorder = _Recorder()
    batched = getattr(model, "_supports_attention_backend", False)
    before = model.config._attn_implementation
    if batched:
        AttentionInterface.register(PROBE_NAME, _probe_attention)
        AttentionMaskInterface.register(PROBE_NAME, no_mask)
        for module in model.modules():
            setattr(module, PROBE_ATTRIBUTE, recorder)
        model.set_attn_implementation(PROBE_NAME)
    ids = torch.arange(PROBE_TOKENS, device=model.device).unsqueeze(0)
    try:
        with torch.inference_mode():
            cache = returned_cache(model(input_ids=ids, position_ids=ids, use_cache=True))
    finally:
        if batched:
            model.set_attn_implementation(before)
            for module in model.modules():
                delattr(module, PROBE_ATTRIBUTE)
    if not hasattr(cache, "layers"):
        raise BackendError(
            f"{type(model).__name__} cannot run on the transformers backend: its forward "
            "returns no transformers Cache (a state of its own, or no cache at all), so a "
            "sequence cannot continue one step at a time"
        )
    layout = _from_cache(cache, next(model.parameters()).dtype)
    layout.unbatched_reason = (
        f"{type(model).__name__} does not take a custom attention function"
        if not batched
        else _why_unbatched(model.config, cache, recorder.calls)
    )
    if layout.unbatched_reason is None:
        # Slots keep what attention receives, which may be larger than what transformers'
        # cache keeps (DeepSeek's latent attention caches the compressed form).
        layout.dtype = recorder.calls[0].dtype
        for c in recorder.calls:
            layout.layers[c.layer] = LayerKV(
                key=(c.key[1], c.key[3]), value=(c.value[1], c.value[3])
            )
        layout.bytes_per_token = sum(
            (k_heads * k_size + v_heads * v_size) * layout.dtype.itemsize
            for (k_heads, k_size), (v_heads, v_size) in (
                (kv.key, kv.value) for kv in layout.layers.values()
            )
        )
    return layout


def _from_cache(cache: Any, dtype: torch.dtype) -> KVLayout:
    """Bytes per token and per-sequence state of what transformers' cache kept."""
    layout = KVLayout(dtype=dtype)
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[-2]:
                layout.bytes_per_token += t.nbytes // t.shape[-2]
                layout.dtype = t.dtype
        for states in (getattr(layer, "conv_states", {}), getattr(layer, "recurrent_states", {})):
            layout.state_bytes += sum(t.nbytes for t in states.values() if t is not None)
    return layout


def _why_unbatched(config: Any, cache: Any, calls: list[_Call]) -> str | None:
    """None when slot attention computes exactly what the model's own attention does."""
    text = config.get_text_config()
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    if not kinds <= PLAIN_LAYERS:
        return f"layer types {sorted(kinds - PLAIN_LAYERS)} need their own caches"
    if not calls:
        return "no layer called the attention function"
    if any(c.layer is None for c in calls):
        return "attention modules without a layer index"
    counts = Counter(c.layer for c in calls)
    if max(counts.values()) > 1:
        return "several attention calls per layer"
    extras = sorted({e for c in calls for e in c.extras})
    if extras:
        return f"its attention takes {', '.join(extras)}, which slot attention does not implement"
    if any(c.masked for c in calls):
        return "it builds its own attention mask or bias (ALiBi or similar)"
    # Cache layer classes by name: the set differs between transformers versions.
    for i, layer in enumerate(cache.layers):
        kind = type(layer).__name__
        if kind == "DummyLayer":  # no KV of its own: an MLP-only layer, or shared KV
            if i in counts:
                return f"layer {i} attends over another layer's keys and values (shared KV)"
        elif kind not in ("DynamicLayer", "DynamicSlidingWindowLayer"):
            return f"its cache has {kind} layers (recurrent state or special KV)"
        elif i not in counts and layer.get_seq_length():
            return f"layer {i} attends without the attention function"
        elif kind == "DynamicSlidingWindowLayer" and i in counts:
            window = next(c.window for c in calls if c.layer == i)
            if not window:
                return f"layer {i} has a sliding window its attention function is not told"
    return None
