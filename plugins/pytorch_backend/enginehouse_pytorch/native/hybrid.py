"""What a hybrid model's cache is made of, in words and bytes (torch-free: the probe reads it).

A hybrid model (Qwen3-Next) has two layer groups: full-attention layers with paged KV, whose
memory grows with the context, and linear-attention layers with one fixed-size state slot per
sequence (`state_pool.py`).
"""

from __future__ import annotations

from .arch import Arch, LinearAttention

NO_PREFIX_CACHING = (
    "prefix caching is off: a linear-attention state sums the whole prefix and is kept only "
    "at a sequence's current position, so cached KV blocks would have no state to resume from"
)
TORCH_PATH = "torch ops (the C++ CPU decode kernels do not implement linear attention)"


def state_bytes_per_sequence(linear: LinearAttention, itemsize: int) -> int:
    """One sequence's slot: the conv state in the model's dtype (`itemsize` bytes), the
    recurrent state in float32 (it accumulates over the whole sequence), every linear layer."""
    conv = linear.conv_dim * (linear.conv_kernel - 1) * itemsize
    recurrent = linear.num_v_heads * linear.head_k_dim * linear.head_v_dim * 4
    return sum(linear.layers) * (conv + recurrent)


def describe(arch: Arch, itemsize: int, max_seqs: int) -> str:
    """The layer groups with their memory (states for `max_seqs` sequences), and why prefix
    caching is off."""
    from enginehouse.plugin_api import format_size

    linear = arch.linear
    assert linear is not None
    num_linear = sum(linear.layers)
    num_full = arch.num_layers - num_linear
    per_token = 2 * num_full * arch.num_kv_heads * arch.head_dim * itemsize
    state = state_bytes_per_sequence(linear, itemsize)
    return (
        f"layer groups: {_layers(num_linear, 'linear-attention')} (Gated DeltaNet, a state "
        f"slot of {format_size(state)} per sequence: {format_size(state * max_seqs)} for "
        f"max_batch_size={max_seqs}, taken from the KV budget) and "
        f"{_layers(num_full, 'full-attention')} (paged KV, {format_size(per_token)} per token); "
        f"{NO_PREFIX_CACHING}; {TORCH_PATH}"
    )


def _layers(n: int, kind: str) -> str:
    return f"{n} {kind} layer" + ("" if n == 1 else "s")
