"""A C++ paged decode-attention kernel for the CPU, compiled on first use.

The torch-ops path gathers every decode row's K/V out of the paged cache into a padded copy,
then runs two batched matrix products: the cache is read, written and read again. This kernel
walks each row's block table and reads each K/V vector once, in place, one (sequence, KV head)
per task across the cores (`at::parallel_for`), with the softmax in between. It is built with
torch's own C++ extension machinery (a compiler and ninja; about 45 s on 2 cores, once per
instruction set, see `cpu_build`). Where that is not possible, or with
ENGINEHOUSE_CPU_KERNELS=0, the runner keeps the torch-ops path; both compute the same thing.
"""

from __future__ import annotations

import functools

import torch

from . import cpu_build
from .attention import StepMeta, TorchAttention

# The kernel itself; `cpu_decode` compiles it too, into its whole decode step.
KERNEL = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

// The two inner loops, with AVX2 + FMA where the compiler targets them (-march=native).
static inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.0f;
#ifdef __AVX2__
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8)
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  half = _mm_hadd_ps(half, half);
  half = _mm_hadd_ps(half, half);
  s = _mm_cvtss_f32(half);
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Ask for a K/V vector a few positions ahead: their slots jump between blocks, and waiting on
// each cache line in turn (not the arithmetic) was what bounded this loop.
static inline void prefetch(const float* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(p + i);
}

static inline void axpy(float* y, float a, const float* x, int64_t n) {  // y += a * x
  int64_t i = 0;
#ifdef __AVX2__
  const __m256 va = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * x[i];
}

// A K/V vector as float32: in place for a float32 cache, converted into `buf` for bfloat16.
static inline const float* as_float(const float* p, int64_t, float*) { return p; }
static inline const float* as_float(const at::BFloat16* p, int64_t n, float* buf) {
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
  return buf;
}

// q [B, H, D]; caches [KVH, S, D] (float32 or bfloat16, contiguous); tables [B, W], lens [B].
// Returns [B, H * D] in q's dtype; the arithmetic is float32. window <= 0: no sliding window;
// softcap <= 0: none.
template <typename T>
static void paged_decode_impl(const float* qp, const T* kp, const T* vp, const int64_t* tp,
                              const int64_t* lp, float* op, int64_t B, int64_t H, int64_t D,
                              int64_t KVH, int64_t S, int64_t W, int64_t block_size, float fscale,
                              float cap, int64_t window) {
  const int64_t G = H / KVH;
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, buf(D);
    std::vector<int64_t> slots;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KVH, kh = task % KVH, len = lp[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      float* o = op + (b * H + kh * G) * D;
      std::fill(o, o + G * D, 0.0f);
      if (n <= 0) continue;
      scores.assign(G * n, 0.0f);
      const float* qh = qp + (b * H + kh * G) * D;
      const T* kbase = kp + kh * S * D;
      const T* vbase = vp + kh * S * D;
      // slots[t]: the cache slot of position first + t, walking the block table once.
      slots.resize(n);
      for (int64_t t = 0; t < n;) {
        const int64_t pos = first + t, off = pos % block_size;
        const int64_t base = tp[b * W + pos / block_size] * block_size;
        for (int64_t o = off; o < block_size && t < n; ++o, ++t) slots[t] = base + o;
      }
      const int64_t lines = D * static_cast<int64_t>(sizeof(T)) / 4;  // floats' worth of bytes
      for (int64_t t = 0; t < n; ++t) {
        const float* kv = as_float(kbase + slots[t] * D, D, buf.data());
        if (t + 8 < n) prefetch(reinterpret_cast<const float*>(kbase + slots[t + 8] * D), lines);
        for (int64_t g = 0; g < G; ++g) {
          float x = dot(qh + g * D, kv, D) * fscale;
          if (cap > 0.0f) x = std::tanh(x / cap) * cap;
          scores[g * n + t] = x;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + g * n;
        const float top = *std::max_element(s, s + n);
        float sum = 0.0f;
        for (int64_t t = 0; t < n; ++t) { s[t] = std::exp(s[t] - top); sum += s[t]; }
        const float inv = 1.0f / sum;
        for (int64_t t = 0; t < n; ++t) s[t] *= inv;
      }
      for (int64_t t = 0; t < n; ++t) {
        const float* vv = as_float(vbase + slots[t] * D, D, buf.data());
        if (t + 8 < n) prefetch(reinterpret_cast<const float*>(vbase + slots[t + 8] * D), lines);
        for (int64_t g = 0; g < G; ++g) axpy(o + g * D, scores[g * n + t], vv, D);
      }
    }
  });
}
"""

OP = r"""
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& tables, const at::Tensor& lens, int64_t block_size,
                        double scale, double softcap, int64_t window) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KVH = k_cache.size(0), S = k_cache.size(1), W = tables.size(1);
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "paged_decode: cache dtypes");
  auto qc = q.to(at::kFloat).contiguous();
  auto tables64 = tables.to(at::kLong).contiguous();
  auto lens64 = lens.to(at::kLong).contiguous();
  auto out = at::empty({B, H * D}, q.options().dtype(at::kFloat));
  const float fscale = static_cast<float>(scale), cap = static_cast<float>(softcap);
  const int64_t* tp = tables64.data_ptr<int64_t>();
  const int64_t* lp = lens64.data_ptr<int64_t>();
  if (k_cache.scalar_type() == at::kBFloat16)
    paged_decode_impl(qc.data_ptr<float>(), k_cache.data_ptr<at::BFloat16>(),
                      v_cache.data_ptr<at::BFloat16>(), tp, lp, out.data_ptr<float>(), B, H, D,
                      KVH, S, W, block_size, fscale, cap, window);
  else
    paged_decode_impl(qc.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                      tp, lp, out.data_ptr<float>(), B, H, D, KVH, S, W, block_size, fscale, cap,
                      window);
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

TORCH_LIBRARY(enginehouse_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor tables, Tensor lens, "
        "int block_size, float scale, float softcap, int window) -> Tensor");
  m.impl("paged_decode", c10::DispatchKey::CPU, &paged_decode);
}
"""
SOURCE = KERNEL + OP


@functools.cache
def load() -> bool:
    """Build (or find already built) and register the kernel; False where that fails."""
    built = cpu_build.build("enginehouse_cpu_kernels", SOURCE, "CPU attention kernel")
    return built and hasattr(torch.ops.enginehouse_cpu, "paged_decode")


class CpuPagedAttention(TorchAttention):
    """`TorchAttention` whose decode reads the paged cache in place (float32 or bfloat16)."""

    def decode(self, meta: StepMeta, q, cache, window, softcap) -> torch.Tensor:
        return torch.ops.enginehouse_cpu.paged_decode(
            q,
            cache[0],
            cache[1],
            meta.block_tables,
            meta.context_lens,
            meta.block_size,
            self.scale,
            softcap or 0.0,
            window or 0,
        )
