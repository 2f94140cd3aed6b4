"""C++ kernels for small decode steps on the CPU: a matrix product for a few rows, and the
fused small ops around it (the residual add with RMSNorm, SiLU-and-mul, rope with the K/V store).

At batch 1 a decode step reads every weight once and does little arithmetic with it: its speed
is the memory bandwidth, plus the overhead of each op in between. `linear` reads weights that
`pack` laid out once as `[N / 64, K, 64]` (groups of four vectors of output columns, AVX-512;
`[N / 32, K, 32]` on AVX2), front to back, broadcasting x and keeping four accumulators per row
in registers: about 2x oneDNN's packed product at one row, behind it from ~5 rows on (so
`Linear` uses it up to `SMALL_ROWS`). Weights may be float32 or bfloat16; the arithmetic is
float32. Each fused op replaces two to four torch ops per layer, whose dispatch at this size
costs as much as their arithmetic. Built per instruction set by `cpu_build`, like `cpu_kernels`;
where it cannot be built the torch ops run instead. Measurements: benchmarks/RESULTS.md, issue 14.
"""

from __future__ import annotations

import functools

import torch

from . import cpu_build, cpu_kernels

# Up to this many rows `linear` beats oneDNN's packed product (measured: 2x at 1 row, about
# even at 4, behind at 8).
SMALL_ROWS = 4

KERNELS = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

// Weights are packed once as [ceil(N / GW), K, GW]: for each group of GW output columns (four
// vectors), the GW weights of every input k side by side. A group is one contiguous run of
// memory, read front to back; for each k, MT rows of x are broadcast and multiplied with the
// group's four vectors (4 * MT accumulators in registers): no horizontal sums, and the same
// layout serves 1 row or 32 (row tiles reuse a chunk of groups from cache).
constexpr int L = 4;               // vectors per group
constexpr int GW = L * VW;         // columns per group: 64 (AVX-512), 32 (AVX2)
#if defined(__AVX512F__)           // 32 registers: 4 * MT accumulators + MT broadcasts + 1
constexpr int MAX_MT = 6;
#else                              // 16 registers
constexpr int MAX_MT = 3;
#endif

// y[m0 .. m0+MT, columns of groups g .. g+NG) = x . w (+ bias), accumulated in float32.
template <typename W, int MT, int NG>
static void tile(const W* w, const float* x, const float* bias, float* y, int64_t K, int64_t N,
                 int64_t g) {
  vec acc[MT][NG * L];
#pragma GCC unroll 32
  for (int m = 0; m < MT; ++m)
#pragma GCC unroll 32
    for (int j = 0; j < NG * L; ++j) acc[m][j] = vzero();
  const W* wg = w + g * K * GW;
  for (int64_t k = 0; k < K; ++k) {
    vec xv[MT];
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) xv[m] = vbroadcast(x[m * K + k]);
#pragma GCC unroll 32
    for (int j = 0; j < NG * L; ++j) {
      const vec wv = vload(wg + ((j / L) * K + k) * GW + (j % L) * VW);
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) acc[m][j] = vfma(wv, xv[m], acc[m][j]);
    }
  }
  for (int b = 0; b < NG; ++b) {
    const int64_t n = (g + b) * GW;
    const int64_t cols = std::min<int64_t>(GW, N - n);
    for (int m = 0; m < MT; ++m) {
      alignas(64) float out[GW];
      for (int l = 0; l < L; ++l) vstore(out + l * VW, acc[m][b * L + l]);
      float* yr = y + m * N + n;
      if (bias)
        for (int64_t c = 0; c < cols; ++c) yr[c] = out[c] + bias[n + c];
      else
        std::copy(out, out + cols, yr);
    }
  }
}

// Rows [0, MT) of x for groups [g0, g1).
template <typename W, int MT>
static void rows_tile(const W* w, const float* x, const float* bias, float* y, int64_t K,
                      int64_t N, int64_t g0, int64_t g1) {
  // One row: four groups at once on AVX-512 (16 accumulators; measured ~1.3x over one group),
  // two on AVX2.
  constexpr int NG = MT == 1 ? (VW == 16 ? 4 : 2) : 1;
  int64_t g = g0;
  for (; g + NG <= g1; g += NG) tile<W, MT, NG>(w, x, bias, y, K, N, g);
  for (; g < g1; ++g) tile<W, MT, 1>(w, x, bias, y, K, N, g);
}

template <typename W>
static void rows(const W* w, const float* x, const float* bias, float* y, int64_t MT, int64_t K,
                 int64_t N, int64_t g0, int64_t g1) {
  switch (MT) {
    case 1: return rows_tile<W, 1>(w, x, bias, y, K, N, g0, g1);
    case 2: return rows_tile<W, 2>(w, x, bias, y, K, N, g0, g1);
    case 3: return rows_tile<W, 3>(w, x, bias, y, K, N, g0, g1);
#if defined(__AVX512F__)
    case 4: return rows_tile<W, 4>(w, x, bias, y, K, N, g0, g1);
    case 5: return rows_tile<W, 5>(w, x, bias, y, K, N, g0, g1);
    case 6: return rows_tile<W, 6>(w, x, bias, y, K, N, g0, g1);
#endif
  }
}

