// CPU kernel of fastgpt::dropout, the residual branches' dropout: y = x ∘ keep / (1 - p), the keep
// mask drawn from the same Philox stream as the attention's (philox.h), row r of x's last dim at
// counter row r. Vectorised and parallel over rows; PyTorch's CPU dropout draws its mask serially
// (bernoulli_; benchmarks/dropout_cpu.py compares the two). The mask is never stored: the
// backward is the same op on the gradient with the same (seed, offset).

#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <ATen/cpu/vec/vec.h>

#include <limits>

#include "../causal_ops.h"
#include "../checks.h"
#include "../philox.h"
#include "common.h"
#include "dropout_cpu.h"

namespace fastgpt::cpu {
namespace {

template <typename scalar_t>
void dropout_kernel(const at::Tensor& x, const DropoutStream& ds, at::Tensor& out) {
  using Vec = at::vec::Vectorized<float>;
  const int64_t C = x.size(-1), rows = x.numel() / C;
  const scalar_t* src = x.const_data_ptr<scalar_t>();
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  // A thread per 20k elements at least, the softmax's threshold (parallel_for's grain is in rows).
  at::parallel_for(0, rows, std::max<int64_t>(1, 20000 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
    std::vector<float> mult(C), row_f(std::is_same_v<scalar_t, float> ? 0 : C);
    for (int64_t r = begin; r < end; ++r) {
      dropout_multipliers(ds, static_cast<uint32_t>(r), C, mult.data());
      const float* in;
      float* res;
      if constexpr (std::is_same_v<scalar_t, float>) {
        in = src + r * C, res = dst + r * C;
      } else {
        to_float(src + r * C, row_f.data(), C);
        in = res = row_f.data();
      }
      int64_t j = 0;
      for (; j + Vec::size() <= C; j += Vec::size()) (Vec::loadu(in + j) * Vec::loadu(mult.data() + j)).store(res + j);
      for (; j < C; ++j) res[j] = in[j] * mult[j];
      if constexpr (!std::is_same_v<scalar_t, float>) from_float(row_f.data(), dst + r * C, C);
    }
  });
}

}  // namespace

at::Tensor dropout(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  constexpr const char* op = "fastgpt::dropout";
  check_dtype(x, op, "x");
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": p must be in [0, 1); got ", p);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dim (its last dim is a row of the mask); got a 0-dim tensor");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  if (out.numel() == 0) return out;
  const int64_t rows = xc.numel() / xc.size(-1);
  TORCH_CHECK(rows <= std::numeric_limits<uint32_t>::max(), op, ": x has ", rows,
              " rows (elements / last dim); dropout supports at most 2^32 rows");
  const DropoutStream ds = make_dropout_stream(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), p);
  if (x.scalar_type() == at::kFloat) dropout_kernel<float>(xc, ds, out);
  else dropout_kernel<c10::BFloat16>(xc, ds, out);
  return out;
}

}  // namespace fastgpt::cpu
