// The fastgpt ops, one declaration per device implementation. The schemas live in
// registration.cpp; every device registers its kernels for the same names (CPU now, CUDA in
// issue 7), so the Python side, autograd and torch.compile see one op whatever the device.
//
// Shapes: a, b, x, out of the products: (B, H, T, D); p, scores, grad and the causal outputs:
// (B, H, T, T), read and written on and below the diagonal only (above it: zero on output,
// ignored on input).
#pragma once

#include <ATen/core/Tensor.h>

namespace fastgpt::cpu {

at::Tensor causal_matmul_nt(const at::Tensor& a, const at::Tensor& b);  // tril(a · bᵀ)
at::Tensor causal_matmul_nn(const at::Tensor& p, const at::Tensor& x);  // tril(p) · x
at::Tensor causal_matmul_tn(const at::Tensor& p, const at::Tensor& x);  // tril(p)ᵀ · x

// P = dropout(softmax(scale · scores, causal)), the dropout mask drawn from (seed, offset).
at::Tensor causal_softmax(const at::Tensor& scores, double scale, double dropout_p, int64_t seed,
                          int64_t offset);
// dScores from dP without dropout, from the forward's output P.
at::Tensor causal_softmax_backward(const at::Tensor& grad, const at::Tensor& probs, double scale);
// dScores from dP with dropout: P recomputed from the scores, the mask regenerated from (seed, offset).
at::Tensor causal_softmax_dropout_backward(const at::Tensor& grad, const at::Tensor& scores, double scale,
                                           double dropout_p, int64_t seed, int64_t offset);
// Returns the cached causal-matrix buffers to the OS (cpu/buffer_pool.h).
void empty_cache();
// The keep mask causal_softmax draws for `scores`' shape: a testing hook, never used by the math.
at::Tensor dropout_keep_mask(const at::Tensor& scores, double dropout_p, int64_t seed, int64_t offset);

}  // namespace fastgpt::cpu
