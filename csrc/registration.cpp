// The fastgpt op library: schemas (device independent) and the CPU kernels behind them. The CUDA
// kernels (cuda/binding.cu) register under the same names with TORCH_LIBRARY_IMPL(fastgpt, CUDA, m).
// Autograd and the shape-only fake kernels are registered from Python (fastgpt/ext/ops.py).

#include <Python.h>
#include <torch/library.h>

#include "causal_ops.h"
#include "cpu/amx_matmul.h"
#include "cpu/isa.h"

// The instruction set the CPU kernels were compiled for: the build passes -DCPU_CAPABILITY=AVX512,
// AVX2 or DEFAULT, the same macro that sizes ATen's Vectorized.
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif
#define FASTGPT_STRINGIFY_(x) #x
#define FASTGPT_STRINGIFY(x) FASTGPT_STRINGIFY_(x)

// Causal matrices are packed (B, H, N) tensors (causal_layout.h): T_q <= T_k, query i sees keys
// j <= o + i, o = T_k - T_q; zero at j > o + i and in the padding on output, not read there on input.
TORCH_LIBRARY(fastgpt, m) {
  // Grouped-query attention: the key/value side has H_kv heads, H_kv dividing H, and query head h
  // reads key/value head h / (H / H_kv) in place (never a copy per query head).
  // tril_o(a · bᵀ): (B, H, T_q, D) × (B, H_kv, T_k, D) -> packed (B, H, N).
  m.def("causal_matmul_nt(Tensor a, Tensor b) -> Tensor");
  // tril_o(p) · x: packed (B, H, N) × (B, H_kv, T_k, D) -> (B, H, T_q, D).
  m.def("causal_matmul_nn(Tensor p, Tensor x, int T_q) -> Tensor");
  // tril_o(p)ᵀ · x summed over each group of H / kv_heads query heads: packed (B, H, N) ×
  // (B, H, T_q, D) -> (B, kv_heads, T_k, D), kv_heads = H when None. dK and dV of grouped-query
  // attention: the group is summed in a fixed order, so repeated calls are bit-equal.
  m.def("causal_matmul_tn(Tensor p, Tensor x, int T_k, int? kv_heads=None) -> Tensor");
  // dropout(softmax(scale · scores with the causal mask)), the keep mask drawn from the Philox
  // stream at (seed, offset): packed -> packed.
  m.def("causal_softmax(Tensor scores, int T_q, int T_k, float scale, float dropout_p, int seed, int offset) -> Tensor");
  // Its backward without dropout, from the forward's output: scale · P ∘ (grad - rowsum(grad ∘ P)).
  m.def("causal_softmax_backward(Tensor grad, Tensor probs, int T_q, int T_k, float scale) -> Tensor");
  // With dropout, from the forward's scores: P recomputed, the keep mask regenerated.
  m.def("causal_softmax_dropout_backward(Tensor grad, Tensor scores, int T_q, int T_k, float scale, "
        "float dropout_p, int seed, int offset) -> Tensor");
  // The nt product and the softmax (or its backward) fused per row block, for the eager attention
  // on CPU: the composed ops' results bit for bit, without S or dP going through memory. S is
  // returned (for the backward) only with dropout, else an empty tensor. saved: P, or S with dropout.
  m.def("causal_attention_probs(Tensor q, Tensor k, float scale, float dropout_p, int seed, int offset) -> (Tensor, Tensor)");
  m.def("causal_attention_grad_scores(Tensor dout, Tensor v, Tensor saved, float scale, float dropout_p, int seed, "
        "int offset) -> Tensor");
  // The whole attention on CPU in float32 (bfloat16 on AMX), flash style (cpu/attention_flash.cpp): no
  // T×T matrix is stored; the forward returns each row's log-sum-exp, from which the backward
  // recomputes P, and takes out for each row's dO·out. out, dq, dk, dv are (B, H, T, D) views of
  // (B, T, H, D) memory. Dropout draws causal_softmax's mask.
  m.def("causal_attention_flash_forward(Tensor q, Tensor k, Tensor v, float scale, float dropout_p, int seed, "
        "int offset) -> (Tensor, Tensor)");
  m.def("causal_attention_flash_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "float scale, float dropout_p, int seed, int offset) -> (Tensor, Tensor, Tensor)");
  // The two as one differentiable op, its autograd node in C++ (below): what the eager ext calls.
  m.def("causal_attention_flash(Tensor q, Tensor k, Tensor v, float scale, float dropout_p, int seed, int offset) "
        "-> Tensor");
  // The dense (B, H, T_q, T_k) bool keep mask causal_softmax draws for (seed, offset): what
  // fastgpt.attention.causal_attention_with_mask gives back, and parity tests rebuild the reference from.
  m.def("dropout_keep_mask(Tensor scores, int T_q, int T_k, float dropout_p, int seed, int offset) -> Tensor");
  // x ∘ keep / (1 - p), the keep mask of each row of x's last dim from the Philox stream at
  // (seed, offset): the residual branches' dropout. The gradient is the same op on grad.
  m.def("dropout(Tensor x, float p, int seed, int offset) -> Tensor");
  // x (..., K) · weightᵀ + bias, weight (N, K), for x of few rows (decode): inference only.
  m.def("skinny_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // Flash attention on CPU with every option of fastgpt.attention.attention (cpu/attention_flash_options.cpp):
  // causal or not (T_q > T_k only when not), a window (left, right) of keys around each query's
  // position T_k - T_q + i (-1 unbounded), softcap (0 off), ALiBi slopes (B, H) and sinks (H,), both
  // float32. The backward's fourth output is dsinks (H,) float32, empty without sinks. Their
  // autograd is a Python Function (fastgpt/ext/ops.py): lse is an output, not differentiable.
  m.def("attention_flash_forward(Tensor q, Tensor k, Tensor v, Tensor? sinks, Tensor? alibi_slopes, float scale, "
        "bool causal, int window_left, int window_right, float softcap, float dropout_p, int seed, int offset) "
        "-> (Tensor, Tensor)");
  m.def("attention_flash_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? sinks, "
        "Tensor? alibi_slopes, float scale, bool causal, int window_left, int window_right, float softcap, "
        "float dropout_p, int seed, int offset) -> (Tensor, Tensor, Tensor, Tensor)");
  // The dense (B, H, T_q, T_k) keep mask the flash kernel above draws for q (B, H, T_q, D), False
  // outside each query's window.
  m.def("attention_dropout_keep_mask(Tensor q, int T_k, bool causal, int window_left, int window_right, "
        "float dropout_p, int seed, int offset) -> Tensor");
  // The three over packed sequences (flash-attention's varlen layout): q (total_q, H, D), k and v
  // (total_k, H_kv, D), any strides with a contiguous last dim; cu_seqlens_q and cu_seqlens_k
  // (B + 1,) int32 on the CPU, sequence b owning query rows cu_seqlens_q[b] : cu_seqlens_q[b + 1]
  // and key rows cu_seqlens_k[b] : cu_seqlens_k[b + 1], each sequence the call above on its own
  // (query i at key position T_k[b] - T_q[b] + i); alibi_slopes (B, H). out (total_q, H, D), lse
  // (H, total_q). Dropout draws the mask of the (B, H, max_q, max_k) call the sequences pad to:
  // the keep mask is (B, H, max_seqlen_q, max_seqlen_k), sequence b's in [b, :, :T_q[b], :T_k[b]].
  m.def("attention_flash_varlen_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "Tensor? sinks, Tensor? alibi_slopes, float scale, bool causal, int window_left, int window_right, "
        "float softcap, float dropout_p, int seed, int offset) -> (Tensor, Tensor)");
  m.def("attention_flash_varlen_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor? sinks, Tensor? alibi_slopes, float scale, bool causal, "
        "int window_left, int window_right, float softcap, float dropout_p, int seed, int offset) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // The forward over a paged KV cache: k_pages, v_pages (num_pages, page_size, H_kv, D) contiguous,
  // read in place through block_table (B, max_pages) int32; cu_seqlens_k counts each sequence's keys.
  m.def("attention_flash_paged_forward(Tensor q, Tensor k_pages, Tensor v_pages, Tensor block_table, "
        "Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor? sinks, Tensor? alibi_slopes, float scale, bool causal, "
        "int window_left, int window_right, float softcap) -> (Tensor, Tensor)");
  m.def("attention_varlen_dropout_keep_mask(Tensor q, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
        "int max_seqlen_k, bool causal, int window_left, int window_right, float dropout_p, int seed, int offset) "
        "-> Tensor");
  // N of the packed layout (causal_layout.h), for the test that holds fastgpt/ext/layout.py to it.
  m.def("causal_packed_size(int T_q, int T_k) -> int", &fastgpt::cpu::causal_packed_size);
  // Whether the CPU kernels' bfloat16 products of head dim D run on AMX here (cpu/amx_matmul.h),
  // rather than as float32 GEMMs on converted tiles: which path a bfloat16 benchmark timed. It
  // follows the amx switch below.
  m.def("cpu_bf16_uses_amx(int head_dim) -> bool", &fastgpt::cpu::amx::usable);
  // The process-wide switches over the CPU kernels' optional instruction sets (cpu/isa.h): sets
  // those given (None leaves one as it is) and returns the previous (amx, avx512bf16). Python's
  // fastgpt.ext.cpu_isa is the interface; a switch on uses its feature where the CPU has it.
  m.def("set_cpu_isa(bool? amx=None, bool? avx512bf16=None) -> (bool, bool)", &fastgpt::cpu::isa::set_switches);
  // (amx, avx512bf16): what this CPU and build offer the kernels, whatever the switches say.
  m.def("cpu_isa_available() -> (bool, bool)", &fastgpt::cpu::isa::available);
  // Frees the CPU kernels' cache of causal-matrix buffers (no tensors: one kernel for all keys).
  m.def("empty_cache() -> ()", &fastgpt::cpu::empty_cache);
}

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("causal_matmul_nt", &fastgpt::cpu::causal_matmul_nt);
  m.impl("causal_matmul_nn", &fastgpt::cpu::causal_matmul_nn);
  m.impl("causal_matmul_tn", &fastgpt::cpu::causal_matmul_tn);
  m.impl("causal_softmax", &fastgpt::cpu::causal_softmax);
  m.impl("causal_softmax_backward", &fastgpt::cpu::causal_softmax_backward);
  m.impl("causal_softmax_dropout_backward", &fastgpt::cpu::causal_softmax_dropout_backward);
  m.impl("dropout_keep_mask", &fastgpt::cpu::dropout_keep_mask);
  m.impl("skinny_linear", &fastgpt::cpu::skinny_linear);
  m.impl("dropout", &fastgpt::cpu::dropout);
  m.impl("causal_attention_probs", &fastgpt::cpu::causal_attention_probs);
  m.impl("causal_attention_grad_scores", &fastgpt::cpu::causal_attention_grad_scores);
  m.impl("causal_attention_flash_forward", &fastgpt::cpu::causal_attention_flash_forward);
  m.impl("causal_attention_flash_backward", &fastgpt::cpu::causal_attention_flash_backward);
  m.impl("causal_attention_flash", &fastgpt::cpu::causal_attention_flash);
  m.impl("attention_flash_forward", &fastgpt::cpu::attention_flash_forward);
  m.impl("attention_flash_backward", &fastgpt::cpu::attention_flash_backward);
  m.impl("attention_dropout_keep_mask", &fastgpt::cpu::attention_dropout_keep_mask);
  m.impl("attention_flash_varlen_forward", &fastgpt::cpu::attention_flash_varlen_forward);
  m.impl("attention_flash_varlen_backward", &fastgpt::cpu::attention_flash_varlen_backward);
  m.impl("attention_varlen_dropout_keep_mask", &fastgpt::cpu::attention_varlen_dropout_keep_mask);
  m.impl("attention_flash_paged_forward", &fastgpt::cpu::attention_flash_paged_forward);
}

// The one op whose gradient is a C++ autograd node rather than a torch.library formula registered
// from Python (fastgpt/ext/ops.py): the eager CPU attention's, where Python per call showed.
TORCH_LIBRARY_IMPL(fastgpt, Autograd, m) {
  m.impl("causal_attention_flash", &fastgpt::cpu::causal_attention_flash_autograd);
}

// `import fastgpt._C` (the ahead-of-time build) runs the registrations above; the module itself
// only records which instruction set its CPU kernels were compiled for. The JIT build is loaded
// with torch.ops.load_library and never imports this.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastgpt's compiled ops (torch.ops.fastgpt)", -1,
                               nullptr, nullptr, nullptr, nullptr, nullptr};
  PyObject* mod = PyModule_Create(&module);
  if (mod != nullptr) PyModule_AddStringConstant(mod, "cpu_capability", FASTGPT_STRINGIFY(CPU_CAPABILITY));
  return mod;
}
