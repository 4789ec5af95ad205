// The flash kernels of attention_flash.cpp in bfloat16 on the CPU's matrix units (AMX-BF16): the
// same algorithm and contracts (lse float32, dropout from causal_softmax's mask, results that do
// not depend on the thread count), every product on amx_tiles.h's brgemm with bfloat16 operands
// and float32 accumulation, the softmax and its gradient in float32 vectors (softmax_rows.h).
//
// Per row block r (m ≤ 64 queries from r0, keys [0, w), w_pad = w rounded up to 64), in a
// thread's scratch:
//
//   forward   S = q·kᵀ       A = the query rows in place, B = the head's keys as 64-key tiles
//             P = softmax(S)  float32 rows, rounded to bfloat16 once (zero past each row's keys)
//             out = P·v       A = P, B = v's rows in VNNI pairs, one panel per 64 columns of D
//   backward  S = q·kᵀ, dP = dO·vᵀ   as the forward's S (v packed like k)
//             P = exp(scale·S - lse), dS = scale·P∘(dP - Σ dP∘P): float32 rows, then bfloat16
//             dq = dS·k                          A = dS, B = k's rows in VNNI pairs
//             dvᵀ += dOᵀ·P, dkᵀ += qᵀ·dS        transposed, so that P and dS are B: pairs of their
//                                                rows interleaved per 64-key tile (amx_matmul.cpp's
//                                                tn does the same); dOᵀ and qᵀ are (D × m) copies.
//
// The backward gives each thread whole key/value heads: it packs the head's k and v once, adds
// every row block of the group's query heads into float32 dkᵀ and dvᵀ (D × T_k) in a fixed
// order, and rounds them once at the end. bfloat16 is rounded where the materialised path rounds
// (P and dS before their products, each output once), so its parity rule is the same.

#include "attention_flash_amx.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "amx_tiles.h"
#include "dropout_cpu.h"
#include "softmax_rows.h"

namespace fastgpt::cpu::amx {
namespace {

constexpr int64_t kBlock = kCausalBlock;

// Work (multiply-adds) below which a thread is not worth waking; AMX is ~10x the float32 rate.
constexpr double kMinCostPerThread = 5e6;

// The packed operands of one key/value head of T_k rows and head dim D.
struct HeadPacking {
  int64_t D, T_k, key_tiles, tile_pairs, K_pad;
  std::vector<ColumnPanel> panels;
  HeadPacking(int64_t d, int64_t t_k)
      : D(d), T_k(t_k), key_tiles((t_k + kTile - 1) / kTile), tile_pairs(d / 2 * kTile), K_pad(key_tiles * kTile),
        panels(column_panels(d)) {}

  int64_t tiles_pairs() const { return key_tiles * tile_pairs; }   // B of a·xᵀ, 64 rows of x per tile
  int64_t rows_pairs() const { return K_pad / 2 * panels_width(panels); }  // B of p·x

  void pack_tiles(const bf16* x, int64_t ld, uint32_t* out) const {
    for (int64_t t = 0; t < key_tiles; ++t) {
      pack_transposed(x + t * kTile * ld, ld, std::min(kTile, T_k - t * kTile), D, out + t * tile_pairs);
    }
  }
  void pack_rows(const bf16* x, int64_t ld, uint32_t* out) const {
    for (int64_t q = 0; q < K_pad / 2; ++q) pack_pair_row(x, ld, T_k, q, K_pad, panels, out);
  }

