// One row of the causal softmax and of its backward, in float32 vectors: what the softmax ops
// (causal_softmax.cpp) run per packed row, and what the fused attention ops run on the rows a
// matmul has just made (attention_fused.cpp). Rows are float32 or bfloat16 in memory.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace fastgpt::cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

// exp(x) for a softmax's arguments, x <= 0 (scale·s minus the row's max or log-sum-exp; -inf
// allowed): 2^n · 2^f with n = round(x·log2 e), 2^f by its degree-6 Taylor polynomial on
// [-1/2, 1/2] (truncation error < 2e-7 relative), 2^n by vscalefps, which underflows to zero
// without exp_u20's range checks: 11 instructions instead of ~20, the exponentials being a large
// part of the flash kernels' work outside the products. Elsewhere (AVX2), exp_u20.
inline Vec exp_nonpositive(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  // max(-120, x): -inf becomes 2^-173, which scalef rounds to 0; NaN (the second operand) stays NaN
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(_mm512_set1_ps(-120.0f), x), _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);  // ln2^6 / 6!, ..., ln2, 1
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402265069591007f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931471805599453f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
#else
  return x.exp_u20();
#endif
}

// Every loop below runs whole vectors; the ragged end of a row (L % 16 lanes) goes through the
// same vector code with masked loads and stores, not a scalar exp per element. bfloat16 rows are
// widened as they are loaded and rounded as they are stored (no float32 copy of a row), with the
// same float32 math as float32 rows: the same results bit for bit as converting first.

// kW floats from x[0, n), n <= kW, zeros after n.
inline Vec load_row(const float* x, int64_t n) { return Vec::loadu(x, n); }
inline Vec load_row(const c10::BFloat16* x, int64_t n) {
  Vec out;
  if (n == kW) {
    at::vec::load_fp32_from_bf16(x, out);
  } else {
    c10::BFloat16 part[kW] = {};
    std::copy(x, x + n, part);
    at::vec::load_fp32_from_bf16(part, out);
  }
  return out;
}

// x[0, n) = v's first n lanes (rounded to nearest even for bfloat16).
inline void store_row(float* x, const Vec& v, int64_t n) { v.store(x, n); }
inline void store_row(c10::BFloat16* x, const Vec& v, int64_t n) { at::vec::convert_float_bfloat16(v, v).store(x, n); }

// out[0..L) = softmax(scale · s[0..L)), times mult when given. e: L floats for the exponentials
// (out itself when out is float32). lse, when given, receives the row's log-sum-exp,
// log Σ exp(scale · s): the flash kernels' backward recomputes the row from it.
template <typename in_t, typename out_t>
inline void softmax_row(const in_t* s, out_t* out, float* e, int64_t L, float scale, const float* mult,
                        float* lse = nullptr) {
  const Vec vscale(scale), neg_inf(-std::numeric_limits<float>::infinity()), zero(0.0f);
  const int64_t full = L / kW * kW, tail = L - full;
  Vec vmax = neg_inf;
  for (int64_t j = 0; j < full; j += kW) vmax = at::vec::maximum(vmax, load_row(s + j, kW) * vscale);
  if (tail > 0) vmax = at::vec::maximum(vmax, Vec::set(neg_inf, load_row(s + full, tail) * vscale, tail));
  const float mx = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);

  const Vec vmx(mx);
  Vec vsum = zero;
  for (int64_t j = 0; j < full; j += kW) {
    const Vec x = exp_nonpositive(load_row(s + j, kW) * vscale - vmx);
    x.store(e + j);
    vsum += x;
  }
  if (tail > 0) {
    const Vec x = Vec::set(zero, exp_nonpositive(load_row(s + full, tail) * vscale - vmx), tail);
    x.store(e + full, tail);
    vsum += x;
  }
  const float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
  if (lse != nullptr) *lse = mx + std::log(sum);

  const Vec vinv(1.0f / sum);
  for (int64_t j = 0; j < L; j += kW) {
    const int64_t n = std::min(kW, L - j);
    const Vec p = Vec::loadu(e + j, n) * vinv;
    store_row(out + j, mult != nullptr ? p * Vec::loadu(mult + j, n) : p, n);
  }
}

// ds[0..L) = scale · p ∘ (dP - Σ dP ∘ p), dP = g ∘ mult (the forward's dropout applied to its
// gradient) or g; p: the probabilities before dropout.
template <typename g_t, typename p_t, typename out_t>
inline void softmax_grad_row(const g_t* g, const p_t* p, out_t* ds, int64_t L, float scale, const float* mult) {
  auto grad_times_mask = [&](int64_t j, int64_t n) {
    const Vec dp = load_row(g + j, n);
    return mult != nullptr ? dp * Vec::loadu(mult + j, n) : dp;
  };
  Vec vacc(0.0f);  // masked loads are zero past the end, so the tail's products add nothing
  for (int64_t j = 0; j < L; j += kW) {
    const int64_t n = std::min(kW, L - j);
    vacc = at::vec::fmadd(grad_times_mask(j, n), load_row(p + j, n), vacc);
  }
  const float acc = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vacc);
  const Vec vacc_b(acc), vscale(scale);
  for (int64_t j = 0; j < L; j += kW) {
    const int64_t n = std::min(kW, L - j);
    store_row(ds + j, (grad_times_mask(j, n) - vacc_b) * load_row(p + j, n) * vscale, n);
  }
}

// One row of the flash backward (attention_flash.cpp), in one pass: from the forward's
// log-sum-exp, P = exp(scale·s - lse); dS = scale · P ∘ (dP - delta), dP = g ∘ mult (the
// forward's dropout applied to its gradient) or g, delta = Σ dP ∘ P, which the caller has as dO·out.
// dS replaces g and P ∘ mult (what dv's product reads) replaces s; both are zero in [L, n).
inline void flash_grad_row(float* s, float* g, int64_t L, int64_t n, float scale, float lse, float delta,
                           const float* mult) {
  const Vec vscale(scale), vlse(lse), vdelta(delta);
  for (int64_t j = 0; j < L; j += kW) {
    const int64_t c = std::min(kW, L - j);
    const Vec p = exp_nonpositive(Vec::loadu(s + j, c) * vscale - vlse);
    Vec dp = Vec::loadu(g + j, c);
    if (mult != nullptr) {
      const Vec m = Vec::loadu(mult + j, c);
      dp = dp * m;
      (p * m).store(s + j, c);
    } else {
      p.store(s + j, c);
    }
    ((dp - vdelta) * p * vscale).store(g + j, c);
  }
  std::fill(s + L, s + n, 0.0f);
  std::fill(g + L, g + n, 0.0f);
}

}  // namespace fastgpt::cpu
