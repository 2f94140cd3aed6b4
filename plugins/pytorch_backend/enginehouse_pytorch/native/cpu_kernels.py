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
from .kv_quant import QuantizedAttention

# The kernel itself; `cpu_decode` compiles it too, into its whole decode step.
KERNEL = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

// One vector of floats: AVX-512 (16 lanes), AVX2 (8) or plain C (1), by the compiler's target.
#if defined(__AVX512F__)
constexpr int VW = 16;
using vec = __m512;
static inline vec vzero() { return _mm512_setzero_ps(); }
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vec vload(const at::BFloat16* p) {  // bfloat16 -> float32 is a 16-bit shift
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline vec vload(const int8_t* p) {  // an int8 KV cache's values (kv_quant.py)
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
#elif defined(__AVX2__)
constexpr int VW = 8;
using vec = __m256;
static inline vec vzero() { return _mm256_setzero_ps(); }
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vec vload(const at::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline vec vload(const int8_t* p) {
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vec a) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_hadd_ps(h, h);
  h = _mm_hadd_ps(h, h);
  return _mm_cvtss_f32(h);
}
#else
constexpr int VW = 1;
using vec = float;
static inline vec vzero() { return 0.0f; }
static inline vec vload(const float* p) { return *p; }
static inline vec vload(const at::BFloat16* p) { return static_cast<float>(*p); }
static inline vec vload(const int8_t* p) { return static_cast<float>(*p); }
static inline vec vfma(vec a, vec b, vec c) { return a * b + c; }
static inline float vsum(vec a) { return a; }
#endif

#if defined(__AVX512F__)
static inline vec vbroadcast(float v) { return _mm512_set1_ps(v); }
static inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
#elif defined(__AVX2__)
static inline vec vbroadcast(float v) { return _mm256_set1_ps(v); }
static inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
#else
static inline vec vbroadcast(float v) { return v; }
static inline void vstore(float* p, vec v) { *p = v; }
#endif

#if defined(__AVX512F__)
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
static inline float vmaxall(vec a) { return _mm512_reduce_max_ps(a); }
#elif defined(__AVX2__)
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
static inline float vmaxall(vec a) {
  alignas(32) float f[8];
  _mm256_store_ps(f, a);
  return *std::max_element(f, f + 8);
}
#else
static inline vec vadd(vec a, vec b) { return a + b; }
static inline vec vmul(vec a, vec b) { return a * b; }
static inline vec vdiv(vec a, vec b) { return a / b; }
static inline vec vmax(vec a, vec b) { return std::max(a, b); }
static inline float vmaxall(vec a) { return a; }
#endif

// exp of a vector: Cephes' expf (a degree-6 polynomial on r = x - n ln2, times 2^n), within
// 2 ulp of std::exp. std::exp one value at a time was most of the softmax's and SiLU's time.
// Below -87.3 the result is 0 (as expf underflows); NaN stays NaN.
#if defined(__AVX512F__) || defined(__AVX2__)
static inline vec vexp_poly(vec x, vec* n) {
  *n = vbroadcast(1.44269504088896341f);
#if defined(__AVX512F__)
  *n = _mm512_roundscale_ps(vmul(x, *n), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  *n = _mm256_round_ps(vmul(x, *n), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
  vec r = vfma(*n, vbroadcast(-0.693359375f), x);
  r = vfma(*n, vbroadcast(2.12194440e-4f), r);
  vec p = vbroadcast(1.9875691500e-4f);
  p = vfma(p, r, vbroadcast(1.3981999507e-3f));
  p = vfma(p, r, vbroadcast(8.3334519073e-3f));
  p = vfma(p, r, vbroadcast(4.1665795894e-2f));
  p = vfma(p, r, vbroadcast(1.6666665459e-1f));
  p = vfma(p, r, vbroadcast(5.0000001201e-1f));
  return vfma(p, vmul(r, r), vadd(r, vbroadcast(1.0f)));
}
#endif
#if defined(__AVX512F__)
static inline vec vexp(vec x) {
  const vec lo = vbroadcast(-87.3365478515625f);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  // max/min return their second operand when one is NaN: NaN passes through
  x = _mm512_min_ps(vbroadcast(88.3762626647949f), _mm512_max_ps(lo, x));
  vec n;
  const vec p = vexp_poly(x, &n);
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~under), _mm512_scalef_ps(p, n));
}
#elif defined(__AVX2__)
static inline vec vexp(vec x) {
  const vec lo = vbroadcast(-87.3365478515625f);
  const vec under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(vbroadcast(88.3762626647949f), _mm256_max_ps(lo, x));
  vec n;
  const vec p = vexp_poly(x, &n);
  const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_andnot_ps(under, vmul(p, _mm256_castsi256_ps(_mm256_slli_epi32(e, 23))));
}
#else
static inline vec vexp(vec x) { return std::exp(x); }
#endif

// The inner loops over one K or V vector (float32 or bfloat16), float32 arithmetic.
template <typename T>
static inline float dot(const float* a, const T* b, int64_t n) {
  int64_t i = 0;
  vec acc = vzero();
  for (; i + VW <= n; i += VW) acc = vfma(vload(a + i), vload(b + i), acc);
  float s = vsum(acc);
  for (; i < n; ++i) s += a[i] * static_cast<float>(b[i]);
  return s;
}

template <typename T>
static inline void axpy(float* y, float a, const T* x, int64_t n) {  // y += a * x
  int64_t i = 0;
  const vec va = vbroadcast(a);
  for (; i + VW <= n; i += VW) vstore(y + i, vfma(va, vload(x + i), vload(y + i)));
  for (; i < n; ++i) y[i] += a * static_cast<float>(x[i]);
}

// s[0 .. n) -> softmax(s), in place. `sink` (gpt-oss's attention sinks): one more logit in
// the denominator with no value; -inf (none) adds exactly zero.
static inline void softmax(float* s, int64_t n,
                           float sink = -std::numeric_limits<float>::infinity()) {
  int64_t i = 0;
  vec m = vbroadcast(-std::numeric_limits<float>::infinity());
  for (; i + VW <= n; i += VW) m = vmax(m, vload(s + i));
  float top = std::max(vmaxall(m), sink);
  for (; i < n; ++i) top = std::max(top, s[i]);
  const vec minus_top = vbroadcast(-top);
  vec vs = vzero();
  for (i = 0; i + VW <= n; i += VW) {
    const vec e = vexp(vadd(vload(s + i), minus_top));
    vstore(s + i, e);
    vs = vadd(vs, e);
  }
  float sum = vsum(vs);
  for (; i < n; ++i) { s[i] = std::exp(s[i] - top); sum += s[i]; }
  sum += std::exp(sink - top);
  const float inv = 1.0f / sum;
  for (i = 0; i + VW <= n; i += VW) vstore(s + i, vmul(vload(s + i), vbroadcast(inv)));
  for (; i < n; ++i) s[i] *= inv;
}

// Ask for a K/V vector a few positions ahead: their slots jump between blocks, and waiting on
// each cache line in turn (not the arithmetic) was what bounded this loop.
static inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(static_cast<const char*>(p) + i);
}

// q [B, H, D]; caches [KVH, S, D] (float32 or bfloat16, contiguous); tables [B, W], lens [B].
// Returns [B, H * D] in q's dtype; the arithmetic is float32. window <= 0: no sliding window;
// softcap <= 0: none. One task per (sequence, KV head): its G = H / KVH query heads share each
// K and V vector, read once. An int8 cache (T = int8_t) comes with float32 scales [KVH, S] per
// token and head (ksp, vsp): a key's scale multiplies its dot products, a value's its weight.
// sinks: nullptr, or a logit per query head [H] (gpt-oss) in each softmax's denominator.
template <typename T>
static void paged_decode_impl(const float* qp, const T* kp, const T* vp, const int64_t* tp,
                              const int64_t* lp, float* op, int64_t B, int64_t H, int64_t D,
                              int64_t KVH, int64_t S, int64_t W, int64_t block_size, float fscale,
                              float cap, int64_t window, const float* ksp = nullptr,
                              const float* vsp = nullptr, const float* sinks = nullptr) {
  const int64_t G = H / KVH, bytes = D * static_cast<int64_t>(sizeof(T));
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<int64_t> slots;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KVH, kh = task % KVH, len = lp[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      float* o = op + (b * H + kh * G) * D;
      std::fill(o, o + G * D, 0.0f);
      if (n <= 0) continue;
      scores.resize(G * n);
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
      for (int64_t t = 0; t < n; ++t) {
        const T* kv = kbase + slots[t] * D;
        if (t + 8 < n) prefetch(kbase + slots[t + 8] * D, bytes);
        const float ks = ksp != nullptr ? ksp[kh * S + slots[t]] * fscale : fscale;
        for (int64_t g = 0; g < G; ++g) {
          float x = dot(qh + g * D, kv, D) * ks;
          if (cap > 0.0f) x = std::tanh(x / cap) * cap;
          scores[g * n + t] = x;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        if (sinks == nullptr) softmax(scores.data() + g * n, n);
        else softmax(scores.data() + g * n, n, sinks[kh * G + g]);
      }
      for (int64_t t = 0; t < n; ++t) {
        const T* vv = vbase + slots[t] * D;
        if (t + 8 < n) prefetch(vbase + slots[t + 8] * D, bytes);
        const float vs = vsp != nullptr ? vsp[kh * S + slots[t]] : 1.0f;
        for (int64_t g = 0; g < G; ++g) axpy(o + g * D, scores[g * n + t] * vs, vv, D);
      }
    }
  });
}
"""

OP = r"""
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& tables, const at::Tensor& lens, int64_t block_size,
                        double scale, double softcap, int64_t window,
                        const c10::optional<at::Tensor>& sinks) {
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
  at::Tensor sinks32;
  if (sinks.has_value()) sinks32 = sinks->to(at::kFloat).contiguous();
  const float* sp = sinks.has_value() ? sinks32.data_ptr<float>() : nullptr;
  if (k_cache.scalar_type() == at::kBFloat16)
    paged_decode_impl(qc.data_ptr<float>(), k_cache.data_ptr<at::BFloat16>(),
                      v_cache.data_ptr<at::BFloat16>(), tp, lp, out.data_ptr<float>(), B, H, D,
                      KVH, S, W, block_size, fscale, cap, window, nullptr, nullptr, sp);
  else
    paged_decode_impl(qc.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                      tp, lp, out.data_ptr<float>(), B, H, D, KVH, S, W, block_size, fscale, cap,
                      window, nullptr, nullptr, sp);
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

// An int8 cache [KVH, S, D] with its float32 scales [KVH, S] (kv_quant.py).
at::Tensor paged_decode_int8(const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& k_scales,
                             const at::Tensor& v_scales, const at::Tensor& tables,
                             const at::Tensor& lens, int64_t block_size, double scale,
                             double softcap, int64_t window) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KVH = k_cache.size(0), S = k_cache.size(1), W = tables.size(1);
  TORCH_CHECK(k_cache.scalar_type() == at::kChar && v_cache.scalar_type() == at::kChar,
              "paged_decode_int8: int8 caches");
  TORCH_CHECK(k_scales.is_contiguous() && v_scales.is_contiguous(), "paged_decode_int8: scales");
  auto qc = q.to(at::kFloat).contiguous();
  auto tables64 = tables.to(at::kLong).contiguous();
  auto lens64 = lens.to(at::kLong).contiguous();
  auto out = at::empty({B, H * D}, q.options().dtype(at::kFloat));
  paged_decode_impl(qc.data_ptr<float>(), k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(),
                    tables64.data_ptr<int64_t>(), lens64.data_ptr<int64_t>(),
                    out.data_ptr<float>(), B, H, D, KVH, S, W, block_size,
                    static_cast<float>(scale), static_cast<float>(softcap), window,
                    k_scales.data_ptr<float>(), v_scales.data_ptr<float>());
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

TORCH_LIBRARY(enginehouse_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor tables, Tensor lens, "
        "int block_size, float scale, float softcap, int window, Tensor? sinks=None) -> Tensor");
  m.impl("paged_decode", c10::DispatchKey::CPU, &paged_decode);
  m.def("paged_decode_int8(Tensor q, Tensor k_cache, Tensor v_cache, Tensor k_scales, "
        "Tensor v_scales, Tensor tables, Tensor lens, int block_size, float scale, "
        "float softcap, int window) -> Tensor");
  m.impl("paged_decode_int8", c10::DispatchKey::CPU, &paged_decode_int8);
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
            self.sinks,
        )


class CpuInt8Attention(QuantizedAttention):
    """An int8 KV cache on the CPU: the store quantizes in torch ops (kv_quant.py), the decode
    is the C++ paged kernel reading the int8 values and their scales in place."""

    reads_tables = True  # the runner builds block tables for it, not gathers

    def decode(self, meta: StepMeta, q, cache, window, softcap) -> torch.Tensor:
        return torch.ops.enginehouse_cpu.paged_decode_int8(
            q,
            cache[0],
            cache[1],
            cache[2],
            cache[3],
            meta.block_tables,
            meta.context_lens,
            meta.block_size,
            self.scale,
            softcap or 0.0,
            window or 0,
        )
