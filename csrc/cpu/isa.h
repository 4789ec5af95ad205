// Process-wide switches over the optional instruction sets of the CPU kernels, owned by Python
// (fastgpt.ext.ops.cpu_isa and cpu_isa_settings, through the op set_cpu_isa). Each switch only
// narrows: a kernel uses a feature where this CPU and build have it and its switch is on, which is
// the default. Turning one off runs the other variant of the same kernel in the same process, so a
// benchmark or a parity test can compare the two on one machine.
//
//   amx         AMX-BF16 tiles for the bfloat16 products (amx_matmul.h, attention_flash_amx.h); off,
//               they run as float32 GEMMs on converted tiles and bfloat16 attention is materialised.
//   avx512bf16  AVX512-BF16's float -> bfloat16 conversion in the bfloat16 flash kernels' loops
//               (attention_flash_amx.cpp); off, ATen's integer rounding, which gives the same bits.
//
// The kernels read a switch once per call of an op, so flip them between calls, not while another
// thread runs a kernel.
#pragma once

#include <atomic>
#include <optional>
#include <tuple>

#include <ATen/native/CPUBlas.h>

namespace fastgpt::cpu::isa {

inline std::atomic<bool> amx_on{true};
inline std::atomic<bool> avx512bf16_on{true};

// Whether ATen's brgemm runs bfloat16 on AMX-BF16 tiles on this CPU.
inline bool has_amx() {
  static const bool has = at::native::cpublas::could_pack(at::kBFloat16);
  return has;
}

// Whether this build's kernels can use AVX512-BF16 here: they emit it only in the AVX512 build.
inline bool has_avx512bf16() {
#if defined(CPU_CAPABILITY_AVX512)
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

inline bool use_amx() { return amx_on.load(std::memory_order_relaxed) && has_amx(); }
inline bool use_avx512bf16() { return avx512bf16_on.load(std::memory_order_relaxed) && has_avx512bf16(); }

// The op set_cpu_isa: sets the switches given (None leaves one as it is) and returns the previous
// (amx, avx512bf16); with no arguments, a read.
inline std::tuple<bool, bool> set_switches(std::optional<bool> amx, std::optional<bool> avx512bf16) {
  const bool old_amx = amx ? amx_on.exchange(*amx) : amx_on.load();
  const bool old_bf16 = avx512bf16 ? avx512bf16_on.exchange(*avx512bf16) : avx512bf16_on.load();
  return {old_amx, old_bf16};
}

// The op cpu_isa_available: (amx, avx512bf16) that this CPU and build have, whatever the switches.
inline std::tuple<bool, bool> available() { return {has_amx(), has_avx512bf16()}; }

}  // namespace fastgpt::cpu::isa
