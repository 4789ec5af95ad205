// CPU kernels of the fused scale + causal mask + softmax (+ dropout), its backward, and the
// dropout keep mask it draws, given back dense. One pass per row of the packed scores (causal_layout.h); row i of a
// head reads columns 0..o+i only (the causal mask is an index bound, never a -inf fill) and writes
// its whole packed row, zeros after them.
//
// Per row of length L = o + i + 1 (the row stays in L1: 4 KiB at T = 1024):
//   forward   m = max(scale·s); e = exp(scale·s - m); P = e / Σe; out = P ∘ keep / (1 - p)
//   backward  dP = grad ∘ keep / (1 - p); dS = scale · P ∘ (dP - Σ dP∘P)
// Without dropout the backward reads P, the forward's output. With dropout it reads the scores,
// recomputes P and regenerates the keep mask from the Philox stream (philox.h): neither the
// probabilities before dropout nor the mask are ever stored.

#include <ATen/ops/zeros.h>

#include <cmath>
#include <limits>

#include "../causal_layout.h"
#include "../causal_ops.h"
#include "../checks.h"
#include "../philox.h"
#include "common.h"
#include "dropout_cpu.h"
#include "softmax_rows.h"

namespace fastgpt::cpu {
namespace {

// Row elements below which a thread is not worth waking: the same tens of microseconds of work as
// the matmuls' threshold, at an exp and a few sums per element.
constexpr double kMinCostPerThread = 2e4;

// Rows of a packed causal matrix: flat row r = bh·T_q + i costs about o + i + 1 (+ a fixed overhead).
struct RowCost {
  int64_t T_q, o;
  static constexpr double kOverhead = 32.0;
  double operator()(int64_t n) const {  // cost of rows [0, n)
    auto partial = [&](double k) { return k * (k + 1.0) / 2.0 + (static_cast<double>(o) + kOverhead) * k; };
    return static_cast<double>(n / T_q) * partial(static_cast<double>(T_q)) + partial(static_cast<double>(n % T_q));
  }
};

// Asks for the n elements at p ahead of their use: each row's compute (exp, reductions) then
// overlaps the next row's memory reads. The packed matrices are larger than L2 and a core alone
// draws only a fraction of the memory bandwidth from sequential reads.
template <typename scalar_t>
inline void prefetch_row(const scalar_t* p, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(scalar_t)); b += 64) __builtin_prefetch(bytes + b);
}

// Where flat row r = bh·T_q + i of a packed matrix lives, its visible length and its stride.
struct PackedRow {
  int64_t bh, offset, length, stride;
};
inline PackedRow packed_row(const CausalLayout& L, int64_t r) {
  const int64_t bh = r / L.T_q, i = r % L.T_q;
  return {bh, L.row_offset(i), L.o + i + 1, L.stride(i / kCausalBlock)};
}

template <typename scalar_t>
void softmax_kernel(const at::Tensor& scores, const CausalLayout& L, at::Tensor& out, float scale,
                    const DropoutStream& ds) {
  const int64_t rows = scores.size(0) * scores.size(1) * L.T_q;
  const auto S = packed3<scalar_t>(scores), O = packed3<scalar_t>(out);
  parallel_for_balanced(rows, RowCost{L.T_q, L.o}, kMinCostPerThread, [&](int64_t begin, int64_t end) {
    std::vector<float> mult(ds.enabled ? L.T_k : 0), e_buf(std::is_same_v<scalar_t, float> ? 0 : L.T_k);
    for (int64_t r = begin; r < end; ++r) {
      const PackedRow row = packed_row(L, r);
      const scalar_t* s = S.at(row.bh) + row.offset;
      scalar_t* o = O.at(row.bh) + row.offset;
      if (r + 1 < end) {
        const PackedRow next = packed_row(L, r + 1);
        prefetch_row(S.at(next.bh) + next.offset, next.length);
      }
      if (ds.enabled) dropout_multipliers(ds, static_cast<uint32_t>(r), row.length, mult.data());
      const float* m = ds.enabled ? mult.data() : nullptr;
      float* e;  // the exponentials: the output row itself in float32
      if constexpr (std::is_same_v<scalar_t, float>) e = o; else e = e_buf.data();
      softmax_row(s, o, e, row.length, scale, m);
      zero_fill(o + row.length, row.stride - row.length);
    }
  });
}

// kRecompute: `saved` holds the forward's scores and P is recomputed (bit-identical to the
// forward's), the mask regenerated; otherwise `saved` is the forward's output P (no dropout).
template <typename scalar_t, bool kRecompute>
void softmax_backward_kernel(const at::Tensor& grad, const at::Tensor& saved, const CausalLayout& L,
                             at::Tensor& out, float scale, const DropoutStream& ds) {
  const int64_t rows = saved.size(0) * saved.size(1) * L.T_q, T_k = L.T_k;
  const auto G = packed3<scalar_t>(grad), S = packed3<scalar_t>(saved), O = packed3<scalar_t>(out);
  parallel_for_balanced(rows, RowCost{L.T_q, L.o}, kMinCostPerThread, [&](int64_t begin, int64_t end) {
    std::vector<float> mult(ds.enabled ? T_k : 0), p_buf(kRecompute ? T_k : 0);
    for (int64_t r = begin; r < end; ++r) {
      const PackedRow row = packed_row(L, r);
      const int64_t n = row.length;
      const scalar_t* g = G.at(row.bh) + row.offset;
      const scalar_t* s = S.at(row.bh) + row.offset;
      scalar_t* o = O.at(row.bh) + row.offset;
      if (r + 1 < end) {
        const PackedRow next = packed_row(L, r + 1);
        prefetch_row(G.at(next.bh) + next.offset, next.length);
        prefetch_row(S.at(next.bh) + next.offset, next.length);
      }
      if (ds.enabled) dropout_multipliers(ds, static_cast<uint32_t>(r), n, mult.data());
      const float* m = ds.enabled ? mult.data() : nullptr;
      if constexpr (kRecompute) {  // P from the scores, in float32, as the forward computed it
        softmax_row(s, p_buf.data(), p_buf.data(), n, scale, nullptr);
        softmax_grad_row(g, p_buf.data(), o, n, scale, m);
      } else {
        softmax_grad_row(g, s, o, n, scale, m);  // s is the forward's output P
      }
      zero_fill(o + n, row.stride - n);
    }
  });
}

