// Input checks shared by every device's implementation of the fastgpt ops, so that a bad call
// fails the same way on CPU and on CUDA. Each message names the op, the argument, what it got and
// what it needs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace fastgpt {

inline void check_rank4(const at::Tensor& t, const char* op, const char* name, const char* dims) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must have 4 dims ", dims, "; got ", t.dim(),
              " dims with shape ", t.sizes());
}

// The kernels compute in float32; bfloat16 is read and written as is, accumulated in float32.
inline void check_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
              " has dtype ", t.scalar_type(), "; supported dtypes are Float (float32) and BFloat16");
}

inline void check_same_dtype_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                                    const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; all tensors must be on one device");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type(), "; all tensors must share one dtype");
}

// A causal matrix: (B, H, T, T), only the lower triangle (diagonal included) is ever read.
inline void check_causal_matrix(const at::Tensor& p, const char* op, const char* name) {
  check_rank4(p, op, name, "(B, H, T, T)");
  TORCH_CHECK(p.size(2) == p.size(3), op, ": ", name, " must be a causal matrix of shape (B, H, T, T); got ",
              p.sizes(), " whose last two dims differ");
  check_dtype(p, op, name);
}

// The CPU GEMM takes 32-bit sizes (LP64 BLAS).
inline void check_blas_size(int64_t n, const char* op, const char* what) {
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), op, ": ", what, " is ", n,
              "; the kernels support at most 2^31 - 1");
}

inline void check_softmax_args(const at::Tensor& scores, double scale, double dropout_p, const char* op,
                               const char* name = "scores") {
  check_causal_matrix(scores, op, name);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite; got ", scale);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1); got ", dropout_p);
  // The dropout stream counts rows in 32 bits (philox.h).
  const int64_t rows = scores.size(0) * scores.size(1) * scores.size(2);
  TORCH_CHECK(dropout_p == 0.0 || rows <= std::numeric_limits<uint32_t>::max(), op, ": B·H·T = ",
              rows, " rows; dropout supports at most 2^32 rows");
}

}  // namespace fastgpt
