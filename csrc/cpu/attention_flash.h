// What the two flash files share: attention_flash.cpp (the plain causal call) defines these, and
// attention_flash_options.cpp (every option of the general attention) uses them too.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fastgpt::cpu {

// (B, H, T, D) whose memory is (B, T, H, D): the layer's transpose back to (B, T, C) costs no copy.
at::Tensor empty_heads_interleaved(int64_t B, int64_t H, int64_t T, int64_t D, const at::TensorOptions& options);

// delta (B, H, T_q) float32: each query's dO·out (float32 or bfloat16 rows), which equals Σ_j dP_ij·P_ij
// over its keys, the sum the softmax's backward subtracts (with dropout and sinks too).
at::Tensor output_grad_dots(const at::Tensor& dout, const at::Tensor& out);

}  // namespace fastgpt::cpu
