// fastgpt::cuda::launch: the one way kernels in csrc/ are launched, so the same source runs on
// the GPU (nvcc: the <<<>>> launch and an error check) and in the SIMT emulation (host compiler:
// blocks in turn, the threads of a block as std::threads; csrc/cuda/emulation/runtime.h).
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>
#include <utility>

#include "compat.h"

namespace fastgpt::cuda {

// kernel<<<grid, block, shared_bytes, stream>>>(args...). Throws std::runtime_error when the
// launch is refused (GPU) or fails (emulation: deadlock, bad warp mask, shared memory overflow).
template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
            Args&&... args) {
  static_assert(sizeof...(KernelArgs) == sizeof...(Args), "launch: wrong number of kernel arguments");
#if defined(__CUDACC__)
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("fastgpt CUDA launch failed: ") + cudaGetErrorString(err));
#else
  (void)stream;
  // The arguments converted to the kernel's parameter types once, as a launch does; every thread
  // then calls the kernel with its own copies (CUDA parameters are by value).
  std::tuple<std::decay_t<KernelArgs>...> params(std::forward<Args>(args)...);
  emu::run_grid(grid, block, shared_bytes, [&] { std::apply(kernel, params); });
#endif
}

}  // namespace fastgpt::cuda
