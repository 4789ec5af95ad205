// The fastgpt ops on CUDA tensors: TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) under the schemas of
// registration.cpp (csrc/README.md). Thin on purpose: check (checks.h, the same messages as on
// CPU), allocate the output on the input's device, launch the raw-pointer kernels of the .cuh
// headers on torch's current stream. Nothing here copies to the host or falls back to another
// backend. The kernels themselves are compile-checked without torch (csrc/cuda/compile_check.cu).
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
// The current stream is all the binding takes from torch's CUDA side. c10's header needs only the
// CUDA runtime's; ATen/cuda/CUDAContext.h would also include cuBLAS, cuSPARSE and cuSOLVER
// headers, which a toolkit of nvcc and the runtime alone (e.g. from pip's nvidia-cuda-nvcc and
// nvidia-cuda-runtime packages) lacks.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../causal_layout.h"
#include "../checks.h"
#include "causal_matmul.cuh"
#include "causal_softmax.cuh"

namespace fastgpt::cuda {
namespace {

// Calls f(T{}) with T the kernels' element type for `dtype` (checks.h admitted only these).
template <typename F>
void dispatch_dtype(at::ScalarType dtype, F f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, "fastgpt CUDA ops: no kernel for dtype ", dtype);
  }
}

template <typename T>
const T* data(const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); }
template <typename T>
T* mutable_data(at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

// The kernels read (B, H, T, D) operands through strides but need unit stride over D (coalesced
// rows): a view that has it is used as is (q, k, v of a fused projection), others are copied on
// the device.
at::Tensor unit_stride_rows(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }
RowStrides row_strides(const at::Tensor& t) { return RowStrides{t.stride(0), t.stride(1), t.stride(2)}; }

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " is on ", t.device(), "; the CUDA kernels need CUDA tensors");
}

// The kernels index a packed matrix as one contiguous (B·H, N) array; a strided one is copied on
// the device (autograd's gradients of the packed outputs normally arrive contiguous).
at::Tensor packed_contiguous(const at::Tensor& p) { return p.contiguous(); }

// Grouped-query attention: the key/value side (b of nt, x of nn, tn's output) has H_kv heads dividing
// H; the kernels read or write head h / (H / H_kv) for query head h (no copy per query head).

// tril_o(a · bᵀ): a (B, H, T_q, D), b (B, H_kv, T_k, D) -> packed (B, H, N).
at::Tensor causal_matmul_nt(const at::Tensor& a_in, const at::Tensor& b_in) {
  constexpr const char* op = "causal_matmul_nt";
  check_rank4(a_in, op, "a", "(B, H, T_q, D)");
  check_cuda(a_in, op, "a");
  check_dtype(a_in, op, "a");
  check_same_dtype_device(b_in, a_in, op, "b", "a");
  const int64_t B = a_in.size(0), H = a_in.size(1), T_q = a_in.size(2), D = a_in.size(3);
  TORCH_CHECK(b_in.dim() == 4, op, ": b must have 4 dims (B, H_kv, T_k, D); got shape ", b_in.sizes());
  const int64_t T_k = b_in.size(2), H_kv = b_in.size(1);
  check_kv_rows(b_in, B, H, T_k, op, "b", "T_k", "a");
  TORCH_CHECK(b_in.size(3) == D, op, ": b has head dim ", b_in.size(3), " but a has ", D, "; they must match");
  check_lengths(T_q, T_k, op);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = unit_stride_rows(a_in), b = unit_stride_rows(b_in);
  at::Tensor out = at::empty({B, H, CausalLayout(T_q, T_k).N}, a.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(a.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch_causal_matmul_nt<T>(data<T>(a), row_strides(a), data<T>(b), row_strides(b), mutable_data<T>(out), B, H,
                               H_kv, T_q, T_k, D, stream);
  });
  return out;
}