  // s (m × w_pad, float32) = a's m rows (lda) · xᵀ over the first w_pad rows of x: a product per tile.
  void times_tiles(int64_t m, int64_t w_pad, const bf16* a, int64_t lda, const uint32_t* tiles, float* s) const {
    for (int64_t k0 = 0; k0 < w_pad; k0 += kTile) {
      product(m, kTile, D, a, lda, tiles + k0 / kTile * tile_pairs, kTile, false, s + k0, w_pad);
    }
  }
  // out (m × D, ld, bfloat16) = a (m × w_pad, lda) · x's first w_pad rows, row i times
  // row_scale[i] when given; acc: m × 64 floats.
  void times_rows(int64_t m, int64_t w_pad, const bf16* a, int64_t lda, const uint32_t* rows, float* acc, bf16* out,
                  int64_t ld, const float* row_scale = nullptr) const {
    for (const ColumnPanel& cp : panels) {
      product(m, cp.ldb, w_pad, a, lda, rows + K_pad / 2 * cp.offset, cp.ldb, false, acc, cp.ldb);
      for (int64_t i = 0; i < m; ++i) {
        float* row = acc + i * cp.ldb;
        if (row_scale != nullptr) {
          const Vec f(row_scale[i]);
          for (int64_t d = 0; d < cp.width; d += kW) (Vec::loadu(row + d, std::min(kW, cp.width - d)) * f).store(row + d, std::min(kW, cp.width - d));
        }
        from_float(row, out + i * ld + cp.d0, cp.width);
      }
    }
  }
};

// Pairs of x's m rows (row-major, ld = w_pad) interleaved per 64-column tile: tile t at
// out + t · (m_pad / 2) · 64, its pair row q at + q · 64; the odd row past m is zero.
void interleave_strips(const bf16* x, int64_t m, int64_t w_pad, uint32_t* out) {
  const int64_t pairs = (m + 1) / 2;
  for (int64_t t = 0; t < w_pad / kTile; ++t) {
    for (int64_t q = 0; q < pairs; ++q) {
      const bf16* even = x + 2 * q * w_pad + t * kTile;
      const bool has_odd = 2 * q + 1 < m;
      interleave(even, kTile, has_odd ? even + w_pad : nullptr, has_odd ? kTile : 0, kTile,
                 out + (t * pairs + q) * kTile);
    }
  }
}

// The forward's row: p[0..L) = exp(scale·s - max) rounded (times mult with dropout), not yet
// divided by the sum (the m × D output is, in float32: one multiply per column instead of per
// key); lse = max + log Σ exp. Returns 1 / Σ exp.
float exp_row(const float* s, bf16* p, int64_t L, float scale, const float* mult, float* lse) {
  const Vec vscale(scale), neg_inf(-std::numeric_limits<float>::infinity());
  Vec vmax = neg_inf;
  for (int64_t j = 0; j < L; j += kW) {
    const int64_t n = std::min(kW, L - j);
    vmax = at::vec::maximum(vmax, Vec::set(neg_inf, Vec::loadu(s + j, n) * vscale, n));
  }
  const float mx = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  const Vec vmx(mx), zero(0.0f);
  Vec vsum = zero;
  for (int64_t j = 0; j < L; j += kW) {
    const int64_t n = std::min(kW, L - j);
    const Vec x = Vec::set(zero, (Vec::loadu(s + j, n) * vscale - vmx).exp_u20(), n);
    vsum += x;
    store_row(p + j, mult != nullptr ? x * Vec::loadu(mult + j, n) : x, n);
  }
  const float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
  *lse = mx + std::log(sum);
  return 1.0f / sum;
}

// The backward's row in two passes: P = exp(scale·s - lse) into s (float32) with
// delta = Σ dP∘P, dP = dp (times mult); then ds = scale·P∘(dP - delta) and pd = P (times mult),
// both rounded. Zeros after L up to n in ds and pd.
void grad_row(float* s, const float* dp, bf16* ds, bf16* pd, int64_t L, int64_t n_pad, float scale, float lse,
              const float* mult) {
  const Vec vscale(scale), vlse(lse);
  Vec vdelta(0.0f);  // masked loads are zero past L: the tail adds nothing
  for (int64_t j = 0; j < L; j += kW) {
    const int64_t n = std::min(kW, L - j);
    const Vec p = (Vec::loadu(s + j, n) * vscale - vlse).exp_u20();
    p.store(s + j, n);
    const Vec g = Vec::loadu(dp + j, n);
    vdelta = at::vec::fmadd(mult != nullptr ? g * Vec::loadu(mult + j, n) : g, p, vdelta);
  }
  const Vec delta(at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vdelta));
  for (int64_t j = 0; j < L; j += kW) {
    const int64_t n = std::min(kW, L - j);
    const Vec p = Vec::loadu(s + j, n), g = Vec::loadu(dp + j, n);
    if (mult != nullptr) {
      const Vec mj = Vec::loadu(mult + j, n);
      store_row(ds + j, (g * mj - delta) * p * vscale, n);
      store_row(pd + j, p * mj, n);
    } else {
      store_row(ds + j, (g - delta) * p * vscale, n);
      store_row(pd + j, p, n);
    }
  }
  zero_fill(ds + L, n_pad - L);
  zero_fill(pd + L, n_pad - L);
}

}  // namespace

