// One row of the general flash attention (attention_flash_options.cpp) in float32 vectors: which
// keys each query sees (Band), what acts on its scores (ScoreMods), the forward's softmax with a
// sink, the backward's P and dS, the dropout multipliers of a span of keys, and the float32 views
// of float32 or bfloat16 rows that the GEMMs read and write.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "../philox.h"
#include "common.h"
#include "dropout_cpu.h"
#include "softmax_rows.h"

namespace fastgpt::cpu {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The keys query i sees: [begin(i), end(i)), both clamped to [0, T_k] and non-decreasing in i.
// left, right: the window's sides, -1 unbounded; a causal call's right is 0.
struct Band {
  int64_t T_q, T_k, left, right;

  Band(int64_t tq, int64_t tk, bool causal, int64_t l, int64_t r)
      : T_q(tq), T_k(tk), left(l), right(causal ? 0 : r) {}
  int64_t pos(int64_t i) const { return T_k - T_q + i; }
  int64_t begin(int64_t i) const { return left < 0 ? 0 : std::clamp<int64_t>(pos(i) - left, 0, T_k); }
  int64_t end(int64_t i) const {
    const int64_t e = right < 0 ? T_k : std::clamp<int64_t>(pos(i) + right + 1, 0, T_k);
    return std::max(e, begin(i));  // a row that sees no key: an empty range at begin
  }
  // The keys of row block [r0, r0 + m): (first key, width).
  std::pair<int64_t, int64_t> span(int64_t r0, int64_t m) const {
    const int64_t b0 = begin(r0);
    return {b0, std::max<int64_t>(end(r0 + m - 1) - b0, 0)};
  }
};

// One sequence of a call: the batch entry of the (B, H, T, D) tensors that holds it, its first
// query and key rows there, and its band.
struct Sequence {
  int64_t entry, q0, k0;
  Band band;
};

// The sequences of a call. A regular call has B of them, sequence b in batch entry b, each T_q × T_k.
// A packed (varlen) call's tensors are (1, H, total, D) views, sequence b owning the query rows
// [cu_q[b], cu_q[b + 1]) and the key rows [cu_k[b], cu_k[b + 1]); T_q and T_k are the longest.
// Either way the dropout stream keys query i of sequence b, head h, by the flat row (b·H + h)·T_q + i,
// so a packed call draws the mask of the (B, H, T_q, T_k) call its sequences would pad to.
struct Sequences {
  int64_t count, T_q, T_k;
  bool causal;
  int64_t left, right;
  const int32_t* cu_q = nullptr;  // (count + 1), or null: a regular call
  const int32_t* cu_k = nullptr;

  Sequence operator[](int64_t b) const {
    if (cu_q == nullptr) return {b, 0, 0, Band(T_q, T_k, causal, left, right)};
    return {0, cu_q[b], cu_k[b], Band(cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b], causal, left, right)};
  }
};

// What acts on a score besides the band.
struct ScoreMods {
  float scale, softcap;   // softcap 0: off
  const float* slopes;    // ALiBi (B·H), or null
  const float* sinks;     // (H) logits, or null
  int64_t H;
};

// A row's scores s[a, e) from its products q·k (key j at s[j], its position key0 + j), in place:
// scaled, soft-capped, ALiBi's -slope·|pos - key| added. dcap[a, e) (when given) receives 1 - tanh².
inline void score_row(float* s, int64_t a, int64_t e, float key0, float pos, const ScoreMods& mods, float slope,
                      float* dcap = nullptr) {
  const Vec vscale(mods.scale), vcap(mods.softcap), vinv_cap(mods.softcap > 0 ? 1.0f / mods.softcap : 0.0f);
  const Vec vpos(pos), vslope(slope), one(1.0f);
  for (int64_t j = a; j < e; j += kW) {
    const int64_t n = std::min(kW, e - j);
    Vec x = Vec::loadu(s + j, n) * vscale;
    if (mods.softcap > 0) {
      const Vec t = (x * vinv_cap).tanh();
      x = vcap * t;
      if (dcap != nullptr) (one - t * t).store(dcap + j, n);
    }
    if (mods.slopes != nullptr) x = x - vslope * (vpos - Vec::arange(key0 + static_cast<float>(j), 1.0f)).abs();
    x.store(s + j, n);
  }
}

