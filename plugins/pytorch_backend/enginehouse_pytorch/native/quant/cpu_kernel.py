"""The CPU kernel of quantized projections: y = x W^T (+ b), W decoded in registers.

Weights stay in their codes (8-bit, 4-bit or FP8 e4m3) in the "panels" layout of `qweight.py`:
16 output channels per panel, each input's 16 codes side by side, so one load gives one vector
of codes. Up to three rows (decode steps): codes are decoded in registers and multiplied into
the activations, each group's sum then scaled once (plus minimum times the group's sum of x).
From four rows: chunks of up to 256 inputs are decoded once into float32 (w = code * scale +
minimum) and multiplied into tiles of rows. Activations stay float32, so the result is a float32
matmul on the exactly decoded weights (only the summation order differs from `F.linear`).

One source, three paths chosen by what the compiler targets (`-march=native`, see `cpu_build`):
AVX-512 (a panel is one 16-lane vector; 7 rows x 4 panels in registers), AVX2 + FMA + F16C (two
8-lane vectors; 6 rows x 1 panel) and plain C++. FP8 codes become half floats by bit
arithmetic (the exponent bias differs by 8, which `qweight.pack` folds into the scales), then
float32 through F16C. Work is split across cores by panels and blocks of rows (`at::parallel_for`).
"""

from __future__ import annotations

import functools

import torch

from .. import cpu_build

SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

constexpr int PW = 16;  // output channels per panel
constexpr int64_t CHUNKED_FROM = 4;  // rows from which codes are decoded once per chunk
enum Code { U8 = 0, U4 = 1, F8 = 2 };

