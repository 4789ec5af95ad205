// CPU flash attention: the whole causal attention in two ops that never store a T×T matrix, and the
// two as one differentiable op with a C++ autograd node (what the eager ext attention calls). The
// kernels here are float32; bfloat16 (where amx::usable(D)) runs attention_flash_amx.cpp's.
//
//   causal_attention_flash_forward(q, k, v, ...)                -> (out, lse)
//   causal_attention_flash_backward(dout, q, k, v, out, lse, ...) -> (dq, dk, dv)
//   causal_attention_flash(q, k, v, ...)                        -> out
//
// Why: the materialised path (attention_fused.cpp and the causal matmuls) writes P and dS to memory
// and reads them back four times: at (B16, H6, T256) 12.6 MB each way, ~90 MB per forward+backward,
// a large share of its time in a profile. Here a row block's scores, probabilities and gradients
// live in a thread's (64 × T_k) scratch, in L2, from the GEMM that makes them to the GEMMs that
// consume them. The price is one more product: the backward recomputes S = q·kᵀ and, from the
// forward's log-sum-exp of each row, P = exp(scale·S - lse), instead of reading P. It takes each
// row's Σ dP∘P, which dS needs before its first element, as dO·out (D products, before the loop),
// so that P and dS are made in one pass.
//
// Row block r holds the m = rows(r) queries from r0 = 64·r and the keys [0, w), w = width(r); its
// diagonal tile is computed whole and its entries above the diagonal set to zero before they reach
// a product (blocks of 32 or 128 rows, and skipping the tile's upper quarter, measured no faster
// with `python benchmarks/ext_flash_cpu.py`). The forward is parallel over (head, row block), like the materialised ops. The backward
// is parallel over key/value heads: one thread owns a head's dk and dv (T_k × D, float32) and adds
// every row block of its G query heads into them in a fixed order, so there are no atomics and the
// results do not depend on the thread count.
//
// Dropout draws causal_softmax's keep mask (the same (seed, offset) stream, flat row bh·T_q + i),
// so this path drops the same elements as the materialised one. The outputs are allocated
// (B, T, H, D) in memory, returned as (B, H, T, D) views: the layer's transpose back to (B, T, C)
// costs no copy, and neither do the gradients' on their way to the fused qkv projection.

#include <ATen/ops/empty.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "../causal_layout.h"
#include "../causal_ops.h"
#include "../checks.h"
#include "../philox.h"
#include "amx_matmul.h"
#include "attention_flash.h"
#include "attention_flash_amx.h"
#include "common.h"
#include "dropout_cpu.h"
#include "nt_blocks.h"
#include "softmax_rows.h"

namespace fastgpt::cpu {
namespace {

// Work (multiply-adds) below which a thread is not worth waking: tens of microseconds of a core's
// GEMM, more than waking a pool thread costs (parallel_for_balanced, common.h).
constexpr double kMinCostPerThread = 5e5;

void flash_forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const CausalLayout& L,
                          float scale, const DropoutStream& ds, at::Tensor& out, at::Tensor& lse) {
  const int64_t BH = q.size(0) * q.size(1), D = q.size(3), group = q.size(1) / k.size(1);
  const auto Q = rows4<float>(q), K = rows4<float>(k), V = rows4<float>(v), O = rows4<float>(out);
  float* lse_data = lse.data_ptr<float>();
  auto cum = head_prefix_cost(L.R, [&](int64_t r) { return static_cast<double>(L.rows(r) * L.width(r) * (2 * D + 8)); });
  parallel_for_balanced(BH * L.R, cum, kMinCostPerThread, [&](int64_t begin, int64_t end) {
    std::vector<float> p_buf, mult;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / L.R, r = item % L.R, r0 = r * kCausalBlock, m = L.rows(r), w = L.width(r);
      p_buf.resize(std::max<size_t>(p_buf.size(), static_cast<size_t>(m * w)));
      float* p = p_buf.data();  // (m × w): S, then P in place
      gemm(false, true, m, w, D, 1.0f, Q.at(bh) + r0 * Q.ld, Q.ld, K.at(bh / group), K.ld, 0.0f, p, w);
      for (int64_t i = 0; i < m; ++i) {
        const int64_t length = L.o + r0 + i + 1, flat = bh * L.T_q + r0 + i;
        float* row = p + i * w;
        softmax_row(row, row, row, length, scale, row_multipliers(ds, flat, length, mult), lse_data + flat);
        std::fill(row + length, row + w, 0.0f);
      }
      gemm(false, false, m, D, w, 1.0f, p, w, V.at(bh / group), V.ld, 0.0f, O.at(bh) + r0 * O.ld, O.ld);
    }
  });
}

