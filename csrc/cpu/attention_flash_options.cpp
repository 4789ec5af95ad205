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

// Softmax rows of one row block: s (m × w) holds q·k over keys [b0, b0 + w) and becomes P; lse of
// the rows into lse_rows.
void forward_block_rows(float* s, int64_t m, int64_t w, int64_t r0, int64_t b0, int64_t bh, const Band& band,
                        const ScoreMods& mods, const DropoutStream& ds, float* lse_rows, std::vector<float>& mult) {
  const int64_t h = bh % mods.H;
  const float slope = mods.slopes != nullptr ? mods.slopes[bh] : 0.0f;
  const float* sink = mods.sinks != nullptr ? mods.sinks + h : nullptr;
  for (int64_t i = 0; i < m; ++i) {
    const int64_t row = r0 + i, a = band.begin(row) - b0, e = band.end(row) - b0;
    float* s_row = s + i * w;
    score_row(s_row, a, e, static_cast<float>(b0), static_cast<float>(band.pos(row)), mods, slope);
    const float* mul = band_multipliers(ds, bh * band.T_q + row, b0, e, mult);
    lse_rows[i] = softmax_band_row(s_row, w, a, e, sink, mul);
  }
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Band& band,
                    const ScoreMods& mods, const DropoutStream& ds, at::Tensor& out, at::Tensor& lse) {
  const int64_t BH = q.size(0) * q.size(1), D = q.size(3), group = q.size(1) / k.size(1);
  const int64_t R = (band.T_q + kBlock - 1) / kBlock;
  const auto Q = rows4<scalar_t>(q), K = rows4<scalar_t>(k), V = rows4<scalar_t>(v), O = rows4<scalar_t>(out);
  float* lse_data = lse.data_ptr<float>();
  auto rows = [&](int64_t r) { return std::min(kBlock, band.T_q - r * kBlock); };
  auto cum = head_prefix_cost(R, [&](int64_t r) {
    return static_cast<double>(rows(r) * (band.span(r * kBlock, rows(r)).second * (2 * D + 8) + D));
  });
  parallel_for_balanced(BH * R, cum, kMinCostPerThread, [&](int64_t begin, int64_t end) {
    std::vector<float> s_buf, q_buf, k_buf, v_buf, o_buf, mult;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / R, r0 = item % R * kBlock, m = rows(item % R), kv = bh / group;
      const auto [b0, w] = band.span(r0, m);
      int64_t ldq, ldk, ldv, ldo;
      float* o = float_rows(O.at(bh) + r0 * O.ld, O.ld, m, D, o_buf, ldo);
      if (w == 0) {  // no row of the block sees a key
        for (int64_t i = 0; i < m; ++i) std::fill(o + i * ldo, o + i * ldo + D, 0.0f);
        std::fill(lse_data + bh * band.T_q + r0, lse_data + bh * band.T_q + r0 + m,
                  mods.sinks != nullptr ? mods.sinks[bh % mods.H] : kNegInf);
      } else {
        const float* qf = rows_as_float(Q.at(bh) + r0 * Q.ld, Q.ld, m, D, q_buf, ldq);
        const float* kf = rows_as_float(K.at(kv) + b0 * K.ld, K.ld, w, D, k_buf, ldk);
        const float* vf = rows_as_float(V.at(kv) + b0 * V.ld, V.ld, w, D, v_buf, ldv);
        s_buf.resize(std::max<size_t>(s_buf.size(), static_cast<size_t>(m * w)));
        gemm(false, true, m, w, D, 1.0f, qf, ldq, kf, ldk, 0.0f, s_buf.data(), w);  // q·kᵀ (m × w)
        forward_block_rows(s_buf.data(), m, w, r0, b0, bh, band, mods, ds, lse_data + bh * band.T_q + r0, mult);
        gemm(false, false, m, D, w, 1.0f, s_buf.data(), w, vf, ldv, 0.0f, o, ldo);  // out = P·v
      }
      store_rows(o, O.at(bh) + r0 * O.ld, O.ld, m, D);
    }
  });
}

