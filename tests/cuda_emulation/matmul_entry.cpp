// The causal matmul kernels of csrc/cuda/causal_matmul.cuh run in the SIMT emulation, behind a C
// entry point for ctypes (tests/cuda_emulation/test_emulation_matmul.py). Built with
// -DFASTGPT_MATMUL_SELFTEST it is instead an executable that runs every kernel, dtype and path on
// small shapes against a float64 reference computed here: the ThreadSanitizer build. H query heads,
// H_kv key/value heads (grouped-query attention where H_kv < H; H_kv divides H).
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>

#include "cuda/causal_matmul.cuh"

namespace {

using fastgpt::cuda::RowStrides;

enum Op { kNT = 0, kNN = 1, kTN = 2 };

template <typename T>
void run(int op, bool force_simt, const void* x0, const int64_t* s0, const void* x1, const int64_t* s1, void* out,
         int64_t B, int64_t H, int64_t H_kv, int64_t T_q, int64_t T_k, int64_t D) {
  using namespace fastgpt::cuda;
  const T* a = static_cast<const T*>(x0);
  const T* b = static_cast<const T*>(x1);
  T* o = static_cast<T*>(out);
  const RowStrides sb{s1[0], s1[1], s1[2]};
  if (op == kNT) {
    launch_causal_matmul_nt<T>(a, RowStrides{s0[0], s0[1], s0[2]}, b, sb, o, B, H, H_kv, T_q, T_k, D, nullptr,
                               force_simt);
  } else if (op == kNN) {
    launch_causal_matmul_nn<T>(a, b, sb, o, B, H, H_kv, T_q, T_k, D, nullptr, force_simt);
  } else {
    launch_causal_matmul_tn<T>(a, b, sb, o, B, H, H_kv, T_q, T_k, D, nullptr, force_simt);
  }
}

}  // namespace

// op: 0 nt (x0 = a (B,H,T_q,D) strides s0, x1 = b (B,H_kv,T_k,D) strides s1, out packed (B,H,N)),
// 1 nn (x0 = p packed (B,H,N), x1 = x (B,H_kv,T_k,D), out (B,H,T_q,D)), 2 tn (x0 = p packed
// (B,H,N), x1 = x (B,H,T_q,D), out (B,H_kv,T_k,D), each group of H / H_kv query heads summed).
// dtype: 0 float32, 1 float16, 2 bfloat16 (torch's bit layouts). Returns 0, or 1 with the
// emulation's message (deadlock, ...) in err.
extern "C" int fastgpt_emu_causal_matmul(int op, int dtype, int force_simt, const void* x0, const int64_t* s0,
                                         const void* x1, const int64_t* s1, void* out, int64_t B, int64_t H,
                                         int64_t H_kv, int64_t T_q, int64_t T_k, int64_t D, char* err,
                                         int64_t err_len) {
  try {
    if (dtype == 0) run<float>(op, force_simt, x0, s0, x1, s1, out, B, H, H_kv, T_q, T_k, D);
    else if (dtype == 1) run<__half>(op, force_simt, x0, s0, x1, s1, out, B, H, H_kv, T_q, T_k, D);
    else run<__nv_bfloat16>(op, force_simt, x0, s0, x1, s1, out, B, H, H_kv, T_q, T_k, D);
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, static_cast<size_t>(err_len), "%s", e.what());
    return 1;
  }
}

// N, the packed elements per (b, h), from csrc/causal_layout.h (the test checks its Python copy).
extern "C" int64_t fastgpt_emu_causal_numel(int64_t T_q, int64_t T_k) { return fastgpt::CausalLayout(T_q, T_k).N; }

#ifdef FASTGPT_MATMUL_SELFTEST
#include <cmath>
#include <random>
#include <vector>