void flash_backward_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& lse, const at::Tensor& delta, const CausalLayout& L, float scale,
                           const DropoutStream& ds, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t BH_kv = k.size(0) * k.size(1), D = q.size(3), group = q.size(1) / k.size(1);
  const auto Q = rows4<float>(q), K = rows4<float>(k), V = rows4<float>(v), dO = rows4<float>(dout);
  const auto dQ = rows4<float>(dq), dK = rows4<float>(dk), dV = rows4<float>(dv);
  const float* lse_data = lse.data_ptr<float>();
  const float* delta_data = delta.data_ptr<float>();
  double per_head = 0.0;  // five products per row block, for each of the group's query heads
  for (int64_t r = 0; r < L.R; ++r) per_head += static_cast<double>(group * L.rows(r) * L.width(r) * (5 * D + 16));
  parallel_for_balanced(BH_kv, [per_head](int64_t i) { return static_cast<double>(i) * per_head; }, kMinCostPerThread,
                        [&](int64_t begin, int64_t end) {
    std::vector<float> p_buf, ds_buf, mult;
    for (int64_t kv = begin; kv < end; ++kv) {
      const float* k_h = K.at(kv);
      const float* v_h = V.at(kv);
      float* dk_h = dK.at(kv);
      float* dv_h = dV.at(kv);
      for (int64_t j = 0; j < L.T_k; ++j) {
        zero_fill(dk_h + j * dK.ld, D);
        zero_fill(dv_h + j * dV.ld, D);
      }
      for (int64_t bh = kv * group; bh < (kv + 1) * group; ++bh) {  // the group's query heads, in order
        for (int64_t r = 0; r < L.R; ++r) {
          const int64_t r0 = r * kCausalBlock, m = L.rows(r), w = L.width(r);
          const float* q_r = Q.at(bh) + r0 * Q.ld;
          const float* do_r = dO.at(bh) + r0 * dO.ld;
          p_buf.resize(std::max<size_t>(p_buf.size(), static_cast<size_t>(m * w)));
          ds_buf.resize(p_buf.size());
          float* p = p_buf.data();    // (m × w): S, then P after dropout
          float* dsc = ds_buf.data();  // (m × w): dP, then dS
          gemm(false, true, m, w, D, 1.0f, q_r, Q.ld, k_h, K.ld, 0.0f, p, w);
          gemm(false, true, m, w, D, 1.0f, do_r, dO.ld, v_h, V.ld, 0.0f, dsc, w);
          for (int64_t i = 0; i < m; ++i) {
            const int64_t length = L.o + r0 + i + 1, flat = bh * L.T_q + r0 + i;
            flash_grad_row(p + i * w, dsc + i * w, length, w, scale, lse_data[flat], delta_data[flat],
                           row_multipliers(ds, flat, length, mult));
          }
          gemm(true, false, w, D, m, 1.0f, p, w, do_r, dO.ld, 1.0f, dv_h, dV.ld);                // dv += Pᵀ·dO
          gemm(false, false, m, D, w, 1.0f, dsc, w, k_h, K.ld, 0.0f, dQ.at(bh) + r0 * dQ.ld, dQ.ld);  // dq = dS·k
          gemm(true, false, w, D, m, 1.0f, dsc, w, q_r, Q.ld, 1.0f, dk_h, dK.ld);                 // dk += dSᵀ·q
        }
      }
    }
  });
}