// w [N, K] -> [ceil(N / GW), K, GW], columns past N zero.
at::Tensor blocked_pack(const at::Tensor& w) {
  const int64_t N = w.size(0), K = w.size(1), groups = (N + GW - 1) / GW;
  auto padded = at::zeros({groups * GW, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  return padded.view({groups, GW, K}).transpose(1, 2).contiguous();
}

// y [M, N] = x [M, K] . w (+ bias [N]), float32 rows in and out; w from blocked_pack.
static void linear_f32(const float* xp, const at::Tensor& w, const float* bp, float* yp,
                       int64_t M, int64_t K, int64_t N) {
  const int64_t groups = w.size(0);
  // Threads split the columns. With more rows than one tile, every row tile runs over a chunk
  // of groups (~128 KB of weights, in L2) before the next chunk: weights come from memory once.
  const int64_t chunk = M <= MAX_MT ? groups : std::max<int64_t>(1, 32768 / (K * GW / 16));
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(K, 1));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t c = g0; c < g1; c += chunk) {
      const int64_t c1 = std::min(g1, c + chunk);
      for (int64_t m = 0; m < M; m += MAX_MT) {
        const int64_t mt = std::min<int64_t>(MAX_MT, M - m);
        if (w.scalar_type() == at::kBFloat16)
          rows(w.data_ptr<at::BFloat16>(), xp + m * K, bp, yp + m * N, mt, K, N, c, c1);
        else
          rows(w.data_ptr<float>(), xp + m * K, bp, yp + m * N, mt, K, N, c, c1);
      }
    }
  });
}

// x [M, K] (any float dtype), w from blocked_pack (float32 or bfloat16), bias [N] or None.
// Returns x @ W.T + bias [M, N] in x's dtype.
at::Tensor blocked_linear(const at::Tensor& x, const at::Tensor& w,
                          const c10::optional<at::Tensor>& bias, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && w.size(2) == GW && x.size(1) == w.size(1),
              "blocked_linear: x [M, K] and w from blocked_pack");
  TORCH_CHECK(w.is_contiguous() && w.size(0) * GW >= N, "blocked_linear: packed weight");
  const int64_t M = x.size(0), K = x.size(1);
  auto xf = x.to(at::kFloat).contiguous();
  at::Tensor bf = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  auto y = at::empty({M, N}, x.options().dtype(at::kFloat));
  linear_f32(xf.data_ptr<float>(), w, bf.defined() ? bf.data_ptr<float>() : nullptr,
             y.data_ptr<float>(), M, K, N);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// The small ops. Their tensors are a few KB at decode: one pass each, on the calling thread
// (the thread pool's wake-up would cost more than the arithmetic). Float32 or bfloat16 in,
// float32 arithmetic.
template <typename T>
static void add_rms_norm_rows(T* x, const T* delta, const T* w, T* out, int64_t rows, int64_t D,
                              float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    T* xr = x + r * D;
    float ss = 0.0f;
    for (int64_t i = 0; i < D; ++i) {
      float v = static_cast<float>(xr[i]);
      if (delta) {
        v += static_cast<float>(delta[r * D + i]);
        xr[i] = static_cast<T>(v);
        v = static_cast<float>(xr[i]);  // normalise the residual as stored (bfloat16 rounds)
      }
      ss += v * v;
    }
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
    for (int64_t i = 0; i < D; ++i) {
      if constexpr (std::is_same_v<T, float>) {
        out[r * D + i] = static_cast<float>(xr[i]) * inv * static_cast<float>(w[i]);
      } else {  // as the reference: normalise in float32, round, then scale in bfloat16
        T normed = static_cast<T>(static_cast<float>(xr[i]) * inv);
        out[r * D + i] = static_cast<T>(static_cast<float>(w[i]) * static_cast<float>(normed));
      }
    }
  }
}

// x [T, D] (+= delta [T, D] in place, when given), then RMSNorm(x) * weight.
at::Tensor add_rms_norm(at::Tensor x, const c10::optional<at::Tensor>& delta,
                        const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && weight.scalar_type() == x.scalar_type(), "add_rms_norm");
  const int64_t D = x.size(-1), rows = x.numel() / D;
  auto out = at::empty_like(x);
  at::Tensor d = delta.has_value() ? delta->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "add_rms_norm", [&] {
    const scalar_t* dp = d.defined() ? d.data_ptr<scalar_t>() : nullptr;
    add_rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), dp, weight.data_ptr<scalar_t>(),
                                out.data_ptr<scalar_t>(), rows, D, static_cast<float>(eps));
  });
  return out;
}

