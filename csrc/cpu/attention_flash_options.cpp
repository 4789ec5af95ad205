// CPU flash attention with every option of the general attention (fastgpt/attention/api.py):
// bidirectional and cross attention (T_q and T_k any), a sliding window (left, right) around each
// query's position, soft-capping, ALiBi, sinks, and the log-sum-exp out; float32, and bfloat16 as
// float32 GEMMs over converted tiles with float32 accumulation. The plain causal call keeps
// attention_flash.cpp's kernels (and their bits); this file runs the calls that use an option.
//
//   attention_flash_forward(q, k, v, sinks, alibi_slopes, scale, causal, window_left, window_right,
//                           softcap, dropout_p, seed, offset)                -> (out, lse)
//   attention_flash_backward(dout, q, k, v, out, lse, <the same after v>)    -> (dq, dk, dv, dsinks)
//   attention_dropout_keep_mask(q, T_k, causal, window_left, window_right, dropout_p, seed, offset)
//                                                                            -> keep (B, H, T_q, T_k)
//   attention_flash_varlen_forward / _backward / attention_varlen_dropout_keep_mask: the same over
//   packed sequences, q (total_q, H, D), k and v (total_k, H_kv, D), cu_seqlens_q and cu_seqlens_k
//   (B + 1,) int32; lse (H, total_q); keep (B, H, max_q, max_k)
//   attention_flash_paged_forward: the varlen forward over a paged KV cache (fastgpt/attention/paged.py),
//   k and v the pool (num_pages, page_size, H_kv, D) read in place through a block table
//
// Query i sits at key position pos = T_k - T_q + i and sees the keys [begin(i), end(i)) of its
// band (Band, attention_band.h). Both ends never decrease with i, so row block r (the m <= 64 queries from
// r0) sees keys [begin(r0), end(r0 + m - 1)): its scores are one (m × w) GEMM over that span and
// the keys outside it are never read. A window of W costs T·(W + 64) products, not T².
//
// Per score, in api.py's order: s = scale·q·k; s = c·tanh(s / c); s -= slope·|pos - j|; the keys
// outside the row's band are left out of its softmax, whose denominator holds exp(sink) too. The
// backward recomputes s and P = exp(s - lse) from the forward's lse (the sink counted in it), and
// dS = P∘(dP - Δ)·(1 - tanh²)·scale, Δ = dO·out; the sink's gradient is -Σ_rows exp(sink - lse)·Δ.
// Dropout draws the plain flash kernels' Philox stream (flat row bh·T_q + i, column j = the key),
// so a causal call drops the same elements with and without options. The work is split as in
// attention_flash.cpp: the forward over (head, row block), the backward over key/value heads (no
// atomics; results independent of the thread count).
//
// A packed call runs the same kernels over (1, H, total, D) views of its tensors: each work item
// resolves its sequence (Sequences, attention_band.h) to that sequence's first rows and its own band,
// query i at key position T_k[b] - T_q[b] + i. The forward's items are (sequence, head, row block),
// the backward's (sequence, key/value head): a sequence's keys belong to it alone, so its dk and dv
// rows still have one writer. A regular call is B sequences of T_q × T_k, sequence b its batch
// entry b. Dropout keys a packed call's query i of sequence b, head h, by the flat row
// (b·H + h)·max_q + i and its key index j in the sequence: the (B, H, max_q, max_k) call's mask.
//
// A paged call is a packed call whose keys are not back to back: sequence b's key j lives in row
// block_table[b][j / page_size]·page_size + j % page_size of the pool. A row block's span of keys is
// gathered from its pages into float32 rows (the buffer the packed bfloat16 call converts into), once
// for the query heads that share the key/value head, and from there each head's products and softmax
// are the packed call's, in the same order: its bits.

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../causal_ops.h"
#include "../checks.h"
#include "../philox.h"
#include "attention_band.h"
#include "attention_flash.h"
#include "common.h"
#include "dropout_cpu.h"
#include "softmax_rows.h"

namespace fastgpt::cpu {
namespace {

constexpr int64_t kBlock = kCausalBlock;        // queries per row block
constexpr double kMinCostPerThread = 5e5;       // as attention_flash.cpp's

int64_t row_blocks(int64_t T) { return (T + kBlock - 1) / kBlock; }
int64_t block_rows(int64_t T, int64_t r) { return std::min(kBlock, T - r * kBlock); }

// What the rows of one (sequence, head) share.
struct SeqHead {
  Band band;
  int64_t head;       // its rows' head in the Rows4 of q, out, dout, dq: entry·H + h
  int64_t q0;         // its first query row there
  int64_t flat0;      // the dropout stream's row of its query 0: (b·H + h)·T_q
  int64_t lse0;       // its query 0 in lse and delta: (entry·H + h)·T + q0
  float slope;        // ALiBi, 0 without
  const float* sink;  // its sink's logit, or null
};

SeqHead seq_head(const Sequences& seqs, const Sequence& seq, int64_t b, int64_t h, const ScoreMods& mods, int64_t T) {
  const int64_t head = seq.entry * mods.H + h, bh = b * mods.H + h;
  return {seq.band, head, seq.q0, bh * seqs.T_q, head * T + seq.q0,
          mods.slopes != nullptr ? mods.slopes[bh] : 0.0f, mods.sinks != nullptr ? mods.sinks + h : nullptr};
}

// The forward's work items, (sequence, head, row block) in that order (a regular call's item
// bh·R + r), and their prefix-summed cost for parallel_for_balanced.
struct RowBlockItems {
  int64_t H;
  std::vector<int64_t> first_item{0}, first_block{0};  // (B + 1): sequence b's items and row blocks start here
  std::vector<double> prefix{0.0};                      // (blocks + 1): one head's block costs, summed in order