// --- one panel's 16 floats as vectors, and code decoding, per instruction set -----------------
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define EH_PATH "avx512"
// Tiles: decode steps take one panel at a time (measured fastest), batches 7 rows x 4 panels
// (28 accumulators of the 32 registers).
constexpr int NP_DIRECT = 1, MR_BIG = 7, NP_CHUNK = 4;
struct PV { __m512 v; };
static inline PV pv_zero() { return {_mm512_setzero_ps()}; }
static inline PV pv_load(const float* p) { return {_mm512_loadu_ps(p)}; }
static inline void pv_store(float* p, PV a) { _mm512_storeu_ps(p, a.v); }
static inline PV pv_add(PV a, PV b) { return {_mm512_add_ps(a.v, b.v)}; }
static inline PV pv_scale(PV a, float s) { return {_mm512_mul_ps(a.v, _mm512_set1_ps(s))}; }
static inline PV pv_fma(PV a, PV b, PV c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
static inline PV pv_fma1(float a, PV b, PV c) {
  return {_mm512_fmadd_ps(_mm512_set1_ps(a), b.v, c.v)};
}
static inline __m128i load16(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}
static inline PV dec_u8(const uint8_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(load16(p)))};
}
static inline void dec_u4(const uint8_t* p, PV& lo, PV& hi) {
  const __m512i v = _mm512_cvtepu8_epi32(load16(p));
  lo.v = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
  hi.v = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
}
// e4m3 -> the half float with the same sign, exponent and mantissa bits (2^-8 of its value).
static inline __m256i f8_half_bits(__m256i h) {
  const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi16(0x80)), 8);
  const __m256i rest = _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi16(0x7F)), 7);
  return _mm256_or_si256(sign, rest);
}
static inline PV dec_f8(const uint8_t* p) {
  return {_mm512_cvtph_ps(f8_half_bits(_mm256_cvtepu8_epi16(load16(p))))};
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define EH_PATH "avx2"
constexpr int NP_DIRECT = 1, MR_BIG = 6, NP_CHUNK = 1;  // 12 accumulators of 16 registers
struct PV { __m256 a, b; };
static inline PV pv_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline PV pv_load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline void pv_store(float* p, PV x) {
  _mm256_storeu_ps(p, x.a);
  _mm256_storeu_ps(p + 8, x.b);
}
static inline PV pv_add(PV x, PV y) { return {_mm256_add_ps(x.a, y.a), _mm256_add_ps(x.b, y.b)}; }
static inline PV pv_scale(PV x, float s) {
  const __m256 v = _mm256_set1_ps(s);
  return {_mm256_mul_ps(x.a, v), _mm256_mul_ps(x.b, v)};
}
static inline PV pv_fma(PV x, PV y, PV z) {
  return {_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)};
}
static inline PV pv_fma1(float s, PV y, PV z) {
  const __m256 v = _mm256_set1_ps(s);
  return {_mm256_fmadd_ps(v, y.a, z.a), _mm256_fmadd_ps(v, y.b, z.b)};
}
static inline __m128i load16(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}
static inline __m256 u8x8(__m128i q) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q)); }
static inline PV dec_u8(const uint8_t* p) {
  const __m128i q = load16(p);
  return {u8x8(q), u8x8(_mm_srli_si128(q, 8))};
}
static inline void dec_u4(const uint8_t* p, PV& lo, PV& hi) {
  const __m128i q = load16(p);
  const __m256i m = _mm256_set1_epi32(15);
  const __m256i a = _mm256_cvtepu8_epi32(q), b = _mm256_cvtepu8_epi32(_mm_srli_si128(q, 8));
  lo = {_mm256_cvtepi32_ps(_mm256_and_si256(a, m)), _mm256_cvtepi32_ps(_mm256_and_si256(b, m))};
  hi = {_mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)), _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4))};
}
static inline PV dec_f8(const uint8_t* p) {
  const __m256i h = _mm256_cvtepu8_epi16(load16(p));
  const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi16(0x80)), 8);
  const __m256i rest = _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi16(0x7F)), 7);
  const __m256i bits = _mm256_or_si256(sign, rest);
  return {_mm256_cvtph_ps(_mm256_castsi256_si128(bits)),
          _mm256_cvtph_ps(_mm256_extracti128_si256(bits, 1))};
}
#else
#define EH_PATH "scalar"
constexpr int NP_DIRECT = 1, MR_BIG = 4, NP_CHUNK = 1;
struct PV { float v[PW]; };
static inline PV pv_zero() { PV r; for (int i = 0; i < PW; ++i) r.v[i] = 0.0f; return r; }
static inline PV pv_load(const float* p) { PV r; std::memcpy(r.v, p, sizeof r.v); return r; }
static inline void pv_store(float* p, PV x) { std::memcpy(p, x.v, sizeof x.v); }
static inline PV pv_add(PV x, PV y) { for (int i = 0; i < PW; ++i) x.v[i] += y.v[i]; return x; }
static inline PV pv_scale(PV x, float s) { for (int i = 0; i < PW; ++i) x.v[i] *= s; return x; }
static inline PV pv_fma(PV x, PV y, PV z) {
  for (int i = 0; i < PW; ++i) z.v[i] = std::fma(x.v[i], y.v[i], z.v[i]);
  return z;
}
static inline PV pv_fma1(float s, PV y, PV z) {
  for (int i = 0; i < PW; ++i) z.v[i] += s * y.v[i];
  return z;
}
static inline PV dec_u8(const uint8_t* p) {
  PV r;
  for (int i = 0; i < PW; ++i) r.v[i] = p[i];
  return r;
}
static inline void dec_u4(const uint8_t* p, PV& lo, PV& hi) {
  for (int i = 0; i < PW; ++i) { lo.v[i] = p[i] & 15; hi.v[i] = p[i] >> 4; }
}
static inline PV dec_f8(const uint8_t* p) {  // the same 2^-8 scaling as the vector paths
  PV r;
  for (int i = 0; i < PW; ++i) {
    const int e = (p[i] >> 3) & 15, m = p[i] & 7;
    const float mag = e ? std::ldexp(1.0f + m / 8.0f, e - 15) : std::ldexp(m / 8.0f, -14);
    r.v[i] = (p[i] & 0x80) ? -mag : mag;
  }
  return r;
}
#endif

struct Args {
  const float* x;
  int64_t ldx;
  const uint8_t* codes;
  const float* scales;
  const float* mins;  // null: minimum = -center * scale
  const float* bias;  // may be null
  float* y;
  int64_t ldy, n, k, group, groups;
  float center;
};

