// CPU kernels of the two fused attention ops: the nt product and the softmax (or its backward) of
// each row block done together, while the block's rows are in cache.
//
//   causal_attention_probs(q, k, ...)          = causal_softmax(causal_matmul_nt(q, k), ...), and S
//                                                itself when there is dropout (its backward needs it)
//   causal_attention_grad_scores(dO, v, saved) = causal_softmax_[dropout_]backward(causal_matmul_nt(dO, v), saved)
//
// The results are those of the composed ops bit for bit: each block's rows are rounded to the
// dtype as the composed op stores them, and the same row functions (softmax_rows.h) read them.
// What the fusion saves is the round trip of S and dP through memory: without dropout they live
// only in a thread's (64 × T_k) scratch. fastgpt/ext/attention_function.py calls these for CPU
// tensors; the per-op path (torch.compile) and CUDA compose the ops.

#include <ATen/ops/empty.h>

#include <tuple>

#include "../causal_layout.h"
#include "../causal_ops.h"
#include "../checks.h"
#include "../philox.h"
#include "common.h"
#include "dropout_cpu.h"
#include "nt_blocks.h"
#include "softmax_rows.h"

namespace fastgpt::cpu {
namespace {

// A thread's scratch for one row block (rows × stride, at most 64 × roundup(T_k)) and one row of
// float32 exponentials; reused across calls.
template <typename scalar_t>
struct Scratch {
  std::vector<scalar_t> block;
  std::vector<float> row, mult;
  static Scratch& mine() {
    static thread_local Scratch s;
    return s;
  }
  // Room for row block r's (rows × stride) products.
  static scalar_t* block_of(const CausalLayout& L, int64_t r) {
    auto& b = mine().block;
    b.resize(static_cast<size_t>(L.rows(r) * L.stride(r)));
    return b.data();
  }
  // Rows of up to T_k keys from here on; the multipliers only with dropout.
  Scratch& rows_of(int64_t T_k, const DropoutStream& ds) {
    row.resize(static_cast<size_t>(T_k));
    if (ds.enabled) mult.resize(static_cast<size_t>(T_k));
    return *this;
  }
  // The dropout multipliers of flat row `flat` (bh·T_q + query, causal_softmax's stream), or null.
  const float* multipliers(const DropoutStream& ds, int64_t flat, int64_t length) {
    if (!ds.enabled) return nullptr;
    dropout_multipliers(ds, static_cast<uint32_t>(flat), length, mult.data());
    return mult.data();
  }
};

template <typename scalar_t>
void probs_kernel(const at::Tensor& q, const at::Tensor& k, const CausalLayout& L, float scale,
                  const DropoutStream& ds, at::Tensor& probs, at::Tensor& scores) {
  const auto P = packed3<scalar_t>(probs);
  const bool keep_scores = scores.defined();
  const auto S = keep_scores ? packed3<scalar_t>(scores) : Packed3<scalar_t>{};
  NtSink<scalar_t> sink;
  sink.block = [&](int64_t bh, int64_t r) -> scalar_t* {
    return keep_scores ? S.at(bh) + L.start(r) : Scratch<scalar_t>::block_of(L, r);
  };
  sink.done = [&](int64_t bh, int64_t r, const scalar_t* rows) {
    auto& scratch = Scratch<scalar_t>::mine().rows_of(L.T_k, ds);
    const int64_t r0 = r * kCausalBlock, ld = L.stride(r);
    scalar_t* p_blk = P.at(bh) + L.start(r);
    for (int64_t i = 0; i < L.rows(r); ++i) {
      const int64_t length = L.o + r0 + i + 1;  // keys the row sees
      scalar_t* p = p_blk + i * ld;
      const float* mult = scratch.multipliers(ds, bh * L.T_q + r0 + i, length);
      float* e;  // the exponentials: the output row itself in float32
      if constexpr (std::is_same_v<scalar_t, float>) e = p; else e = scratch.row.data();
      softmax_row(rows + i * ld, p, e, length, scale, mult);
      zero_fill(p + length, ld - length);
    }
  };
  nt_blocks(q, k, L, sink);
}

// saved: P (kRecompute false) or the scores S (true: P recomputed, the mask regenerated).
template <typename scalar_t, bool kRecompute>
void grad_scores_kernel(const at::Tensor& dout, const at::Tensor& v, const at::Tensor& saved, const CausalLayout& L,
                        float scale, const DropoutStream& ds, at::Tensor& grad_scores) {
  const auto Sv = packed3<scalar_t>(saved), G = packed3<scalar_t>(grad_scores);
  NtSink<scalar_t> sink;
  sink.block = [&](int64_t, int64_t r) -> scalar_t* { return Scratch<scalar_t>::block_of(L, r); };
  sink.done = [&](int64_t bh, int64_t r, const scalar_t* dp_rows) {
    auto& scratch = Scratch<scalar_t>::mine().rows_of(L.T_k, ds);
    const int64_t r0 = r * kCausalBlock, ld = L.stride(r);
    const scalar_t* saved_blk = Sv.at(bh) + L.start(r);
    scalar_t* g_blk = G.at(bh) + L.start(r);
    for (int64_t i = 0; i < L.rows(r); ++i) {
      const int64_t length = L.o + r0 + i + 1;
      const scalar_t* dp = dp_rows + i * ld;
      const scalar_t* s = saved_blk + i * ld;
      scalar_t* out = g_blk + i * ld;
      const float* mult = scratch.multipliers(ds, bh * L.T_q + r0 + i, length);
      if constexpr (kRecompute) {  // P from the scores, in float32, as the forward computed it
        float* p = scratch.row.data();
        softmax_row(s, p, p, length, scale, nullptr);
        softmax_grad_row(dp, p, out, length, scale, mult);
      } else {
        softmax_grad_row(dp, s, out, length, scale, mult);  // s is the forward's output P
      }
      zero_fill(out + length, ld - length);
    }
  };
  nt_blocks(dout, v, L, sink);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> causal_attention_probs(const at::Tensor& q, const at::Tensor& k, double scale,
                                                          double dropout_p, int64_t seed, int64_t offset) {
  constexpr const char* op = "fastgpt::causal_attention_probs";
  const CausalLayout L = check_nt_args(q, k, op);
  check_scale_dropout(scale, dropout_p, q.size(0) * q.size(1) * L.T_q, op);
  at::Tensor probs = empty_causal(q.size(0), q.size(1), L.N, q.options());  // (B, H, N)
  at::Tensor scores = dropout_p > 0.0 ? empty_causal(q.size(0), q.size(1), L.N, q.options())
                                      : at::empty({0}, q.options());
  if (probs.numel() == 0) return {probs, scores};
  const auto ds = make_dropout_stream(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), dropout_p);
  at::Tensor kept = dropout_p > 0.0 ? scores : at::Tensor();
  if (q.scalar_type() == at::kFloat) probs_kernel<float>(q, k, L, static_cast<float>(scale), ds, probs, kept);
  else probs_kernel<c10::BFloat16>(q, k, L, static_cast<float>(scale), ds, probs, kept);
  return {probs, scores};
}

at::Tensor causal_attention_grad_scores(const at::Tensor& dout, const at::Tensor& v, const at::Tensor& saved,
                                        double scale, double dropout_p, int64_t seed, int64_t offset) {
  constexpr const char* op = "fastgpt::causal_attention_grad_scores";
  const CausalLayout L = check_nt_args(dout, v, op);
  check_scale_dropout(scale, dropout_p, dout.size(0) * dout.size(1) * L.T_q, op);
  check_packed(saved, L.T_q, L.T_k, op, dropout_p > 0.0 ? "saved (the scores)" : "saved (the probabilities)");
  check_same_dtype_device(saved, dout, op, "saved", "dout");
  TORCH_CHECK(saved.size(0) == dout.size(0) && saved.size(1) == dout.size(1), op, ": saved has shape ",
              saved.sizes(), " but dout has shape ", dout.sizes(), "; saved must be (B, H, N) with dout's B and H");
  at::Tensor grad_scores = empty_causal(dout.size(0), dout.size(1), L.N, dout.options());
  if (grad_scores.numel() == 0) return grad_scores;
  const auto sv = packed_readable(saved);
  const auto ds = make_dropout_stream(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), dropout_p);
  const float sc = static_cast<float>(scale);
  const bool recompute = dropout_p > 0.0;
  if (dout.scalar_type() == at::kFloat) {
    if (recompute) grad_scores_kernel<float, true>(dout, v, sv, L, sc, ds, grad_scores);
    else grad_scores_kernel<float, false>(dout, v, sv, L, sc, ds, grad_scores);
  } else {
    if (recompute) grad_scores_kernel<c10::BFloat16, true>(dout, v, sv, L, sc, ds, grad_scores);
    else grad_scores_kernel<c10::BFloat16, false>(dout, v, sv, L, sc, ds, grad_scores);
  }
  return grad_scores;
}

}  // namespace fastgpt::cpu