// gate_up [rows, 2I] -> silu(gate) * up [rows, I]; silu rounded to the dtype first, as
// F.silu(gate) * up does. Float32 a vector at a time (vexp), bfloat16 one value at a time.
template <typename T>
static void silu_mul_rows(const T* p, T* o, int64_t rows, int64_t I) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* gate = p + r * 2 * I;
    const T* up = gate + I;
    T* out = o + r * I;
    int64_t i = 0;
    if constexpr (std::is_same_v<T, float>) {
      const vec one = vbroadcast(1.0f), minus = vbroadcast(-1.0f);
      for (; i + VW <= I; i += VW) {
        const vec g = vload(gate + i);
        const vec silu = vdiv(g, vadd(one, vexp(vmul(g, minus))));
        vstore(out + i, vmul(silu, vload(up + i)));
      }
    }
    for (; i < I; ++i) {
      const float g = static_cast<float>(gate[i]);
      const T silu = static_cast<T>(g / (1.0f + std::exp(-g)));
      out[i] = static_cast<T>(static_cast<float>(silu) * static_cast<float>(up[i]));
    }
  }
}

// Decode's few rows run on the calling thread; a prefill's thousands are split over the cores.
at::Tensor silu_mul(const at::Tensor& gate_up) {
  const int64_t I = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * I);
  auto gu = gate_up.contiguous();
  auto out = at::empty({rows, I}, gu.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gu.scalar_type(), "silu_mul", [&] {
    const scalar_t* src = gu.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(I, 1)),
                     [&](int64_t r0, int64_t r1) {
                       silu_mul_rows(src + r0 * 2 * I, dst + r0 * I, r1 - r0, I);
                     });
  });
  return out;
}

// qkv [T, (H + 2 KVH) * D] -> q [T, H, D] rotated, while k (rotated) and v go to their slots
// of the caches [KVH, S, D]. cos, signed sin [T, D] as rope_table makes them (rotate-half form).
template <typename T>
static void rope_rows(const T* x, const T* c, const T* s, T* out, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < D; ++i) {
    const float rolled = static_cast<float>(x[(i + half) % D]);
    // x * cos + roll(x) * sin, rounded after each op as the torch path rounds
    const T a = static_cast<T>(static_cast<float>(x[i]) * static_cast<float>(c[i]));
    out[i] = static_cast<T>(static_cast<float>(a) + rolled * static_cast<float>(s[i]));
  }
}

// One token: q heads rotated into qp, k (rotated) and v into cache slot `slot`.
template <typename T>
static void rope_store_row(const T* row, const T* c, const T* s, T* qp, T* kc, T* vc,
                           int64_t slot, int64_t heads, int64_t kv_heads, int64_t D, int64_t S) {
  for (int64_t h = 0; h < heads; ++h) rope_rows(row + h * D, c, s, qp + h * D, D);
  for (int64_t h = 0; h < kv_heads; ++h) {
    const int64_t at = (h * S + slot) * D;
    rope_rows(row + (heads + h) * D, c, s, kc + at, D);
    std::copy(row + (heads + kv_heads + h) * D, row + (heads + kv_heads + h + 1) * D, vc + at);
  }
}

// A prefill's tokens split over the cores; a decode's few stay on the calling thread.
template <typename F>
static void over_tokens(int64_t T, const F& f) {
  if (T < 16) return f(0, T);
  at::parallel_for(0, T, 8, f);
}

// rope_store, and (`in_place`, a prefill, whose attention then reads its K/V from qkv, not
// from the cache) the same with q and k rotated inside qkv instead of a new q.
static at::Tensor rope_store_impl(at::Tensor qkv, const at::Tensor& cos, const at::Tensor& sin,
                                  at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots,
                                  int64_t heads, int64_t kv_heads, bool in_place) {
  const int64_t T = qkv.size(0), D = k_cache.size(-1), S = k_cache.size(1);
  TORCH_CHECK(qkv.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(), "rope_store");
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * D && cos.size(-1) == D, "rope_store: shapes");
  auto q = in_place ? qkv : at::empty({T, heads, D}, qkv.options());
  auto slots64 = slots.to(at::kLong).contiguous();
  const int64_t* sp = slots64.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "rope_store", [&] {
    const int64_t width = (heads + 2 * kv_heads) * D;
    scalar_t* kc = k_cache.data_ptr<scalar_t>();
    scalar_t* vc = v_cache.data_ptr<scalar_t>();
    over_tokens(T, [&](int64_t t0, int64_t t1) {
      std::vector<scalar_t> rotated(in_place ? heads * D : 0);  // q, before it overwrites qkv
      for (int64_t t = t0; t < t1; ++t) {
        scalar_t* row = qkv.data_ptr<scalar_t>() + t * width;
        scalar_t* qt = in_place ? rotated.data() : q.data_ptr<scalar_t>() + t * heads * D;
        rope_store_row(row, cos.data_ptr<scalar_t>() + t * D, sin.data_ptr<scalar_t>() + t * D,
                       qt, kc, vc, sp[t], heads, kv_heads, D, S);
        if (!in_place) continue;
        std::copy(rotated.begin(), rotated.end(), row);
        for (int64_t h = 0; h < kv_heads; ++h) {  // k, rotated, from its slot
          const scalar_t* k = kc + (h * S + sp[t]) * D;
          std::copy(k, k + D, row + (heads + h) * D);
        }
      }
    });
  });
  return q;
}