DropoutStream stream_for(double dropout_p, int64_t seed, int64_t offset) {
  return make_dropout_stream(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), dropout_p);
}

}  // namespace

at::Tensor causal_softmax(const at::Tensor& scores, int64_t T_q, int64_t T_k, double scale, double dropout_p,
                          int64_t seed, int64_t offset) {
  constexpr const char* op = "fastgpt::causal_softmax";
  check_softmax_args(scores, T_q, T_k, scale, dropout_p, op);
  const CausalLayout L(T_q, T_k);
  const auto s = packed_readable(scores);
  at::Tensor out = empty_causal(scores.size(0), scores.size(1), L.N, scores.options());
  if (out.numel() == 0) return out;
  const auto ds = stream_for(dropout_p, seed, offset);
  if (scores.scalar_type() == at::kFloat) softmax_kernel<float>(s, L, out, static_cast<float>(scale), ds);
  else softmax_kernel<c10::BFloat16>(s, L, out, static_cast<float>(scale), ds);
  return out;
}

namespace {
void check_grad(const at::Tensor& grad, const at::Tensor& saved, const char* op, const char* saved_name) {
  TORCH_CHECK(grad.dim() == 3, op, ": grad must be a packed causal matrix of 3 dims (B, H, N); got ", grad.dim(),
              " dims with shape ", grad.sizes());
  check_same_dtype_device(grad, saved, op, "grad", saved_name);
  TORCH_CHECK(grad.sizes() == saved.sizes(), op, ": grad has shape ", grad.sizes(), " but ", saved_name,
              " has shape ", saved.sizes(), "; they must match");
}
}  // namespace

at::Tensor causal_softmax_backward(const at::Tensor& grad, const at::Tensor& probs, int64_t T_q, int64_t T_k,
                                   double scale) {
  constexpr const char* op = "fastgpt::causal_softmax_backward";
  check_softmax_args(probs, T_q, T_k, scale, 0.0, op, "probs");
  check_grad(grad, probs, op, "probs");
  const CausalLayout L(T_q, T_k);
  const auto g = packed_readable(grad), p = packed_readable(probs);
  at::Tensor out = empty_causal(probs.size(0), probs.size(1), L.N, probs.options());
  if (out.numel() == 0) return out;
  const auto ds = stream_for(0.0, 0, 0);
  const float sc = static_cast<float>(scale);
  if (probs.scalar_type() == at::kFloat) softmax_backward_kernel<float, false>(g, p, L, out, sc, ds);
  else softmax_backward_kernel<c10::BFloat16, false>(g, p, L, out, sc, ds);
  return out;
}

at::Tensor causal_softmax_dropout_backward(const at::Tensor& grad, const at::Tensor& scores, int64_t T_q,
                                           int64_t T_k, double scale, double dropout_p, int64_t seed,
                                           int64_t offset) {
  constexpr const char* op = "fastgpt::causal_softmax_dropout_backward";
  check_softmax_args(scores, T_q, T_k, scale, dropout_p, op);
  check_grad(grad, scores, op, "scores");
  const CausalLayout L(T_q, T_k);
  const auto g = packed_readable(grad), s = packed_readable(scores);
  at::Tensor out = empty_causal(scores.size(0), scores.size(1), L.N, scores.options());
  if (out.numel() == 0) return out;
  const auto ds = stream_for(dropout_p, seed, offset);
  const float sc = static_cast<float>(scale);
  if (scores.scalar_type() == at::kFloat) softmax_backward_kernel<float, true>(g, s, L, out, sc, ds);
  else softmax_backward_kernel<c10::BFloat16, true>(g, s, L, out, sc, ds);
  return out;
}

void empty_cache() { BufferPool::instance().empty_cache(); }

at::Tensor dropout_keep_mask(const at::Tensor& scores, int64_t T_q, int64_t T_k, double dropout_p, int64_t seed,
                             int64_t offset) {
  constexpr const char* op = "fastgpt::dropout_keep_mask";
  check_softmax_args(scores, T_q, T_k, 1.0, dropout_p, op);
  const int64_t rows = scores.size(0) * scores.size(1) * T_q, o = T_k - T_q;
  at::Tensor keep = at::zeros({scores.size(0), scores.size(1), T_q, T_k}, scores.options().dtype(at::kBool));
  bool* k = keep.data_ptr<bool>();
  const auto ds = stream_for(dropout_p, seed, offset);
  // The scalar philox4x32_10, one block per 4 columns: the reference the vectorised kernels match.
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t visible = o + r % T_q + 1;  // columns [0, visible) of the row; False after them
      for (int64_t j = 0; j < visible; j += 4) {
        const Philox4 w = ds.words(static_cast<uint32_t>(j / 4), static_cast<uint32_t>(r));
        for (int64_t c = j; c < std::min(visible, j + 4); ++c) k[r * T_k + c] = w.x[c - j] >= ds.threshold;
      }
    }
  });
  return keep;
}

}  // namespace fastgpt::cpu
