// The flash kernels of attention_flash.cpp in bfloat16 on the CPU's matrix units (AMX-BF16): the
// same algorithm and contracts (lse float32, dropout from causal_softmax's mask, results that do
// not depend on the thread count), every product on amx_tiles.h's brgemm with bfloat16 operands
// and float32 accumulation, the softmax and its gradient in float32 vectors.
//
// Key-major: a row block's scores are held transposed, Sᵀ (w keys × 64 queries), so that
//   - each product is one micro-kernel call over all w keys (M = w): the B operand, at most 64
//     columns wide, is the block's 64 queries, not a 64-key tile (amx_matmul.cpp's nt needs w / 64
//     calls, and every call costs a kernel lookup and often a tile reconfiguration);
//   - the softmax runs down the keys with a query per vector lane: the row maxima and sums are kept
//     per lane, never reduced across a vector, and the causal mask is a lane compare on the 64 keys
//     the diagonal crosses;
//   - two consecutive keys of P or dS are exactly one VNNI pair row of the next product's B.
//
// Row block r: queries [r0, r0 + m), m ≤ 64, keys [0, w), w = o + r0 + m, w2 = w rounded up to even.
//
//   forward   Sᵀ = k·qᵀ          A = the head's key rows in place, B = qᵀ (the block, VNNI)
//             P = softmax         per lane; exp(scale·s - max) rounded into VNNI pairs, not yet
//                                 divided by the sum (the D × 64 output is: D multiplies per query
//                                 instead of w)
//             outᵀ = vᵀ·Pᵀ        A = vᵀ (D × T_k, transposed once per call), B = the pairs
//   backward  Sᵀ = k·qᵀ, dPᵀ = v·dOᵀ
//             P = exp(scale·S - lse), dS = scale·P∘(dP - delta), per lane in one pass (delta =
//                                 Σ dP∘P = dO·out per query, from the op)
//             dv += Pᵀ·dO, dk += dSᵀ·q   A = Pᵀ, dSᵀ (w × 64, row-major), B = dO, q rows in VNNI pairs
//             dqᵀ = kᵀ·dSᵀ           A = kᵀ (D × T_k, transposed once per head), B = dS's key pairs
//
// The backward gives each thread whole key/value heads and adds every row block of the group's
// query heads into float32 dk and dv (T_k × D) in a fixed order, rounding them once at the end.
// bfloat16 is rounded where the materialised path rounds (P and dS before their products, each
// output once), so its parity rule is the same.

#include "attention_flash_amx.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "amx_tiles.h"
#include "dropout_cpu.h"
#include "isa.h"
#include "softmax_rows.h"

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace fastgpt::cpu::amx {
namespace {

constexpr int64_t kBlock = kCausalBlock;   // queries per row block: the B operands' 64 columns
constexpr int64_t kLanes = kBlock / kW;    // vectors per key row

// Work (multiply-adds) below which a thread is not worth waking: ten times the float32 kernels'
// threshold, since AMX tiles get through multiply-adds that much sooner.
constexpr double kMinCostPerThread = 5e6;

// Rounding float32 vectors to bfloat16 (to nearest even), as the hot loops store them: `row`, 16
// halves in order; `pairs`, 16 VNNI words (a[l], b[l]), keys j and j + 1 of 16 queries.
// SoftBf16 is ATen's integer rounding (~7 instructions per 16); NativeBf16 is AVX512-BF16's
// vcvtne2ps2bf16 (one per 32; every CPU with AMX-BF16 has it, and isa.h checks it at run time).
// They differ only in denormals, which the instruction flushes to zero; fewer instructions in the
// softmax loops, where the rounding is a large share of the work.
#if defined(CPU_CAPABILITY_AVX512)
alignas(64) constexpr uint16_t kZip[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                           8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
struct SoftBf16 {
  static inline void row(const Vec& a, bf16* out) { store_row(out, a, kW); }
  static inline void pairs(const Vec& a, const Vec& b, uint32_t* out) {
    const __m512i ab = at::vec::convert_float_bfloat16(a, b);  // a's 16 halves, then b's
    _mm512_storeu_si512(out, _mm512_permutexvar_epi16(_mm512_load_si512(kZip), ab));
  }
};
#define FASTGPT_BF16_TARGET __attribute__((target("avx512bf16")))
struct NativeBf16 {
  FASTGPT_BF16_TARGET static inline void row(const Vec& a, bf16* out) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(a)));
  }
  FASTGPT_BF16_TARGET static inline void pairs(const Vec& a, const Vec& b, uint32_t* out) {
    const __m512i ab = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));  // a's 16 halves, then b's
    _mm512_storeu_si512(out, _mm512_permutexvar_epi16(_mm512_load_si512(kZip), ab));
  }
};
// The avx512bf16 switch off takes SoftBf16 anyway (isa.h: read at every call, so that a test
// compares the two in one process).
bool native_bf16() { return isa::use_avx512bf16(); }
#else
struct SoftBf16 {
  static inline void row(const Vec& a, bf16* out) { store_row(out, a, kW); }
  static inline void pairs(const Vec& a, const Vec& b, uint32_t* out) {
    float fa[kW], fb[kW];
    a.store(fa);
    b.store(fb);
    for (int64_t l = 0; l < kW; ++l) out[l] = bf16(fa[l]).x | (static_cast<uint32_t>(bf16(fb[l]).x) << 16);
  }
};
#define FASTGPT_BF16_TARGET
using NativeBf16 = SoftBf16;
bool native_bf16() { return false; }
#endif

