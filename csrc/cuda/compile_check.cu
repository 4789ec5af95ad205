// One translation unit that instantiates every CUDA kernel of csrc/cuda/ for every dtype and
// variant, for the offline compile check (fastgpt/verify/cuda_compile.py): nvcc compiles it for sm_80 and
// sm_90 with `-Xptxas -v`, which reports registers, spills and static shared memory per kernel.
// Its host main() prints the dynamic shared memory each kernel family's launcher requests, from
// the launchers' own constants, so the check adds it to the static figure; it needs no GPU.
#include <cstdio>

#include "causal_matmul.cuh"
#include "causal_softmax.cuh"

namespace fastgpt::cuda {

// The launchers instantiate their kernels: tensor-core and SIMT variants for 16-bit, SIMT for fp32.
// Grouped-query attention is no separate variant: the group size is a kernel argument (1 without
// it), so these kernels are the ones both kinds of call run.
#define FASTGPT_INSTANTIATE_MATMULS(T)                                                                           \
  template void launch_causal_matmul_nt<T>(const T*, RowStrides, const T*, RowStrides, T*, int64_t, int64_t,    \
                                           int64_t, int64_t, int64_t, int64_t, cudaStream_t, bool);             \
  template void launch_causal_matmul_nn<T>(const T*, const T*, RowStrides, T*, int64_t, int64_t, int64_t,       \
                                           int64_t, int64_t, int64_t, cudaStream_t, bool);                      \
  template void launch_causal_matmul_tn<T>(const T*, const T*, RowStrides, T*, int64_t, int64_t, int64_t,       \
                                           int64_t, int64_t, int64_t, cudaStream_t, bool);
// The softmax launchers instantiate both row ownerships (warp per row, block per row).
#define FASTGPT_INSTANTIATE_SOFTMAX(T)                                                                           \
  template void launch_causal_softmax<T>(const T*, T*, int64_t, int64_t, int64_t, float, double, uint64_t,      \
                                         uint64_t, cudaStream_t, SoftmaxPath);                                   \
  template void launch_causal_softmax_backward<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, float,     \
                                                  cudaStream_t, SoftmaxPath);                                    \
  template void launch_causal_softmax_dropout_backward<T>(const T*, const T*, T*, int64_t, int64_t, int64_t,    \
                                                          float, double, uint64_t, uint64_t, cudaStream_t,       \
                                                          SoftmaxPath);
#define FASTGPT_INSTANTIATE(T) FASTGPT_INSTANTIATE_MATMULS(T) FASTGPT_INSTANTIATE_SOFTMAX(T)
FASTGPT_INSTANTIATE(float)
FASTGPT_INSTANTIATE(__half)
FASTGPT_INSTANTIATE(__nv_bfloat16)
#undef FASTGPT_INSTANTIATE
#undef FASTGPT_INSTANTIATE_SOFTMAX
#undef FASTGPT_INSTANTIATE_MATMULS

// dropout_keep_mask has no dtype: referencing its launcher compiles its kernel.
[[maybe_unused]] auto* const keep_mask_launcher = &launch_dropout_keep_mask;

}  // namespace fastgpt::cuda

// "<kernel family> <dynamic shared bytes>": the most any launch of that family requests.
int main() {
  using namespace fastgpt::cuda;
  std::printf("causal_matmul_nt_kernel %zu\n", kCausalMatmulDynamicShared);
  std::printf("causal_matmul_nn_kernel %zu\n", kCausalMatmulDynamicShared);
  std::printf("causal_matmul_tn_kernel %zu\n", kCausalMatmulDynamicShared);
  // causal_softmax.cuh's launchers pass shared_bytes = 0 (their reductions use static shared memory).
  std::printf("causal_softmax_kernel 0\ncausal_softmax_backward_kernel 0\n");
  std::printf("causal_softmax_dropout_backward_kernel 0\ndropout_keep_mask_kernel 0\n");
  return 0;
}