// One key/value head in the backward: k and v as float32 rows, and the float32 rows its dk and
// dv accumulate in (the outputs themselves for float32).
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
  const Band& band;
  const ScoreMods& mods;
  const DropoutStream& ds;
  const float *lse, *delta;
};

// P and dS of one row block (m × w, over keys [b0, b0 + w)) from the products in t.p and t.ds.
template <typename scalar_t>
void backward_block_rows(const BackwardArgs<scalar_t>& a, int64_t bh, int64_t r0, int64_t m, int64_t b0, int64_t w,
                         BackwardScratch& t) {
  const float slope = a.mods.slopes != nullptr ? a.mods.slopes[bh] : 0.0f;
  if (a.mods.softcap > 0) t.cap.resize(std::max<size_t>(t.cap.size(), static_cast<size_t>(w)));
  for (int64_t i = 0; i < m; ++i) {
    const int64_t row = r0 + i, flat = bh * a.band.T_q + row;
    const int64_t begin = a.band.begin(row) - b0, end = a.band.end(row) - b0;
    const float* mult = band_multipliers(a.ds, flat, b0, end, t.mult);
    grad_band_row(t.p.data() + i * w, t.ds.data() + i * w, w, begin, end, static_cast<float>(b0),
                  static_cast<float>(a.band.pos(row)), a.mods, slope, a.lse[flat], a.delta[flat], mult, t.cap.data());
  }
}