void flash_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const CausalLayout& L, float scale,
                   const DropoutStream& ds, at::Tensor& out, at::Tensor& lse) {
  const int64_t BH = q.size(0) * q.size(1), BH_kv = k.size(0) * k.size(1), D = q.size(3), group = q.size(1) / k.size(1);
  const auto Q = rows4<bf16>(q), K = rows4<bf16>(k), V = rows4<bf16>(v), O = rows4<bf16>(out);
  float* lse_data = lse.data_ptr<float>();
  const HeadPacking hp(D, L.T_k);

  // Every head's keys as tiles and values as pair rows, packed once (a thread per head).
  Packed keys(BH_kv * hp.tiles_pairs()), values(BH_kv * hp.rows_pairs());
  at::parallel_for(0, BH_kv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t kv = begin; kv < end; ++kv) {
      hp.pack_tiles(K.at(kv), K.ld, keys.data + kv * hp.tiles_pairs());
      hp.pack_rows(V.at(kv), V.ld, values.data + kv * hp.rows_pairs());
    }
  });

  auto cum = head_prefix_cost(L.R, [&](int64_t r) { return static_cast<double>(L.rows(r) * L.width(r) * (2 * D + 8)); });
  parallel_for_balanced(BH * L.R, cum, kMinCostPerThread, [&](int64_t begin, int64_t end) {
    std::vector<float> s, mult, acc(kBlock * kTile), inv_sum(kBlock);
    std::vector<bf16> p;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / L.R, r = item % L.R, r0 = r * kBlock, m = L.rows(r);
      const int64_t w_pad = round_up(L.width(r), kTile), kv = bh / group;
      s.resize(std::max<size_t>(s.size(), static_cast<size_t>(m * w_pad)));
      p.resize(s.size());
      hp.times_tiles(m, w_pad, Q.at(bh) + r0 * Q.ld, Q.ld, keys.data + kv * hp.tiles_pairs(), s.data());
      for (int64_t i = 0; i < m; ++i) {
        const int64_t length = L.o + r0 + i + 1, flat = bh * L.T_q + r0 + i;
        float* row = s.data() + i * w_pad;
        bf16* p_row = p.data() + i * w_pad;
        inv_sum[i] = exp_row(row, p_row, length, scale, row_multipliers(ds, flat, length, mult), lse_data + flat);
        zero_fill(p_row + length, w_pad - length);
      }
      hp.times_rows(m, w_pad, p.data(), w_pad, values.data + kv * hp.rows_pairs(), acc.data(), O.at(bh) + r0 * O.ld,
                    O.ld, inv_sum.data());
    }
    at::native::cpublas::brgemm_release();
  });
}