// delta (B, H, T_q) float32: each query's dO·out, D products, which equals Σ_j dP_ij·P_ij over
// its keys (with dropout too: out = (P∘mult)·v and dP = (dO·vᵀ)∘mult), the sum the softmax's
// backward subtracts. The flash backward takes it from here instead of a pass over the keys.
template <typename scalar_t>
at::Tensor grad_dots_typed(const at::Tensor& dout, const at::Tensor& out) {
  const int64_t B = dout.size(0), H = dout.size(1), T_q = dout.size(2), D = dout.size(3);
  const auto G = rows4<scalar_t>(dout), O = rows4<scalar_t>(out);
  at::Tensor delta = at::empty({B, H, T_q}, dout.options().dtype(at::kFloat));
  float* d = delta.data_ptr<float>();
  const int64_t heads_per_task = std::max<int64_t>(1, 16384 / std::max<int64_t>(T_q * D, 1));  // ~16k products
  at::parallel_for(0, B * H, heads_per_task, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      for (int64_t i = 0; i < T_q; ++i) {
        const scalar_t* g = G.at(bh) + i * G.ld;
        const scalar_t* o = O.at(bh) + i * O.ld;
        Vec acc(0.0f);  // load_row is zero past D
        for (int64_t c = 0; c < D; c += kW) {
          const int64_t n = std::min(kW, D - c);
          acc = at::vec::fmadd(load_row(g + c, n), load_row(o + c, n), acc);
        }
        d[bh * T_q + i] = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
      }
    }
  });
  return delta;
}

}  // namespace

at::Tensor empty_heads_interleaved(int64_t B, int64_t H, int64_t T, int64_t D, const at::TensorOptions& options) {
  return at::empty({B, T, H, D}, options).transpose(1, 2);
}

at::Tensor output_grad_dots(const at::Tensor& dout, const at::Tensor& out) {
  return dout.scalar_type() == at::kBFloat16 ? grad_dots_typed<c10::BFloat16>(dout, out)
                                             : grad_dots_typed<float>(dout, out);
}

namespace {

// q (B, H, T_q, D), k and v (B, H_kv, T_k, D), float32 on the CPU.
CausalLayout check_flash_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  TORCH_CHECK(q.device().is_cpu(), op, ": q is on ", q.device(), "; the flash kernels are CPU only");
  const CausalLayout L = check_nt_args(q, k, op);
  check_same_dtype_device(v, k, op, "v", "k");
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v has shape ", v.sizes(), " but k has shape ", k.sizes(),
              "; k and v must be (B, H_kv, T_k, D) alike");
  const bool bf16_ok = q.scalar_type() == at::kBFloat16 && amx::usable(q.size(3));
  TORCH_CHECK(q.scalar_type() == at::kFloat || bf16_ok, op, ": q has dtype ", q.scalar_type(), " and head dim ",
              q.size(3), "; the flash kernels take float32, or bfloat16 where it runs on AMX (an AMX-BF16 CPU, an "
              "even head dim, the amx switch of fastgpt.ext.cpu_isa on); elsewhere bfloat16 runs causal_attention_probs and the causal matmuls");
  return L;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> causal_attention_flash_forward(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, double scale, double dropout_p,
                                                                  int64_t seed, int64_t offset) {
  constexpr const char* op = "fastgpt::causal_attention_flash_forward";
  const CausalLayout L = check_flash_args(q, k, v, op);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  check_scale_dropout(scale, dropout_p, B * H * L.T_q, op);
  at::Tensor out = empty_heads_interleaved(B, H, L.T_q, D, q.options());
  at::Tensor lse = at::empty({B, H, L.T_q}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  const auto ds = make_dropout_stream(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), dropout_p);
  if (q.scalar_type() == at::kBFloat16) {
    amx::flash_forward(rows_readable(q), rows_readable(k), rows_readable(v), L, static_cast<float>(scale), ds, out, lse);
  } else {
    flash_forward_kernel(rows_readable(q), rows_readable(k), rows_readable(v), L, static_cast<float>(scale), ds, out,
                         lse);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_flash_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, double scale, double dropout_p, int64_t seed, int64_t offset) {
  constexpr const char* op = "fastgpt::causal_attention_flash_backward";
  const CausalLayout L = check_flash_args(q, k, v, op);
  const int64_t B = q.size(0), H = q.size(1), H_kv = k.size(1), D = q.size(3);
  check_scale_dropout(scale, dropout_p, B * H * L.T_q, op);
  check_same_dtype_device(dout, q, op, "dout", "q");
  TORCH_CHECK(dout.sizes() == q.sizes(), op, ": dout has shape ", dout.sizes(), " but q has shape ", q.sizes(),
              "; dout must be shaped like the forward's output (B, H, T_q, D)");
  check_same_dtype_device(out, q, op, "out", "q");
  TORCH_CHECK(out.sizes() == q.sizes(), op, ": out has shape ", out.sizes(), " but q has shape ", q.sizes(),
              "; out must be the forward's output (B, H, T_q, D)");
  TORCH_CHECK(lse.device() == q.device() && lse.scalar_type() == at::kFloat, op, ": lse is ", lse.scalar_type(),
              " on ", lse.device(), "; it must be the forward's float32 log-sum-exp on ", q.device());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == L.T_q, op, ": lse has shape ",
              lse.sizes(), "; it must be the forward's (B, H, T_q) = (", B, ", ", H, ", ", L.T_q, ")");
  at::Tensor dq = empty_heads_interleaved(B, H, L.T_q, D, q.options());
  at::Tensor dk = empty_heads_interleaved(B, H_kv, L.T_k, D, q.options());
  at::Tensor dv = empty_heads_interleaved(B, H_kv, L.T_k, D, q.options());
  if (B * H_kv == 0 || L.T_k == 0 || D == 0) return {dq, dk, dv};
  if (L.T_q == 0) {  // no query sees any key
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const auto ds = make_dropout_stream(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), dropout_p);
  const at::Tensor g = rows_readable(dout);
  if (q.scalar_type() == at::kBFloat16) {
    const at::Tensor delta = grad_dots_typed<c10::BFloat16>(g, rows_readable(out));
    amx::flash_backward(g, rows_readable(q), rows_readable(k), rows_readable(v), lse.contiguous(), delta, L,
                        static_cast<float>(scale), ds, dq, dk, dv);
  } else {
    const at::Tensor delta = grad_dots_typed<float>(g, rows_readable(out));
    flash_backward_kernel(g, rows_readable(q), rows_readable(k), rows_readable(v), lse.contiguous(), delta, L,
                          static_cast<float>(scale), ds, dq, dk, dv);
  }
  return {dq, dk, dv};
}

