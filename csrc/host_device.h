// FASTGPT_HOST_DEVICE: a function both the CPU kernels and the CUDA kernels call (philox.h,
// causal_layout.h): `__host__ __device__` and inlined under nvcc, plain `inline` elsewhere.
#pragma once

#if defined(__CUDACC__)
#define FASTGPT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTGPT_HOST_DEVICE inline
#endif