// tril_o(p) · x: p packed (B, H, N), x (B, H_kv, T_k, D) -> (B, H, T_q, D).
at::Tensor causal_matmul_nn(const at::Tensor& p_in, const at::Tensor& x_in, int64_t T_q) {
  constexpr const char* op = "causal_matmul_nn";
  TORCH_CHECK(x_in.dim() == 4, op, ": x must have 4 dims (B, H_kv, T_k, D); got shape ", x_in.sizes());
  const int64_t T_k = x_in.size(2);  // tril_o(p) (T_q, T_k) · x (T_k, D)
  check_cuda(p_in, op, "p");
  check_packed(p_in, T_q, T_k, op, "p");
  check_same_dtype_device(x_in, p_in, op, "x", "p");
  const int64_t B = p_in.size(0), H = p_in.size(1), H_kv = x_in.size(1), D = x_in.size(3);
  check_kv_rows(x_in, B, H, T_k, op, "x", "T_k", "p");
  const c10::cuda::CUDAGuard guard(p_in.device());
  const at::Tensor p = packed_contiguous(p_in), x = unit_stride_rows(x_in);
  at::Tensor out = at::empty({B, H, T_q, D}, x.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(p.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch_causal_matmul_nn<T>(data<T>(p), data<T>(x), row_strides(x), mutable_data<T>(out), B, H, H_kv, T_q, T_k,
                               D, stream);
  });
  return out;
}

// tril_o(p)ᵀ · x summed over each group of H / H_kv query heads: p packed (B, H, N), x (B, H, T_q, D)
// -> (B, H_kv, T_k, D), H_kv = kv_heads or H. One block per output tile sums its group in order.
at::Tensor causal_matmul_tn(const at::Tensor& p_in, const at::Tensor& x_in, int64_t T_k,
                            std::optional<int64_t> kv_heads) {
  constexpr const char* op = "causal_matmul_tn";
  TORCH_CHECK(x_in.dim() == 4, op, ": x must have 4 dims (B, H, T_q, D); got shape ", x_in.sizes());
  const int64_t T_q = x_in.size(2);  // tril_o(p)ᵀ (T_k, T_q) · x (T_q, D)
  check_cuda(p_in, op, "p");
  check_packed(p_in, T_q, T_k, op, "p");
  check_same_dtype_device(x_in, p_in, op, "x", "p");
  const int64_t B = p_in.size(0), H = p_in.size(1), D = x_in.size(3), H_kv = kv_heads.value_or(H);
  check_rows(x_in, B, H, T_q, op, "x", "T_q");
  check_kv_heads(H, H_kv, op, "the output (kv_heads)", "x");
  const c10::cuda::CUDAGuard guard(p_in.device());
  const at::Tensor p = packed_contiguous(p_in), x = unit_stride_rows(x_in);
  at::Tensor out = at::empty({B, H_kv, T_k, D}, x.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(p.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch_causal_matmul_tn<T>(data<T>(p), data<T>(x), row_strides(x), mutable_data<T>(out), B, H, H_kv, T_q, T_k,
                               D, stream);
  });
  return out;
}

// dropout(softmax(scale · scores, causal)): packed -> packed.
at::Tensor causal_softmax(const at::Tensor& scores_in, int64_t T_q, int64_t T_k, double scale, double dropout_p,
                          int64_t seed, int64_t offset) {
  constexpr const char* op = "causal_softmax";
  check_cuda(scores_in, op, "scores");
  check_softmax_args(scores_in, T_q, T_k, scale, dropout_p, op);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = packed_contiguous(scores_in);
  at::Tensor probs = at::empty_like(scores);
  const int64_t batch_heads = scores.size(0) * scores.size(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(scores.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch_causal_softmax<T>(data<T>(scores), mutable_data<T>(probs), batch_heads, T_q, T_k, static_cast<float>(scale),
                             dropout_p, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), stream);
  });
  return probs;
}

