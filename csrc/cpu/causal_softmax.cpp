// CPU kernels of the fused scale + causal mask + softmax (+ dropout), its backward, and the
// dropout-mask testing hook. One pass per row of the (B, H, T, T) scores; row i of a head reads and
// writes columns 0..i only (the causal mask is an index bound, never a -inf fill).
//
// Per row of length L = i + 1 (the row stays in L1: 4 KiB at T = 1024):
//   forward   m = max(scale·s); e = exp(scale·s - m); P = e / Σe; out = P ∘ keep / (1 - p)
//   backward  dP = grad ∘ keep / (1 - p); dS = scale · P ∘ (dP - Σ dP∘P)
// Without dropout the backward reads P, the forward's output. With dropout it reads the scores,
// recomputes P and regenerates the keep mask from the Philox stream (philox.h): neither the
// probabilities before dropout nor the mask are ever stored.

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

// Every loop below runs whole vectors; the ragged end of a row (L % 16 lanes) goes through the
// same vector code with masked loads and stores, not a scalar exp per element.

// out[0..L) = softmax(scale · s[0..L)), times mult when given.
void softmax_row(const float* s, float* out, int64_t L, float scale, const float* mult) {
  const Vec vscale(scale), neg_inf(-std::numeric_limits<float>::infinity()), zero(0.0f);
  const int64_t full = L / kW * kW, tail = L - full;
  Vec vmax = neg_inf;
  for (int64_t j = 0; j < full; j += kW) vmax = at::vec::maximum(vmax, Vec::loadu(s + j) * vscale);
  if (tail > 0) vmax = at::vec::maximum(vmax, Vec::set(neg_inf, Vec::loadu(s + full, tail) * vscale, tail));
  const float mx = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);

  const Vec vmx(mx);
  Vec vsum = zero;
  for (int64_t j = 0; j < full; j += kW) {
    const Vec e = (Vec::loadu(s + j) * vscale - vmx).exp_u20();
    e.store(out + j);
    vsum += e;
  }
  if (tail > 0) {
    const Vec e = Vec::set(zero, (Vec::loadu(s + full, tail) * vscale - vmx).exp_u20(), tail);
    e.store(out + full, tail);
    vsum += e;
  }
  const float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);

  const Vec vinv(1.0f / sum);
  if (mult != nullptr) {
    for (int64_t j = 0; j < full; j += kW) (Vec::loadu(out + j) * vinv * Vec::loadu(mult + j)).store(out + j);
    if (tail > 0) (Vec::loadu(out + full, tail) * vinv * Vec::loadu(mult + full, tail)).store(out + full, tail);
  } else {
    for (int64_t j = 0; j < full; j += kW) (Vec::loadu(out + j) * vinv).store(out + j);
    if (tail > 0) (Vec::loadu(out + full, tail) * vinv).store(out + full, tail);
  }
}

// ds[0..L) = scale · p ∘ (dP - Σ dP ∘ p), dP = g ∘ mult (the forward's dropout applied to its
// gradient) or g; p: the probabilities before dropout.
void softmax_grad_row(const float* g, const float* p, float* ds, int64_t L, float scale, const float* mult) {
  const int64_t full = L / kW * kW, tail = L - full;
  auto grad_times_mask = [&](int64_t j, int64_t n) {
    Vec dp = Vec::loadu(g + j, n);
    return mult != nullptr ? dp * Vec::loadu(mult + j, n) : dp;
  };
  Vec vacc(0.0f);
  for (int64_t j = 0; j < full; j += kW) {
    const Vec dp = grad_times_mask(j, kW);
    dp.store(ds + j);
    vacc = at::vec::fmadd(dp, Vec::loadu(p + j), vacc);
  }
  if (tail > 0) {  // masked loads are zero past the end, so the product adds nothing there
    const Vec dp = grad_times_mask(full, tail);
    dp.store(ds + full, tail);
    vacc = at::vec::fmadd(dp, Vec::loadu(p + full, tail), vacc);
  }
  const float acc = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vacc);
  const Vec vacc_b(acc), vscale(scale);
  for (int64_t j = 0; j < full; j += kW) {
    ((Vec::loadu(ds + j) - vacc_b) * Vec::loadu(p + j) * vscale).store(ds + j);
  }
  if (tail > 0) {
    ((Vec::loadu(ds + full, tail) - vacc_b) * Vec::loadu(p + full, tail) * vscale).store(ds + full, tail);
  }
}

// Row elements below which a thread is not worth waking: ~20 µs at ~1 ns per element.
constexpr double kMinCostPerThread = 2e4;

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
  parallel_for_balanced(rows, RowCost{T}, kMinCostPerThread, [&](int64_t begin, int64_t end) {
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
      zero_fill(o + L, T - L);
    }
  });
}