// Row block [r0, r0 + m) of query head bh: its dq rows, and its share of the head's dk and dv.
template <typename scalar_t>
void backward_block(const BackwardArgs<scalar_t>& a, const KvHead& hd, int64_t bh, int64_t r0, int64_t m,
                    BackwardScratch& t) {
  const int64_t D = a.D;
  const auto [b0, w] = a.band.span(r0, m);
  int64_t ldq, lddo, lddq;
  float* dq = float_rows(a.dQ.at(bh) + r0 * a.dQ.ld, a.dQ.ld, m, D, t.dq, lddq);
  if (w == 0) {  // no row of the block sees a key
    for (int64_t i = 0; i < m; ++i) std::fill(dq + i * lddq, dq + i * lddq + D, 0.0f);
  } else {
    const float* qf = rows_as_float(a.Q.at(bh) + r0 * a.Q.ld, a.Q.ld, m, D, t.q, ldq);
    const float* dof = rows_as_float(a.dO.at(bh) + r0 * a.dO.ld, a.dO.ld, m, D, t.dout, lddo);
    const float* k = hd.k + b0 * hd.ldk;
    for (auto* buf : {&t.p, &t.ds}) buf->resize(std::max<size_t>(buf->size(), static_cast<size_t>(m * w)));
    gemm(false, true, m, w, D, 1.0f, qf, ldq, k, hd.ldk, 0.0f, t.p.data(), w);                  // q·kᵀ
    gemm(false, true, m, w, D, 1.0f, dof, lddo, hd.v + b0 * hd.ldv, hd.ldv, 0.0f, t.ds.data(), w);  // dO·vᵀ
    backward_block_rows(a, bh, r0, m, b0, w, t);
    gemm(true, false, w, D, m, 1.0f, t.p.data(), w, dof, lddo, 1.0f, hd.dv + b0 * hd.lddv, hd.lddv);  // dv += Pᵀ·dO
    gemm(false, false, m, D, w, 1.0f, t.ds.data(), w, k, hd.ldk, 0.0f, dq, lddq);                    // dq = dS·k
    gemm(true, false, w, D, m, 1.0f, t.ds.data(), w, qf, ldq, 1.0f, hd.dk + b0 * hd.lddk, hd.lddk);   // dk += dSᵀ·q
  }
  store_rows(dq, a.dQ.at(bh) + r0 * a.dQ.ld, a.dQ.ld, m, D);
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& lse, const at::Tensor& delta, const Band& band, const ScoreMods& mods,
                     const DropoutStream& ds, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t BH_kv = k.size(0) * k.size(1), D = q.size(3), group = q.size(1) / k.size(1), T_k = band.T_k;
  const int64_t R = (band.T_q + kBlock - 1) / kBlock;
  const BackwardArgs<scalar_t> args{rows4<scalar_t>(q), rows4<scalar_t>(dout), rows4<scalar_t>(dq), D, band, mods, ds,
                                    lse.data_ptr<float>(), delta.data_ptr<float>()};
  const auto K = rows4<scalar_t>(k), V = rows4<scalar_t>(v), dK = rows4<scalar_t>(dk), dV = rows4<scalar_t>(dv);
  double per_head = 0.0;  // five products per row block, for each of the group's query heads
  for (int64_t r = 0; r < R; ++r) {
    const int64_t m = std::min(kBlock, band.T_q - r * kBlock);
    per_head += static_cast<double>(group * m * (band.span(r * kBlock, m).second * (5 * D + 16) + D));
  }
  parallel_for_balanced(BH_kv, [per_head](int64_t i) { return static_cast<double>(i) * per_head; }, kMinCostPerThread,
                        [&](int64_t begin, int64_t end) {
    BackwardScratch t;
    for (int64_t kv = begin; kv < end; ++kv) {
      KvHead hd{};
      hd.k = rows_as_float(K.at(kv), K.ld, T_k, D, t.k, hd.ldk);
      hd.v = rows_as_float(V.at(kv), V.ld, T_k, D, t.v, hd.ldv);
      hd.dk = float_rows(dK.at(kv), dK.ld, T_k, D, t.dk, hd.lddk);
      hd.dv = float_rows(dV.at(kv), dV.ld, T_k, D, t.dv, hd.lddv);
      for (int64_t j = 0; j < T_k; ++j) {
        zero_fill(hd.dk + j * hd.lddk, D);
        zero_fill(hd.dv + j * hd.lddv, D);
      }
      for (int64_t bh = kv * group; bh < (kv + 1) * group; ++bh) {  // the group's query heads, in order
        for (int64_t r = 0; r < R; ++r) backward_block(args, hd, bh, r * kBlock, std::min(kBlock, band.T_q - r * kBlock), t);
      }
      store_rows(hd.dk, dK.at(kv), dK.ld, T_k, D);  // bfloat16: rounded once
      store_rows(hd.dv, dV.at(kv), dV.ld, T_k, D);
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

// q (B, H, T_q, D), k and v (B, H_kv, T_k, D), float32 or bfloat16 on the CPU; the options.
void check_options_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& slopes, bool causal,
                        int64_t left, int64_t right, double softcap, const char* op) {
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
  check_band(causal, q.size(2), k.size(2), left, right, op);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, op, ": softcap must be a finite number >= 0 (0 turns it off); got ",
              softcap);
  check_blas_size(k.size(2), op, "T_k");
  check_blas_size(q.size(3), op, "D");
  check_float_option(sinks, {q.size(1)}, op, "sinks", "(H,)");
  check_float_option(slopes, {q.size(0), q.size(1)}, op, "alibi_slopes", "(B, H)");
}

ScoreMods score_mods(const at::Tensor& sinks, const at::Tensor& slopes, double scale, double softcap, int64_t H) {
  return {static_cast<float>(scale), static_cast<float>(softcap),
          slopes.defined() ? slopes.data_ptr<float>() : nullptr, sinks.defined() ? sinks.data_ptr<float>() : nullptr, H};
}

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_flash_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                           const std::optional<at::Tensor>& sinks,
                                                           const std::optional<at::Tensor>& alibi_slopes, double scale,
                                                           bool causal, int64_t window_left, int64_t window_right,
                                                           double softcap, double dropout_p, int64_t seed,
                                                           int64_t offset) {
  constexpr const char* op = "fastgpt::attention_flash_forward";
  check_options_args(q, k, v, sinks, alibi_slopes, causal, window_left, window_right, softcap, op);
  const int64_t B = q.size(0), H = q.size(1), T_q = q.size(2), D = q.size(3);
  check_scale_dropout(scale, dropout_p, B * H * T_q, op);
  at::Tensor out = empty_heads_interleaved(B, H, T_q, D, q.options());
  at::Tensor lse = at::empty({B, H, T_q}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const at::Tensor sinks32 = contiguous_or_undefined(sinks), slopes32 = contiguous_or_undefined(alibi_slopes);
  const ScoreMods mods = score_mods(sinks32, slopes32, scale, softcap, H);
  const Band band(T_q, k.size(2), causal, window_left, window_right);
  const auto ds = make_dropout_stream(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), dropout_p);
  if (q.scalar_type() == at::kBFloat16) {
    forward_kernel<c10::BFloat16>(rows_readable(q), rows_readable(k), rows_readable(v), band, mods, ds, out, lse);
  } else {
    forward_kernel<float>(rows_readable(q), rows_readable(k), rows_readable(v), band, mods, ds, out, lse);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_flash_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& alibi_slopes,
    double scale, bool causal, int64_t window_left, int64_t window_right, double softcap, double dropout_p,
    int64_t seed, int64_t offset) {
  constexpr const char* op = "fastgpt::attention_flash_backward";
  check_options_args(q, k, v, sinks, alibi_slopes, causal, window_left, window_right, softcap, op);
  const int64_t B = q.size(0), H = q.size(1), H_kv = k.size(1), T_q = q.size(2), T_k = k.size(2), D = q.size(3);
  check_scale_dropout(scale, dropout_p, B * H * T_q, op);
  for (const auto& [t, name] : {std::pair{&dout, "dout"}, std::pair{&out, "out"}}) {
    check_same_dtype_device(*t, q, op, name, "q");
    TORCH_CHECK(t->sizes() == q.sizes(), op, ": ", name, " has shape ", t->sizes(), " but q has shape ", q.sizes(),
                "; it must be shaped like the forward's output (B, H, T_q, D)");
  }
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == B &&
                  lse.size(1) == H && lse.size(2) == T_q,
              op, ": lse is ", lse.scalar_type(), " of shape ", lse.sizes(), "; it must be the forward's float32 (B, H, T_q) = (",
              B, ", ", H, ", ", T_q, ")");
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
  const Band band(T_q, T_k, causal, window_left, window_right);
  const auto ds = make_dropout_stream(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), dropout_p);
  if (q.scalar_type() == at::kBFloat16) {
    backward_kernel<c10::BFloat16>(g, rows_readable(q), rows_readable(k), rows_readable(v), lse_c, delta, band, mods, ds,
                                   dq, dk, dv);
  } else {
    backward_kernel<float>(g, rows_readable(q), rows_readable(k), rows_readable(v), lse_c, delta, band, mods, ds, dq,
                           dk, dv);
  }
  if (sinks32.defined()) dsinks = sink_grads(lse_c, delta, sinks32);
  return {dq, dk, dv, dsinks};
}

