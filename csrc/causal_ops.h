// The CPU kernels of the fastgpt ops, one declaration per op. The schemas live in registration.cpp;
// every device registers its kernels under the same names (the CPU ones there, the CUDA ones in
// cuda/binding.cu), so the Python side, autograd and torch.compile see one op whatever the device.
//
// Shapes: T_q <= T_k, query i sees keys j <= o + i, o = T_k - T_q. a, x, out of the products:
// (B, H, T_q or T_k, D). p, scores, grad and the causal outputs: packed (B, H, N) (causal_layout.h),
// read at j <= o + i only, written everywhere (zeros above the diagonal and in the padding).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fastgpt::cpu {

// Grouped-query attention: the key/value side (b of nt, x of nn, the output of tn) has H_kv heads,
// H_kv dividing H; query head h uses key/value head h / G, G = H / H_kv (G = 1: one each).

// tril_o(a · bᵀ): a (B, H, T_q, D), b (B, H_kv, T_k, D) -> packed (B, H, N).
at::Tensor causal_matmul_nt(const at::Tensor& a, const at::Tensor& b);
// tril_o(p) · x: p packed (B, H, N), x (B, H_kv, T_k, D) -> (B, H, T_q, D).
at::Tensor causal_matmul_nn(const at::Tensor& p, const at::Tensor& x, int64_t T_q);
// Σ over each group of G query heads of tril_o(p)ᵀ · x: p packed (B, H, N), x (B, H, T_q, D) ->
// (B, kv_heads, T_k, D); kv_heads defaults to H. The group is summed in a fixed order (deterministic).
at::Tensor causal_matmul_tn(const at::Tensor& p, const at::Tensor& x, int64_t T_k, std::optional<int64_t> kv_heads);

// P = dropout(softmax(scale · scores, causal)), the dropout mask drawn from (seed, offset).
at::Tensor causal_softmax(const at::Tensor& scores, int64_t T_q, int64_t T_k, double scale, double dropout_p,
                          int64_t seed, int64_t offset);
// dScores from dP without dropout, from the forward's output P.
at::Tensor causal_softmax_backward(const at::Tensor& grad, const at::Tensor& probs, int64_t T_q, int64_t T_k,
                                   double scale);
// dScores from dP with dropout: P recomputed from the scores, the mask regenerated from (seed, offset).
at::Tensor causal_softmax_dropout_backward(const at::Tensor& grad, const at::Tensor& scores, int64_t T_q,
                                           int64_t T_k, double scale, double dropout_p, int64_t seed,
                                           int64_t offset);
// x ∘ keep / (1 - p), the keep mask of row r of x's last dim drawn from the Philox stream at
// (seed, offset), counter row r: the residual branches' dropout (cpu/dropout.cpp). Its own backward.
at::Tensor dropout(const at::Tensor& x, double p, int64_t seed, int64_t offset);
// Fused (cpu/attention_fused.cpp), the composed ops' results bit for bit:
// (P, S) = (causal_softmax(causal_matmul_nt(q, k), ...), S), S only with dropout (else empty).
std::tuple<at::Tensor, at::Tensor> causal_attention_probs(const at::Tensor& q, const at::Tensor& k, double scale,
                                                          double dropout_p, int64_t seed, int64_t offset);
// dScores = the softmax's backward of causal_matmul_nt(dout, v), from saved = P (no dropout) or S.
at::Tensor causal_attention_grad_scores(const at::Tensor& dout, const at::Tensor& v, const at::Tensor& saved,
                                        double scale, double dropout_p, int64_t seed, int64_t offset);