at::Tensor rope_store(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                      at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots,
                      int64_t heads, int64_t kv_heads) {
  return rope_store_impl(qkv, cos, sin, k_cache, v_cache, slots, heads, kv_heads, false);
}

at::Tensor rope_store_inplace(at::Tensor qkv, const at::Tensor& cos, const at::Tensor& sin,
                              at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots,
                              int64_t heads, int64_t kv_heads) {
  return rope_store_impl(qkv, cos, sin, k_cache, v_cache, slots, heads, kv_heads, true);
}

// The whole decode step of a Llama-like decoder for a few rows, in one call: per layer
// add + RMSNorm, qkv, rope + K/V store, paged attention, o, add + RMSNorm, gate_up,
// SiLU-and-mul, down; then the final add + RMSNorm. The same kernels as the separate ops, in
// the same order with the same roundings (so the same numbers), without a trip through Python
// and the dispatcher between any two of them. Gemma 3's layers too: q/k norms before rope,
// sandwich norms (the attention's and the MLP's outputs normalised before they are added, a
// norm before the MLP), GELU (tanh) instead of SiLU, each KV group with its own rope.
constexpr int PER_LAYER = 14;  // weights per layer, in the order DecodeStep lists them
// 10, 11: q and k norms; 12, 13: the norms before and after the MLP (sandwich); None: absent.

// gate_up [rows, 2I] -> gelu_tanh(gate) * up, rounded to the dtype after the GELU as
// F.gelu(gate, approximate="tanh") * up does.
template <typename T>
static void gelu_tanh_mul_rows(const T* p, T* o, int64_t rows, int64_t I) {
  constexpr float k0 = 0.7978845608028654f, k1 = 0.044715f;  // sqrt(2 / pi)
  for (int64_t r = 0; r < rows; ++r) {
    const T* gate = p + r * 2 * I;
    const T* up = gate + I;
    for (int64_t i = 0; i < I; ++i) {
      const float g = static_cast<float>(gate[i]);
      const T gelu = static_cast<T>(0.5f * g * (1.0f + std::tanh(k0 * (g + k1 * g * g * g))));
      o[r * I + i] = static_cast<T>(static_cast<float>(gelu) * static_cast<float>(up[i]));
    }
  }
}

// The projections read float32 rows: bfloat16 activations go through fx / fy.
template <typename T>
static void linear_rows(const T* x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                        T* y, int64_t M, int64_t K, int64_t N, float* fx, float* fy) {
  const float* bp = b.has_value() ? b->data_ptr<float>() : nullptr;
  if constexpr (std::is_same_v<T, float>) {
    linear_f32(x, w, bp, y, M, K, N);
  } else {
    for (int64_t i = 0; i < M * K; ++i) fx[i] = static_cast<float>(x[i]);
    linear_f32(fx, w, bp, fy, M, K, N);
    for (int64_t i = 0; i < M * N; ++i) y[i] = static_cast<T>(fy[i]);
  }
}

struct StepShape {
  int64_t M, D, H, KVH, Dh, W, block_size, I;
  float eps, scale, softcap;
  bool gelu;  // the MLP's activation: GELU (tanh approximation) instead of SiLU
};

// Where each row's K/V goes and what it reads, per KV group (models with sliding-window
// layers keep one pool per window, kv_cache.py): group g's slots are sp[g * M ..], its block
// tables tp[g * M * W ..], its rope rows cos / sin [g * M * Dh ..]; layer l reads group
// groups[l]'s. Rows of one sequence (speculative
// verify rows) are qs[s] .. qs[s + 1] (nullptr: every row its own), attended together.
struct StepRows {
  const int64_t* sp;
  const int64_t* tp;
  const int64_t* lp;
  const int64_t* qs;
  int64_t NS;
  at::IntArrayRef groups;
};