// The lanes of key j that see it: query i sees keys up to o + r0 + i = diag + i. A vector of
// queries [16c, 16c + 16) keeps lanes whose index is at least j - diag.
struct CausalLanes {
  Vec index[kLanes];
  CausalLanes() {
    for (int64_t c = 0; c < kLanes; ++c) index[c] = Vec::arange(static_cast<float>(c * kW), 1.0f);
  }
  // x where lane c·16 + l sees key j, fill elsewhere.
  Vec keep(const Vec& x, int64_t c, int64_t j, int64_t diag, const Vec& fill) const {
    return j < diag ? x : Vec::blendv(fill, x, index[c] >= Vec(static_cast<float>(j - diag)));
  }
};

// The block's dropout multipliers, key-major (w × 64): lane i of key j is row i's multiplier for
// key j; zero in lanes past m. rows: scratch for the rows as dropout_multipliers draws them.
void transposed_multipliers(const DropoutStream& ds, int64_t flat0, int64_t m, int64_t diag, int64_t w,
                            std::vector<float>& rows, std::vector<float>& out) {
  rows.assign(static_cast<size_t>(kBlock * w), 0.0f);
  out.resize(static_cast<size_t>(w * kBlock));
  for (int64_t i = 0; i < m; ++i) dropout_multipliers(ds, static_cast<uint32_t>(flat0 + i), diag + i + 1, rows.data() + i * w);
  at::vec::transpose_mxn<float>(rows.data(), w, out.data(), kBlock, static_cast<int>(kBlock), static_cast<int>(w));
}

// dst (m × D rows, ld, bfloat16) = the transpose of src (D × 64, float32), its first m columns,
// row i times row_scale[i] when given.
void rows_from_transposed(const float* src, int64_t D, int64_t m, bf16* dst, int64_t ld, std::vector<float>& scratch,
                          const float* row_scale = nullptr) {
  scratch.resize(static_cast<size_t>(kBlock * D));
  at::vec::transpose_mxn<float>(src, kBlock, scratch.data(), D, static_cast<int>(D), static_cast<int>(m));
  for (int64_t i = 0; i < m; ++i) {
    float* row = scratch.data() + i * D;
    if (row_scale != nullptr) {
      const Vec f(row_scale[i]);
      for (int64_t d = 0; d < D; d += kW) (Vec::loadu(row + d, std::min(kW, D - d)) * f).store(row + d, std::min(kW, D - d));
    }
    from_float(row, dst + i * ld, D);
  }
}

