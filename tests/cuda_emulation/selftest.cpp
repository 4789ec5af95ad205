// Self-test of the SIMT emulation (csrc/cuda/emulation/): each check is a tiny kernel with a
// known answer. `selftest` runs the passing ones; `selftest <case>` runs one kernel that must
// fail (deadlock, divergent barrier, bad mask) and prints the emulation's message, exit code 3.
// Built and run by tests/cuda_emulation/test_emulation_runtime.py.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/launch.h"

using fastgpt::cuda::launch;

namespace {

int failures = 0;
void check(bool ok, const char* what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
  failures += !ok;
}

// Butterfly sum, shuffle down/up/broadcast, ballot/any/all within each warp of a 96-thread block
// (3 warps).
__global__ void warp_ops_kernel(int* out) {
  const int t = threadIdx.x, lane = t % 32;
  int v = t;
  for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, m);
  const int down = __shfl_down_sync(0xFFFFFFFFu, t, 1);
  const int up = __shfl_up_sync(0xFFFFFFFFu, t, 2);
  const int bcast = __shfl_sync(0xFFFFFFFFu, t * 10, 3);
  const unsigned odd = __ballot_sync(0xFFFFFFFFu, lane % 2);
  const int any7 = __any_sync(0xFFFFFFFFu, lane == 7), all_small = __all_sync(0xFFFFFFFFu, lane < 31);
  // Half-warp groups with their own masks, concurrently.
  const unsigned half_mask = lane < 16 ? 0x0000FFFFu : 0xFFFF0000u;
  const int half_sum = __shfl_xor_sync(half_mask, lane, 8, 16) + lane;
  out[t * 8 + 0] = v;
  out[t * 8 + 1] = down;
  out[t * 8 + 2] = up;
  out[t * 8 + 3] = bcast;
  out[t * 8 + 4] = static_cast<int>(odd);
  out[t * 8 + 5] = any7;
  out[t * 8 + 6] = all_small;
  out[t * 8 + 7] = half_sum;
}

// Block reduction through static shared memory and __syncthreads, plus an atomicAdd per block.
__global__ void shared_atomic_kernel(const float* x, float* block_sums, float* total, int* count) {
  FASTGPT_SHARED(float, partial, 256);
  FASTGPT_SHARED(int, flag, 1);  // second declaration: its own slice of the arena
  const int t = threadIdx.x;
  partial[t] = x[blockIdx.x * 256 + t];
  if (t == 0) flag[0] = 7;
  __syncthreads();
  for (int s = 128; s > 0; s /= 2) {
    if (t < s) partial[t] += partial[t + s];
    __syncthreads();
  }
  if (t == 0) block_sums[blockIdx.x] = partial[0] + static_cast<float>(flag[0] - 7);
  atomicAdd(total, x[blockIdx.x * 256 + t]);
  atomicAdd(count, 1);
}

// Dynamic shared memory and a 2-D block: reverse a row through shared memory.
__global__ void dynamic_shared_kernel(const float* x, float* y) {
  FASTGPT_DYNAMIC_SHARED(float, buf);
  const int t = threadIdx.y * blockDim.x + threadIdx.x, n = blockDim.x * blockDim.y;
  buf[t] = x[t];
  __syncthreads();
  y[t] = buf[n - 1 - t];
}

// One 16x16x16 wmma product by one warp: C = A (row-major) · B (col-major) + 1.
template <typename T>
__global__ void wmma_kernel(const T* a, const T* b, float* c) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 1.0f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
}

// ---- kernels that must fail ----
__global__ void exit_before_barrier_kernel(int* out) {
  if (threadIdx.x == 5) return;  // skips the barrier the others wait at
  __syncthreads();
  out[threadIdx.x] = 1;
}
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}
__global__ void shuffle_exited_lane_kernel(int* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, static_cast<int>(threadIdx.x), 1);
}
__global__ void mixed_warp_ops_kernel(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, static_cast<int>(threadIdx.x), 1);
  else out[threadIdx.x] = static_cast<int>(__ballot_sync(0xFFFFFFFFu, 1));
}
__global__ void spin_forever_kernel(int* out) {
  if (threadIdx.x == 0) {
    volatile int forever = 1;
    while (forever) {
    }
  }
  __syncthreads();
  out[threadIdx.x] = 1;
}
__global__ void bad_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000FFFFu, static_cast<int>(threadIdx.x), 1);  // lanes 16+ not in it
}

