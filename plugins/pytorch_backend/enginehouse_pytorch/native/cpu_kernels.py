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
#include <cstdint>
#include <cstring>
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

// An fp8 (e4m3) cache's element (kv_quant.py stores the bits as uint8). Widening: the 7 bits
// below the sign shifted to float32's exponent/mantissa boundary are the value times 2^-120
// (exponent bias 7 against 127; e4m3's subnormals land on float32's subnormals, exactly), so
// one shift, one multiply by 2^120 and the sign bit. The NaN pattern (0x7f) reads as 480:
// stores clamp to +-448, so it never occurs.
struct fp8e4m3 {
  uint8_t bits;
  operator float() const {
    uint32_t u = (static_cast<uint32_t>(bits & 0x7f) << 20);
    float f;
    std::memcpy(&f, &u, 4);
    f *= 1.329227995784916e36f;  // 2^120
    return (bits & 0x80) ? -f : f;
  }
};
#if defined(__AVX512F__)
static inline vec vload(const fp8e4m3* p) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i mag = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x7f)), 20);
  const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24);
  const vec f = _mm512_mul_ps(_mm512_castsi512_ps(mag), _mm512_set1_ps(1.329227995784916e36f));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(f), sign));
}
#elif defined(__AVX2__)
static inline vec vload(const fp8e4m3* p) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i mag = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7f)), 20);
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 24);
  const vec f = _mm256_mul_ps(_mm256_castsi256_ps(mag), _mm256_set1_ps(1.329227995784916e36f));
  return _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(f), sign));
}
#else
static inline vec vload(const fp8e4m3* p) { return static_cast<float>(*p); }
#endif