// The forward's softmax of one row block, down the w keys of Sᵀ (ld 64) with a query per lane:
// exp(scale·s - max) into the VNNI pairs (times the dropout multipliers), and per query 1 / Σ exp
// and the log-sum-exp (float[64] each). A key row is four vectors, kept in registers (unrolled).
template <bool kDropout, class Cvt>
[[gnu::always_inline]] inline void forward_softmax(const float* st, int64_t w, int64_t diag, float scale, const float* mult, const CausalLanes& lanes,
                     uint32_t* pairs, float* inv_sum, float* lse) {
  const Vec vscale(scale), neg_inf(-std::numeric_limits<float>::infinity()), zero(0.0f);
  Vec mx[kLanes], sum[kLanes];
#pragma GCC unroll 4
  for (int64_t c = 0; c < kLanes; ++c) mx[c] = neg_inf, sum[c] = zero;
  for (int64_t j = 0; j < w; ++j) {
#pragma GCC unroll 4
    for (int64_t c = 0; c < kLanes; ++c) {
      const Vec x = Vec::loadu(st + j * kBlock + c * kW) * vscale;
      mx[c] = at::vec::maximum(mx[c], j < diag ? x : lanes.keep(x, c, j, diag, neg_inf));
    }
  }
  for (int64_t j = 0; j < w; j += 2) {
    const bool odd = j + 1 < w;
#pragma GCC unroll 4
    for (int64_t c = 0; c < kLanes; ++c) {
      const float* s = st + j * kBlock + c * kW;
      Vec a = exp_nonpositive(at::vec::fmsub(Vec::loadu(s), vscale, mx[c]));
      Vec b = odd ? exp_nonpositive(at::vec::fmsub(Vec::loadu(s + kBlock), vscale, mx[c])) : zero;
      if (j + 1 >= diag) {  // the diagonal's keys: only the lanes that see them
        a = lanes.keep(a, c, j, diag, zero);
        b = lanes.keep(b, c, j + 1, diag, zero);
      }
      sum[c] += a + b;
      if constexpr (kDropout) {
        a = a * Vec::loadu(mult + j * kBlock + c * kW);
        if (odd) b = b * Vec::loadu(mult + (j + 1) * kBlock + c * kW);
      }
      Cvt::pairs(a, b, pairs + j / 2 * kBlock + c * kW);
    }
  }
#pragma GCC unroll 4
  for (int64_t c = 0; c < kLanes; ++c) {
    (Vec(1.0f) / sum[c]).store(inv_sum + c * kW);
    (mx[c] + sum[c].log()).store(lse + c * kW);
  }
}

// The backward's rows of one row block in one pass down the keys, a query per lane:
// P = exp(scale·S - lse), dS = scale·P∘(dP - delta) into dst (row-major) and its VNNI pairs, and P
// (times the dropout multipliers) into pt; delta (float[64]) is each query's Σ dP∘P, which the op
// has as dO·out. The odd key's pair half is zero.
template <bool kDropout, class Cvt>
[[gnu::always_inline]] inline void backward_rows(const float* st, const float* dpt, int64_t w, int64_t diag, float scale,
                                                 const float* lse, const float* delta, const float* mult,
                                                 const CausalLanes& lanes, bf16* pt, bf16* dst, uint32_t* ds_pairs) {
  const Vec vscale(scale), zero(0.0f);
  Vec row_lse[kLanes], row_delta[kLanes];
#pragma GCC unroll 4
  for (int64_t c = 0; c < kLanes; ++c) row_lse[c] = Vec::loadu(lse + c * kW), row_delta[c] = Vec::loadu(delta + c * kW);
  for (int64_t j = 0; j < w; j += 2) {
    const int64_t keys = std::min<int64_t>(2, w - j);
#pragma GCC unroll 4
    for (int64_t c = 0; c < kLanes; ++c) {
      Vec d_s[2] = {zero, zero};
      for (int64_t t = 0; t < keys; ++t) {
        const int64_t e = (j + t) * kBlock + c * kW;
        Vec p = exp_nonpositive(at::vec::fmsub(Vec::loadu(st + e), vscale, row_lse[c]));
        if (j + t >= diag) p = lanes.keep(p, c, j + t, diag, zero);
        Vec dp = Vec::loadu(dpt + e);
        if constexpr (kDropout) {
          const Vec m = Vec::loadu(mult + e);
          dp = dp * m;
          Cvt::row(p * m, pt + e);
        } else {
          Cvt::row(p, pt + e);
        }
        d_s[t] = (dp - row_delta[c]) * p * vscale;
        Cvt::row(d_s[t], dst + e);
      }
      Cvt::pairs(d_s[0], d_s[1], ds_pairs + j / 2 * kBlock + c * kW);
    }
  }
}