template <typename T>
static at::Tensor decode_layers_impl(at::Tensor& x, const c10::List<c10::optional<at::Tensor>>& w,
                                     at::TensorList caches, const T* cos, const T* sin,
                                     const StepRows& rows, at::IntArrayRef windows,
                                     const StepShape& s) {
  const int64_t M = s.M, D = s.D, Dh = s.Dh, HD = s.H * Dh, QKV = (s.H + 2 * s.KVH) * Dh;
  const int64_t I = s.I, layers = static_cast<int64_t>(caches.size()) / 2;
  const int64_t widest = std::max({D, QKV, HD, 2 * I});
  // One scratch tensor for every intermediate: [h | qkv | q | attn | o | gate_up | mid | delta]
  auto scratch = at::empty({M * (3 * D + QKV + 2 * HD + 3 * I)}, x.options());
  T* h = scratch.data_ptr<T>();
  T* qkv = h + M * D;
  T* q = qkv + M * QKV;
  T* attn = q + M * HD;
  T* o = attn + M * HD;
  T* gu = o + M * D;
  T* mid = gu + M * 2 * I;
  T* delta = mid + M * I;
  auto fbuf = at::empty({2 * M * widest}, x.options().dtype(at::kFloat));
  float* fx = fbuf.data_ptr<float>();
  float* fy = fx + M * widest;
  T* xp = x.data_ptr<T>();
  for (int64_t l = 0; l < layers; ++l) {
    auto weight = [&](int i) { return w.get(l * PER_LAYER + i); };
    auto norm = [&](int i) { return static_cast<const T*>(weight(i)->data_ptr()); };
    const at::Tensor& kc = caches[2 * l];
    const at::Tensor& vc = caches[2 * l + 1];
    T* kp = kc.data_ptr<T>();
    T* vp = vc.data_ptr<T>();
    const int64_t S = kc.size(1), g = rows.groups[l];  // this layer's group: its pool, slots
    const int64_t* sp = rows.sp + g * M;
    const int64_t* tp = rows.tp + g * M * s.W;
    const T* gcos = cos + g * M * Dh;
    const T* gsin = sin + g * M * Dh;
    const bool sandwich = weight(12).has_value();
    add_rms_norm_rows<T>(xp, l == 0 ? nullptr : delta, norm(0), h, M, D, s.eps);
    linear_rows(h, *weight(1), weight(2), qkv, M, D, QKV, fx, fy);
    if (weight(10).has_value())  // q and k norms, per head, in place
      for (int64_t t = 0; t < M; ++t) {
        T* row = qkv + t * QKV;
        add_rms_norm_rows<T>(row, nullptr, norm(10), row, s.H, Dh, s.eps);
        add_rms_norm_rows<T>(row + HD, nullptr, norm(11), row + HD, s.KVH, Dh, s.eps);
      }
    for (int64_t t = 0; t < M; ++t)
      rope_store_row(qkv + t * QKV, gcos + t * Dh, gsin + t * Dh, q + t * HD, kp, vp, sp[t], s.H,
                     s.KVH, Dh, S);
    // Attention reads float32 queries and writes float32 rows, as the paged_decode op does.
    const float* fq = reinterpret_cast<const float*>(q);
    float* fo = reinterpret_cast<float*>(attn);
    if constexpr (!std::is_same_v<T, float>) {
      for (int64_t i = 0; i < M * HD; ++i) fx[i] = static_cast<float>(q[i]);
      fq = fx;
      fo = fy;
    }
    paged_decode_impl(fq, static_cast<const T*>(kp), static_cast<const T*>(vp), tp, rows.lp, fo,
                      M, s.H, Dh, s.KVH, S, s.W, s.block_size, s.scale, s.softcap, windows[l],
                      nullptr, nullptr, nullptr, rows.qs, rows.NS);
    if constexpr (!std::is_same_v<T, float>)
      for (int64_t i = 0; i < M * HD; ++i) attn[i] = static_cast<T>(fy[i]);
    linear_rows(attn, *weight(3), weight(4), o, M, HD, D, fx, fy);
    if (sandwich) {  // x += norm(o); h = norm(x) before the MLP
      add_rms_norm_rows<T>(o, nullptr, norm(5), o, M, D, s.eps);
      add_rms_norm_rows<T>(xp, o, norm(12), h, M, D, s.eps);
    } else {
      add_rms_norm_rows<T>(xp, o, norm(5), h, M, D, s.eps);
    }
    linear_rows(h, *weight(6), weight(7), gu, M, D, 2 * I, fx, fy);
    if (s.gelu) gelu_tanh_mul_rows(gu, mid, M, I);
    else silu_mul_rows(gu, mid, M, I);
    linear_rows(mid, *weight(8), weight(9), delta, M, I, D, fx, fy);
    if (sandwich) add_rms_norm_rows<T>(delta, nullptr, norm(13), delta, M, D, s.eps);
  }
  auto out = at::empty_like(x);
  const T* final_norm = static_cast<const T*>(w.get(layers * PER_LAYER)->data_ptr());
  add_rms_norm_rows<T>(xp, delta, final_norm, out.data_ptr<T>(), M, D, s.eps);
  return out;
}

