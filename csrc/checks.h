// Input checks shared by every device's implementation of the fastgpt ops, so that a bad call
// fails the same way on CPU and on CUDA. Each message names the op, the argument, what it got and
// what it needs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "causal_layout.h"

namespace fastgpt {

inline void check_rank4(const at::Tensor& t, const char* op, const char* name, const char* dims) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must have 4 dims ", dims, "; got ", t.dim(),
              " dims with shape ", t.sizes());
}

// The kernels compute in float32; bfloat16 (and, on CUDA, float16) is read and written as is,
// accumulated in float32.
inline void check_dtype(const at::Tensor& t, const char* op, const char* name) {
  const bool half_ok = t.is_cuda();  // the CUDA kernels take float16 too
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 ||
                  (half_ok && t.scalar_type() == at::kHalf),
              op, ": ", name, " has dtype ", t.scalar_type(), "; supported dtypes are Float (float32)",
              half_ok ? ", Half (float16, CUDA only)" : "", " and BFloat16");
}

inline void check_same_dtype_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                                    const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; all tensors must be on one device");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type(), "; all tensors must share one dtype");
}

// T_q queries against T_k keys: 0 <= T_q <= T_k (the diagonal aligned bottom-right).
inline void check_lengths(int64_t T_q, int64_t T_k, const char* op) {
  TORCH_CHECK(T_q >= 0 && T_k >= 0, op, ": T_q and T_k must be >= 0; got T_q = ", T_q, ", T_k = ", T_k);
  TORCH_CHECK(T_q <= T_k, op, ": T_q = ", T_q, " > T_k = ", T_k,
              "; the causal ops need at most as many queries as keys (T_q <= T_k)");
}

// A packed causal matrix (B, H, N) of (T_q, T_k) (causal_layout.h); only j <= o + i is ever read.
inline void check_packed(const at::Tensor& p, int64_t T_q, int64_t T_k, const char* op, const char* name) {
  check_lengths(T_q, T_k, op);
  TORCH_CHECK(p.dim() == 3, op, ": ", name, " must be a packed causal matrix of 3 dims (B, H, N); got ", p.dim(),
              " dims with shape ", p.sizes());
  const int64_t n = CausalLayout(T_q, T_k).N;
  TORCH_CHECK(p.size(2) == n, op, ": ", name, " has ", p.size(2), " elements per (b, h) but (T_q, T_k) = (", T_q,
              ", ", T_k, ") needs N = ", n, " (csrc/causal_layout.h)");
  check_dtype(p, op, name);
}

// An operand of the products: (B, H, T, D) with the packed matrix's B and H and the given T.
// (Written on branch cuda2 for the CUDA binding; the CPU kernels may use it too.)
inline void check_rows(const at::Tensor& x, int64_t B, int64_t H, int64_t T, const char* op, const char* name,
                       const char* t_name) {
  check_rank4(x, op, name, "(B, H, T, D)");
  TORCH_CHECK(x.size(0) == B && x.size(1) == H && x.size(2) == T, op, ": ", name, " has shape ", x.sizes(),
              "; it must be (B, H, ", t_name, ", D) = (", B, ", ", H, ", ", T, ", D)");
  check_dtype(x, op, name);
}

// Grouped-query attention: the key/value side has H_kv heads, each shared by a group of G = H / H_kv
// consecutive query heads (query head h reads key/value head h / G), so H_kv must divide H.
// `kv_name` / `q_name` name the tensors (or argument) that carry the two head counts.
inline void check_kv_heads(int64_t H, int64_t H_kv, const char* op, const char* kv_name, const char* q_name) {
  TORCH_CHECK(H_kv == H || (H_kv >= 1 && H % H_kv == 0), op, ": ", kv_name, " has ", H_kv, " heads and ", q_name,
              " has ", H, ": the key/value heads H_kv must divide the query heads H (query head h reads key/value "
              "head h / (H / H_kv))");
}

// A key/value-side operand of the products: (B, H_kv, T, D) with the query side's B, the given T,
// and H_kv dividing the query side's H.
inline void check_kv_rows(const at::Tensor& x, int64_t B, int64_t H, int64_t T, const char* op, const char* name,
                          const char* t_name, const char* q_name) {
  check_rank4(x, op, name, "(B, H_kv, T, D)");
  TORCH_CHECK(x.size(0) == B && x.size(2) == T, op, ": ", name, " has shape ", x.sizes(), "; it must be (B, H_kv, ",
              t_name, ", D) = (", B, ", H_kv, ", T, ", D)");
  check_kv_heads(H, x.size(1), op, name, q_name);
  check_dtype(x, op, name);
}

// The CPU GEMM takes 32-bit sizes (LP64 BLAS).
inline void check_blas_size(int64_t n, const char* op, const char* what) {
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), op, ": ", what, " is ", n,
              "; the kernels support at most 2^31 - 1");
}

// The softmax's scale and dropout over `rows` = B·H·T_q flat rows.
inline void check_scale_dropout(double scale, double dropout_p, int64_t rows, const char* op) {
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite; got ", scale);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1); got ", dropout_p);
  // The dropout stream counts rows in 32 bits (philox.h).
  TORCH_CHECK(dropout_p == 0.0 || rows <= std::numeric_limits<uint32_t>::max(), op, ": B·H·T_q = ",
              rows, " rows; dropout supports at most 2^32 rows");
}

inline void check_softmax_args(const at::Tensor& scores, int64_t T_q, int64_t T_k, double scale, double dropout_p,
                               const char* op, const char* name = "scores") {
  check_packed(scores, T_q, T_k, op, name);
  check_scale_dropout(scale, dropout_p, scores.size(0) * scores.size(1) * T_q, op);
}


}  // namespace fastgpt