// The two above for each dropout setting and rounding: NativeBf16's need the target attribute on
// the function its intrinsics are inlined into.
using ForwardSoftmax = void (*)(const float*, int64_t, int64_t, float, const float*, const CausalLanes&, uint32_t*,
                                float*, float*);
using BackwardRows = void (*)(const float*, const float*, int64_t, int64_t, float, const float*, const float*,
                              const float*, const CausalLanes&, bf16*, bf16*, uint32_t*);
template <bool kDropout>
FASTGPT_BF16_TARGET void forward_softmax_native(const float* st, int64_t w, int64_t diag, float scale, const float* mult,
                                                const CausalLanes& lanes, uint32_t* pairs, float* inv_sum, float* lse) {
  forward_softmax<kDropout, NativeBf16>(st, w, diag, scale, mult, lanes, pairs, inv_sum, lse);
}
template <bool kDropout>
void forward_softmax_soft(const float* st, int64_t w, int64_t diag, float scale, const float* mult,
                          const CausalLanes& lanes, uint32_t* pairs, float* inv_sum, float* lse) {
  forward_softmax<kDropout, SoftBf16>(st, w, diag, scale, mult, lanes, pairs, inv_sum, lse);
}
template <bool kDropout>
FASTGPT_BF16_TARGET void backward_rows_native(const float* st, const float* dpt, int64_t w, int64_t diag, float scale,
                                              const float* lse, const float* delta, const float* mult,
                                              const CausalLanes& lanes, bf16* pt, bf16* dst, uint32_t* ds_pairs) {
  backward_rows<kDropout, NativeBf16>(st, dpt, w, diag, scale, lse, delta, mult, lanes, pt, dst, ds_pairs);
}
template <bool kDropout>
void backward_rows_soft(const float* st, const float* dpt, int64_t w, int64_t diag, float scale, const float* lse,
                        const float* delta, const float* mult, const CausalLanes& lanes, bf16* pt, bf16* dst,
                        uint32_t* ds_pairs) {
  backward_rows<kDropout, SoftBf16>(st, dpt, w, diag, scale, lse, delta, mult, lanes, pt, dst, ds_pairs);
}
ForwardSoftmax pick_forward_softmax(bool dropout) {
  if (native_bf16()) return dropout ? forward_softmax_native<true> : forward_softmax_native<false>;
  return dropout ? forward_softmax_soft<true> : forward_softmax_soft<false>;
}
BackwardRows pick_backward_rows(bool dropout) {
  if (native_bf16()) return dropout ? backward_rows_native<true> : backward_rows_native<false>;
  return dropout ? backward_rows_soft<true> : backward_rows_soft<false>;
}

}  // namespace