// What decode_layers and decode_logits check alike: a group per layer, each in range, and the
// query starts (when given) from 0 to the number of rows.
static void check_rows(int64_t M, int64_t layers, int64_t num_groups, at::IntArrayRef groups,
                       at::IntArrayRef windows, const int64_t* qs, int64_t NS, const char* op) {
  TORCH_CHECK(static_cast<int64_t>(groups.size()) == layers &&
                  static_cast<int64_t>(windows.size()) == layers,
              op, ": a KV group and a window per layer");
  for (int64_t g : groups)
    TORCH_CHECK(g >= 0 && g < num_groups, op, ": a layer's KV group has no slots or tables");
  if (qs != nullptr) {
    TORCH_CHECK(NS >= 0 && qs[0] == 0 && qs[NS] == M, op,
                ": query_starts [sequences + 1] from 0 to the number of rows");
    for (int64_t i = 0; i < NS; ++i)
      TORCH_CHECK(qs[i] <= qs[i + 1], op, ": query_starts must not decrease");
  }
}

// x [M, D], the step's embeddings: the residual stream, updated in place. Returns the final
// norm's output [M, D]. weights: PER_LAYER per layer (norms in x's dtype, packed projections,
// float32 biases or None), then the final norm. caches: k, v of every layer [KVH, S, Dh].
// slots [groups, M], tables [groups, M, W] (one block table per row and group); cos / sin
// [groups, M, Dh]; groups: each layer's KV group; query_starts: see StepRows.
at::Tensor decode_layers(at::Tensor x, const c10::List<c10::optional<at::Tensor>>& weights,
                         at::TensorList caches, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& slots, const at::Tensor& tables,
                         const at::Tensor& lens, const c10::optional<at::Tensor>& query_starts,
                         at::IntArrayRef groups, int64_t block_size, int64_t heads,
                         int64_t kv_heads, at::IntArrayRef windows, double eps, double scale,
                         double softcap, bool gelu) {
  const int64_t layers = static_cast<int64_t>(caches.size()) / 2, M = x.size(0);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "decode_layers: x [rows, hidden]");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers * PER_LAYER + 1,
              "decode_layers: weights per layer");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous(), "decode_layers: cos, sin");
  TORCH_CHECK(slots.dim() == 2 && slots.size(1) == M && tables.dim() == 3 &&
                  tables.size(0) == slots.size(0) && tables.size(1) == M,
              "decode_layers: slots [groups, rows] and tables [groups, rows, width]");
  TORCH_CHECK(cos.numel() == sin.numel() && cos.numel() == slots.numel() * caches[0].size(-1),
              "decode_layers: cos, sin [groups, rows, head_dim]");
  const at::Tensor& k0 = caches[0];
  StepShape s{M, x.size(1), heads, kv_heads, k0.size(-1), tables.size(2), block_size,
              weights.get(8)->size(1), static_cast<float>(eps), static_cast<float>(scale),
              static_cast<float>(softcap), gelu};
  auto slots64 = slots.to(at::kLong).contiguous();
  auto tables64 = tables.to(at::kLong).contiguous();
  auto lens64 = lens.to(at::kLong).contiguous();
  at::Tensor starts64;
  if (query_starts.has_value()) starts64 = query_starts->to(at::kLong).contiguous();
  const int64_t* qs = starts64.defined() ? starts64.data_ptr<int64_t>() : nullptr;
  const int64_t NS = starts64.defined() ? starts64.numel() - 1 : M;
  check_rows(M, layers, slots.size(0), groups, windows, qs, NS, "decode_layers");
  StepRows rows{slots64.data_ptr<int64_t>(), tables64.data_ptr<int64_t>(),
                lens64.data_ptr<int64_t>(), qs, NS, groups};
  if (x.scalar_type() == at::kBFloat16)
    return decode_layers_impl(x, weights, caches, cos.data_ptr<at::BFloat16>(),
                              sin.data_ptr<at::BFloat16>(), rows, windows, s);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "decode_layers: float32 or bfloat16");
  return decode_layers_impl(x, weights, caches, cos.data_ptr<float>(), sin.data_ptr<float>(),
                            rows, windows, s);
}