void flash_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& lse, const CausalLayout& L, float scale, const DropoutStream& ds, at::Tensor& dq,
                    at::Tensor& dk, at::Tensor& dv) {
  const int64_t BH_kv = k.size(0) * k.size(1), D = q.size(3), group = q.size(1) / k.size(1);
  const auto Q = rows4<bf16>(q), K = rows4<bf16>(k), V = rows4<bf16>(v), dO = rows4<bf16>(dout);
  const auto dQ = rows4<bf16>(dq), dK = rows4<bf16>(dk), dV = rows4<bf16>(dv);
  const float* lse_data = lse.data_ptr<float>();
  const HeadPacking hp(D, L.T_k);
  const int64_t K_pad = hp.K_pad;
  double per_head = 0.0;  // five products per row block, for each of the group's query heads
  for (int64_t r = 0; r < L.R; ++r) per_head += static_cast<double>(group * L.rows(r) * L.width(r) * (5 * D + 16));
  parallel_for_balanced(BH_kv, [per_head](int64_t i) { return static_cast<double>(i) * per_head; }, kMinCostPerThread,
                        [&](int64_t begin, int64_t end) {
    // The head's packed k and v, its float32 dkᵀ and dvᵀ, and one row block's rows: ~1.7 MB at T_k = 1024, D = 64.
    std::vector<uint32_t> k_tiles(hp.tiles_pairs()), v_tiles(hp.tiles_pairs()), k_rows(hp.rows_pairs());
    std::vector<uint32_t> p_strips(kBlock / 2 * K_pad), ds_strips(kBlock / 2 * K_pad);
    std::vector<float> dkt(D * K_pad), dvt(D * K_pad), s(kBlock * K_pad), dp(kBlock * K_pad);
    std::vector<float> acc(kBlock * kTile), rows_f(kTile * D), mult;
    std::vector<bf16> p(kBlock * K_pad), dsb(kBlock * K_pad), qt(D * kBlock), dot(D * kBlock);
    for (int64_t kv = begin; kv < end; ++kv) {
      hp.pack_tiles(K.at(kv), K.ld, k_tiles.data());
      hp.pack_tiles(V.at(kv), V.ld, v_tiles.data());
      hp.pack_rows(K.at(kv), K.ld, k_rows.data());
      std::fill(dkt.begin(), dkt.end(), 0.0f);
      std::fill(dvt.begin(), dvt.end(), 0.0f);
      for (int64_t bh = kv * group; bh < (kv + 1) * group; ++bh) {  // the group's query heads, in order
        for (int64_t r = 0; r < L.R; ++r) {
          const int64_t r0 = r * kBlock, m = L.rows(r), m_pad = round_up(m, 2);
          const int64_t w_pad = round_up(L.width(r), kTile);
          const bf16* q_r = Q.at(bh) + r0 * Q.ld;
          const bf16* do_r = dO.at(bh) + r0 * dO.ld;
          hp.times_tiles(m, w_pad, q_r, Q.ld, k_tiles.data(), s.data());
          hp.times_tiles(m, w_pad, do_r, dO.ld, v_tiles.data(), dp.data());
          for (int64_t i = 0; i < m; ++i) {
            const int64_t length = L.o + r0 + i + 1, flat = bh * L.T_q + r0 + i;
            grad_row(s.data() + i * w_pad, dp.data() + i * w_pad, dsb.data() + i * w_pad, p.data() + i * w_pad, length,
                     w_pad, scale, lse_data[flat], row_multipliers(ds, flat, length, mult));
          }
          interleave_strips(p.data(), m, w_pad, p_strips.data());
          interleave_strips(dsb.data(), m, w_pad, ds_strips.data());
          transpose_rows(do_r, dO.ld, m, D, dot.data(), m_pad, m_pad);
          transpose_rows(q_r, Q.ld, m, D, qt.data(), m_pad, m_pad);
          const int64_t strip_pairs = m_pad / 2 * kTile;
          for (int64_t t = 0; t < w_pad / kTile; ++t) {
            product(D, kTile, m_pad, dot.data(), m_pad, p_strips.data() + t * strip_pairs, kTile, true,
                    dvt.data() + t * kTile, K_pad);
            product(D, kTile, m_pad, qt.data(), m_pad, ds_strips.data() + t * strip_pairs, kTile, true,
                    dkt.data() + t * kTile, K_pad);
          }
          hp.times_rows(m, w_pad, dsb.data(), w_pad, k_rows.data(), acc.data(), dQ.at(bh) + r0 * dQ.ld, dQ.ld);
        }
      }
      // dk and dv: (D × T_k) float32 transposed back 64 keys at a time and rounded once.
      for (int64_t k0 = 0; k0 < L.T_k; k0 += kTile) {
        const int n = static_cast<int>(std::min(kTile, L.T_k - k0));
        for (auto [acc_t, X] : {std::pair{dkt.data(), dK}, std::pair{dvt.data(), dV}}) {
          at::vec::transpose_mxn<float>(acc_t + k0, K_pad, rows_f.data(), D, static_cast<int>(D), n);
          bf16* x = X.at(kv) + k0 * X.ld;
          for (int64_t j = 0; j < n; ++j) from_float(rows_f.data() + j * D, x + j * X.ld, D);
        }
      }
    }
    at::native::cpublas::brgemm_release();
  });
}

}  // namespace fastgpt::cpu::amx