// kRecompute: `saved` holds the forward's scores and P is recomputed (bit-identical to the
// forward's), the mask regenerated; otherwise `saved` is the forward's output P (no dropout).
template <typename scalar_t, bool kRecompute>
void softmax_backward_kernel(const at::Tensor& grad, const at::Tensor& saved, at::Tensor& out, float scale,
                             const DropoutStream& ds) {
  const int64_t T = saved.size(2), rows = saved.size(0) * saved.size(1) * T;
  const auto G = rows4<scalar_t>(grad), S = rows4<scalar_t>(saved), O = rows4<scalar_t>(out);
  parallel_for_balanced(rows, RowCost{T}, kMinCostPerThread, [&](int64_t begin, int64_t end) {
    std::vector<float> mult(ds.enabled ? T : 0), p_buf(T), g_buf, s_buf, o_buf;
    if constexpr (!std::is_same_v<scalar_t, float>) g_buf.resize(T), s_buf.resize(T), o_buf.resize(T);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bh = r / T, i = r % T, L = i + 1;
      const scalar_t* g = G.at(bh) + i * G.ld;
      const scalar_t* s = S.at(bh) + i * S.ld;
      scalar_t* o = O.at(bh) + i * O.ld;
      if (ds.enabled) dropout_multipliers(ds, static_cast<uint32_t>(r), L, mult.data());
      const float* m = ds.enabled ? mult.data() : nullptr;
      const float* g_f;
      const float* s_f;
      float* o_f;
      if constexpr (std::is_same_v<scalar_t, float>) {
        g_f = g, s_f = s, o_f = o;
      } else {
        to_float(g, g_buf.data(), L);
        to_float(s, s_buf.data(), L);
        g_f = g_buf.data(), s_f = s_buf.data(), o_f = o_buf.data();
      }
      const float* p = s_f;
      if constexpr (kRecompute) {
        softmax_row(s_f, p_buf.data(), L, scale, nullptr);
        p = p_buf.data();
      }
      softmax_grad_row(g_f, p, o_f, L, scale, m);
      if constexpr (!std::is_same_v<scalar_t, float>) from_float(o_buf.data(), o, L);
      zero_fill(o + L, T - L);
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
  at::Tensor out = empty_causal(scores.sizes(), scores.options());
  if (out.numel() == 0) return out;
  const auto ds = stream_for(dropout_p, seed, offset);
  if (scores.scalar_type() == at::kFloat) softmax_kernel<float>(s, out, static_cast<float>(scale), ds);
  else softmax_kernel<c10::BFloat16>(s, out, static_cast<float>(scale), ds);
  return out;
}

namespace {
void check_grad(const at::Tensor& grad, const at::Tensor& saved, const char* op, const char* saved_name) {
  check_rank4(grad, op, "grad", "(B, H, T, T)");
  check_same_dtype_device(grad, saved, op, "grad", saved_name);
  TORCH_CHECK(grad.sizes() == saved.sizes(), op, ": grad has shape ", grad.sizes(), " but ", saved_name,
              " has shape ", saved.sizes(), "; they must match");
}
}  // namespace

at::Tensor causal_softmax_backward(const at::Tensor& grad, const at::Tensor& probs, double scale) {
  constexpr const char* op = "fastgpt::causal_softmax_backward";
  check_softmax_args(probs, scale, 0.0, op, "probs");
  check_grad(grad, probs, op, "probs");
  const auto g = rows_readable(grad), p = rows_readable(probs);
  at::Tensor out = empty_causal(probs.sizes(), probs.options());
  if (out.numel() == 0) return out;
  const auto ds = stream_for(0.0, 0, 0);
  if (probs.scalar_type() == at::kFloat) softmax_backward_kernel<float, false>(g, p, out, static_cast<float>(scale), ds);
  else softmax_backward_kernel<c10::BFloat16, false>(g, p, out, static_cast<float>(scale), ds);
  return out;
}

at::Tensor causal_softmax_dropout_backward(const at::Tensor& grad, const at::Tensor& scores, double scale,
                                           double dropout_p, int64_t seed, int64_t offset) {
  constexpr const char* op = "fastgpt::causal_softmax_dropout_backward";
  check_softmax_args(scores, scale, dropout_p, op);
  check_grad(grad, scores, op, "scores");
  const auto g = rows_readable(grad), s = rows_readable(scores);
  at::Tensor out = empty_causal(scores.sizes(), scores.options());
  if (out.numel() == 0) return out;
  const auto ds = stream_for(dropout_p, seed, offset);
  if (scores.scalar_type() == at::kFloat) softmax_backward_kernel<float, true>(g, s, out, static_cast<float>(scale), ds);
  else softmax_backward_kernel<c10::BFloat16, true>(g, s, out, static_cast<float>(scale), ds);
  return out;
}

void empty_cache() { BufferPool::instance().empty_cache(); }

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