// dS from dP = grad and the forward's P (no dropout): packed -> packed.
at::Tensor causal_softmax_backward(const at::Tensor& grad_in, const at::Tensor& probs_in, int64_t T_q, int64_t T_k,
                                   double scale) {
  constexpr const char* op = "causal_softmax_backward";
  check_cuda(probs_in, op, "probs");
  check_softmax_args(probs_in, T_q, T_k, scale, 0.0, op, "probs");
  check_same_dtype_device(grad_in, probs_in, op, "grad", "probs");
  check_packed(grad_in, T_q, T_k, op, "grad");
  TORCH_CHECK(grad_in.sizes() == probs_in.sizes(), op, ": grad has shape ", grad_in.sizes(), " but probs has ",
              probs_in.sizes(), "; they must match");
  const c10::cuda::CUDAGuard guard(probs_in.device());
  const at::Tensor grad = packed_contiguous(grad_in), probs = packed_contiguous(probs_in);
  at::Tensor grad_scores = at::empty_like(probs);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(probs.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch_causal_softmax_backward<T>(data<T>(grad), data<T>(probs), mutable_data<T>(grad_scores),
                                      probs.size(0) * probs.size(1), T_q, T_k, static_cast<float>(scale), stream);
  });
  return grad_scores;
}

// dS from dP = grad with dropout: P recomputed from the scores, the mask regenerated.
at::Tensor causal_softmax_dropout_backward(const at::Tensor& grad_in, const at::Tensor& scores_in, int64_t T_q,
                                           int64_t T_k, double scale, double dropout_p, int64_t seed, int64_t offset) {
  constexpr const char* op = "causal_softmax_dropout_backward";
  check_cuda(scores_in, op, "scores");
  check_softmax_args(scores_in, T_q, T_k, scale, dropout_p, op);
  check_same_dtype_device(grad_in, scores_in, op, "grad", "scores");
  check_packed(grad_in, T_q, T_k, op, "grad");
  TORCH_CHECK(grad_in.sizes() == scores_in.sizes(), op, ": grad has shape ", grad_in.sizes(), " but scores has ",
              scores_in.sizes(), "; they must match");
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor grad = packed_contiguous(grad_in), scores = packed_contiguous(scores_in);
  at::Tensor grad_scores = at::empty_like(scores);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(scores.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch_causal_softmax_dropout_backward<T>(data<T>(grad), data<T>(scores), mutable_data<T>(grad_scores),
                                              scores.size(0) * scores.size(1), T_q, T_k, static_cast<float>(scale),
                                              dropout_p, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
                                              stream);
  });
  return grad_scores;
}

// The dense (B, H, T_q, T_k) bool keep mask causal_softmax draws (False at j > o + i).
at::Tensor dropout_keep_mask(const at::Tensor& scores, int64_t T_q, int64_t T_k, double dropout_p, int64_t seed,
                             int64_t offset) {
  constexpr const char* op = "dropout_keep_mask";
  check_cuda(scores, op, "scores");
  check_softmax_args(scores, T_q, T_k, 1.0, dropout_p, op);
  const c10::cuda::CUDAGuard guard(scores.device());
  at::Tensor keep = at::empty({scores.size(0), scores.size(1), T_q, T_k}, scores.options().dtype(at::kBool));
  launch_dropout_keep_mask(reinterpret_cast<uint8_t*>(keep.data_ptr()), scores.size(0) * scores.size(1), T_q, T_k,
                           dropout_p, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
                           c10::cuda::getCurrentCUDAStream());
  return keep;
}

}  // namespace
}  // namespace fastgpt::cuda

TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) {
  m.impl("causal_matmul_nt", &fastgpt::cuda::causal_matmul_nt);
  m.impl("causal_matmul_nn", &fastgpt::cuda::causal_matmul_nn);
  m.impl("causal_matmul_tn", &fastgpt::cuda::causal_matmul_tn);
  m.impl("causal_softmax", &fastgpt::cuda::causal_softmax);
  m.impl("causal_softmax_backward", &fastgpt::cuda::causal_softmax_backward);
  m.impl("causal_softmax_dropout_backward", &fastgpt::cuda::causal_softmax_dropout_backward);
  m.impl("dropout_keep_mask", &fastgpt::cuda::dropout_keep_mask);
}