  template <typename BlockCost>
  RowBlockItems(const Sequences& seqs, int64_t heads, const BlockCost& block_cost) : H(heads) {
    for (int64_t b = 0; b < seqs.count; ++b) {
      const Band band = seqs[b].band;
      const int64_t R = row_blocks(band.T_q);
      for (int64_t r = 0; r < R; ++r) prefix.push_back(prefix.back() + block_cost(band, r * kBlock, block_rows(band.T_q, r)));
      first_block.push_back(first_block.back() + R);
      first_item.push_back(first_item.back() + H * R);
    }
  }
  int64_t size() const { return first_item.back(); }
  int64_t sequence(int64_t item) const {  // the last sequence starting at or before item: empty ones own none
    return std::upper_bound(first_item.begin(), first_item.end(), item) - first_item.begin() - 1;
  }
  std::pair<int64_t, int64_t> head_and_block(int64_t item, int64_t b) const {
    const int64_t R = first_block[b + 1] - first_block[b], within = item - first_item[b];
    return {within / R, within % R};
  }
  double cost_before(int64_t item) const {
    if (item >= size()) return static_cast<double>(H) * prefix.back();
    const int64_t b = sequence(item);
    const auto [h, r] = head_and_block(item, b);
    const double* p = prefix.data() + first_block[b];
    const double per_head = prefix[first_block[b + 1]] - p[0];
    return static_cast<double>(H) * p[0] + static_cast<double>(h) * per_head + (p[r] - p[0]);
  }
};

// Where a paged call's keys are (null for a packed or regular call): sequence b's key j in pool row
// table[b·table_ld + j / page]·page + j % page.
struct PagedKeys {
  const int32_t* table;
  int64_t table_ld, page;

