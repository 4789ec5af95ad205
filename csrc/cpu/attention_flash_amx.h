// The bfloat16 flash kernels on AMX (attention_flash_amx.cpp), called by attention_flash.cpp's ops
// where amx::usable(D) holds. Tensors as the ops pass them: q, dout (B, H, T_q, D), k, v
// (B, H_kv, T_k, D) bfloat16 with contiguous rows; lse and delta (B, H, T_q) float32, contiguous;
// the outputs allocated.
#pragma once

#include <ATen/core/Tensor.h>

#include "../causal_layout.h"
#include "../philox.h"

namespace fastgpt::cpu::amx {

void flash_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const CausalLayout& L, float scale,
                   const DropoutStream& ds, at::Tensor& out, at::Tensor& lse);

void flash_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& lse, const at::Tensor& delta, const CausalLayout& L, float scale,
                    const DropoutStream& ds, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv);

}  // namespace fastgpt::cpu::amx
