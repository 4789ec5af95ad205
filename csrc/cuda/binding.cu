// The fastgpt ops on CUDA tensors: TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) under the schemas of
// registration.cpp (csrc/README.md). Thin on purpose: check (checks.h, the same messages as on
// CPU), allocate the output on the input's device, launch the raw-pointer kernels of the .cuh
// headers on torch's current stream. Nothing here copies to the host or falls back to another
// backend. The kernels themselves are compile-checked without torch (csrc/cuda/compile_check.cu).
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../causal_layout.h"
#include "../checks.h"
#include "causal_matmul.cuh"

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

// tril_o(a · bᵀ): a (B, H, T_q, D), b (B, H, T_k, D) -> packed (B, H, N).
at::Tensor causal_matmul_nt(const at::Tensor& a_in, const at::Tensor& b_in) {
  constexpr const char* op = "causal_matmul_nt";
  check_rank4(a_in, op, "a", "(B, H, T_q, D)");
  check_cuda(a_in, op, "a");
  check_dtype(a_in, op, "a");
  check_same_dtype_device(b_in, a_in, op, "b", "a");
  const int64_t B = a_in.size(0), H = a_in.size(1), T_q = a_in.size(2), D = a_in.size(3), T_k = b_in.size(2);
  check_rows(b_in, B, H, T_k, op, "b", "T_k");
  TORCH_CHECK(b_in.size(3) == D, op, ": b has head dim ", b_in.size(3), " but a has ", D, "; they must match");
  check_lengths(T_q, T_k, op);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = unit_stride_rows(a_in), b = unit_stride_rows(b_in);
  at::Tensor out = at::empty({B, H, CausalLayout{T_q, T_k}.numel()}, a.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtype(a.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch_causal_matmul_nt<T>(data<T>(a), row_strides(a), data<T>(b), row_strides(b), mutable_data<T>(out), B, H,
                               T_q, T_k, D, stream);
  });
  return out;
}

// tril_o(p) · x (nn, x (B, H, T_k, D) -> (B, H, T_q, D)) or tril_o(p)ᵀ · x (tn, x (B, H, T_q, D)
// -> (B, H, T_k, D)); p packed (B, H, N).
at::Tensor packed_times_rows(const at::Tensor& p, const at::Tensor& x_in, int64_t T_q, int64_t T_k, bool transposed) {
  const char* op = transposed ? "causal_matmul_tn" : "causal_matmul_nn";
  check_cuda(p, op, "p");
  check_packed(p, T_q, T_k, op, "p");
  check_same_dtype_device(x_in, p, op, "x", "p");
  const int64_t B = p.size(0), H = p.size(1);
  check_rows(x_in, B, H, transposed ? T_q : T_k, op, "x", transposed ? "T_q" : "T_k");
  const int64_t D = x_in.size(3);
  const c10::cuda::CUDAGuard guard(p.device());
  const at::Tensor x = unit_stride_rows(x_in);
  at::Tensor out = at::empty({B, H, transposed ? T_k : T_q, D}, x.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtype(p.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    (transposed ? launch_causal_matmul_tn<T> : launch_causal_matmul_nn<T>)(
        data<T>(p), data<T>(x), row_strides(x), mutable_data<T>(out), B, H, T_q, T_k, D, stream, false);
  });
  return out;
}

at::Tensor causal_matmul_nn(const at::Tensor& p, const at::Tensor& x, int64_t T_q) {
  // T_k is x's: tril_o(p) (T_q, T_k) · x (T_k, D)
  TORCH_CHECK(x.dim() == 4, "causal_matmul_nn: x must have 4 dims (B, H, T_k, D); got shape ", x.sizes());
  return packed_times_rows(p, x, T_q, x.size(2), false);
}

at::Tensor causal_matmul_tn(const at::Tensor& p, const at::Tensor& x, int64_t T_k) {
  // T_q is x's: tril_o(p)ᵀ (T_k, T_q) · x (T_q, D)
  TORCH_CHECK(x.dim() == 4, "causal_matmul_tn: x must have 4 dims (B, H, T_q, D); got shape ", x.sizes());
  return packed_times_rows(p, x, x.size(2), T_k, true);
}

}  // namespace
}  // namespace fastgpt::cuda

TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) {
  m.impl("causal_matmul_nt", &fastgpt::cuda::causal_matmul_nt);
  m.impl("causal_matmul_nn", &fastgpt::cuda::causal_matmul_nn);
  m.impl("causal_matmul_tn", &fastgpt::cuda::causal_matmul_tn);
}