  // Keys [j0, j0 + n) of sequence b of one head (its pool rows at head + row·ld) as float32 rows
  // in buf (ld_out = D), one page's run of rows at a time.
  template <typename scalar_t>
  const float* gather(const scalar_t* head, int64_t ld, int64_t b, int64_t j0, int64_t n, int64_t D,
                      std::vector<float>& buf, int64_t& ld_out) const {
    buf.resize(std::max<size_t>(buf.size(), static_cast<size_t>(n * D)));
    for (int64_t i = 0; i < n;) {
      const int64_t j = j0 + i, in_page = std::min(n - i, page - j % page);
      const scalar_t* src = head + (static_cast<int64_t>(table[b * table_ld + j / page]) * page + j % page) * ld;
      for (int64_t r = 0; r < in_page; ++r) {
        float* dst = buf.data() + (i + r) * D;
        if constexpr (std::is_same_v<scalar_t, float>) {
          std::copy(src + r * ld, src + r * ld + D, dst);
        } else {
          to_float(src + r * ld, dst, D);
        }
      }
      i += in_page;
    }
    ld_out = D;
    return buf.data();
  }
};

// Softmax rows of one row block: s (m × w) holds q·k over keys [b0, b0 + w) and becomes P; lse of
// the rows into lse_rows.
void forward_block_rows(float* s, int64_t m, int64_t w, int64_t r0, int64_t b0, const SeqHead& sh,
                        const ScoreMods& mods, const DropoutStream& ds, float* lse_rows, std::vector<float>& mult) {
  for (int64_t i = 0; i < m; ++i) {
    const int64_t row = r0 + i, a = sh.band.begin(row) - b0, e = sh.band.end(row) - b0;
    float* s_row = s + i * w;
    score_row(s_row, a, e, static_cast<float>(b0), static_cast<float>(sh.band.pos(row)), mods, sh.slope);
    const float* mul = band_multipliers(ds, sh.flat0 + row, b0, e, mult);
    lse_rows[i] = softmax_band_row(s_row, w, a, e, sh.sink, mul);
  }
}

// Per thread, the forward's float32 copies and scratch.
struct ForwardScratch {
  std::vector<float> s, q, k, v, o, mult;
};

// Row block [r0, r0 + m) of one (sequence, query head) over its keys [b0, b0 + w), given as float32
// rows kf, vf (null when w = 0): its out rows and lse.
template <typename scalar_t>
void forward_block(const Rows4<scalar_t>& Q, const Rows4<scalar_t>& O, float* lse_data, const SeqHead& sh, int64_t r0,
                   int64_t m, int64_t b0, int64_t w, const float* kf, int64_t ldk, const float* vf, int64_t ldv,
                   const ScoreMods& mods, const DropoutStream& ds, int64_t D, ForwardScratch& t) {
  scalar_t* o_dst = O.at(sh.head) + (sh.q0 + r0) * O.ld;
  int64_t ldq, ldo;
  float* o = float_rows(o_dst, O.ld, m, D, t.o, ldo);
  if (w == 0) {  // no row of the block sees a key
    for (int64_t i = 0; i < m; ++i) std::fill(o + i * ldo, o + i * ldo + D, 0.0f);
    std::fill(lse_data + sh.lse0 + r0, lse_data + sh.lse0 + r0 + m, sh.sink != nullptr ? *sh.sink : kNegInf);
  } else {
    const float* qf = rows_as_float(Q.at(sh.head) + (sh.q0 + r0) * Q.ld, Q.ld, m, D, t.q, ldq);
    t.s.resize(std::max<size_t>(t.s.size(), static_cast<size_t>(m * w)));
    gemm(false, true, m, w, D, 1.0f, qf, ldq, kf, ldk, 0.0f, t.s.data(), w);  // q·kᵀ (m × w)
    forward_block_rows(t.s.data(), m, w, r0, b0, sh, mods, ds, lse_data + sh.lse0 + r0, t.mult);
    gemm(false, false, m, D, w, 1.0f, t.s.data(), w, vf, ldv, 0.0f, o, ldo);  // out = P·v
  }
  store_rows(o, o_dst, O.ld, m, D);
}

// How many query heads a forward work item runs: the whole group of a key/value head where the
// items (sequence, key/value head, row block) still outnumber the threads several times over, so
// that its keys are read (gathered, converted) once for the group while they are in cache; else
// one, and the items are (sequence, head, row block). Each head's block is computed the same way
// either way: the choice moves no bit.
int64_t forward_heads_per_item(const Sequences& seqs, int64_t group, int64_t kv_heads) {
  if (group == 1) return 1;
  int64_t blocks = 0;
  for (int64_t b = 0; b < seqs.count; ++b) blocks += row_blocks(seqs[b].band.T_q);
  return blocks * kv_heads >= 4 * at::get_num_threads() ? group : 1;
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Sequences& seqs,
                    const ScoreMods& mods, const DropoutStream& ds, const PagedKeys* paged, at::Tensor& out,
                    at::Tensor& lse) {
  const int64_t D = q.size(3), group = q.size(1) / k.size(1), T = q.size(2);
  const int64_t heads_per_item = forward_heads_per_item(seqs, group, k.size(1));
  const auto Q = rows4<scalar_t>(q), K = rows4<scalar_t>(k), V = rows4<scalar_t>(v), O = rows4<scalar_t>(out);
  float* lse_data = lse.data_ptr<float>();
  const auto block_cost = [D, heads_per_item](const Band& band, int64_t r0, int64_t m) {
    return static_cast<double>(heads_per_item * m * (band.span(r0, m).second * (2 * D + 8) + D));
  };
  const RowBlockItems items(seqs, mods.H / heads_per_item, block_cost);
  parallel_for_balanced(items.size(), [&items](int64_t item) { return items.cost_before(item); }, kMinCostPerThread,
                        [&](int64_t begin, int64_t end) {
    ForwardScratch t;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = items.sequence(item);
      const auto [slot, r] = items.head_and_block(item, b);
      const Sequence seq = seqs[b];
      const int64_t h0 = slot * heads_per_item, kv = seq.entry * K.heads + h0 / group;
      const int64_t r0 = r * kBlock, m = block_rows(seq.band.T_q, r);
      const auto [b0, w] = seq.band.span(r0, m);
      const float *kf = nullptr, *vf = nullptr;
      int64_t ldk = 0, ldv = 0;
      if (w > 0 && paged != nullptr) {
        kf = paged->gather(K.at(kv), K.ld, b, b0, w, D, t.k, ldk);
        vf = paged->gather(V.at(kv), V.ld, b, b0, w, D, t.v, ldv);
      } else if (w > 0) {
        kf = rows_as_float(K.at(kv) + (seq.k0 + b0) * K.ld, K.ld, w, D, t.k, ldk);
        vf = rows_as_float(V.at(kv) + (seq.k0 + b0) * V.ld, V.ld, w, D, t.v, ldv);
      }
      for (int64_t h = h0; h < h0 + heads_per_item; ++h) {
        forward_block(Q, O, lse_data, seq_head(seqs, seq, b, h, mods, T), r0, m, b0, w, kf, ldk, vf, ldv, mods, ds,
                      D, t);
      }
    }
  });
}

// One key/value head of one sequence in the backward: its k and v rows as float32, and the float32
// rows its dk and dv accumulate in (the outputs themselves for float32).
struct KvHead {
  const float *k, *v;
  int64_t ldk, ldv;
  float *dk, *dv;
  int64_t lddk, lddv;
};

// Per thread, the backward's float32 copies and scratch.
struct BackwardScratch {
  std::vector<float> k, v, dk, dv, q, dout, dq, p, ds, cap, mult;
};

// What every row block of the backward reads.
template <typename scalar_t>
struct BackwardArgs {
  Rows4<scalar_t> Q, dO, dQ;
  int64_t D;
  const ScoreMods& mods;
  const DropoutStream& ds;
  const float *lse, *delta;
};

// P and dS of one row block (m × w, over keys [b0, b0 + w)) from the products in t.p and t.ds.
template <typename scalar_t>
void backward_block_rows(const BackwardArgs<scalar_t>& a, const SeqHead& sh, int64_t r0, int64_t m, int64_t b0,
                         int64_t w, BackwardScratch& t) {
  if (a.mods.softcap > 0) t.cap.resize(std::max<size_t>(t.cap.size(), static_cast<size_t>(w)));
  for (int64_t i = 0; i < m; ++i) {
    const int64_t row = r0 + i, begin = sh.band.begin(row) - b0, end = sh.band.end(row) - b0;
    const float* mult = band_multipliers(a.ds, sh.flat0 + row, b0, end, t.mult);
    grad_band_row(t.p.data() + i * w, t.ds.data() + i * w, w, begin, end, static_cast<float>(b0),
                  static_cast<float>(sh.band.pos(row)), a.mods, sh.slope, a.lse[sh.lse0 + row],
                  a.delta[sh.lse0 + row], mult, t.cap.data());
  }
}

// Row block [r0, r0 + m) of one (sequence, query head): its dq rows, and its share of the key/value
// head's dk and dv.
template <typename scalar_t>
void backward_block(const BackwardArgs<scalar_t>& a, const KvHead& hd, const SeqHead& sh, int64_t r0, int64_t m,
                    BackwardScratch& t) {
  const int64_t D = a.D, row0 = sh.q0 + r0;
  const auto [b0, w] = sh.band.span(r0, m);
  int64_t ldq, lddo, lddq;
  scalar_t* dq_dst = a.dQ.at(sh.head) + row0 * a.dQ.ld;
  float* dq = float_rows(dq_dst, a.dQ.ld, m, D, t.dq, lddq);
  if (w == 0) {  // no row of the block sees a key
    for (int64_t i = 0; i < m; ++i) std::fill(dq + i * lddq, dq + i * lddq + D, 0.0f);
  } else {
    const float* qf = rows_as_float(a.Q.at(sh.head) + row0 * a.Q.ld, a.Q.ld, m, D, t.q, ldq);
    const float* dof = rows_as_float(a.dO.at(sh.head) + row0 * a.dO.ld, a.dO.ld, m, D, t.dout, lddo);
    const float* k = hd.k + b0 * hd.ldk;
    for (auto* buf : {&t.p, &t.ds}) buf->resize(std::max<size_t>(buf->size(), static_cast<size_t>(m * w)));
    gemm(false, true, m, w, D, 1.0f, qf, ldq, k, hd.ldk, 0.0f, t.p.data(), w);                  // q·kᵀ
    gemm(false, true, m, w, D, 1.0f, dof, lddo, hd.v + b0 * hd.ldv, hd.ldv, 0.0f, t.ds.data(), w);  // dO·vᵀ
    backward_block_rows(a, sh, r0, m, b0, w, t);
    gemm(true, false, w, D, m, 1.0f, t.p.data(), w, dof, lddo, 1.0f, hd.dv + b0 * hd.lddv, hd.lddv);  // dv += Pᵀ·dO
    gemm(false, false, m, D, w, 1.0f, t.ds.data(), w, k, hd.ldk, 0.0f, dq, lddq);                    // dq = dS·k
    gemm(true, false, w, D, m, 1.0f, t.ds.data(), w, qf, ldq, 1.0f, hd.dk + b0 * hd.lddk, hd.lddk);   // dk += dSᵀ·q
  }
  store_rows(dq, dq_dst, a.dQ.ld, m, D);
}

// The backward's cost of one key/value head of each sequence (five products per row block, for each
// of the group's query heads), prefix-summed over the items (sequence, key/value head).
struct KvHeadCosts {
  int64_t H_kv;
  std::vector<double> per_head, before;  // (B) and (B + 1)

