// The nt product (tril_o(a · bᵀ), causal_matmul.cpp) with its row blocks sent to a sink: the plain
// op writes them into its packed output; the fused attention ops (attention_fused.cpp) run the
// softmax or its backward on each block's rows while they are in cache.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include "../causal_layout.h"
#include "common.h"

namespace fastgpt::cpu {

// The argument checks of causal_matmul_nt for a (B, H, T_q, D) and b (B, H_kv, T_k, D), naming
// `op`; returns their layout.
CausalLayout check_nt_args(const at::Tensor& a, const at::Tensor& b, const char* op);

// Computes every row block of tril_o(a · bᵀ) into sink.block(bh, r), then calls sink.done on it;
// bfloat16 on AMX where amx::usable (amx_matmul.h). a and b as check_nt_args accepts them.
void nt_blocks(const at::Tensor& a, const at::Tensor& b, const CausalLayout& L, const NtSink<float>& sink);
void nt_blocks(const at::Tensor& a, const at::Tensor& b, const CausalLayout& L, const NtSink<c10::BFloat16>& sink);

}  // namespace fastgpt::cpu