namespace {

// The two ops through the dispatcher (below autograd), not the functions above: so that tracing
// (torch.compile's fake tensors, opcheck) reaches their fake kernels instead of the CPU kernels.
std::tuple<at::Tensor, at::Tensor> dispatch_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    double scale, double dropout_p, int64_t seed, int64_t offset) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastgpt::causal_attention_flash_forward", "")
                             .typed<decltype(causal_attention_flash_forward)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(q, k, v, scale, dropout_p, seed, offset);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dispatch_backward(const at::Tensor& dout, const at::Tensor& q,
                                                                 const at::Tensor& k, const at::Tensor& v,
                                                                 const at::Tensor& out, const at::Tensor& lse,
                                                                 double scale, double dropout_p, int64_t seed,
                                                                 int64_t offset) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastgpt::causal_attention_flash_backward", "")
                             .typed<decltype(causal_attention_flash_backward)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(dout, q, k, v, out, lse, scale, dropout_p, seed, offset);
}

// The autograd node of causal_attention_flash, in C++: an eager training step pays no Python per
// attention call (a Python autograd.Function around the two ops cost, at the `cpu` preset's small
// shapes, as much as the kernels gained over sdpa's there).
class ExtFlashAttention : public torch::autograd::Function<ExtFlashAttention> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, double scale, double dropout_p, int64_t seed, int64_t offset) {
    auto [out, lse] = dispatch_forward(q, k, v, scale, dropout_p, seed, offset);
    ctx->save_for_backward({q, k, v, out, lse});  // out: the backward's delta = dO·out
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["offset"] = offset;
    return out;
  }

  // The gradients are plain tensors, off the graph even under create_graph: a second derivative
  // fails (they do not require grad) instead of being wrong.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& d = ctx->saved_data;
    at::Tensor dq, dk, dv;
    if (grads[0].defined()) {
      std::tie(dq, dk, dv) = dispatch_backward(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                                               d.at("scale").toDouble(), d.at("dropout_p").toDouble(),
                                               d.at("seed").toInt(), d.at("offset").toInt());
    }
    auto asked = [&](int i, const at::Tensor& g) { return ctx->needs_input_grad(i) ? g : at::Tensor(); };
    return {asked(0, dq), asked(1, dk), asked(2, dv), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor causal_attention_flash(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                  double dropout_p, int64_t seed, int64_t offset) {
  return std::get<0>(causal_attention_flash_forward(q, k, v, scale, dropout_p, seed, offset));
}

at::Tensor causal_attention_flash_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                           double dropout_p, int64_t seed, int64_t offset) {
  return ExtFlashAttention::apply(q, k, v, scale, dropout_p, seed, offset);
}

}  // namespace fastgpt::cpu