  KvHeadCosts(const Sequences& seqs, int64_t kv_heads, int64_t group, int64_t D) : H_kv(kv_heads), before{0.0} {
    for (int64_t b = 0; b < seqs.count; ++b) {
      const Band band = seqs[b].band;
      double cost = 0.0;
      for (int64_t r = 0; r < row_blocks(band.T_q); ++r) {
        const int64_t m = block_rows(band.T_q, r);
        cost += static_cast<double>(group * m * (band.span(r * kBlock, m).second * (5 * D + 16) + D));
      }
      per_head.push_back(cost);
      before.push_back(before.back() + static_cast<double>(H_kv) * cost);
    }
  }
  double cost_before(int64_t item) const {
    const int64_t b = item / H_kv;
    return b >= static_cast<int64_t>(per_head.size()) ? before.back()
                                                      : before[b] + static_cast<double>(item % H_kv) * per_head[b];
  }
};

template <typename scalar_t>
void backward_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& lse, const at::Tensor& delta, const Sequences& seqs, const ScoreMods& mods,
                     const DropoutStream& ds, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t H_kv = k.size(1), D = q.size(3), group = q.size(1) / k.size(1), T = q.size(2);
  const BackwardArgs<scalar_t> args{rows4<scalar_t>(q), rows4<scalar_t>(dout), rows4<scalar_t>(dq), D, mods, ds,
                                    lse.data_ptr<float>(), delta.data_ptr<float>()};
  const auto K = rows4<scalar_t>(k), V = rows4<scalar_t>(v), dK = rows4<scalar_t>(dk), dV = rows4<scalar_t>(dv);
  const KvHeadCosts costs(seqs, H_kv, group, D);
  parallel_for_balanced(seqs.count * H_kv, [&costs](int64_t item) { return costs.cost_before(item); },
                        kMinCostPerThread, [&](int64_t begin, int64_t end) {
    BackwardScratch t;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / H_kv, kv_head = item % H_kv;
      const Sequence seq = seqs[b];
      const int64_t kv = seq.entry * H_kv + kv_head, T_k = seq.band.T_k;
      KvHead hd{};
      hd.k = rows_as_float(K.at(kv) + seq.k0 * K.ld, K.ld, T_k, D, t.k, hd.ldk);
      hd.v = rows_as_float(V.at(kv) + seq.k0 * V.ld, V.ld, T_k, D, t.v, hd.ldv);
      hd.dk = float_rows(dK.at(kv) + seq.k0 * dK.ld, dK.ld, T_k, D, t.dk, hd.lddk);
      hd.dv = float_rows(dV.at(kv) + seq.k0 * dV.ld, dV.ld, T_k, D, t.dv, hd.lddv);
      for (int64_t j = 0; j < T_k; ++j) {
        zero_fill(hd.dk + j * hd.lddk, D);
        zero_fill(hd.dv + j * hd.lddv, D);
      }
      for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {  // the group's query heads, in order
        const SeqHead sh = seq_head(seqs, seq, b, h, mods, T);
        for (int64_t r = 0; r < row_blocks(sh.band.T_q); ++r) {
          backward_block(args, hd, sh, r * kBlock, block_rows(sh.band.T_q, r), t);
        }
      }
      store_rows(hd.dk, dK.at(kv) + seq.k0 * dK.ld, dK.ld, T_k, D);  // bfloat16: rounded once
      store_rows(hd.dv, dV.at(kv) + seq.k0 * dV.ld, dV.ld, T_k, D);
    }
  });
}