// Few rows (decode steps), codes decoded in registers: per group, sum code * x over the group
// (two chains, even and odd inputs, so that FMA latency does not bound it), then scale the sum
// and add minimum * (the group's sum of x, `xsum`): one FMA per weight instead of two.
template <int CODE, int MR, int NP>
static void tile(const Args& a, const float* xsum, int64_t p0, int64_t m0) {
  PV acc[MR][NP];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NP; ++j) acc[r][j] = pv_zero();
  const int64_t rows_per_panel = CODE == U4 ? a.k / 2 : a.k;
  const uint8_t* c[NP];
  for (int j = 0; j < NP; ++j) c[j] = a.codes + (p0 + j) * rows_per_panel * PW;
  const float* x = a.x + m0 * a.ldx;
  for (int64_t g = 0; g < a.groups; ++g) {
    PV s0[MR][NP], s1[MR][NP];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NP; ++j) s0[r][j] = s1[r][j] = pv_zero();
    const int64_t k0 = g * a.group, k1 = k0 + a.group;
    for (int64_t k = k0; k < k1; k += 2) {
      PV w0[NP], w1[NP];
      for (int j = 0; j < NP; ++j) {
        if (CODE == U4) {
          dec_u4(c[j] + (k / 2) * PW, w0[j], w1[j]);
        } else if (CODE == U8) {
          w0[j] = dec_u8(c[j] + k * PW);
          w1[j] = dec_u8(c[j] + (k + 1) * PW);
        } else {
          w0[j] = dec_f8(c[j] + k * PW);
          w1[j] = dec_f8(c[j] + (k + 1) * PW);
        }
      }
      for (int r = 0; r < MR; ++r) {
        const float xa = x[r * a.ldx + k], xb = x[r * a.ldx + k + 1];
        for (int j = 0; j < NP; ++j) {
          s0[r][j] = pv_fma1(xa, w0[j], s0[r][j]);
          s1[r][j] = pv_fma1(xb, w1[j], s1[r][j]);
        }
      }
    }
    for (int j = 0; j < NP; ++j) {
      const int64_t at = ((p0 + j) * a.groups + g) * PW;
      const PV sc = pv_load(a.scales + at);
      const PV off = a.mins ? pv_load(a.mins + at) : pv_scale(sc, -a.center);
      for (int r = 0; r < MR; ++r) {
        acc[r][j] = pv_fma(pv_add(s0[r][j], s1[r][j]), sc, acc[r][j]);
        if (CODE != F8) acc[r][j] = pv_fma1(xsum[(m0 + r) * a.groups + g], off, acc[r][j]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    float* y = a.y + (m0 + r) * a.ldy;
    for (int j = 0; j < NP; ++j) {
      const int64_t col = (p0 + j) * PW, width = std::min<int64_t>(PW, a.n - col);
      const PV out = a.bias ? pv_add(acc[r][j], pv_load(a.bias + col)) : acc[r][j];
      if (width == PW) {
        pv_store(y + col, out);
      } else {
        float tmp[PW];
        pv_store(tmp, out);
        std::memcpy(y + col, tmp, width * sizeof(float));
      }
    }
  }
}

// Rows [m0, m1) of panels [p0, p0 + NP), decoding in registers: few rows (decode steps).
template <int CODE, int NP>
static void rows_direct(const Args& a, const float* xsum, int64_t p0, int64_t m0, int64_t m1) {
  int64_t m = m0;
  for (; m + 2 <= m1; m += 2) tile<CODE, 2, NP>(a, xsum, p0, m);
  for (; m < m1; ++m) tile<CODE, 1, NP>(a, xsum, p0, m);
}

// Many rows: decode up to KC inputs of NP panels once into `w` ([kc][NP * 16] floats, in L1
// or L2), then multiply them into every tile of rows, accumulating in y (padded to whole
// panels). A chunk may span groups: each run of inputs takes its own group's scales.
constexpr int64_t KC = 256;

template <int CODE, int NP>
static void decode_chunk(const Args& a, int64_t p0, int64_t k0, int64_t kc, float* w) {
  const int64_t rows_per_panel = CODE == U4 ? a.k / 2 : a.k;
  for (int j = 0; j < NP; ++j) {
    const int64_t p = p0 + j;
    const uint8_t* c = a.codes + p * rows_per_panel * PW;
    for (int64_t k = k0; k < k0 + kc;) {
      const int64_t g = k / a.group, end = std::min(k0 + kc, (g + 1) * a.group);
      const PV sc = pv_load(a.scales + (p * a.groups + g) * PW);
      const PV off = a.mins ? pv_load(a.mins + (p * a.groups + g) * PW) : pv_scale(sc, -a.center);
      for (; k < end; k += 2) {
        PV w0, w1;
        if (CODE == U4) {
          dec_u4(c + (k / 2) * PW, w0, w1);
        } else if (CODE == U8) {
          w0 = dec_u8(c + k * PW);
          w1 = dec_u8(c + (k + 1) * PW);
        } else {
          w0 = dec_f8(c + k * PW);
          w1 = dec_f8(c + (k + 1) * PW);
        }
        pv_store(w + (k - k0) * NP * PW + j * PW, pv_fma(w0, sc, off));
        pv_store(w + (k - k0 + 1) * NP * PW + j * PW, pv_fma(w1, sc, off));
      }
    }
  }
}

template <int MR, int NP>
static void fma_tile(const Args& a, const float* w, int64_t p0, int64_t m0, int64_t k0,
                     int64_t kc) {
  PV acc[MR][NP];
  float* y = a.y + m0 * a.ldy + p0 * PW;
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NP; ++j)
      acc[r][j] = k0 == 0 ? pv_zero() : pv_load(y + r * a.ldy + j * PW);
  const float* x = a.x + m0 * a.ldx + k0;
  for (int64_t k = 0; k < kc; ++k) {
    PV wv[NP];
    for (int j = 0; j < NP; ++j) wv[j] = pv_load(w + k * NP * PW + j * PW);
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NP; ++j) acc[r][j] = pv_fma1(x[r * a.ldx + k], wv[j], acc[r][j]);
  }
  const bool last = k0 + kc == a.k;
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NP; ++j) {
      PV out = acc[r][j];
      if (last && a.bias) out = pv_add(out, pv_load(a.bias + (p0 + j) * PW));
      pv_store(y + r * a.ldy + j * PW, out);
    }
}