void flash_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const CausalLayout& L, float scale,
                   const DropoutStream& ds, at::Tensor& out, at::Tensor& lse) {
  const int64_t BH = q.size(0) * q.size(1), BH_kv = k.size(0) * k.size(1), D = q.size(3), group = q.size(1) / k.size(1);
  const auto Q = rows4<bf16>(q), K = rows4<bf16>(k), V = rows4<bf16>(v), O = rows4<bf16>(out);
  float* lse_data = lse.data_ptr<float>();
  const int64_t T_k2 = round_up(L.T_k, 2);

  // vᵀ of every key/value head, (D × T_k2), zero in the odd key: A of outᵀ = vᵀ·Pᵀ.
  at::Tensor vt_storage = BufferPool::instance().empty({BH_kv * D * T_k2}, v.options());
  bf16* vt = vt_storage.data_ptr<bf16>();
  at::parallel_for(0, BH_kv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t kv = begin; kv < end; ++kv) transpose_rows(V.at(kv), V.ld, L.T_k, D, vt + kv * D * T_k2, T_k2, T_k2);
  });

  const CausalLanes lanes;
  const ForwardSoftmax softmax = pick_forward_softmax(ds.enabled);
  auto cum = head_prefix_cost(L.R, [&](int64_t r) { return static_cast<double>(L.rows(r) * L.width(r) * (2 * D + 8)); });
  parallel_for_balanced(BH * L.R, cum, kMinCostPerThread, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> qt(D / 2 * kTile), pairs;
    std::vector<float> st, ot(D * kBlock), rows, mult_rows, mult;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / L.R, r = item % L.R, r0 = r * kBlock, m = L.rows(r), kv = bh / group;
      const int64_t diag = L.o + r0, w = diag + m, w2 = round_up(w, 2), flat0 = bh * L.T_q + r0;
      st.resize(std::max<size_t>(st.size(), static_cast<size_t>(w * kBlock)));
      pairs.resize(std::max<size_t>(pairs.size(), static_cast<size_t>(w2 / 2 * kBlock)));
      pack_transposed(Q.at(bh) + r0 * Q.ld, Q.ld, m, D, qt.data());
      product(w, kTile, D, K.at(kv), K.ld, qt.data(), kTile, false, st.data(), kBlock);  // Sᵀ (w × 64)
      if (ds.enabled) transposed_multipliers(ds, flat0, m, diag, w, mult_rows, mult);

      alignas(64) float inv_sum[kBlock], row_lse[kBlock];
      softmax(st.data(), w, diag, scale, mult.data(), lanes, pairs.data(), inv_sum, row_lse);
      std::copy(row_lse, row_lse + m, lse_data + flat0);

      product(D, kTile, w2, vt + kv * D * T_k2, T_k2, pairs.data(), kTile, false, ot.data(), kBlock);  // outᵀ (D × 64)
      rows_from_transposed(ot.data(), D, m, O.at(bh) + r0 * O.ld, O.ld, rows, inv_sum);
    }
    at::native::cpublas::brgemm_release();
  });
}