// dsinks (H,) float32: -Σ over (b, i) of exp(sink_h - lse)·delta, in double, in a fixed order.
at::Tensor sink_grads(const at::Tensor& lse, const at::Tensor& delta, const at::Tensor& sinks) {
  const int64_t B = lse.size(0), H = lse.size(1), T_q = lse.size(2);
  at::Tensor grads = at::empty({H}, lse.options());
  const float *l = lse.data_ptr<float>(), *d = delta.data_ptr<float>(), *s = sinks.data_ptr<float>();
  float* g = grads.data_ptr<float>();
  at::parallel_for(0, H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) {
      double acc = 0.0;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t row0 = (b * H + h) * T_q;
        for (int64_t i = 0; i < T_q; ++i) acc += std::exp(double(s[h]) - double(l[row0 + i])) * double(d[row0 + i]);
      }
      g[h] = static_cast<float>(-acc);
    }
  });
  return grads;
}

// keep (B, H, T_rows, T_cols): query i of sequence b, head h, in row (b·H + h)·T_rows + i, True where
// the stream keeps a key of its band. The scalar philox4x32_10, one block per 4 columns: the
// reference the vectorised draws match.
void fill_keep_mask(const Sequences& seqs, int64_t H, int64_t T_rows, int64_t T_cols, const DropoutStream& ds,
                    bool* out) {
  at::parallel_for(0, seqs.count * H * T_rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r % T_rows;
      const Band band = seqs[r / (H * T_rows)].band;
      if (i >= band.T_q) continue;  // padding past a shorter sequence's queries
      const auto flat = static_cast<uint32_t>(r / T_rows * seqs.T_q + i);
      Philox4 words{};
      for (int64_t j = band.begin(i); j < band.end(i); ++j) {
        if (j == band.begin(i) || j % 4 == 0) words = ds.words(static_cast<uint32_t>(j / 4), flat);
        out[r * T_cols + j] = words.x[j % 4] >= ds.threshold;
      }
    }
  });
}

// sinks (H,) and alibi_slopes (B, H): float32 on the CPU (the Python side converts them).
void check_float_option(const std::optional<at::Tensor>& t, at::IntArrayRef shape, const char* op, const char* name,
                        const char* dims) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, op, ": ", name, " is ", t->scalar_type(), " on ",
              t->device(), "; it must be float32 on the CPU");
  TORCH_CHECK(t->sizes() == shape, op, ": ", name, " has shape ", t->sizes(), "; it must be ", dims, " = ", shape);
}

void check_band(bool causal, int64_t T_q, int64_t T_k, int64_t left, int64_t right, const char* op) {
  TORCH_CHECK(!causal || T_q <= T_k, op, ": T_q = ", T_q, " > T_k = ", T_k,
              " in a causal call; a causal call needs T_q <= T_k (causal=False takes any T_k)");
  TORCH_CHECK(left >= -1 && right >= -1, op, ": window (", left, ", ", right,
              ") must have sides >= 0, or -1 for unbounded");
}

// q (B, H, T_q, D), k and v (B, H_kv, T_k, D), float32 or bfloat16 on the CPU (a packed call's
// (1, H, total, D) views); the options, alibi_slopes (sequences, H).
void check_options_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& slopes,
                        int64_t sequences, double softcap, const char* op) {
  check_rank4(q, op, "q", "(B, H, T_q, D)");
  check_rank4(k, op, "k", "(B, H_kv, T_k, D)");
  TORCH_CHECK(q.device().is_cpu(), op, ": q is on ", q.device(), "; these flash kernels are CPU only");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, op, ": q has dtype ", q.scalar_type(),
              "; supported dtypes are Float (float32) and BFloat16");
  check_same_dtype_device(k, q, op, "k", "q");
  check_same_dtype_device(v, q, op, "v", "q");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), op, ": k has shape ", k.sizes(), " but q has shape ",
              q.sizes(), "; q (B, H, T_q, D) and k (B, H_kv, T_k, D) must share B and D");
  check_kv_heads(q.size(1), k.size(1), op, "k", "q");
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v has shape ", v.sizes(), " but k has shape ", k.sizes(),
              "; k and v must be (B, H_kv, T_k, D) alike");
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, op, ": softcap must be a finite number >= 0 (0 turns it off); got ",
              softcap);
  check_blas_size(k.size(2), op, "T_k");
  check_blas_size(q.size(3), op, "D");
  check_float_option(sinks, {q.size(1)}, op, "sinks", "(H,)");
  check_float_option(slopes, {sequences, q.size(1)}, op, "alibi_slopes", "(B, H)");
}

// cu_seqlens (B + 1,) int32, contiguous on the CPU, from 0 to `total` rows, never decreasing.
void check_cu_seqlens(const at::Tensor& cu, int64_t total, const char* op, const char* name, const char* total_name) {
  TORCH_CHECK(cu.device().is_cpu() && cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.numel() >= 2 &&
                  cu.is_contiguous(),
              op, ": ", name, " is ", cu.scalar_type(), " of shape ", cu.sizes(), " on ", cu.device(),
              "; it must be a contiguous (B + 1,) int32 tensor on the CPU, B >= 1 sequences");
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t B = cu.numel() - 1;
  TORCH_CHECK(c[0] == 0 && c[B] == total, op, ": ", name, " runs from ", c[0], " to ", c[B], "; it must run from 0 to ",
              total_name, " = ", total);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(c[b + 1] >= c[b], op, ": ", name, "[", b + 1, "] = ", c[b + 1], " < ", name, "[", b, "] = ", c[b],
                "; it must never decrease");
  }
}

