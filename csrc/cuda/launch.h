// STAND-IN (branch cuda2) for branch `cuda`'s launch.h, nvcc half only: on merge keep `cuda`'s file.
#pragma once

#include <cstddef>

#include "compat.h"

namespace fastgpt::cuda {

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
            Args&&... args) {
  kernel<<<grid, block, shared_bytes, stream>>>(static_cast<Params>(args)...);
}

}  // namespace fastgpt::cuda