// q [B, H, D]; caches [KVH, S, D] (contiguous); tables [B, W], lens [B]: a block table and a
// context length per query row. Returns [B, H * D] float32. window <= 0: no sliding window;
// softcap <= 0: none. An int8 cache (T = int8_t) comes with float32 scales [KVH, S] per token
// and head (ksp, vsp): a key's scale multiplies its dot products, a value's its weight. An fp8
// cache's per-tensor scales are folded in by the caller. sinks: nullptr, or a logit per query
// head [H] (gpt-oss) in each softmax's denominator.
//
// Query rows are grouped into sequences: qs [NS + 1] (nullptr: every row its own sequence)
// gives each sequence's rows qs[s] .. qs[s + 1], which share the block table of their first
// row, at increasing positions (speculative decoding's verified tokens: row r sees the
// context up to its own position, lens[r]). One task per (sequence, KV head): each K and V
// vector is read once for all its rows and their G = H / KVH query heads, so verifying K + 1
// tokens reads the context once, not K + 1 times.
template <typename T>
static void paged_decode_impl(const float* qp, const T* kp, const T* vp, const int64_t* tp,
                              const int64_t* lp, float* op, int64_t B, int64_t H, int64_t D,
                              int64_t KVH, int64_t S, int64_t W, int64_t block_size, float fscale,
                              float cap, int64_t window, const float* ksp = nullptr,
                              const float* vsp = nullptr, const float* sinks = nullptr,
                              const int64_t* qs = nullptr, int64_t NS = -1) {
  if (qs == nullptr) NS = B;
  const int64_t G = H / KVH, bytes = D * static_cast<int64_t>(sizeof(T));
  at::parallel_for(0, NS * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<int64_t> slots, lo, hi;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / KVH, kh = task % KVH;
      const int64_t r0 = qs != nullptr ? qs[s] : s, Q = (qs != nullptr ? qs[s + 1] : s + 1) - r0;
      // Row r attends to positions [lo[r], hi[r]); the task reads their union [first, last).
      lo.resize(Q);
      hi.resize(Q);
      int64_t first = std::numeric_limits<int64_t>::max(), last = 0;
      for (int64_t r = 0; r < Q; ++r) {
        hi[r] = lp[r0 + r];
        lo[r] = window > 0 ? std::max<int64_t>(0, hi[r] - window) : 0;
        first = std::min(first, lo[r]);
        last = std::max(last, hi[r]);
        float* o = op + ((r0 + r) * H + kh * G) * D;
        std::fill(o, o + G * D, 0.0f);
      }
      const int64_t n = last - first;
      if (n <= 0) continue;
      scores.resize(Q * G * n);
      const T* kbase = kp + kh * S * D;
      const T* vbase = vp + kh * S * D;
      const int64_t* table = tp + r0 * W;
      // slots[t]: the cache slot of position first + t, walking the block table once.
      slots.resize(n);
      for (int64_t t = 0; t < n;) {
        const int64_t pos = first + t, off = pos % block_size;
        const int64_t base = table[pos / block_size] * block_size;
        for (int64_t o = off; o < block_size && t < n; ++o, ++t) slots[t] = base + o;
      }
      for (int64_t t = 0; t < n; ++t) {
        const T* kv = kbase + slots[t] * D;
        if (t + 8 < n) prefetch(kbase + slots[t + 8] * D, bytes);
        const float ks = ksp != nullptr ? ksp[kh * S + slots[t]] * fscale : fscale;
        for (int64_t r = 0; r < Q; ++r) {
          if (first + t < lo[r] || first + t >= hi[r]) continue;
          const float* qh = qp + ((r0 + r) * H + kh * G) * D;
          float* sr = scores.data() + r * G * n + t;
          for (int64_t g = 0; g < G; ++g) {
            float x = dot(qh + g * D, kv, D) * ks;
            if (cap > 0.0f) x = std::tanh(x / cap) * cap;
            sr[g * n] = x;
          }
        }
      }
      for (int64_t r = 0; r < Q; ++r) {
        if (hi[r] <= lo[r]) continue;
        for (int64_t g = 0; g < G; ++g) {
          float* sr = scores.data() + (r * G + g) * n + (lo[r] - first);
          if (sinks == nullptr) softmax(sr, hi[r] - lo[r]);
          else softmax(sr, hi[r] - lo[r], sinks[kh * G + g]);
        }
      }
      for (int64_t t = 0; t < n; ++t) {
        const T* vv = vbase + slots[t] * D;
        if (t + 8 < n) prefetch(vbase + slots[t + 8] * D, bytes);
        const float vs = vsp != nullptr ? vsp[kh * S + slots[t]] : 1.0f;
        for (int64_t r = 0; r < Q; ++r) {
          if (first + t < lo[r] || first + t >= hi[r]) continue;
          float* o = op + ((r0 + r) * H + kh * G) * D;
          const float* sr = scores.data() + r * G * n + t;
          for (int64_t g = 0; g < G; ++g) axpy(o + g * D, sr[g * n] * vs, vv, D);
        }
      }
    }
  });
}
"""

OP = r"""
// What the three ops share: q as float32 rows, tables and lens as int64, the optional sinks and
// query starts; `run` gets the pointers and writes out [B, H * D] float32.
struct DecodeArgs {
  at::Tensor q, tables, lens, sinks, starts, out;
  int64_t B, H, D, W, NS;
  DecodeArgs(const at::Tensor& q_, const at::Tensor& tables_, const at::Tensor& lens_,
             const c10::optional<at::Tensor>& sinks_,
             const c10::optional<at::Tensor>& starts_) {
    B = q_.size(0), H = q_.size(1), D = q_.size(2), W = tables_.size(1);
    TORCH_CHECK(tables_.size(0) == B && lens_.numel() == B,
                "paged_decode: a block table row and a context length per query row");
    q = q_.to(at::kFloat).contiguous();
    tables = tables_.to(at::kLong).contiguous();
    lens = lens_.to(at::kLong).contiguous();
    if (sinks_.has_value()) sinks = sinks_->to(at::kFloat).contiguous();
    NS = B;
    if (starts_.has_value()) {
      starts = starts_->to(at::kLong).contiguous();
      NS = starts.numel() - 1;
      const int64_t* sp = starts.data_ptr<int64_t>();
      TORCH_CHECK(NS >= 0 && sp[0] == 0 && sp[NS] == B,
                  "paged_decode: query_starts [sequences + 1] from 0 to the number of rows");
      for (int64_t i = 0; i < NS; ++i)
        TORCH_CHECK(sp[i] <= sp[i + 1], "paged_decode: query_starts must not decrease");
    }
    out = at::empty({B, H * D}, q.options());
  }
  const float* sinks_ptr() const { return sinks.defined() ? sinks.data_ptr<float>() : nullptr; }
  const int64_t* starts_ptr() const {
    return starts.defined() ? starts.data_ptr<int64_t>() : nullptr;
  }
  template <typename T>
  at::Tensor run(const at::Tensor& k, const at::Tensor& v, int64_t block_size, double scale,
                 double softcap, int64_t window, const at::Tensor& q_in,
                 const float* ksp = nullptr, const float* vsp = nullptr) {
    TORCH_CHECK(k.is_contiguous() && v.is_contiguous(), "paged_decode: contiguous caches");
    paged_decode_impl(q.data_ptr<float>(), reinterpret_cast<const T*>(k.data_ptr()),
                      reinterpret_cast<const T*>(v.data_ptr()), tables.data_ptr<int64_t>(),
                      lens.data_ptr<int64_t>(), out.data_ptr<float>(), B, H, D, k.size(0),
                      k.size(1), W, block_size, static_cast<float>(scale),
                      static_cast<float>(softcap), window, ksp, vsp, sinks_ptr(), starts_ptr(),
                      NS);
    return q_in.scalar_type() == at::kFloat ? out : out.to(q_in.scalar_type());
  }
};

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& tables, const at::Tensor& lens, int64_t block_size,
                        double scale, double softcap, int64_t window,
                        const c10::optional<at::Tensor>& sinks,
                        const c10::optional<at::Tensor>& query_starts) {
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "paged_decode: cache dtypes");
  DecodeArgs a(q, tables, lens, sinks, query_starts);
  if (k_cache.scalar_type() == at::kBFloat16)
    return a.run<at::BFloat16>(k_cache, v_cache, block_size, scale, softcap, window, q);
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat, "paged_decode: float32 or bfloat16 caches");
  return a.run<float>(k_cache, v_cache, block_size, scale, softcap, window, q);
}