// The sequences of a packed call with total_q queries and total_k keys, checked.
Sequences packed_sequences(const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t total_q, int64_t total_k,
                           bool causal, int64_t left, int64_t right, const char* op) {
  check_cu_seqlens(cu_q, total_q, op, "cu_seqlens_q", "total_q");
  check_cu_seqlens(cu_k, total_k, op, "cu_seqlens_k", "total_k");
  TORCH_CHECK(cu_q.numel() == cu_k.numel(), op, ": cu_seqlens_q has ", cu_q.numel(), " entries and cu_seqlens_k ",
              cu_k.numel(), "; both must be (B + 1,) for the same B sequences");
  check_band(false, 0, 0, left, right, op);
  Sequences seqs{cu_q.numel() - 1, 0, 0, causal, left, right, cu_q.data_ptr<int32_t>(), cu_k.data_ptr<int32_t>()};
  for (int64_t b = 0; b < seqs.count; ++b) {
    const Band band = seqs[b].band;
    TORCH_CHECK(!causal || band.T_q <= band.T_k, op, ": sequence ", b, " has T_q = ", band.T_q, " > T_k = ", band.T_k,
                " in a causal call; a causal call needs T_q <= T_k in every sequence (causal=False takes any)");
    seqs.T_q = std::max(seqs.T_q, band.T_q);
    seqs.T_k = std::max(seqs.T_k, band.T_k);
  }
  return seqs;
}

// A packed call's q (total_q, H, D) or k, v (total_k, H_kv, D) as its (1, H, total, D) view.
at::Tensor one_entry_view(const at::Tensor& t, const char* op, const char* name, const char* dims) {
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must have 3 dims ", dims, " in a packed call; got ", t.dim(),
              " dims with shape ", t.sizes());
  return t.unsqueeze(0).transpose(1, 2);
}

// q, k, v of a packed call as (1, H, total, D) views, their shapes checked against each other.
std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_views(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const char* op) {
  at::Tensor q4 = one_entry_view(q, op, "q", "(total_q, H, D)"), k4 = one_entry_view(k, op, "k", "(total_k, H_kv, D)");
  at::Tensor v4 = one_entry_view(v, op, "v", "(total_k, H_kv, D)");
  TORCH_CHECK(q.size(2) == k.size(2) && v.sizes() == k.sizes(), op, ": q, k, v have shapes ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes(), "; they must be (total_q, H, D) and (total_k, H_kv, D) alike");
  return {q4, k4, v4};
}

ScoreMods score_mods(const at::Tensor& sinks, const at::Tensor& slopes, double scale, double softcap, int64_t H) {
  return {static_cast<float>(scale), static_cast<float>(softcap),
          slopes.defined() ? slopes.data_ptr<float>() : nullptr, sinks.defined() ? sinks.data_ptr<float>() : nullptr, H};
}

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// (out, lse) of checked (B, H, T_q, D) tensors (a packed call's views) over their sequences.
std::tuple<at::Tensor, at::Tensor> run_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const Sequences& seqs, const std::optional<at::Tensor>& sinks,
                                               const std::optional<at::Tensor>& alibi_slopes, double scale,
                                               double softcap, double dropout_p, int64_t seed, int64_t offset,
                                               const char* op, const PagedKeys* paged = nullptr) {
  const int64_t B = q.size(0), H = q.size(1), T_q = q.size(2), D = q.size(3);
  check_scale_dropout(scale, dropout_p, seqs.count * H * seqs.T_q, op);
  at::Tensor out = empty_heads_interleaved(B, H, T_q, D, q.options());
  at::Tensor lse = at::empty({B, H, T_q}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const at::Tensor sinks32 = contiguous_or_undefined(sinks), slopes32 = contiguous_or_undefined(alibi_slopes);
  const ScoreMods mods = score_mods(sinks32, slopes32, scale, softcap, H);
  const auto ds = make_dropout_stream(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), dropout_p);
  if (q.scalar_type() == at::kBFloat16) {
    forward_kernel<c10::BFloat16>(rows_readable(q), rows_readable(k), rows_readable(v), seqs, mods, ds, paged, out,
                                  lse);
  } else {
    forward_kernel<float>(rows_readable(q), rows_readable(k), rows_readable(v), seqs, mods, ds, paged, out, lse);
  }
  return {out, lse};
}

// dout and out shaped like q (what `dims` names), in q's dtype and device; lse the forward's
// float32 `lse_shape`.
void check_backward_inputs(const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& q,
                           at::IntArrayRef lse_shape, const char* dims, const char* lse_dims, const char* op) {
  for (const auto& [t, name] : {std::pair{&dout, "dout"}, std::pair{&out, "out"}}) {
    check_same_dtype_device(*t, q, op, name, "q");
    TORCH_CHECK(t->sizes() == q.sizes(), op, ": ", name, " has shape ", t->sizes(), " but q has shape ", q.sizes(),
                "; it must be shaped like the forward's output ", dims);
  }
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat && lse.sizes() == lse_shape, op, ": lse is ",
              lse.scalar_type(), " of shape ", lse.sizes(), " on ", lse.device(), "; it must be the forward's float32 ",
              lse_dims, " = ", lse_shape);
}

