// STAND-IN (branch cuda2) for branch `cuda`'s compat.h, nvcc half only: on merge keep `cuda`'s file
// (it adds the C++20 emulation behind the same spellings).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#define FASTGPT_SHARED(type, name, count) __shared__ type name[count]
#define FASTGPT_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
