// CPU kernels of the fused scale + causal mask + softmax (+ dropout), its backward, and the
// dropout-mask testing hook. One pass per row of the (B, H, T, T) scores; row i of a head reads and
// writes columns 0..i only (the causal mask is an index bound, never a -inf fill).
//
// Per row of length L = i + 1 (the row stays in L1: 4 KiB at T = 1024):
//   forward   m = max(scale·s); e = exp(scale·s - m); P = e / Σe; out = P ∘ keep / (1 - p)
//   backward  P recomputed as above; dP = grad ∘ keep / (1 - p); dS = scale · P ∘ (dP - Σ dP∘P)
// The backward reads the scores, not a stored P, and regenerates the keep mask from the Philox
// stream (philox.h), so neither the probabilities before dropout nor the mask are ever stored.

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>

#include "../causal_ops.h"
#include "../checks.h"
#include "../philox.h"
#include "common.h"
#include "dropout_cpu.h"

namespace fastgpt::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

// out[0..L) = softmax(scale · s[0..L)), times mult when given.
void softmax_row(const float* s, float* out, int64_t L, float scale, const float* mult) {
  const Vec vscale(scale);
  Vec vmax(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kW <= L; j += kW) vmax = at::vec::maximum(vmax, Vec::loadu(s + j) * vscale);
  float mx = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  for (; j < L; ++j) mx = std::max(mx, s[j] * scale);

  const Vec vmx(mx);
  Vec vsum(0.0f);
  j = 0;
  for (; j + kW <= L; j += kW) {
    const Vec e = (Vec::loadu(s + j) * vscale - vmx).exp_u20();
    e.store(out + j);
    vsum += e;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
  for (; j < L; ++j) {
    out[j] = std::exp(s[j] * scale - mx);
    sum += out[j];
  }

  const float inv = 1.0f / sum;
  const Vec vinv(inv);
  j = 0;
  if (mult != nullptr) {
    for (; j + kW <= L; j += kW) (Vec::loadu(out + j) * vinv * Vec::loadu(mult + j)).store(out + j);
    for (; j < L; ++j) out[j] = out[j] * inv * mult[j];
  } else {
    for (; j + kW <= L; j += kW) (Vec::loadu(out + j) * vinv).store(out + j);
    for (; j < L; ++j) out[j] *= inv;
  }
}

// ds[0..L) from the upstream grad g and the scores s; p: scratch of L floats.
void softmax_backward_row(const float* g, const float* s, float* ds, int64_t L, float scale,
                          const float* mult, float* p) {
  softmax_row(s, p, L, scale, nullptr);  // bit-identical to the forward's P
  Vec vacc(0.0f);
  int64_t j = 0;
  for (; j + kW <= L; j += kW) {
    Vec dp = Vec::loadu(g + j);
    if (mult != nullptr) dp = dp * Vec::loadu(mult + j);
    dp.store(ds + j);
    vacc = at::vec::fmadd(dp, Vec::loadu(p + j), vacc);
  }
  float acc = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vacc);
  for (; j < L; ++j) {
    ds[j] = mult != nullptr ? g[j] * mult[j] : g[j];
    acc += ds[j] * p[j];
  }
  const Vec vacc_b(acc), vscale(scale);
  j = 0;
  for (; j + kW <= L; j += kW) ((Vec::loadu(ds + j) - vacc_b) * Vec::loadu(p + j) * vscale).store(ds + j);
  for (; j < L; ++j) ds[j] = (ds[j] - acc) * p[j] * scale;
}

// Rows of a (B, H, T, T) causal matrix: row r = bh·T + i costs about i + 1 (+ a fixed overhead).
struct RowCost {
  int64_t T;
  static constexpr double kOverhead = 32.0;
  double operator()(int64_t n) const {  // cost of rows [0, n)
    auto partial = [](double k) { return k * (k + 1.0) / 2.0 + kOverhead * k; };
    return static_cast<double>(n / T) * partial(static_cast<double>(T)) + partial(static_cast<double>(n % T));
  }
};

template <typename scalar_t>
void softmax_kernel(const at::Tensor& scores, at::Tensor& out, float scale, const DropoutStream& ds) {
  const int64_t T = scores.size(2), rows = scores.size(0) * scores.size(1) * T;
  const auto S = rows4<scalar_t>(scores), O = rows4<scalar_t>(out);
  parallel_for_balanced(rows, RowCost{T}, [&](int64_t begin, int64_t end) {
    std::vector<float> mult(ds.enabled ? T : 0), s_buf, o_buf;
    if constexpr (!std::is_same_v<scalar_t, float>) s_buf.resize(T), o_buf.resize(T);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bh = r / T, i = r % T, L = i + 1;
      const scalar_t* s = S.at(bh) + i * S.ld;
      scalar_t* o = O.at(bh) + i * O.ld;
      if (ds.enabled) dropout_multipliers(ds, static_cast<uint32_t>(r), L, mult.data());
      const float* m = ds.enabled ? mult.data() : nullptr;
      if constexpr (std::is_same_v<scalar_t, float>) {
        softmax_row(s, o, L, scale, m);
      } else {
        to_float(s, s_buf.data(), L);
        softmax_row(s_buf.data(), o_buf.data(), L, scale, m);
        from_float(o_buf.data(), o, L);
      }
    }
  });
}