// A whole decode step from token ids to float32 logits, for a runner that skips building the
// step's tensors: ids, positions, slots (per group), block tables (per group, flattened,
// `width` per row), context lengths and query starts (empty: every row its own sequence) come
// as integer lists; cos / sin are the whole rope tables [positions, Dh], one per KV group.
// embed_scale (Gemma; 0: none) multiplies the embedding rows, rounded to their dtype first as
// the per-op path does; softcap / final_softcap (Gemma 2; 0: none) cap the attention scores
// and the logits. The embedding rows,
// the layers (decode_layers) and the head (weights from blocked_pack) run here; the logits are
// rounded to x's dtype before float32, as the per-op path rounds them.
template <typename T>
static at::Tensor decode_logits_impl(const at::Tensor& embed, at::IntArrayRef ids,
                                     at::IntArrayRef positions, at::IntArrayRef windows,
                                     const c10::List<c10::optional<at::Tensor>>& weights,
                                     at::TensorList caches, at::TensorList cos,
                                     at::TensorList sin, double embed_scale,
                                     const at::Tensor& head, int64_t vocab, const StepRows& rows,
                                     StepShape& s, double final_softcap) {
  const int64_t M = s.M, D = s.D, Dh = s.Dh, G = static_cast<int64_t>(cos.size());
  auto x = at::empty({M, D}, embed.options());
  auto table = at::empty({2, G, M, Dh}, embed.options());
  T* c = table.data_ptr<T>();
  T* sn = c + G * M * Dh;
  const float scale = static_cast<float>(static_cast<T>(static_cast<float>(embed_scale)));
  for (int64_t m = 0; m < M; ++m) {
    const T* e = embed.data_ptr<T>() + ids[m] * D;
    T* xm = x.data_ptr<T>() + m * D;
    if (embed_scale != 0.0)
      for (int64_t i = 0; i < D; ++i) xm[i] = static_cast<T>(static_cast<float>(e[i]) * scale);
    else
      std::copy_n(e, D, xm);
    for (int64_t g = 0; g < G; ++g) {
      std::copy_n(cos[g].data_ptr<T>() + positions[m] * Dh, Dh, c + (g * M + m) * Dh);
      std::copy_n(sin[g].data_ptr<T>() + positions[m] * Dh, Dh, sn + (g * M + m) * Dh);
    }
  }
  at::Tensor hidden = decode_layers_impl<T>(x, weights, caches, c, sn, rows, windows, s);
  auto logits = at::empty({M, vocab}, embed.options().dtype(at::kFloat));
  at::Tensor fh = hidden.to(at::kFloat);
  linear_f32(fh.data_ptr<float>(), head, nullptr, logits.data_ptr<float>(), M, D, vocab);
  if constexpr (!std::is_same_v<T, float>) logits = logits.to(embed.scalar_type());
  if (final_softcap > 0.0)  // Gemma 2: tanh(logits / cap) * cap, in the logits' dtype
    logits = at::tanh(logits / final_softcap) * final_softcap;
  return logits.to(at::kFloat);
}

at::Tensor decode_logits(const at::Tensor& embed, at::IntArrayRef ids, at::IntArrayRef positions,
                         at::IntArrayRef slots, at::IntArrayRef tables, int64_t width,
                         at::IntArrayRef lens, at::IntArrayRef query_starts,
                         at::IntArrayRef groups, at::TensorList cos, at::TensorList sin,
                         double embed_scale, const c10::List<c10::optional<at::Tensor>>& weights,
                         at::TensorList caches, const at::Tensor& head, int64_t vocab,
                         int64_t block_size, int64_t heads, int64_t kv_heads,
                         at::IntArrayRef windows, double eps, double scale, bool gelu,
                         double softcap, double final_softcap) {
  const int64_t M = static_cast<int64_t>(ids.size()), layers = caches.size() / 2;
  const int64_t num_groups = M > 0 ? static_cast<int64_t>(slots.size()) / M : 0;
  TORCH_CHECK(M > 0 && positions.size() == ids.size() && lens.size() == ids.size() &&
                  static_cast<int64_t>(slots.size()) == num_groups * M &&
                  static_cast<int64_t>(tables.size()) == num_groups * M * width,
              "decode_logits: one position and length per id, a slot and a table row per id "
              "and KV group");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers * PER_LAYER + 1,
              "decode_logits: weights per layer");
  TORCH_CHECK(embed.is_contiguous() && static_cast<int64_t>(cos.size()) == num_groups &&
                  sin.size() == cos.size(),
              "decode_logits: the embedding, and a rope table per KV group");
  for (size_t g = 0; g < cos.size(); ++g)
    TORCH_CHECK(cos[g].is_contiguous() && sin[g].is_contiguous() &&
                    cos[g].scalar_type() == embed.scalar_type(),
                "decode_logits: rope tables [positions, head_dim] in the embedding's dtype");
  const int64_t* qs = query_starts.empty() ? nullptr : query_starts.data();
  const int64_t NS = query_starts.empty() ? M : static_cast<int64_t>(query_starts.size()) - 1;
  check_rows(M, layers, num_groups, groups, windows, qs, NS, "decode_logits");
  const at::Tensor& k0 = caches[0];
  StepShape s{M, embed.size(1), heads, kv_heads, k0.size(-1), width, block_size,
              weights.get(8)->size(1), static_cast<float>(eps), static_cast<float>(scale),
              static_cast<float>(softcap), gelu};
  StepRows rows{slots.data(), tables.data(), lens.data(), qs, NS, groups};
  if (embed.scalar_type() == at::kBFloat16)
    return decode_logits_impl<at::BFloat16>(embed, ids, positions, windows, weights, caches, cos,
                                            sin, embed_scale, head, vocab, rows, s,
                                            final_softcap);
  TORCH_CHECK(embed.scalar_type() == at::kFloat, "decode_logits: float32 or bfloat16");
  return decode_logits_impl<float>(embed, ids, positions, windows, weights, caches, cos, sin,
                                   embed_scale, head, vocab, rows, s, final_softcap);
}