// A tile of `mr` rows (1..MR_BIG), the template instance chosen at run time.
template <int NP, int MR = MR_BIG>
static void fma_tile_n(int mr, const Args& a, const float* w, int64_t p0, int64_t m0, int64_t k0,
                       int64_t kc) {
  if constexpr (MR > 1) {
    if (mr < MR) return fma_tile_n<NP, MR - 1>(mr, a, w, p0, m0, k0, kc);
  }
  fma_tile<MR, NP>(a, w, p0, m0, k0, kc);
}

template <int CODE, int NP>
static void rows_chunked(const Args& a, int64_t p0, int64_t m0, int64_t m1) {
  alignas(64) float w[KC * NP * PW];
  // Rows in tiles of equal height (32 rows: 11 + 11 + 10, not 12 + 12 + 4 + 4): a short tile
  // makes few FMAs per weight load.
  const int64_t tiles = (m1 - m0 + MR_BIG - 1) / MR_BIG;
  for (int64_t k0 = 0; k0 < a.k; k0 += KC) {
    const int64_t kc = std::min(KC, a.k - k0);
    decode_chunk<CODE, NP>(a, p0, k0, kc, w);
    for (int64_t t = 0, m = m0; t < tiles; ++t) {
      const int mr = static_cast<int>((m1 - m + (tiles - t) - 1) / (tiles - t));
      fma_tile_n<NP>(mr, a, w, p0, m, k0, kc);
      m += mr;
    }
  }
}

// Tasks: blocks of up to 96 rows (so a block's activations stay in cache across panels)
// times steps of NP panels. Small problems stay on one thread.
template <int CODE, int NP, bool CHUNKED>
static void run_tasks(const Args& a, const float* xsum, int64_t m_total, int64_t panels) {
  constexpr int64_t ROWS = 96;
  const int64_t row_blocks = (m_total + ROWS - 1) / ROWS;
  const int64_t steps = (panels + NP - 1) / NP;
  const int64_t work = std::max<int64_t>(1, a.k * PW * NP * std::min<int64_t>(m_total, ROWS));
  const int64_t grain = std::max<int64_t>(1, 65536 / work);
  at::parallel_for(0, row_blocks * steps, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t rb = t / steps, p0 = (t % steps) * NP;
      const int64_t m0 = rb * ROWS, m1 = std::min(m_total, m0 + ROWS);
      if (p0 + NP <= panels) {
        if (CHUNKED) rows_chunked<CODE, NP>(a, p0, m0, m1);
        else rows_direct<CODE, NP>(a, xsum, p0, m0, m1);
        continue;
      }
      for (int64_t p = p0; p < panels; ++p) {  // the last panels, one at a time
        if (CHUNKED) rows_chunked<CODE, 1>(a, p, m0, m1);
        else rows_direct<CODE, 1>(a, xsum, p, m0, m1);
      }
    }
  });
}

