"""What a hybrid model's cache is made of, in words and bytes (torch-free: the probe reads it).

A hybrid model (Qwen3-Next, Qwen3.5) has two KV groups (`hybrid_groups`): "full" for the
full-attention layers, paged KV whose memory grows with the context, and "state" for the
linear-attention layers, one fixed-size state slot per sequence (`state_pool.py`). The engine's
block manager plans both and hands out the state slots.
"""

from __future__ import annotations

from .arch import Arch, LinearAttention

PREFIX_CACHING = (
    "prefix caching resumes only where a linear-attention state was saved: each chunk saves "
    "the state at the last block boundary it reaches, and a hit is cut back to the last "
    "cached block with a saved state"
)
NO_PREFIX_CACHING = "prefix caching is off (enable_prefix_caching=False): no states are saved"
TORCH_PATH = "torch ops (the C++ CPU decode kernels do not implement linear attention)"


def hybrid_groups(
    arch: Arch,
    linear: LinearAttention,
    kv_heads: int,
    head_bytes: int,
    itemsize: int,
    snapshots: bool,
):
    """The `KVSpec.groups` of a hybrid model: "full" for its full-attention layers (`kv_heads`
    KV heads of this rank, `head_bytes` per token's key or value of a head: quantized where
    `kv_cache_dtype` asks), "state" for its linear-attention ones (`linear`: this rank's heads,
    `itemsize`: the model dtype's), saving snapshots for prefix caching where `snapshots`."""
    from enginehouse.plugin_api import KVGroup

    full = tuple(i for i, lin in enumerate(linear.layers) if not lin)
    per_token = 2 * len(full) * kv_heads * head_bytes
    return (
        KVGroup("full", full, bytes_per_token=per_token),
        KVGroup(
            "state",
            tuple(i for i, lin in enumerate(linear.layers) if lin),
            bytes_per_seq=state_bytes_per_sequence(linear, itemsize),
            snapshots=snapshots,
        ),
    )


def state_bytes_per_sequence(linear: LinearAttention, itemsize: int) -> int:
    """One sequence's slot: the conv state in the model's dtype (`itemsize` bytes), the
    recurrent state in float32 (it accumulates over the whole sequence), every linear layer."""
    conv = linear.conv_dim * (linear.conv_kernel - 1) * itemsize
    recurrent = linear.num_v_heads * linear.head_k_dim * linear.head_v_dim * 4
    return sum(linear.layers) * (conv + recurrent)


def describe(arch: Arch, prefix_caching: bool) -> str:
    """The layer groups in words, and where prefix hits can resume."""
    linear = arch.linear
    assert linear is not None
    num_linear = sum(linear.layers)
    num_full = arch.num_layers - num_linear
    return (
        f"layer groups: {_layers(num_linear, 'linear-attention')} (Gated DeltaNet, kind "
        f"state: a slot per sequence) and {_layers(num_full, 'full-attention')} (kind full: "
        f"paged KV); {PREFIX_CACHING if prefix_caching else NO_PREFIX_CACHING}; {TORCH_PATH}"
    )


def _layers(n: int, kind: str) -> str:
    return f"{n} {kind} layer" + ("" if n == 1 else "s")