// An int8 cache [KVH, S, D] with its float32 scales [KVH, S] (kv_quant.py).
at::Tensor paged_decode_int8(const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& k_scales,
                             const at::Tensor& v_scales, const at::Tensor& tables,
                             const at::Tensor& lens, int64_t block_size, double scale,
                             double softcap, int64_t window,
                             const c10::optional<at::Tensor>& sinks,
                             const c10::optional<at::Tensor>& query_starts) {
  TORCH_CHECK(k_cache.scalar_type() == at::kChar && v_cache.scalar_type() == at::kChar,
              "paged_decode_int8: int8 caches");
  TORCH_CHECK(k_scales.is_contiguous() && v_scales.is_contiguous() &&
                  k_scales.scalar_type() == at::kFloat && v_scales.scalar_type() == at::kFloat,
              "paged_decode_int8: float32 scales [kv_heads, slots]");
  DecodeArgs a(q, tables, lens, sinks, query_starts);
  return a.run<int8_t>(k_cache, v_cache, block_size, scale, softcap, window, q,
                       k_scales.data_ptr<float>(), v_scales.data_ptr<float>());
}

// An fp8 (e4m3) cache [KVH, S, D] held as uint8, with one float32 scale for the keys and one
// for the values (kv_quant.py): the key scale joins the softmax scale, the value scale
// multiplies the output (each row's weights sum to at most one over the same values).
at::Tensor paged_decode_fp8(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& k_scale,
                            const at::Tensor& v_scale, const at::Tensor& tables,
                            const at::Tensor& lens, int64_t block_size, double scale,
                            double softcap, int64_t window,
                            const c10::optional<at::Tensor>& sinks,
                            const c10::optional<at::Tensor>& query_starts) {
  TORCH_CHECK(k_cache.scalar_type() == at::kByte && v_cache.scalar_type() == at::kByte,
              "paged_decode_fp8: e4m3 bits held as uint8 caches");
  TORCH_CHECK(k_scale.numel() == 1 && v_scale.numel() == 1,
              "paged_decode_fp8: one scale for the keys, one for the values");
  const double ks = k_scale.item<double>(), vs = v_scale.item<double>();
  DecodeArgs a(q, tables, lens, sinks, query_starts);
  // softcap applies to the scaled score, so the key scale must come before it: fold it in.
  at::Tensor out = a.run<fp8e4m3>(k_cache, v_cache, block_size, scale * ks, softcap, window,
                                  a.q);
  out.mul_(static_cast<float>(vs));
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

TORCH_LIBRARY(enginehouse_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor tables, Tensor lens, "
        "int block_size, float scale, float softcap, int window, Tensor? sinks=None, "
        "Tensor? query_starts=None) -> Tensor");
  m.impl("paged_decode", c10::DispatchKey::CPU, &paged_decode);
  m.def("paged_decode_int8(Tensor q, Tensor k_cache, Tensor v_cache, Tensor k_scales, "
        "Tensor v_scales, Tensor tables, Tensor lens, int block_size, float scale, "
        "float softcap, int window, Tensor? sinks=None, Tensor? query_starts=None) -> Tensor");
  m.impl("paged_decode_int8", c10::DispatchKey::CPU, &paged_decode_int8);
  m.def("paged_decode_fp8(Tensor q, Tensor k_cache, Tensor v_cache, Tensor k_scale, "
        "Tensor v_scale, Tensor tables, Tensor lens, int block_size, float scale, "
        "float softcap, int window, Tensor? sinks=None, Tensor? query_starts=None) -> Tensor");
  m.impl("paged_decode_fp8", c10::DispatchKey::CPU, &paged_decode_fp8);
}
"""
SOURCE = KERNEL + OP


@functools.cache
def load(flags: tuple[str, ...] = ()) -> bool:
    """Build (or find already built) and register the kernel; False where that fails.
    `flags`: extra compiler flags (tests build the AVX2 variant with `-mno-avx512f`)."""
    what = "CPU attention kernel"
    built = cpu_build.build("enginehouse_cpu_kernels", SOURCE, what, extra_flags=flags)
    return built and hasattr(torch.ops.enginehouse_cpu, "paged_decode")


class CpuPagedAttention(TorchAttention):
    """`TorchAttention` whose decode reads the paged cache in place (float32 or bfloat16).
    A speculative step's verify rows of one sequence (`StepMeta.query_starts`) are read
    together: the sequence's K/V once for all its rows."""

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
            meta.query_starts,
        )


class CpuInt8Attention(QuantizedAttention):
    """An int8 KV cache on the CPU: the store quantizes in torch ops (kv_quant.py), the decode
    is the C++ paged kernel reading the int8 values and their scales in place."""

    reads_tables = True  # the runner builds block tables for it, not gathers

    def decode(self, meta: StepMeta, q, cache, window, softcap) -> torch.Tensor:
        op = torch.ops.enginehouse_cpu
        kernel = op.paged_decode_int8 if self.kind == "int8" else op.paged_decode_fp8
        return kernel(
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
            self.sinks,
            meta.query_starts,
        )


class CpuFp8Attention(CpuInt8Attention):
    """An fp8 (e4m3) KV cache on the CPU: the C++ paged kernel widens e4m3 to float32 as it
    reads (bit arithmetic, no table), with the per-tensor key and value scales."""

    kind = "fp8"


def quantized_attention(kind: str) -> type[QuantizedAttention]:
    """The C++ kernel's attention for an "int8" or "fp8" KV cache."""
    return {"int8": CpuInt8Attention, "fp8": CpuFp8Attention}[kind]
