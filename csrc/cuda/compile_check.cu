// One translation unit that instantiates every CUDA kernel of csrc/cuda/ for every dtype and
// variant, for the offline compile check (fastgpt/cuda_check.py): nvcc compiles it for sm_80 and
// sm_90 with `-Xptxas -v`, which reports registers, spills and static shared memory per kernel.
// Its host main() prints the dynamic shared memory each kernel family's launcher requests, from
// the launchers' own constants, so the check adds it to the static figure; it needs no GPU.
#include <cstdio>

#include "causal_matmul.cuh"

namespace fastgpt::cuda {

// The launchers instantiate their kernels: tensor-core and SIMT variants for 16-bit, SIMT for fp32.
#define FASTGPT_INSTANTIATE_MATMULS(T)                                                                           \
  template void launch_causal_matmul_nt<T>(const T*, RowStrides, const T*, RowStrides, T*, int64_t, int64_t,    \
                                           int64_t, int64_t, int64_t, cudaStream_t, bool);                      \
  template void launch_causal_matmul_nn<T>(const T*, const T*, RowStrides, T*, int64_t, int64_t, int64_t,       \
                                           int64_t, int64_t, cudaStream_t, bool);                               \
  template void launch_causal_matmul_tn<T>(const T*, const T*, RowStrides, T*, int64_t, int64_t, int64_t,       \
                                           int64_t, int64_t, cudaStream_t, bool);
FASTGPT_INSTANTIATE_MATMULS(float)
FASTGPT_INSTANTIATE_MATMULS(__half)
FASTGPT_INSTANTIATE_MATMULS(__nv_bfloat16)
#undef FASTGPT_INSTANTIATE_MATMULS

}  // namespace fastgpt::cuda

// "<kernel family> <dynamic shared bytes>": the most any launch of that family requests.
int main() {
  using namespace fastgpt::cuda;
  std::printf("causal_matmul_nt_kernel %zu\n", kCausalMatmulDynamicShared);
  std::printf("causal_matmul_nn_kernel %zu\n", kCausalMatmulDynamicShared);
  std::printf("causal_matmul_tn_kernel %zu\n", kCausalMatmulDynamicShared);
  return 0;
}