// Flash style, float32 or bfloat16 on AMX (cpu/attention_flash.cpp): (out, lse) with lse (B, H, T_q)
// the rows' log-sum-exp of scale · q·kᵀ, and the backward's (dq, dk, dv) from out and lse; no T×T
// matrix stored.
std::tuple<at::Tensor, at::Tensor> causal_attention_flash_forward(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, double scale, double dropout_p,
                                                                  int64_t seed, int64_t offset);
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_flash_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, double scale, double dropout_p, int64_t seed, int64_t offset);
// out of the two above as one differentiable op: its CPU kernel (no graph) and its autograd kernel,
// a C++ node that saves out and lse and runs the flash backward (what the eager ext attention calls).
at::Tensor causal_attention_flash(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                  double dropout_p, int64_t seed, int64_t offset);
at::Tensor causal_attention_flash_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                           double dropout_p, int64_t seed, int64_t offset);
// Flash style with every option of the general attention (cpu/attention_flash_options.cpp), float32
// or bfloat16 (float32 products over converted tiles): T_q and T_k any unless causal; query i at
// key position T_k - T_q + i sees the keys of its window (window_left, window_right; -1 unbounded,
// a causal call's right is 0); scores soft-capped (softcap > 0) and ALiBi-biased (alibi_slopes
// (B, H) float32); sinks (H,) float32 join each row's softmax denominator. (out, lse) with lse the
// rows' log-sum-exp, the sink counted in it (-inf for a row that sees nothing). The backward gives
// (dq, dk, dv, dsinks), dsinks (H,) float32 (empty without sinks).
std::tuple<at::Tensor, at::Tensor> attention_flash_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                           const std::optional<at::Tensor>& sinks,
                                                           const std::optional<at::Tensor>& alibi_slopes, double scale,
                                                           bool causal, int64_t window_left, int64_t window_right,
                                                           double softcap, double dropout_p, int64_t seed,
                                                           int64_t offset);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_flash_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& alibi_slopes,
    double scale, bool causal, int64_t window_left, int64_t window_right, double softcap, double dropout_p,
    int64_t seed, int64_t offset);
// The keep mask attention_flash_forward draws: dense bool (B, H, T_q, T_k) for q (B, H, T_q, D),
// False outside each query's window. Never used by the math: it gives the mask back
// (fastgpt.attention.attention_with_mask).
at::Tensor attention_dropout_keep_mask(const at::Tensor& q, int64_t T_k, bool causal, int64_t window_left,
                                       int64_t window_right, double dropout_p, int64_t seed, int64_t offset);
// The same over packed sequences (fastgpt/attention/varlen.py): q (total_q, H, D), k, v (total_k,
// H_kv, D), sequence b's rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] (int32); alibi_slopes (B, H) per
// sequence; lse (H, total_q). The keep mask is (B, H, max_seqlen_q, max_seqlen_k), sequence b's in
// its [b, :, :T_q[b], :T_k[b]] corner.
std::tuple<at::Tensor, at::Tensor> attention_flash_varlen_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& alibi_slopes, double scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap, double dropout_p, int64_t seed, int64_t offset);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_flash_varlen_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& alibi_slopes, double scale, bool causal,
    int64_t window_left, int64_t window_right, double softcap, double dropout_p, int64_t seed, int64_t offset);
// The varlen forward over a paged KV cache (fastgpt/attention/paged.py): k_pages, v_pages (num_pages,
// page_size, H_kv, D) contiguous, read in place; sequence b's key j at page block_table[b][j /
// page_size] (int32 (B, max_pages)), slot j % page_size; cu_seqlens_k counts each sequence's keys.
// Forward only, no dropout (a paged cache serves inference).
std::tuple<at::Tensor, at::Tensor> attention_flash_paged_forward(
    const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages, const at::Tensor& block_table,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& alibi_slopes, double scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap);
at::Tensor attention_varlen_dropout_keep_mask(const at::Tensor& q, const at::Tensor& cu_seqlens_q,
                                              const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                              int64_t max_seqlen_k, bool causal, int64_t window_left,
                                              int64_t window_right, double dropout_p, int64_t seed, int64_t offset);
// Returns the cached causal-matrix buffers to the OS (cpu/buffer_pool.h).
void empty_cache();
// The keep mask causal_softmax draws for (T_q, T_k): dense bool (B, H, T_q, T_k), False at j > o + i.
// Never used by the math: it gives the mask back (fastgpt.attention.causal_attention_with_mask).
at::Tensor dropout_keep_mask(const at::Tensor& scores, int64_t T_q, int64_t T_k, double dropout_p, int64_t seed,
                             int64_t offset);
// y = x · weightᵀ + bias for an x (..., K) of few rows, weight (N, K): the decode step's linear
// layers, at memory bandwidth (cpu/skinny_linear.cpp). float32, CPU only; no backward.
at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
// N of causal_layout.h, so that a test can hold the Python formula (fastgpt/ext/layout.py) to it.
int64_t causal_packed_size(int64_t T_q, int64_t T_k);

}  // namespace fastgpt::cpu