at::Tensor attention_dropout_keep_mask(const at::Tensor& q, int64_t T_k, bool causal, int64_t window_left,
                                       int64_t window_right, double dropout_p, int64_t seed, int64_t offset) {
  constexpr const char* op = "fastgpt::attention_dropout_keep_mask";
  check_rank4(q, op, "q", "(B, H, T_q, D)");
  TORCH_CHECK(T_k >= 0, op, ": T_k must be >= 0; got ", T_k);
  const int64_t B = q.size(0), H = q.size(1), T_q = q.size(2), rows = B * H * T_q;
  check_band(causal, T_q, T_k, window_left, window_right, op);
  check_scale_dropout(1.0, dropout_p, rows, op);
  at::Tensor keep = at::zeros({B, H, T_q, T_k}, q.options().dtype(at::kBool));
  bool* out = keep.data_ptr<bool>();
  const Band band(T_q, T_k, causal, window_left, window_right);
  const auto ds = make_dropout_stream(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), dropout_p);
  // The scalar philox4x32_10, one block per 4 columns: the reference the vectorised draws match.
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r % T_q;
      Philox4 words{};
      for (int64_t j = band.begin(i); j < band.end(i); ++j) {
        if (j == band.begin(i) || j % 4 == 0) words = ds.words(static_cast<uint32_t>(j / 4), static_cast<uint32_t>(r));
        out[r * T_k + j] = words.x[j % 4] >= ds.threshold;
      }
    }
  });
  return keep;
}

}  // namespace fastgpt::cpu