int run_passing() {
  {
    std::vector<int> out(96 * 8);
    launch(warp_ops_kernel, dim3(1), dim3(96), 0, nullptr, out.data());
    bool ok = true;
    for (int t = 0; t < 96; ++t) {
      const int lane = t % 32, w = t / 32;
      const int* o = &out[t * 8];
      ok &= o[0] == 32 * 32 * w + 31 * 32 / 2;
      ok &= o[1] == (lane == 31 ? t : t + 1);
      ok &= o[2] == (lane < 2 ? t : t - 2);
      ok &= o[3] == (32 * w + 3) * 10;
      ok &= static_cast<unsigned>(o[4]) == 0xAAAAAAAAu;
      ok &= o[5] == 1 && o[6] == 0;
      ok &= o[7] == lane + (lane ^ 8);
    }
    check(ok, "shuffles (xor, down, up, broadcast), ballot/any/all, half-warp masks");
  }
  {
    const int blocks = 3;
    std::vector<float> x(blocks * 256), sums(blocks);
    for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 17);
    float total = 0;
    int count = 0;
    launch(shared_atomic_kernel, dim3(blocks), dim3(256), 0, nullptr, x.data(), sums.data(), &total, &count);
    bool ok = count == blocks * 256;
    double all = 0;
    for (int b = 0; b < blocks; ++b) {
      double s = 0;
      for (int t = 0; t < 256; ++t) s += x[b * 256 + t];
      ok &= sums[b] == static_cast<float>(s);
      all += s;
    }
    ok &= total == static_cast<float>(all);
    check(ok, "static shared memory (two declarations), __syncthreads tree reduction, atomicAdd");
  }
  {
    std::vector<float> x(8 * 4), y(8 * 4);
    for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i);
    launch(dynamic_shared_kernel, dim3(1), dim3(8, 4), x.size() * sizeof(float), nullptr, x.data(), y.data());
    bool ok = true;
    for (size_t i = 0; i < y.size(); ++i) ok &= y[i] == x[x.size() - 1 - i];
    check(ok, "dynamic shared memory, 2-D block");
  }
  {
    std::vector<__half> a(256), b(256);
    std::vector<__nv_bfloat16> ab(256), bb(256);
    std::vector<float> fa(256), fb(256), c(256), cb(256);
    for (int i = 0; i < 256; ++i) {
      fa[i] = static_cast<float>((i * 7) % 11) - 5.0f;
      fb[i] = static_cast<float>((i * 5) % 13) * 0.25f;
      a[i] = __float2half(fa[i]), b[i] = __float2half(fb[i]);
      ab[i] = __float2bfloat16(fa[i]), bb[i] = __float2bfloat16(fb[i]);
    }
    launch(wmma_kernel<__half>, dim3(1), dim3(32), 0, nullptr, a.data(), b.data(), c.data());
    launch(wmma_kernel<__nv_bfloat16>, dim3(1), dim3(32), 0, nullptr, ab.data(), bb.data(), cb.data());
    bool ok = true;
    for (int r = 0; r < 16; ++r) {
      for (int col = 0; col < 16; ++col) {
        double s = 1.0;
        for (int k = 0; k < 16; ++k) s += double(fa[r * 16 + k]) * fb[col * 16 + k];  // B col-major
        ok &= c[r * 16 + col] == static_cast<float>(s) && cb[r * 16 + col] == static_cast<float>(s);
      }
    }
    check(ok, "wmma 16x16x16 half and bf16, float accumulators");
  }
  {
    bool ok = __half2float(__float2half(1.0f + 1.0f / 2048)) == 1.0f &&               // tie to even
              __half2float(__float2half(1.0f + 3.0f / 2048)) == 1.0f + 2.0f / 1024 &&  // tie to even (up)
              __bfloat162float(__float2bfloat16(1.0f + 1.0f / 256)) == 1.0f &&
              __bfloat162float(__float2bfloat16(1.0f + 3.0f / 256)) == 1.0f + 1.0f / 64 &&
              std::isinf(__half2float(__float2half(70000.0f)));
    check(ok, "16-bit conversions round to nearest even");
  }
  return failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return run_passing();
  const std::string which = argv[1];
  std::vector<int> out(64);
  try {
    if (which == "exit_before_barrier") launch(exit_before_barrier_kernel, dim3(2), dim3(64), 0, nullptr, out.data());
    else if (which == "divergent_barrier") launch(divergent_barrier_kernel, dim3(1), dim3(64), 0, nullptr, out.data());
    else if (which == "shuffle_exited_lane") launch(shuffle_exited_lane_kernel, dim3(1), dim3(32), 0, nullptr, out.data());
    else if (which == "mixed_warp_ops") launch(mixed_warp_ops_kernel, dim3(1), dim3(32), 0, nullptr, out.data());
    else if (which == "spin_forever") launch(spin_forever_kernel, dim3(1), dim3(32), 0, nullptr, out.data());
    else if (which == "bad_mask") launch(bad_mask_kernel, dim3(1), dim3(32), 0, nullptr, out.data());
    else {
      std::fprintf(stderr, "unknown case %s\n", which.c_str());
      return 2;
    }
  } catch (const fastgpt::cuda::emu::KernelError& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 3;
  }
  std::fprintf(stderr, "%s: the launch did not fail\n", which.c_str());
  return 0;
}