namespace {

float to_f(float x) { return x; }
float to_f(__half x) { return __half2float(x); }
float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
T from_f(float x);
template <>
float from_f<float>(float x) { return x; }
template <>
__half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Max relative error of the three kernels on one shape against float64 sums of the same inputs;
// P carries NaN above the diagonal (never to be read); the nt output is checked everywhere,
// padding included. H query heads over H_kv key/value heads: b (the keys of nt, the values of nn)
// has H_kv heads, query head bh reads bh / G (G = H / H_kv, and bh = b·H + h gives b·H_kv + h / G),
// and tn's H_kv output heads sum their G query heads.
template <typename T>
double max_error(int64_t B, int64_t H, int64_t H_kv, int64_t T_q, int64_t T_k, int64_t D, bool simt) {
  const fastgpt::CausalLayout L(T_q, T_k);
  const int64_t N = L.N, o = T_k - T_q, BH = B * H, BH_kv = B * H_kv, G = H / H_kv;
  std::mt19937 gen(7);
  std::normal_distribution<float> normal;
  std::vector<T> a(BH * T_q * D), b(BH_kv * T_k * D), p(BH * N, from_f<T>(NAN)), s(BH * N, from_f<T>(7.0f));
  std::vector<T> out_nn(BH * T_q * D), out_tn(BH_kv * T_k * D);
  for (auto& e : a) e = from_f<T>(normal(gen));
  for (auto& e : b) e = from_f<T>(normal(gen));
  for (int64_t bh = 0; bh < BH; ++bh)
    for (int64_t i = 0; i < T_q; ++i)
      for (int64_t j = 0; j <= o + i; ++j) p[bh * N + L.row_offset(i) + j] = from_f<T>(normal(gen));
  const int64_t sq[3] = {H * T_q * D, T_q * D, D}, sk[3] = {H_kv * T_k * D, T_k * D, D};
  run<T>(kNT, simt, a.data(), sq, b.data(), sk, s.data(), B, H, H_kv, T_q, T_k, D);
  run<T>(kNN, simt, p.data(), nullptr, b.data(), sk, out_nn.data(), B, H, H_kv, T_q, T_k, D);
  run<T>(kTN, simt, p.data(), nullptr, a.data(), sq, out_tn.data(), B, H, H_kv, T_q, T_k, D);
  double worst = 0;
  auto note = [&](double got, double ref) {
    const double e = std::fabs(got - ref) / (1.0 + std::fabs(ref));
    if (!(e <= worst)) worst = std::isnan(e) ? INFINITY : e;  // a NaN counts as infinitely wrong
  };
  for (int64_t bh = 0; bh < BH; ++bh) {
    for (int64_t r = 0; r < L.R; ++r)
      for (int64_t m = 0; m < L.rows(r); ++m)
        for (int64_t j = 0; j < L.stride(r); ++j) {
          const int64_t i = 64 * r + m;
          double ref = 0;
          for (int64_t d = 0; j <= o + i && d < D; ++d)
            ref += double(to_f(a[(bh * T_q + i) * D + d])) * to_f(b[(bh / G * T_k + j) * D + d]);
          note(to_f(s[bh * N + L.start(r) + m * L.stride(r) + j]), ref);
        }
    for (int64_t i = 0; i < T_q; ++i)
      for (int64_t d = 0; d < D; ++d) {
        double ref = 0;
        for (int64_t j = 0; j <= o + i; ++j)
          ref += double(to_f(p[bh * N + L.row_offset(i) + j])) * to_f(b[(bh / G * T_k + j) * D + d]);
        note(to_f(out_nn[(bh * T_q + i) * D + d]), ref);
      }
  }
  for (int64_t kv = 0; kv < BH_kv; ++kv)
    for (int64_t j = 0; j < T_k; ++j)
      for (int64_t d = 0; d < D; ++d) {
        double ref = 0;
        for (int64_t bh = kv * G; bh < (kv + 1) * G; ++bh)
          for (int64_t i = j - o > 0 ? j - o : 0; i < T_q; ++i)
            ref += double(to_f(p[bh * N + L.row_offset(i) + j])) * to_f(a[(bh * T_q + i) * D + d]);
        note(to_f(out_tn[(kv * T_k + j) * D + d]), ref);
      }
  return worst;
}

}  // namespace

// Every kernel, dtype and path on T_q < T_k and T_q = T_k with tails, and grouped-query (two query
// heads over one key/value head: nt and nn share it, tn sums the pair); exit 1 on an error over
// the output rounding of the dtype (float32: 1e-5, float16: 2e-3, bfloat16: 1.6e-2, relative).
// `matmul_selftest fp32`: the fp32 variant only (the deleted-barrier test's quick run).
int main(int argc, char** argv) {
  struct Shape {
    int64_t T_q, T_k, D, H, H_kv;
  };
  const Shape shapes[] = {{17, 70, 40, 2, 2}, {65, 65, 16, 2, 2}, {17, 70, 40, 2, 1}};
  int failures = 0;
  if (argc > 1 && std::strcmp(argv[1], "fp32") == 0) {
    const double error = max_error<float>(1, 1, 1, 17, 70, 40, true);
    std::printf("%s fp32 simt: max rel error %.2e\n", error <= 1e-5 ? "ok  " : "FAIL", error);
    return error <= 1e-5 ? 0 : 1;
  }
  for (const Shape& sh : shapes) {
    // The 16-bit SIMT runs take one head (emulation time) unless the shape is about the group.
    const int64_t h1 = sh.H == sh.H_kv ? 1 : sh.H, h1_kv = sh.H == sh.H_kv ? 1 : sh.H_kv;
    const double errors[5] = {max_error<float>(1, sh.H, sh.H_kv, sh.T_q, sh.T_k, sh.D, true),
                              max_error<__half>(1, sh.H, sh.H_kv, sh.T_q, sh.T_k, sh.D, false),
                              max_error<__half>(1, h1, h1_kv, sh.T_q, sh.T_k, sh.D, true),
                              max_error<__nv_bfloat16>(1, sh.H, sh.H_kv, sh.T_q, sh.T_k, sh.D, false),
                              max_error<__nv_bfloat16>(1, h1, h1_kv, sh.T_q, sh.T_k, sh.D, true)};
    const double limits[5] = {1e-5, 2e-3, 2e-3, 1.6e-2, 1.6e-2};
    const char* names[5] = {"fp32 simt", "fp16 wmma", "fp16 simt", "bf16 wmma", "bf16 simt"};
    for (int v = 0; v < 5; ++v) {
      const bool ok = errors[v] <= limits[v];
      failures += !ok;
      std::printf("%s H=%lld H_kv=%lld T_q=%lld T_k=%lld D=%lld %s: max rel error %.2e\n", ok ? "ok  " : "FAIL",
                  (long long)sh.H, (long long)sh.H_kv, (long long)sh.T_q, (long long)sh.T_k, (long long)sh.D,
                  names[v], errors[v]);
    }
  }
  return failures ? 1 : 0;
}
#endif