template <typename scalar_t>
void softmax_backward_kernel(const at::Tensor& grad, const at::Tensor& scores, at::Tensor& out, float scale,
                             const DropoutStream& ds) {
  const int64_t T = scores.size(2), rows = scores.size(0) * scores.size(1) * T;
  const auto G = rows4<scalar_t>(grad), S = rows4<scalar_t>(scores), O = rows4<scalar_t>(out);
  parallel_for_balanced(rows, RowCost{T}, [&](int64_t begin, int64_t end) {
    std::vector<float> mult(ds.enabled ? T : 0), p_buf(T), g_buf, s_buf, o_buf;
    if constexpr (!std::is_same_v<scalar_t, float>) g_buf.resize(T), s_buf.resize(T), o_buf.resize(T);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bh = r / T, i = r % T, L = i + 1;
      const scalar_t* g = G.at(bh) + i * G.ld;
      const scalar_t* s = S.at(bh) + i * S.ld;
      scalar_t* o = O.at(bh) + i * O.ld;
      if (ds.enabled) dropout_multipliers(ds, static_cast<uint32_t>(r), L, mult.data());
      const float* m = ds.enabled ? mult.data() : nullptr;
      if constexpr (std::is_same_v<scalar_t, float>) {
        softmax_backward_row(g, s, o, L, scale, m, p_buf.data());
      } else {
        to_float(g, g_buf.data(), L);
        to_float(s, s_buf.data(), L);
        softmax_backward_row(g_buf.data(), s_buf.data(), o_buf.data(), L, scale, m, p_buf.data());
        from_float(o_buf.data(), o, L);
      }
    }
  });
}

DropoutStream stream_for(double dropout_p, int64_t seed, int64_t offset) {
  return make_dropout_stream(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), dropout_p);
}

}  // namespace

at::Tensor causal_softmax(const at::Tensor& scores, double scale, double dropout_p, int64_t seed,
                          int64_t offset) {
  constexpr const char* op = "fastgpt::causal_softmax";
  check_softmax_args(scores, scale, dropout_p, op);
  const auto s = rows_readable(scores);
  at::Tensor out = zeros_causal(scores.sizes(), scores.options());
  if (out.numel() == 0) return out;
  const auto ds = stream_for(dropout_p, seed, offset);
  if (scores.scalar_type() == at::kFloat) softmax_kernel<float>(s, out, static_cast<float>(scale), ds);
  else softmax_kernel<c10::BFloat16>(s, out, static_cast<float>(scale), ds);
  return out;
}

at::Tensor causal_softmax_backward(const at::Tensor& grad, const at::Tensor& scores, double scale,
                                   double dropout_p, int64_t seed, int64_t offset) {
  constexpr const char* op = "fastgpt::causal_softmax_backward";
  check_softmax_args(scores, scale, dropout_p, op);
  check_rank4(grad, op, "grad", "(B, H, T, T)");
  check_same_dtype_device(grad, scores, op, "grad", "scores");
  TORCH_CHECK(grad.sizes() == scores.sizes(), op, ": grad has shape ", grad.sizes(), " but scores has shape ",
              scores.sizes(), "; they must match");
  const auto g = rows_readable(grad), s = rows_readable(scores);
  at::Tensor out = zeros_causal(scores.sizes(), scores.options());
  if (out.numel() == 0) return out;
  const auto ds = stream_for(dropout_p, seed, offset);
  if (scores.scalar_type() == at::kFloat) softmax_backward_kernel<float>(g, s, out, static_cast<float>(scale), ds);
  else softmax_backward_kernel<c10::BFloat16>(g, s, out, static_cast<float>(scale), ds);
  return out;
}

at::Tensor dropout_keep_mask(const at::Tensor& scores, double dropout_p, int64_t seed, int64_t offset) {
  constexpr const char* op = "fastgpt::dropout_keep_mask";
  check_softmax_args(scores, 1.0, dropout_p, op);
  const int64_t T = scores.size(2), rows = scores.size(0) * scores.size(1) * T;
  at::Tensor keep = at::empty(scores.sizes(), scores.options().dtype(at::kBool));
  bool* k = keep.data_ptr<bool>();
  const auto ds = stream_for(dropout_p, seed, offset);
  // The scalar philox4x32_10, one block per 4 columns: the reference the vectorised kernels match.
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t j = 0; j < T; j += 4) {
        const Philox4 w = ds.words(static_cast<uint32_t>(j / 4), static_cast<uint32_t>(r));
        for (int64_t c = j; c < std::min(T, j + 4); ++c) k[r * T + c] = w.x[c - j] >= ds.threshold;
      }
    }
  });
  return keep;
}

}  // namespace fastgpt::cpu