// (dq, dk, dv, dsinks) of checked (B, H, T, D) tensors (a packed call's views) over their sequences.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const Sequences& seqs, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& alibi_slopes, double scale, double softcap, double dropout_p, int64_t seed,
    int64_t offset, const char* op) {
  const int64_t B = q.size(0), H = q.size(1), H_kv = k.size(1), T_q = q.size(2), T_k = k.size(2), D = q.size(3);
  check_scale_dropout(scale, dropout_p, seqs.count * H * seqs.T_q, op);
  at::Tensor dq = empty_heads_interleaved(B, H, T_q, D, q.options());
  at::Tensor dk = empty_heads_interleaved(B, H_kv, T_k, D, q.options());
  at::Tensor dv = empty_heads_interleaved(B, H_kv, T_k, D, q.options());
  const at::Tensor sinks32 = contiguous_or_undefined(sinks), slopes32 = contiguous_or_undefined(alibi_slopes);
  at::Tensor dsinks = sinks32.defined() ? at::zeros({H}, lse.options()) : at::empty({0}, lse.options());
  if (q.numel() == 0 || k.numel() == 0) {  // nothing to multiply: every gradient is zero
    for (at::Tensor* t : {&dq, &dk, &dv}) t->zero_();
    return {dq, dk, dv, dsinks};
  }
  const at::Tensor g = rows_readable(dout), lse_c = lse.contiguous();
  const at::Tensor delta = output_grad_dots(g, rows_readable(out));
  const ScoreMods mods = score_mods(sinks32, slopes32, scale, softcap, H);
  const auto ds = make_dropout_stream(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), dropout_p);
  if (q.scalar_type() == at::kBFloat16) {
    backward_kernel<c10::BFloat16>(g, rows_readable(q), rows_readable(k), rows_readable(v), lse_c, delta, seqs, mods, ds,
                                   dq, dk, dv);
  } else {
    backward_kernel<float>(g, rows_readable(q), rows_readable(k), rows_readable(v), lse_c, delta, seqs, mods, ds, dq,
                           dk, dv);
  }
  if (sinks32.defined()) dsinks = sink_grads(lse_c, delta, sinks32);
  return {dq, dk, dv, dsinks};
}

// A packed (total, H, D) tensor of its (1, H, total, D) view.
at::Tensor packed_of(const at::Tensor& view) { return view.select(0, 0).transpose(0, 1); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_flash_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                           const std::optional<at::Tensor>& sinks,
                                                           const std::optional<at::Tensor>& alibi_slopes, double scale,
                                                           bool causal, int64_t window_left, int64_t window_right,
                                                           double softcap, double dropout_p, int64_t seed,
                                                           int64_t offset) {
  constexpr const char* op = "fastgpt::attention_flash_forward";
  check_options_args(q, k, v, sinks, alibi_slopes, q.dim() == 4 ? q.size(0) : 0, softcap, op);
  check_band(causal, q.size(2), k.size(2), window_left, window_right, op);
  const Sequences seqs{q.size(0), q.size(2), k.size(2), causal, window_left, window_right};
  return run_forward(q, k, v, seqs, sinks, alibi_slopes, scale, softcap, dropout_p, seed, offset, op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_flash_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& alibi_slopes,
    double scale, bool causal, int64_t window_left, int64_t window_right, double softcap, double dropout_p,
    int64_t seed, int64_t offset) {
  constexpr const char* op = "fastgpt::attention_flash_backward";
  check_options_args(q, k, v, sinks, alibi_slopes, q.dim() == 4 ? q.size(0) : 0, softcap, op);
  check_band(causal, q.size(2), k.size(2), window_left, window_right, op);
  const int64_t B = q.size(0), H = q.size(1), T_q = q.size(2);
  check_backward_inputs(dout, out, lse, q, {B, H, T_q}, "(B, H, T_q, D)", "(B, H, T_q)", op);
  const Sequences seqs{B, T_q, k.size(2), causal, window_left, window_right};
  return run_backward(dout, q, k, v, out, lse, seqs, sinks, alibi_slopes, scale, softcap, dropout_p, seed, offset, op);
}

at::Tensor attention_dropout_keep_mask(const at::Tensor& q, int64_t T_k, bool causal, int64_t window_left,
                                       int64_t window_right, double dropout_p, int64_t seed, int64_t offset) {
  constexpr const char* op = "fastgpt::attention_dropout_keep_mask";
  check_rank4(q, op, "q", "(B, H, T_q, D)");
  TORCH_CHECK(T_k >= 0, op, ": T_k must be >= 0; got ", T_k);
  const int64_t B = q.size(0), H = q.size(1), T_q = q.size(2);
  check_band(causal, T_q, T_k, window_left, window_right, op);
  check_scale_dropout(1.0, dropout_p, B * H * T_q, op);
  at::Tensor keep = at::zeros({B, H, T_q, T_k}, q.options().dtype(at::kBool));
  const Sequences seqs{B, T_q, T_k, causal, window_left, window_right};
  const auto ds = make_dropout_stream(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), dropout_p);
  fill_keep_mask(seqs, H, T_q, T_k, ds, keep.data_ptr<bool>());
  return keep;
}

std::tuple<at::Tensor, at::Tensor> attention_flash_varlen_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& alibi_slopes, double scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap, double dropout_p, int64_t seed, int64_t offset) {
  constexpr const char* op = "fastgpt::attention_flash_varlen_forward";
  const auto [q4, k4, v4] = packed_views(q, k, v, op);
  const Sequences seqs =
      packed_sequences(cu_seqlens_q, cu_seqlens_k, q.size(0), k.size(0), causal, window_left, window_right, op);
  check_options_args(q4, k4, v4, sinks, alibi_slopes, seqs.count, softcap, op);
  const auto [out, lse] = run_forward(q4, k4, v4, seqs, sinks, alibi_slopes, scale, softcap, dropout_p, seed, offset, op);
  return {packed_of(out), lse.select(0, 0)};  // (total_q, H, D), (H, total_q)
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_flash_varlen_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& alibi_slopes, double scale, bool causal,
    int64_t window_left, int64_t window_right, double softcap, double dropout_p, int64_t seed, int64_t offset) {
  constexpr const char* op = "fastgpt::attention_flash_varlen_backward";
  const auto [q4, k4, v4] = packed_views(q, k, v, op);
  const Sequences seqs =
      packed_sequences(cu_seqlens_q, cu_seqlens_k, q.size(0), k.size(0), causal, window_left, window_right, op);
  check_options_args(q4, k4, v4, sinks, alibi_slopes, seqs.count, softcap, op);
  check_backward_inputs(dout, out, lse, q, {q.size(1), q.size(0)}, "(total_q, H, D)", "(H, total_q)", op);
  const auto [dq, dk, dv, dsinks] =
      run_backward(dout.unsqueeze(0).transpose(1, 2), q4, k4, v4, out.unsqueeze(0).transpose(1, 2), lse.unsqueeze(0),
                   seqs, sinks, alibi_slopes, scale, softcap, dropout_p, seed, offset, op);
  return {packed_of(dq), packed_of(dk), packed_of(dv), dsinks};
}

