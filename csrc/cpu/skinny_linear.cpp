// CPU kernel of the skinny linear layer: y = x · Wᵀ + b for an x of few rows, the shape of every
// linear layer in a decode step (one row per sequence).
//
// Why not BLAS: with M rows of x and W of N×K, the work is 2·M·N·K flops over 4·N·K bytes of
// weights, so for small M the layer is a stream over W and its speed is memory bandwidth. A BLAS
// tuned for large matrices may read W at a fraction of what a plain read of the same bytes gets.
// This kernel reads W once, row after row, split across threads by output rows; every row of x
// (L1-resident: M·K floats) is dotted with the W row while it is in registers. BLAS is not slow
// everywhere, so fastgpt.model.linear's "auto" times the two on the model. Its speed against F.linear
// and against torch.sum over the same bytes, per M: `python benchmarks/skinny_linear.py` (its
// results: benchmarks/results/README.md).
//
// Accumulation is float32, in a different order than BLAS: results agree with F.linear to float32
// rounding, not bit for bit.

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>

#include <algorithm>

#include "../causal_ops.h"
#include "common.h"

namespace fastgpt::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
// x rows dotted with one W row per pass: R accumulators (and R rows of x) live in registers.
constexpr int64_t kRowsPerPass = 4;

float horizontal_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// out[r] = dot(w[0..K), x[r·ldx ..][0..K)) for r < R. Two accumulators per row of x: at R = 1 the
// two independent FMA chains keep up with the stream over w.
template <int R>
void dot_rows(const float* w, const float* x, int64_t ldx, int64_t K, float* out) {
  Vec acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = Vec(0.0f);
  int64_t k = 0;
  for (; k + 2 * kW <= K; k += 2 * kW) {
    const Vec w0 = Vec::loadu(w + k), w1 = Vec::loadu(w + k + kW);
    for (int r = 0; r < R; ++r) {
      acc0[r] = at::vec::fmadd(w0, Vec::loadu(x + r * ldx + k), acc0[r]);
      acc1[r] = at::vec::fmadd(w1, Vec::loadu(x + r * ldx + k + kW), acc1[r]);
    }
  }
  const int64_t tail = K - k;  // < 2·kW lanes, through the same vector code with masked loads
  if (tail > 0) {
    const int64_t n0 = std::min(tail, kW), n1 = tail - n0;
    const Vec w0 = Vec::loadu(w + k, n0), w1 = n1 > 0 ? Vec::loadu(w + k + kW, n1) : Vec(0.0f);
    for (int r = 0; r < R; ++r) {
      acc0[r] = at::vec::fmadd(w0, Vec::loadu(x + r * ldx + k, n0), acc0[r]);
      if (n1 > 0) acc1[r] = at::vec::fmadd(w1, Vec::loadu(x + r * ldx + k + kW, n1), acc1[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = horizontal_sum(acc0[r] + acc1[r]);
}

}  // namespace

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "skinny_linear";
  TORCH_CHECK(weight.dim() == 2, op, ": weight must have 2 dims (N, K); got shape ", weight.sizes());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dim (..., K); got a scalar");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(-1) == K, op, ": x has ", x.size(-1), " features (shape ", x.sizes(), ") but weight has K = ",
              K, " (shape ", weight.sizes(), ")");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, op,
              ": x and weight must be float32; got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), op, ": x and weight must be CPU tensors; got ",
              x.device(), " and ", weight.device());
  const float* b = nullptr;
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape (", N, ",); got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->device().is_cpu(), op,
                ": bias must be a float32 CPU tensor; got ", bias->scalar_type(), " on ", bias->device());
    bias_c = bias->contiguous();
    b = bias_c.data_ptr<float>();
  }
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const int64_t M = K == 0 ? 0 : xc.numel() / K;
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = N;
  at::Tensor y = at::empty(out_sizes, x.options());
  if (y.numel() == 0) return y;
  if (K == 0) return b == nullptr ? y.zero_() : y.copy_(bias_c.expand_as(y));
  const float* X = xc.data_ptr<float>();
  const float* W = wc.data_ptr<float>();
  float* Y = y.data_ptr<float>();

  // Output rows n are independent: each thread streams its own contiguous slice of W. Cost of a row
  // of W ~ K·M; a thread is worth waking for ~16 K multiply-adds (min_cost: a short stream of W is
  // done before a second thread would start).
  parallel_for_balanced(N, [&](int64_t n) { return n * K * M; }, 16384.0, [&](int64_t n0, int64_t n1) {
    float dots[kRowsPerPass];
    for (int64_t n = n0; n < n1; ++n) {
      const float* w = W + n * K;
      const float bn = b == nullptr ? 0.0f : b[n];
      for (int64_t m = 0; m < M; m += kRowsPerPass) {
        const int64_t rows = std::min(kRowsPerPass, M - m);
        const float* xm = X + m * K;
        static_assert(kRowsPerPass == 4, "one case per pass size below");
        switch (rows) {
          case 4: dot_rows<4>(w, xm, K, K, dots); break;
          case 3: dot_rows<3>(w, xm, K, K, dots); break;
          case 2: dot_rows<2>(w, xm, K, K, dots); break;
          default: dot_rows<1>(w, xm, K, K, dots); break;
        }
        for (int64_t r = 0; r < rows; ++r) Y[(m + r) * N + n] = dots[r] + bn;
      }
    }
  });
  return y;
}

}  // namespace fastgpt::cpu
