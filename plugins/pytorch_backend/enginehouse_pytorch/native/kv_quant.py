"""A quantized KV cache (`EngineConfig(kv_cache_dtype=...)`, vLLM's `--kv-cache-dtype`).

- "int8": each token's key (and value) of each KV head is stored as int8 with its own float32
  scale (absmax / 127), LMDeploy's `quant_policy=8`. One element takes 1 byte plus 4 bytes of
  scale per head_dim elements: for head_dim 128, 132 bytes a head instead of 256 (bfloat16)
  or 512 (float32).
- "fp8": float8 e4m3 with one scale per layer's keys and one per its values (per-tensor
  scales), taken from the first keys and values the layer stores (their absmax / 200, the
  headroom vLLM's `calculate_kv_scales` leaves); later values beyond e4m3's range (+-448 times
  the scale) are clamped. A scale of 1.0, vLLM's default without calibrated scales, lost too
  much on small-valued keys (measured: docs/quantization.md).

The K/V of the tokens computed in a step are attended in full precision by that step's
prefill; every read of the cache (decodes, later chunks of a prompt) dequantizes what it
reads. `QuantizedAttention` is the torch path (it dequantizes what it gathers); the decodes
read the quantized cache in place where a kernel can: the C++ paged kernel on the CPU (int8
and fp8, `cpu_kernels.CpuInt8Attention` / `CpuFp8Attention`), Triton's on CUDA (int8 and fp8,
`TritonInt8Attention`, `TritonFp8Attention`). The fused CPU ops, the one-call decode step and
CUDA graphs write a float cache only: a quantized cache runs the per-op path (native_runner
picks the attention).
"""

from __future__ import annotations

import torch

from .attention import TorchAttention

KV_CACHE_DTYPES = ("auto", "int8", "fp8")
INT8_MAX = 127.0
FP8_MAX = 448.0  # e4m3's largest finite value
FP8_CALIBRATION = 200.0  # the first values' absmax maps here: headroom for later ones


def head_bytes(kind: str, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one token's key (or value) of one KV head takes in the cache."""
    if kind == "int8":
        return head_dim + 4  # the int8 elements and a float32 scale
    if kind == "fp8":
        return head_dim  # the per-tensor scales are a few bytes per layer
    return head_dim * dtype.itemsize


def storage_dtype(kind: str, dtype: torch.dtype) -> torch.dtype:
    """What the cache tensor holds: fp8 bits live in uint8 (CPU gathers and copies of uint8
    are implemented everywhere; they are viewed as float8 to convert)."""
    return {"int8": torch.int8, "fp8": torch.uint8}.get(kind, dtype)


def scales_shape(kind: str, layers: int, kv_heads: int, slots: int) -> tuple[int, ...]:
    """int8: a scale per layer, K/V, head and slot; fp8: one per layer and K/V."""
    return (layers, 2, kv_heads, slots) if kind == "int8" else (layers, 2)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[tokens, heads, d] -> int8 values and [tokens, heads] float32 scales."""
    amax = x.float().abs().amax(dim=-1)
    scale = (amax / INT8_MAX).clamp(min=1e-12)
    q = (x.float() / scale[..., None]).round_().clamp_(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[tokens, heads, d] -> float8 e4m3 bits (uint8) at the per-tensor `scale`, which the
    first call sets (0 until then: no host sync, a tensor op decides)."""
    first = (x.float().abs().amax() / FP8_CALIBRATION).clamp(min=1e-12)
    scale.copy_(torch.where(scale > 0, scale, first))
    q = (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn).view(torch.uint8)


class QuantizedAttention(TorchAttention):
    """`TorchAttention` over an int8 or fp8 cache: a layer's cache is (keys, values,
    key scales, value scales)."""

    kind = "int8"

    def store(self, cache, k, v, slots) -> None:
        for i, x in enumerate((k, v)):
            if self.kind == "int8":
                q, scale = quantize_int8(x)
                cache[2 + i].index_copy_(1, slots, scale.transpose(0, 1))
            else:
                q = quantize_fp8(x, cache[2 + i])
            cache[i].index_copy_(1, slots, q.transpose(0, 1))

    def keys_values(self, cache, index: torch.Tensor, dtype: torch.dtype):
        return tuple(self._dequantized(cache, i, index, dtype) for i in (0, 1))

    def _dequantized(self, cache, i: int, index: torch.Tensor, dtype: torch.dtype):
        rows = cache[i].view(-1, self.d).index_select(0, index)
        if self.kind == "int8":
            scale = cache[2 + i].view(-1).index_select(0, index)
            return (rows.float() * scale[:, None]).to(dtype)
        return (rows.view(torch.float8_e4m3fn).float() * cache[2 + i]).to(dtype)


class Fp8Attention(QuantizedAttention):
    kind = "fp8"


def attention_for(kind: str) -> type[TorchAttention]:
    return {"int8": QuantizedAttention, "fp8": Fp8Attention}[kind]