std::tuple<at::Tensor, at::Tensor> attention_flash_paged_forward(
    const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& block_table,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& alibi_slopes, double scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap) {
  constexpr const char* op = "fastgpt::attention_flash_paged_forward";
  TORCH_CHECK(k_pages.dim() == 4 && v_pages.sizes() == k_pages.sizes() && k_pages.is_contiguous() &&
                  v_pages.is_contiguous(),
              op, ": k_pages and v_pages have shapes ", k_pages.sizes(), " and ", v_pages.sizes(),
              "; they must be contiguous (num_pages, page_size, H_kv, D) alike");
  const int64_t num_pages = k_pages.size(0), page = k_pages.size(1);
  TORCH_CHECK(page >= 1, op, ": page_size (k_pages.size(1)) is ", page, "; it must be at least 1");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2 && block_table.is_contiguous() &&
                  block_table.device().is_cpu() && block_table.size(0) == cu_seqlens_k.numel() - 1,
              op, ": block_table is ", block_table.scalar_type(), " of shape ", block_table.sizes(), " on ",
              block_table.device(), "; it must be a contiguous (B, max_pages) int32 tensor on the CPU, B = ",
              cu_seqlens_k.numel() - 1, " sequences");
  TORCH_CHECK(cu_seqlens_k.scalar_type() == at::kInt && cu_seqlens_k.dim() == 1 && cu_seqlens_k.numel() >= 2,
              op, ": cu_seqlens_k must be a (B + 1,) int32 tensor; got ", cu_seqlens_k.scalar_type(), " ",
              cu_seqlens_k.sizes());
  const at::Tensor k_rows = k_pages.view({num_pages * page, k_pages.size(2), k_pages.size(3)});
  const at::Tensor v_rows = v_pages.view({num_pages * page, v_pages.size(2), v_pages.size(3)});
  const auto [q4, k4, v4] = packed_views(q, k_rows, v_rows, op);
  const int64_t total_k = cu_seqlens_k.is_contiguous() ? cu_seqlens_k[-1].item<int64_t>() : -1;
  const Sequences seqs =
      packed_sequences(cu_seqlens_q, cu_seqlens_k, q.size(0), total_k, causal, window_left, window_right, op);
  check_options_args(q4, k4, v4, sinks, alibi_slopes, seqs.count, softcap, op);
  const int64_t max_pages = block_table.size(1);
  const int32_t* table = block_table.data_ptr<int32_t>();
  for (int64_t b = 0; b < seqs.count; ++b) {  // every page a sequence reads lies in the pool
    const int64_t T_k = seqs[b].band.T_k;
    TORCH_CHECK(T_k <= max_pages * page, op, ": sequence ", b, " has ", T_k, " keys but its block table row holds ",
                max_pages, " pages of ", page);
    for (int64_t p = 0; p * page < T_k; ++p) {
      const int32_t at_p = table[b * max_pages + p];
      TORCH_CHECK(at_p >= 0 && at_p < num_pages, op, ": block_table[", b, "][", p, "] = ", at_p,
                  " is outside the pool's pages 0 .. ", num_pages - 1);
    }
  }
  const PagedKeys paged{table, max_pages, page};
  const auto [out, lse] =
      run_forward(q4, k4, v4, seqs, sinks, alibi_slopes, scale, softcap, 0.0, 0, 0, op, &paged);
  return {packed_of(out), lse.select(0, 0)};  // (total_q, H, D), (H, total_q)
}

at::Tensor attention_varlen_dropout_keep_mask(const at::Tensor& q, const at::Tensor& cu_seqlens_q,
                                              const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                              int64_t max_seqlen_k, bool causal, int64_t window_left,
                                              int64_t window_right, double dropout_p, int64_t seed, int64_t offset) {
  constexpr const char* op = "fastgpt::attention_varlen_dropout_keep_mask";
  TORCH_CHECK(q.dim() == 3, op, ": q must have 3 dims (total_q, H, D); got ", q.dim(), " dims with shape ", q.sizes());
  TORCH_CHECK(cu_seqlens_k.dim() == 1 && cu_seqlens_k.numel() >= 2, op, ": cu_seqlens_k has shape ",
              cu_seqlens_k.sizes(), "; it must be (B + 1,) with B >= 1 sequences");
  const int64_t total_k = cu_seqlens_k.scalar_type() == at::kInt ? cu_seqlens_k[-1].item<int64_t>() : -1;
  const Sequences seqs =
      packed_sequences(cu_seqlens_q, cu_seqlens_k, q.size(0), total_k, causal, window_left, window_right, op);
  TORCH_CHECK(max_seqlen_q >= seqs.T_q && max_seqlen_k >= seqs.T_k, op, ": max_seqlen_q = ", max_seqlen_q,
              " and max_seqlen_k = ", max_seqlen_k, " must be at least the longest sequences, ", seqs.T_q, " and ",
              seqs.T_k);
  const int64_t H = q.size(1);
  check_scale_dropout(1.0, dropout_p, seqs.count * H * seqs.T_q, op);
  at::Tensor keep = at::zeros({seqs.count, H, max_seqlen_q, max_seqlen_k}, q.options().dtype(at::kBool));
  const auto ds = make_dropout_stream(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), dropout_p);
  fill_keep_mask(seqs, H, max_seqlen_q, max_seqlen_k, ds, keep.data_ptr<bool>());
  return keep;
}

}  // namespace fastgpt::cpu