TORCH_LIBRARY(enginehouse_decode, m) {
  m.def("blocked_pack(Tensor w) -> Tensor");
  m.def("blocked_linear(Tensor x, Tensor w, Tensor? bias, int n) -> Tensor");
  m.def("add_rms_norm(Tensor(a!) x, Tensor? delta, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rope_store(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slots, int heads, int kv_heads) -> Tensor");
  m.impl("blocked_pack", c10::DispatchKey::CPU, &blocked_pack);
  m.impl("blocked_linear", c10::DispatchKey::CPU, &blocked_linear);
  m.impl("add_rms_norm", c10::DispatchKey::CPU, &add_rms_norm);
  m.impl("silu_mul", c10::DispatchKey::CPU, &silu_mul);
  m.def("decode_layers(Tensor(a!) x, Tensor?[] weights, Tensor(b!)[] caches, Tensor cos, "
        "Tensor sin, Tensor slots, Tensor tables, Tensor lens, Tensor? query_starts, "
        "int[] groups, int block_size, int heads, int kv_heads, int[] windows, float eps, "
        "float scale, float softcap, bool gelu) -> Tensor");
  m.impl("rope_store", c10::DispatchKey::CPU, &rope_store);
  m.def("rope_store_inplace(Tensor(a!) qkv, Tensor cos, Tensor sin, Tensor(b!) k_cache, "
        "Tensor(c!) v_cache, Tensor slots, int heads, int kv_heads) -> Tensor(a!)");
  m.impl("rope_store_inplace", c10::DispatchKey::CPU, &rope_store_inplace);
  m.def("decode_logits(Tensor embed, int[] ids, int[] positions, int[] slots, int[] tables, "
        "int width, int[] lens, int[] query_starts, int[] groups, Tensor[] cos, Tensor[] sin, "
        "float embed_scale, Tensor?[] weights, Tensor(a!)[] caches, "
        "Tensor head, int vocab, int block_size, int heads, int kv_heads, int[] windows, "
        "float eps, float scale, bool gelu, float softcap, float final_softcap) -> Tensor");
  m.impl("decode_layers", c10::DispatchKey::CPU, &decode_layers);
  m.impl("decode_logits", c10::DispatchKey::CPU, &decode_logits);
}
"""
# The attention kernel is compiled in too: the whole decode step calls it directly.
SOURCE = cpu_kernels.KERNEL + KERNELS


@functools.cache
def load(flags: tuple[str, ...] = ()) -> bool:
    """Build (or find already built) and register the kernels; False where that fails."""
    what = "CPU decode kernels"
    built = cpu_build.build("enginehouse_cpu_decode", SOURCE, what, extra_flags=flags)
    return built and hasattr(torch.ops.enginehouse_decode, "blocked_linear")


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> the layout of `linear` (groups of 64 or 32 columns, by the ISA)."""
    return torch.ops.enginehouse_decode.blocked_pack(weight.contiguous())


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int):
    """x @ W.T + bias for a weight `pack`ed from W [n, K]; x [rows, K] in any float dtype."""
    return torch.ops.enginehouse_decode.blocked_linear(x, packed, bias, n)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight, eps: float):
    """x += delta (in place, when given), then RMSNorm(x) * weight."""
    return torch.ops.enginehouse_decode.add_rms_norm(x, delta, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [rows, 2 * I]."""
    return torch.ops.enginehouse_decode.silu_mul(gate_up)


def rope_store(
    qkv, cos, sin, cache, slots, heads: int, kv_heads: int, in_place: bool = False
) -> torch.Tensor:
    """q rotated [T, heads, D] from qkv [T, (heads + 2 kv_heads) D]; k (rotated) and v are
    written into their slots of the layer's cache. `in_place` (a prefill, which attends over
    its own K/V): q and k are rotated inside qkv instead, and qkv is returned."""
    # M-RoPE's rows (Qwen2-VL) come as a transposed view: the kernel reads rows in place.
    cos, sin = cos.contiguous(), sin.contiguous()
    op = torch.ops.enginehouse_decode
    op = op.rope_store_inplace if in_place else op.rope_store
    return op(qkv, cos, sin, cache[0], cache[1], slots, heads, kv_heads)
