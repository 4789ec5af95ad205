// The one include of every CUDA kernel header in csrc/: under nvcc the CUDA headers, under a host
// compiler the SIMT emulation (csrc/cuda/emulation/, tests only). Kernels written against this
// header compile both ways; csrc/cuda/README.md lists what they may use.
#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

// Static shared memory: an array on the GPU, a pointer into the block's arena in the emulation
// (so never take sizeof of it).
#define FASTGPT_SHARED(type, name, count) __shared__ type name[count]
#define FASTGPT_SHARED_2D(type, name, rows, cols) __shared__ type name[rows][cols]
// Dynamic shared memory (the launch's shared_bytes), 16-byte aligned. One untyped extern array
// for every kernel, so kernels of different element types do not redeclare it.
extern __shared__ __align__(16) unsigned char fastgpt_dynamic_shared_[];
#define FASTGPT_DYNAMIC_SHARED(type, name) type* const name = reinterpret_cast<type*>(fastgpt_dynamic_shared_)
#else
#include "emulation/device.h"
#include "emulation/wmma.h"
#endif