// p[0, w) = the softmax of the scores s[a, e), the sink's exp(sink) in its denominator, times the
// dropout multipliers (indexed like s) when given; zero outside [a, e). Returns the log-sum-exp
// (-inf for a row with no key and no sink: its output is 0).
inline float softmax_band_row(float* s, int64_t w, int64_t a, int64_t e, const float* sink, const float* mult) {
  Vec vmax(kNegInf);
  for (int64_t j = a; j < e; j += kW) {
    const int64_t n = std::min(kW, e - j);
    vmax = at::vec::maximum(vmax, Vec::set(Vec(kNegInf), Vec::loadu(s + j, n), n));
  }
  float mx = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, vmax);
  if (sink != nullptr) mx = std::max(mx, *sink);
  std::fill(s, s + a, 0.0f);
  std::fill(s + e, s + w, 0.0f);
  if (mx == kNegInf) {  // no key (or every score -inf, which api.py leaves unspecified)
    std::fill(s + a, s + e, 0.0f);
    return kNegInf;
  }
  const Vec vmx(mx);
  Vec vsum(0.0f);
  for (int64_t j = a; j < e; j += kW) {
    const int64_t n = std::min(kW, e - j);
    const Vec x = Vec::set(Vec(0.0f), exp_nonpositive(Vec::loadu(s + j, n) - vmx), n);
    x.store(s + j, n);
    vsum += x;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, vsum);
  if (sink != nullptr) sum += std::exp(*sink - mx);
  const Vec vinv(1.0f / sum);
  for (int64_t j = a; j < e; j += kW) {
    const int64_t n = std::min(kW, e - j);
    const Vec p = Vec::loadu(s + j, n) * vinv;
    (mult != nullptr ? p * Vec::loadu(mult + j, n) : p).store(s + j, n);
  }
  return mx + std::log(sum);
}

// One row of the backward from its products s = q·k and g = dO·v (ld w): P = exp(score - lse)
// (times mult: what dv's product reads) into s, dS = P∘(dP - delta)·(1 - tanh²)·scale into g, with
// dP = g∘mult; zero outside [a, e). cap: scratch for 1 - tanh² (soft-capping only).
inline void grad_band_row(float* s, float* g, int64_t w, int64_t a, int64_t e, float key0, float pos,
                          const ScoreMods& mods, float slope, float lse, float delta, const float* mult, float* cap) {
  score_row(s, a, e, key0, pos, mods, slope, cap);
  const Vec vlse(lse), vdelta(delta), vscale(mods.scale);
  for (int64_t j = a; j < e; j += kW) {
    const int64_t n = std::min(kW, e - j);
    const Vec p = exp_nonpositive(Vec::loadu(s + j, n) - vlse);
    Vec dp = Vec::loadu(g + j, n);
    if (mult != nullptr) {
      const Vec m = Vec::loadu(mult + j, n);
      dp = dp * m;
      (p * m).store(s + j, n);
    } else {
      p.store(s + j, n);
    }
    Vec ds = (dp - vdelta) * p * vscale;
    if (mods.softcap > 0) ds = ds * Vec::loadu(cap + j, n);
    ds.store(g + j, n);
  }
  for (float* x : {s, g}) {
    std::fill(x, x + a, 0.0f);
    std::fill(x + e, x + w, 0.0f);
  }
}

// The dropout multipliers of flat row `flat` at columns [col0, col0 + n), or null without dropout.
// The stream draws four columns per Philox block, so the draw starts at col0 rounded down to 4.
inline const float* band_multipliers(const DropoutStream& ds, int64_t flat, int64_t col0, int64_t n, std::vector<float>& buf) {
  if (!ds.enabled || n <= 0) return nullptr;
  const int64_t lead = col0 % 4, first = col0 - lead, total = n + lead;
  buf.resize(static_cast<size_t>(total + 64));  // whole draws of 64 columns
  for (int64_t c = 0; c < total; c += 64) {
    dropout_multipliers_64(ds, static_cast<uint32_t>(flat), static_cast<uint32_t>((first + c) / 4), buf.data() + c);
  }
  return buf.data() + lead;
}

// Rows [0, n) of D floats: float32 rows in place (ld kept), bfloat16 ones converted into buf (ld D).
inline const float* rows_as_float(const float* src, int64_t ld, int64_t, int64_t, std::vector<float>&, int64_t& ld_out) {
  ld_out = ld;
  return src;
}
inline const float* rows_as_float(const c10::BFloat16* src, int64_t ld, int64_t n, int64_t D, std::vector<float>& buf,
                                  int64_t& ld_out) {
  buf.resize(std::max<size_t>(buf.size(), static_cast<size_t>(n * D)));
  for (int64_t i = 0; i < n; ++i) to_float(src + i * ld, buf.data() + i * D, D);
  ld_out = D;
  return buf.data();
}

// Where a product writes n rows of D that end up at dst (ld): dst itself for float32, else buf
// (ld D), which store_rows then rounds into dst.
template <typename scalar_t>
inline float* float_rows(scalar_t* dst, int64_t ld, int64_t n, int64_t D, std::vector<float>& buf, int64_t& ld_out) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    ld_out = ld;
    return dst;
  } else {
    buf.resize(std::max<size_t>(buf.size(), static_cast<size_t>(n * D)));
    ld_out = D;
    return buf.data();
  }
}
template <typename scalar_t>
inline void store_rows(const float* src, scalar_t* dst, int64_t ld, int64_t n, int64_t D) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    for (int64_t i = 0; i < n; ++i) from_float(src + i * D, dst + i * ld, D);
  }
}

}  // namespace fastgpt::cpu