void flash_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& lse, const at::Tensor& delta, const CausalLayout& L, float scale,
                    const DropoutStream& ds, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t BH_kv = k.size(0) * k.size(1), D = q.size(3), group = q.size(1) / k.size(1);
  const auto Q = rows4<bf16>(q), K = rows4<bf16>(k), V = rows4<bf16>(v), dO = rows4<bf16>(dout);
  const auto dQ = rows4<bf16>(dq), dK = rows4<bf16>(dk), dV = rows4<bf16>(dv);
  const float* lse_data = lse.data_ptr<float>();
  const float* delta_data = delta.data_ptr<float>();
  const auto panels = column_panels(D);
  const int64_t T_k = L.T_k, T_k2 = round_up(T_k, 2), width = panels_width(panels);
  const CausalLanes lanes;
  const BackwardRows rows_of = pick_backward_rows(ds.enabled);
  double per_head = 0.0;  // five products per row block, for each of the group's query heads
  for (int64_t r = 0; r < L.R; ++r) per_head += static_cast<double>(group * L.rows(r) * L.width(r) * (5 * D + 16));
  parallel_for_balanced(BH_kv, [per_head](int64_t i) { return static_cast<double>(i) * per_head; }, kMinCostPerThread,
                        [&](int64_t begin, int64_t end) {
    // Per head: kᵀ, float32 dk and dv; per row block: Sᵀ, dPᵀ, Pᵀ, dSᵀ (w × 64) and dS's key pairs.
    // ~1.5 MB at T_k = 1024, D = 64.
    std::vector<bf16> kt(D * T_k2), pt(T_k2 * kBlock), dst(T_k2 * kBlock);
    std::vector<float> dk_acc(T_k * width), dv_acc(T_k * width), st(T_k2 * kBlock), dpt(T_k2 * kBlock);
    std::vector<float> dqt(D * kBlock), rows, mult_rows, mult;
    std::vector<uint32_t> ds_pairs(T_k2 / 2 * kBlock), qt(D / 2 * kTile), dot(D / 2 * kTile);
    std::vector<uint32_t> q_pairs(kBlock / 2 * width), do_pairs(kBlock / 2 * width);
    for (int64_t kv = begin; kv < end; ++kv) {
      const bf16* k_h = K.at(kv);
      const bf16* v_h = V.at(kv);
      transpose_rows(k_h, K.ld, T_k, D, kt.data(), T_k2, T_k2);
      std::fill(dk_acc.begin(), dk_acc.end(), 0.0f);
      std::fill(dv_acc.begin(), dv_acc.end(), 0.0f);
      for (int64_t bh = kv * group; bh < (kv + 1) * group; ++bh) {  // the group's query heads, in order
        for (int64_t r = 0; r < L.R; ++r) {
          const int64_t r0 = r * kBlock, m = L.rows(r), diag = L.o + r0, w = diag + m, w2 = round_up(w, 2);
          const int64_t flat0 = bh * L.T_q + r0;
          const bf16* q_r = Q.at(bh) + r0 * Q.ld;
          const bf16* do_r = dO.at(bh) + r0 * dO.ld;
          pack_transposed(q_r, Q.ld, m, D, qt.data());
          pack_transposed(do_r, dO.ld, m, D, dot.data());
          for (int64_t p = 0; p < kBlock / 2; ++p) {
            pack_pair_row(q_r, Q.ld, m, p, kBlock, panels, q_pairs.data());
            pack_pair_row(do_r, dO.ld, m, p, kBlock, panels, do_pairs.data());
          }
          product(w, kTile, D, k_h, K.ld, qt.data(), kTile, false, st.data(), kBlock);     // Sᵀ
          product(w, kTile, D, v_h, V.ld, dot.data(), kTile, false, dpt.data(), kBlock);   // dPᵀ
          if (ds.enabled) transposed_multipliers(ds, flat0, m, diag, w, mult_rows, mult);

          alignas(64) float row_lse[kBlock], row_delta[kBlock];  // lse +inf past m: P = 0 in those lanes
          std::fill(std::copy(lse_data + flat0, lse_data + flat0 + m, row_lse), row_lse + kBlock,
                    std::numeric_limits<float>::infinity());
          std::fill(std::copy(delta_data + flat0, delta_data + flat0 + m, row_delta), row_delta + kBlock, 0.0f);
          rows_of(st.data(), dpt.data(), w, diag, scale, row_lse, row_delta, mult.data(), lanes, pt.data(), dst.data(),
                  ds_pairs.data());
          for (const ColumnPanel& cp : panels) {
            const int64_t b_at = kBlock / 2 * cp.offset;
            product(w, cp.ldb, kBlock, pt.data(), kBlock, do_pairs.data() + b_at, cp.ldb, true, dv_acc.data() + cp.offset,
                    width);  // dv += Pᵀ·dO
            product(w, cp.ldb, kBlock, dst.data(), kBlock, q_pairs.data() + b_at, cp.ldb, true, dk_acc.data() + cp.offset,
                    width);  // dk += dSᵀ·q
          }
          product(D, kTile, w2, kt.data(), T_k2, ds_pairs.data(), kTile, false, dqt.data(), kBlock);  // dqᵀ = kᵀ·dSᵀ
          rows_from_transposed(dqt.data(), D, m, dQ.at(bh) + r0 * dQ.ld, dQ.ld, rows);
        }
      }
      // The panels' columns are D's (every panel but the last is 64 wide): rounded once.
      for (int64_t j = 0; j < T_k; ++j) {
        from_float(dk_acc.data() + j * width, dK.at(kv) + j * dK.ld, D);
        from_float(dv_acc.data() + j * width, dV.at(kv) + j * dV.ld, D);
      }
    }
    at::native::cpublas::brgemm_release();
  });
}

}  // namespace fastgpt::cpu::amx
