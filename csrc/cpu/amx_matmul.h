// The bfloat16 causal matmuls on the CPU's matrix units (Intel AMX-BF16): nt, nn and tn of
// causal_matmul.cpp, same contracts, for a CPU and head dim where `usable` says so. The tile
// products are oneDNN's batch-reduce GEMM micro-kernel as ATen exports it
// (at::native::cpublas::brgemm, what PyTorch's own CPU flash attention calls): bfloat16 operands,
// float32 accumulation, each result rounded to bfloat16 once. Elsewhere causal_matmul.cpp converts
// the tiles to float32 and runs them through the float32 GEMM, the fastest bfloat16 path a CPU
// without bfloat16 matrix instructions has.
#pragma once

#include <ATen/core/Tensor.h>

#include "../causal_layout.h"
#include "common.h"

namespace fastgpt::cpu::amx {

// Whether the bfloat16 products of head dim D run on AMX here: ATen's brgemm can use AMX-BF16 on
// this CPU (cpublas::could_pack), the process-wide amx switch is on (isa.h: Python can turn it
// off between calls, so that a test or a benchmark runs the other path in the same process), and
// D is even (the micro-kernel's B operand pairs consecutive rows of K).
bool usable(int64_t D);

// a (B, H, T_q, D), b (B, H_kv, T_k, D); each row block of the packed (B, H, N) result goes
// where `sink` says (common.h). bfloat16, rows contiguous.
void matmul_nt(const at::Tensor& a, const at::Tensor& b, const CausalLayout& L, int64_t group,
               const NtSink<c10::BFloat16>& sink);
// p packed (B, H, N), x (B, H_kv, T_k, D), out (B, H, T_q, D).
void matmul_nn(const at::Tensor& p, const at::Tensor& x, const CausalLayout& L, int64_t group, at::Tensor& out);
// p packed (B, H, N), x (B, H, T_q, D), out (B, H_kv, T_k, D), each group of query heads summed in order.
void matmul_tn(const at::Tensor& p, const at::Tensor& x, const CausalLayout& L, int64_t group, at::Tensor& out);

}  // namespace fastgpt::cpu::amx
