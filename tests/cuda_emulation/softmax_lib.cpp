// The emulated softmax kernels (csrc/cuda/causal_softmax.cuh) as a shared library for ctypes:
// extern "C" entry points on raw pointers. dtype: 0 float, 1 __half, 2 __nv_bfloat16; path:
// 0 auto, 1 warp per row, 2 block per row. Each returns 0, or 1 with the error in `err`.
#include <cstdint>
#include <cstdio>
#include <exception>

#include "cuda/causal_softmax.cuh"

namespace fc = fastgpt::cuda;

namespace {
template <typename Fn>
int guarded(char* err, int err_len, Fn&& fn) {
  try {
    fn();
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, static_cast<size_t>(err_len), "%s", e.what());
    return 1;
  }
}

template <typename Fn>
void by_dtype(int dtype, Fn&& fn) {
  if (dtype == 0) fn(float{});
  else if (dtype == 1) fn(__half{});
  else fn(__nv_bfloat16{});
}
}  // namespace

extern "C" {

int emu_causal_softmax(int dtype, const void* scores, void* probs, int64_t bh, int64_t T_q, int64_t T_k, float scale,
                       double dropout_p, uint64_t seed, uint64_t offset, int path, char* err, int err_len) {
  return guarded(err, err_len, [&] {
    by_dtype(dtype, [&](auto zero) {
      using T = decltype(zero);
      fc::launch_causal_softmax<T>(static_cast<const T*>(scores), static_cast<T*>(probs), bh, T_q, T_k, scale,
                                   dropout_p, seed, offset, nullptr, static_cast<fc::SoftmaxPath>(path));
    });
  });
}

int emu_causal_softmax_backward(int dtype, const void* grad, const void* probs, void* out, int64_t bh, int64_t T_q,
                                int64_t T_k, float scale, int path, char* err, int err_len) {
  return guarded(err, err_len, [&] {
    by_dtype(dtype, [&](auto zero) {
      using T = decltype(zero);
      fc::launch_causal_softmax_backward<T>(static_cast<const T*>(grad), static_cast<const T*>(probs),
                                            static_cast<T*>(out), bh, T_q, T_k, scale, nullptr,
                                            static_cast<fc::SoftmaxPath>(path));
    });
  });
}

int emu_causal_softmax_dropout_backward(int dtype, const void* grad, const void* scores, void* out, int64_t bh,
                                        int64_t T_q, int64_t T_k, float scale, double dropout_p, uint64_t seed,
                                        uint64_t offset, int path, char* err, int err_len) {
  return guarded(err, err_len, [&] {
    by_dtype(dtype, [&](auto zero) {
      using T = decltype(zero);
      fc::launch_causal_softmax_dropout_backward<T>(static_cast<const T*>(grad), static_cast<const T*>(scores),
                                                    static_cast<T*>(out), bh, T_q, T_k, scale, dropout_p, seed,
                                                    offset, nullptr, static_cast<fc::SoftmaxPath>(path));
    });
  });
}

int emu_dropout_keep_mask(uint8_t* keep, int64_t bh, int64_t T_q, int64_t T_k, double dropout_p, uint64_t seed,
                          uint64_t offset, char* err, int err_len) {
  return guarded(err, err_len, [&] { fc::launch_dropout_keep_mask(keep, bh, T_q, T_k, dropout_p, seed, offset, nullptr); });
}

}  // extern "C"
