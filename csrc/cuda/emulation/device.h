// The device side of the emulation: CUDA's keywords, built-in variables, vector and 16-bit float
// types, conversion and math intrinsics, warp shuffles and votes, atomics. Host C++20; included
// through csrc/cuda/compat.h when the compiler is not nvcc.
#pragma once

#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <source_location>

#include "runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)

// Built-in variables: this thread's coordinates in the running launch.
#define threadIdx (::fastgpt::cuda::emu::ctx().thread_idx)
#define blockIdx (::fastgpt::cuda::emu::ctx().block_idx)
#define blockDim (::fastgpt::cuda::emu::ctx().block_dim)
#define gridDim (::fastgpt::cuda::emu::ctx().grid_dim)

// ---- vector types (the alignment is what makes a 128-bit load one instruction on the GPU) ----
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// ---- 16-bit floats: storage types, conversions round to nearest even as on the GPU ----
struct alignas(2) __half {
  uint16_t bits;
};
struct alignas(2) __nv_bfloat16 {
  uint16_t bits;
};
struct alignas(4) __half2 { __half x, y; };
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
using half = __half;
using nv_bfloat16 = __nv_bfloat16;

inline float __half2float(__half h) {
  _Float16 f;  // g++ 12 on x86-64: IEEE binary16 with exact conversions
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float x) {
  const _Float16 f = static_cast<_Float16>(x);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline __half __float2half(float x) { return __float2half_rn(x); }
inline float __bfloat162float(__nv_bfloat16 h) { return std::bit_cast<float>(static_cast<uint32_t>(h.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  const uint32_t u = std::bit_cast<uint32_t>(x);
  if (std::isnan(x)) return {static_cast<uint16_t>((u >> 16) | 0x40)};  // stays a (quiet) NaN
  return {static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float x) { return __float2bfloat16_rn(x); }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline __half2 __float22half2_rn(float2 f) { return {__float2half_rn(f.x), __float2half_rn(f.y)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {__bfloat162float(h.x), __bfloat162float(h.y)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return {__float2bfloat16_rn(f.x), __float2bfloat16_rn(f.y)}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline __half __ushort_as_half(unsigned short u) { return {u}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return {u}; }

// ---- math and bit intrinsics (exact host versions: see "cannot show" in runtime.h) ----
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline int __popc(unsigned x) { return std::popcount(x); }
inline int __ffs(unsigned x) { return x == 0 ? 0 : std::countr_zero(x) + 1; }
inline int __clz(unsigned x) { return std::countl_zero(x); }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t{a} * b) >> 32); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
// expf, fmaxf, fminf, fabsf, sqrtf, logf: the C library's, from <cmath>, in the global namespace.

// ---- barriers, shuffles, votes: all through the exchanges of runtime.h ----
inline void __syncthreads(std::source_location site = std::source_location::current()) {
  ::fastgpt::cuda::emu::syncthreads(site);
}
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu, std::source_location site = std::source_location::current()) {
  ::fastgpt::cuda::emu::warp_exchange<int>(mask, 0, "__syncwarp", site);
}

namespace fastgpt::cuda::emu {
// The source lane of a shuffle inside its `width`-lane segment, or -1: keep the own value.
inline int shuffle_source(int lane, int src, int width) {
  const int base = lane / width * width;
  return (src < base || src >= base + width) ? -1 : src;
}
template <typename T>
T shuffle(unsigned mask, T var, int src, const char* op, const std::source_location& site) {
  const auto all = warp_exchange<T>(mask, var, op, site);
  if (src < 0) return var;
  if (!(mask >> src & 1u)) {
    fail(*ctx().block, std::string(op) + " at " + site_str(site.file_name(), site.line()) + ": lane " +
                           std::to_string(ctx().lane) + " reads lane " + std::to_string(src) +
                           ", which is not in the mask");
  }
  return all[src];
}
}  // namespace fastgpt::cuda::emu

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
              std::source_location site = std::source_location::current()) {
  const int lane = ::fastgpt::cuda::emu::ctx().lane;
  const int src = lane / width * width + (src_lane % width + width) % width;
  return ::fastgpt::cuda::emu::shuffle(mask, var, src, "__shfl_sync", site);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  std::source_location site = std::source_location::current()) {
  const int lane = ::fastgpt::cuda::emu::ctx().lane;
  const int src = ::fastgpt::cuda::emu::shuffle_source(lane, lane ^ lane_mask, width);
  return ::fastgpt::cuda::emu::shuffle(mask, var, src, "__shfl_xor_sync", site);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   std::source_location site = std::source_location::current()) {
  const int lane = ::fastgpt::cuda::emu::ctx().lane;
  const int src = ::fastgpt::cuda::emu::shuffle_source(lane, lane + static_cast<int>(delta), width);
  return ::fastgpt::cuda::emu::shuffle(mask, var, src, "__shfl_down_sync", site);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 std::source_location site = std::source_location::current()) {
  const int lane = ::fastgpt::cuda::emu::ctx().lane;
  const int src = ::fastgpt::cuda::emu::shuffle_source(lane, lane - static_cast<int>(delta), width);
  return ::fastgpt::cuda::emu::shuffle(mask, var, src, "__shfl_up_sync", site);
}
inline unsigned __ballot_sync(unsigned mask, int pred, std::source_location site = std::source_location::current()) {
  const auto all = ::fastgpt::cuda::emu::warp_exchange<int>(mask, pred != 0, "__ballot_sync", site);
  unsigned out = 0;
  for (int l = 0; l < 32; ++l) out |= ((mask >> l & 1u) && all[l]) ? 1u << l : 0u;
  return out;
}
inline int __any_sync(unsigned mask, int pred, std::source_location site = std::source_location::current()) {
  return __ballot_sync(mask, pred, site) != 0;
}
inline int __all_sync(unsigned mask, int pred, std::source_location site = std::source_location::current()) {
  return __ballot_sync(mask, pred, site) == mask;
}

// ---- atomics: relaxed, as CUDA's atomicAdd (they order no other memory) ----
template <typename T>
T atomicAdd(T* address, T val) {
  return std::atomic_ref<T>(*address).fetch_add(val, std::memory_order_relaxed);
}
template <typename T>
T atomicMax(T* address, T val) {
  std::atomic_ref<T> a(*address);
  T old = a.load(std::memory_order_relaxed);
  while (old < val && !a.compare_exchange_weak(old, val, std::memory_order_relaxed)) {
  }
  return old;
}
template <typename T>
T atomicCAS(T* address, T compare, T val) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, val, std::memory_order_relaxed);
  return compare;
}
template <typename T>
T atomicExch(T* address, T val) {
  return std::atomic_ref<T>(*address).exchange(val, std::memory_order_relaxed);
}

// ---- shared memory (see FASTGPT_SHARED in compat.h) ----
#define FASTGPT_SHARED(type, name, count) type* const name = ::fastgpt::cuda::emu::shared_array<type>(count)
#define FASTGPT_SHARED_2D(type, name, rows, cols) \
  type(*const name)[cols] = reinterpret_cast<type(*)[cols]>(::fastgpt::cuda::emu::shared_array<type>((rows) * (cols)))
#define FASTGPT_DYNAMIC_SHARED(type, name) type* const name = ::fastgpt::cuda::emu::dynamic_shared<type>()