template <int CODE>
static void run(const Args& a, int64_t m_total, int64_t panels, bool chunked) {
  if (chunked) return run_tasks<CODE, NP_CHUNK, true>(a, nullptr, m_total, panels);
  std::vector<float> xsum(m_total * a.groups, 0.0f);  // per row and group: the sum of x
  for (int64_t r = 0; r < m_total; ++r)
    for (int64_t k = 0; k < a.k; ++k) xsum[r * a.groups + k / a.group] += a.x[r * a.ldx + k];
  run_tasks<CODE, NP_DIRECT, false>(a, xsum.data(), m_total, panels);
}

// x [M, K] float32; codes: panels of uint8 (see qweight.py); scales, mins [P, groups, 16] float32.
at::Tensor qlinear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                   const std::optional<at::Tensor>& mins, const std::optional<at::Tensor>& bias,
                   int64_t code, int64_t n, int64_t group, double center) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be 2-D float32");
  TORCH_CHECK(codes.scalar_type() == at::kByte && scales.scalar_type() == at::kFloat);
  const auto xc = x.contiguous();
  const int64_t m = xc.size(0), k = xc.size(1), panels = scales.size(0);
  TORCH_CHECK(k % group == 0 && group % 2 == 0, "group must divide K and be even");
  TORCH_CHECK(panels * PW >= n && scales.size(1) == k / group, "scales do not match the shapes");
  // Few rows: codes decoded in registers, straight into y. More: decoded per chunk of KC
  // inputs and accumulated in y, whose rows then span whole panels (cut to n at the end).
  const bool chunked = m >= CHUNKED_FROM;
  const int64_t width = chunked ? panels * PW : n;
  auto y = at::empty({m, width}, xc.options());
  if (m == 0) return y;
  at::Tensor b;
  if (bias && bias->defined()) {
    b = at::zeros({panels * PW}, xc.options());
    b.narrow(0, 0, n).copy_(*bias);
  }
  Args a{xc.data_ptr<float>(), k, codes.data_ptr<uint8_t>(), scales.data_ptr<float>(),
         mins && mins->defined() ? mins->data_ptr<float>() : nullptr,
         b.defined() ? b.data_ptr<float>() : nullptr,
         y.data_ptr<float>(), width, n, k, group, k / group, static_cast<float>(center)};
  if (code == U4) run<U4>(a, m, panels, chunked);
  else if (code == U8) run<U8>(a, m, panels, chunked);
  else run<F8>(a, m, panels, chunked);
  return width == n ? y : y.narrow(1, 0, n).contiguous();
}

std::string path() { return EH_PATH; }

#define EH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
EH_LIBRARY(EH_NS, m) {
  m.def("qlinear(Tensor x, Tensor codes, Tensor scales, Tensor? mins, Tensor? bias, int code, "
        "int n, int group, float center) -> Tensor");
  m.impl("qlinear", c10::DispatchKey::CPU, &qlinear);
  m.def("path() -> str", &path);
}
"""

NAMESPACE = "enginehouse_quant"
# The AVX2 path, built with AVX-512 switched off: how a machine with AVX-512 checks the path an
# AVX2-only CPU (CI, say) runs.
AVX2_NAMESPACE = "enginehouse_quant_avx2"
AVX2_FLAGS = ("-mno-avx512f",)


def _build(namespace: str, flags: tuple[str, ...] = ()) -> bool:
    source = f"#define EH_NS {namespace}\n{SOURCE}"
    what = "CPU quantized-matmul kernel" + (" (AVX2 variant)" if flags else "")
    if not cpu_build.build(namespace, source, what, extra_flags=flags):
        return False
    return hasattr(getattr(torch.ops, namespace), "qlinear")


@functools.cache
def load() -> bool:
    """Build (or find built) and register the kernel for this CPU; False where that fails."""
    return _build(NAMESPACE)


@functools.cache
def load_avx2() -> bool:
    """The same kernel compiled for AVX2 (tests compare it with the native build)."""
    return _build(AVX2_NAMESPACE, AVX2_FLAGS)


def ops(namespace: str = NAMESPACE):
    return getattr(torch.ops, namespace)
