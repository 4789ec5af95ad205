// The SIMT emulation's runtime: blocks, threads, __syncthreads, the warp exchange, shared memory
// and the launcher. Host C++20 only, used only by tests (tests/cuda_emulation/); kernels never
// include this file directly, they include csrc/cuda/compat.h.
//
// Model: the blocks of a grid run one after another; the threads of a block run as real
// std::threads (one per CUDA thread, reused from block to block), released in a shuffled order.
//   __syncthreads    a barrier of the block (mutex + condition variable, so ThreadSanitizer sees
//                    the happens-before edge it creates and no other)
//   shuffles, votes  an exchange per (warp, mask): each lane posts its value, the last lane to
//                    arrive publishes all of them; a per-warp mutex, so lanes of *different* warps
//                    get no happens-before edge from a shuffle
//   deadlock         every thread is either running, waiting (barrier or warp exchange) or exited;
//                    when all live threads wait, nothing can ever release them: the launch stops
//                    with a message naming who waits where and who exited (no hang). Divergent
//                    __syncthreads (two call sites in one barrier round) is reported the same way.
//                    A thread spinning forever is caught by a timeout (FASTGPT_EMU_WATCHDOG_S
//                    seconds; its default is where it is read, below): message, then exit code 124.
//
// What the emulation CANNOT show (test on a GPU for these):
//   * memory ordering weaker than x86-TSO: a missing __threadfence / volatile / fence that only
//     bites on the GPU's relaxed memory model runs correctly here;
//   * races between blocks: blocks run in turn, and the launcher orders them;
//   * intra-warp races hidden by a shuffle or vote: here every warp op orders memory between the
//     lanes of its mask (on hardware only __syncwarp and __syncthreads do);
//   * timing, occupancy, bank conflicts, coalescing, register pressure, spills (the nvcc check does
//     the last two);
//   * floating point as the GPU computes it: __expf is expf here (the GPU's is ex2.approx based,
//     ~2 ulp), nvcc contracts a*b+c into FMA where g++ -O1 may not, wmma sums in another order;
//   * warp-synchronous code without _sync intrinsics (lanes are independent threads here, as on
//     Volta+ with independent thread scheduling, which is the right model for sm_80/sm_90).
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <source_location>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;
constexpr int warpSize = 32;

namespace fastgpt::cuda::emu {

constexpr size_t kStaticSharedBytes = 48 * 1024;   // the static __shared__ limit per block
constexpr size_t kMaxDynamicSharedBytes = 227 * 1024;  // sm_90's opt-in maximum
constexpr int kMaxThreadsPerBlock = 1024;

// A launch that failed inside the emulation: deadlock, divergent barrier, bad warp mask, shared
// memory overflow, an exception thrown by a kernel thread.
struct KernelError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Thrown into a kernel thread to unwind it once its block has failed.
struct BlockAborted {};

enum class Where : uint8_t { kRunning, kSyncthreads, kWarpOp, kExited };

// What one thread is doing, read only to explain a failure (relaxed atomics: no happens-before).
struct ThreadState {
  std::atomic<Where> where{Where::kRunning};
  std::atomic<const char*> file{""};
  std::atomic<unsigned> line{0};
  std::atomic<uint32_t> mask{0};
};

// One warp-level exchange among the lanes of `mask` (a shuffle, vote or __syncwarp).
struct WarpGroup {
  using Slot = std::array<unsigned char, 16>;
  uint32_t arrived = 0;
  uint64_t generation = 0;
  const char* op = "";  // the op of the round under way: every lane of the mask must call the same
  std::array<Slot, 32> posted{}, published{};
};

struct Warp {
  std::mutex m;
  std::condition_variable cv;
  std::map<uint32_t, WarpGroup> groups;  // by mask
  uint32_t exited = 0;                    // lanes that have left the kernel
};

struct Block {
  dim3 dim, grid, idx;
  int nthreads = 0, nwarps = 0;
  // waiting (low 32 bits) and alive (high 32 bits) threads in one word: one modification order,
  // so "every live thread waits" is read exactly; relaxed, so it orders no kernel memory.
  std::atomic<uint64_t> census{0};
  std::atomic<bool> aborted{false};
  std::mutex error_m;
  std::string error;
  // __syncthreads
  std::mutex bar_m;
  std::condition_variable bar_cv;
  int bar_arrived = 0;
  uint64_t bar_generation = 0;
  std::source_location bar_site;
  std::unique_ptr<Warp[]> warps;
  std::unique_ptr<ThreadState[]> threads;
  std::vector<unsigned char> shared;  // static arena, then the dynamic region
  size_t dynamic_bytes = 0;
  unsigned seed = 0;
};

struct ThreadCtx {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  Block* block = nullptr;
  int tid = 0, lane = 0, warp = 0;
  size_t shared_cursor = 0;
};

inline thread_local ThreadCtx* t_ctx = nullptr;

inline ThreadCtx& ctx() {
  if (t_ctx == nullptr) {
    std::fputs("fastgpt emulation: a CUDA built-in was used outside an emulated kernel launch\n", stderr);
    std::abort();
  }
  return *t_ctx;
}

inline std::string dim_str(dim3 d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

inline dim3 unflatten(int t, dim3 d) {
  return dim3(t % d.x, (t / d.x) % d.y, t / (d.x * d.y));
}

inline std::string site_str(const char* file, unsigned line) {
  std::string f = file;
  const size_t slash = f.find_last_of('/');
  return (slash == std::string::npos ? f : f.substr(slash + 1)) + ":" + std::to_string(line);
}

// "12 threads wait at __syncthreads (k.cuh:40); 1 exited: (5,0,0)": who is where, grouped.
inline std::string describe(Block& b) {
  std::map<std::string, std::vector<int>> by_state;
  for (int t = 0; t < b.nthreads; ++t) {
    const ThreadState& s = b.threads[t];
    const char* file = s.file.load(std::memory_order_relaxed);
    const unsigned line = s.line.load(std::memory_order_relaxed);
    std::string key;
    switch (s.where.load(std::memory_order_relaxed)) {
      case Where::kRunning: key = "running"; break;
      case Where::kExited: key = "exited"; break;
      case Where::kSyncthreads: key = "wait at __syncthreads (" + site_str(file, line) + ")"; break;
      case Where::kWarpOp: {
        char mask[16];
        std::snprintf(mask, sizeof mask, "%#x", s.mask.load(std::memory_order_relaxed));
        key = "wait at a warp op, mask " + std::string(mask) + " (" + site_str(file, line) + ")";
        break;
      }
    }
    by_state[key].push_back(t);
  }
  std::ostringstream out;
  for (auto& [key, tids] : by_state) {
    out << "\n    " << tids.size() << " thread(s) " << key << ":";
    for (size_t i = 0; i < std::min<size_t>(tids.size(), 8); ++i) out << " " << dim_str(unflatten(tids[i], b.dim));
    if (tids.size() > 8) out << " ...";
  }
  return out.str();
}

// Records the block's first error, wakes every waiter (they unwind with BlockAborted).
inline void abort_block(Block& b, const std::string& what) {
  {
    std::lock_guard lk(b.error_m);
    if (b.error.empty()) {
      b.error = "block " + dim_str(b.idx) + " of grid " + dim_str(b.grid) + ", block " + dim_str(b.dim) +
                " (lane start order seed " + std::to_string(b.seed) + "): " + what + describe(b);
    }
  }
  b.aborted.store(true);
  { std::lock_guard lk(b.bar_m); }
  b.bar_cv.notify_all();
  for (int w = 0; w < b.nwarps; ++w) {
    { std::lock_guard lk(b.warps[w].m); }
    b.warps[w].cv.notify_all();
  }
}

[[noreturn]] inline void fail(Block& b, const std::string& what) {
  abort_block(b, what);
  throw BlockAborted{};
}

constexpr uint64_t kOneAlive = uint64_t{1} << 32;
inline bool all_wait(uint64_t census) { return census != 0 && (census & 0xFFFFFFFFu) == (census >> 32); }

// Waits for pred under lk; unwinds if the block fails; exits the process if nothing moves for
// the watchdog's time (a thread spinning forever cannot be released).
template <typename Pred>
void wait_for(Block& b, std::unique_lock<std::mutex>& lk, std::condition_variable& cv, Pred pred) {
  static const double limit_s = [] {
    const char* env = std::getenv("FASTGPT_EMU_WATCHDOG_S");
    return env != nullptr ? std::atof(env) : 60.0;
  }();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(limit_s);
  while (!pred()) {
    if (b.aborted.load()) throw BlockAborted{};
    if (cv.wait_until(lk, deadline) == std::cv_status::timeout && !pred() && !b.aborted.load()) {
      std::fprintf(stderr,
                   "fastgpt emulation watchdog: no progress for %.0f s in block %s (a thread spins "
                   "forever or waits on something the emulation does not model):%s\n",
                   limit_s, dim_str(b.idx).c_str(), describe(b).c_str());
      std::fflush(stderr);
      std::_Exit(124);
    }
  }
}

inline void set_state(ThreadState& s, Where where, const std::source_location& site, uint32_t mask = 0) {
  s.file.store(site.file_name(), std::memory_order_relaxed);
  s.line.store(site.line(), std::memory_order_relaxed);
  s.mask.store(mask, std::memory_order_relaxed);
  s.where.store(where, std::memory_order_relaxed);
}

// __syncthreads(): every thread of the block, at the same call site.
inline void syncthreads(const std::source_location& site) {
  ThreadCtx& c = ctx();
  Block& b = *c.block;
  if (b.aborted.load()) throw BlockAborted{};
  std::unique_lock lk(b.bar_m);
  if (b.bar_arrived > 0 && (b.bar_site.line() != site.line() ||
                            std::strcmp(b.bar_site.file_name(), site.file_name()) != 0)) {
    set_state(b.threads[c.tid], Where::kSyncthreads, site);
    lk.unlock();
    fail(b, "divergent __syncthreads: this round began at " + site_str(b.bar_site.file_name(), b.bar_site.line()) +
                ", thread " + dim_str(c.thread_idx) + " arrived at " + site_str(site.file_name(), site.line()));
  }
  if (b.bar_arrived == 0) b.bar_site = site;
  if (++b.bar_arrived == b.nthreads) {  // the last one releases the others
    b.bar_arrived = 0;
    ++b.bar_generation;
    b.census.fetch_sub(static_cast<uint64_t>(b.nthreads - 1), std::memory_order_relaxed);
    b.bar_cv.notify_all();
    return;
  }
  set_state(b.threads[c.tid], Where::kSyncthreads, site);
  if (all_wait(b.census.fetch_add(1, std::memory_order_relaxed) + 1)) {
    lk.unlock();
    fail(b, "deadlock at __syncthreads: every live thread waits, some thread will never arrive");
  }
  const uint64_t gen = b.bar_generation;
  wait_for(b, lk, b.bar_cv, [&] { return b.bar_generation != gen; });
  set_state(b.threads[c.tid], Where::kRunning, site);
}

// The warp exchange behind every shuffle, vote and __syncwarp: posts this lane's value, returns
// the values of all lanes of `mask` once they have all arrived.
template <typename T>
std::array<T, 32> warp_exchange(uint32_t mask, const T& value, const char* op, const std::source_location& site) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>, "warp ops move at most 16 bytes");
  ThreadCtx& c = ctx();
  Block& b = *c.block;
  if (b.aborted.load()) throw BlockAborted{};
  const int lanes_here = std::min(32, b.nthreads - 32 * c.warp);
  const uint32_t existing = lanes_here == 32 ? 0xFFFFFFFFu : (1u << lanes_here) - 1;
  Warp& w = b.warps[c.warp];
  std::unique_lock lk(w.m);
  char buf[256];
  if (!(mask >> c.lane & 1u) || (mask & ~existing) != 0 || (mask & w.exited) != 0) {
    std::snprintf(buf, sizeof buf, "%s at %s: lane %d passes mask %#x, which must hold the lane itself and only lanes that exist and have not exited (lanes of this warp: %#x, exited: %#x)", op,
                  site_str(site.file_name(), site.line()).c_str(), c.lane, mask, existing, w.exited);
    lk.unlock();
    fail(b, buf);
  }
  WarpGroup& g = w.groups[mask];
  if (g.arrived == 0) {
    g.op = op;
  } else if (std::strcmp(g.op, op) != 0) {
    std::snprintf(buf, sizeof buf, "lanes of mask %#x meet at different warp ops: %s and %s (at %s)", mask, g.op, op,
                  site_str(site.file_name(), site.line()).c_str());
    lk.unlock();
    fail(b, buf);
  }
  std::memcpy(g.posted[c.lane].data(), &value, sizeof(T));
  std::array<T, 32> out{};
  auto read = [&] {
    for (int l = 0; l < 32; ++l) {
      if (mask >> l & 1u) std::memcpy(&out[l], g.published[l].data(), sizeof(T));
    }
  };
  if (++g.arrived == static_cast<uint32_t>(std::popcount(mask))) {
    g.published = g.posted;
    g.arrived = 0;
    ++g.generation;
    b.census.fetch_sub(static_cast<uint64_t>(std::popcount(mask) - 1), std::memory_order_relaxed);
    w.cv.notify_all();
    read();
    return out;
  }
  set_state(b.threads[c.tid], Where::kWarpOp, site, mask);
  if (all_wait(b.census.fetch_add(1, std::memory_order_relaxed) + 1)) {
    lk.unlock();
    std::snprintf(buf, sizeof buf, "deadlock at %s: every live thread waits", op);
    fail(b, buf);
  }
  const uint64_t gen = g.generation;
  wait_for(b, lk, w.cv, [&] { return g.generation != gen; });
  set_state(b.threads[c.tid], Where::kRunning, site);
  read();
  return out;
}

// Static shared memory: the k-th declaration a thread executes gets the k-th slice of the block's
// arena, so the same declarations in the same order give every thread the same address.
template <typename T>
T* shared_array(size_t count) {
  ThreadCtx& c = ctx();
  const size_t align = std::max<size_t>(alignof(T), 16);
  const size_t begin = (c.shared_cursor + align - 1) / align * align;
  c.shared_cursor = begin + count * sizeof(T);
  if (c.shared_cursor > kStaticSharedBytes) {
    fail(*c.block, "static shared memory of " + std::to_string(c.shared_cursor) + " bytes is over the " +
                       std::to_string(kStaticSharedBytes) + "-byte limit");
  }
  return reinterpret_cast<T*>(c.block->shared.data() + begin);
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(ctx().block->shared.data() + kStaticSharedBytes);
}

// Runs `body` as every thread of every block of the grid. Throws KernelError on failure.
inline void run_grid(dim3 grid, dim3 block_dim, size_t shared_bytes, const std::function<void()>& body) {
  const long long nthreads = 1LL * block_dim.x * block_dim.y * block_dim.z;
  if (nthreads < 1 || nthreads > kMaxThreadsPerBlock) {
    throw KernelError("launch: block " + dim_str(block_dim) + " has " + std::to_string(nthreads) +
                      " threads; CUDA allows 1 to " + std::to_string(kMaxThreadsPerBlock));
  }
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535) {
    throw KernelError("launch: grid " + dim_str(grid) + " is empty or over CUDA's limits (y, z <= 65535)");
  }
  if (shared_bytes > kMaxDynamicSharedBytes) {
    throw KernelError("launch: " + std::to_string(shared_bytes) + " bytes of dynamic shared memory is over " +
                      std::to_string(kMaxDynamicSharedBytes));
  }
  static std::atomic<unsigned> launches{0};
  unsigned seed;
  if (const char* env = std::getenv("FASTGPT_EMU_SEED")) seed = static_cast<unsigned>(std::strtoul(env, nullptr, 10));
  else seed = std::random_device{}();
  seed += launches.fetch_add(1);
  std::mt19937 rng(seed);

  Block b;
  b.dim = block_dim, b.grid = grid, b.seed = seed;
  b.nthreads = static_cast<int>(nthreads);
  b.nwarps = (b.nthreads + 31) / 32;
  b.warps = std::make_unique<Warp[]>(b.nwarps);
  b.threads = std::make_unique<ThreadState[]>(b.nthreads);
  b.dynamic_bytes = shared_bytes;
  b.shared.resize(kStaticSharedBytes + shared_bytes);

  // The worker pool: one std::thread per CUDA thread, released block after block through its gate.
  struct Gate {
    std::mutex m;
    std::condition_variable cv;
    uint64_t round = 0;
  };
  std::vector<Gate> gates(b.nthreads);
  std::mutex done_m;
  std::condition_variable done_cv;
  int done = 0;
  bool stop = false;
  std::vector<std::thread> workers;
  workers.reserve(b.nthreads);
  for (int t = 0; t < b.nthreads; ++t) {
    workers.emplace_back([&, t] {
      ThreadCtx c;
      c.block = &b, c.tid = t, c.lane = t % 32, c.warp = t / 32;
      c.block_dim = block_dim, c.grid_dim = grid, c.thread_idx = unflatten(t, block_dim);
      for (uint64_t round = 1;; ++round) {
        {
          std::unique_lock lk(gates[t].m);
          gates[t].cv.wait(lk, [&] { return gates[t].round >= round; });
          if (stop) return;
        }
        c.block_idx = b.idx;
        c.shared_cursor = 0;
        t_ctx = &c;
        try {
          body();
        } catch (const BlockAborted&) {
        } catch (const std::exception& e) {
          abort_block(b, "thread " + dim_str(c.thread_idx) + " threw: " + e.what());
        }
        t_ctx = nullptr;
        // Exit: this lane leaves its warp; if every live thread now waits, nothing will free them.
        {
          std::lock_guard lk(b.warps[c.warp].m);
          b.warps[c.warp].exited |= 1u << c.lane;
        }
        b.threads[t].where.store(Where::kExited, std::memory_order_relaxed);
        const uint64_t census = b.census.fetch_sub(kOneAlive, std::memory_order_relaxed) - kOneAlive;
        if (all_wait(census) && !b.aborted.load()) {
          abort_block(b, "deadlock: thread " + dim_str(c.thread_idx) +
                             " exited while the others wait for it (a __syncthreads or warp op it skipped)");
        }
        std::lock_guard lk(done_m);
        if (++done == b.nthreads) done_cv.notify_one();
      }
    });
  }

  std::vector<int> order(b.nthreads);
  for (int t = 0; t < b.nthreads; ++t) order[t] = t;
  uint64_t round = 0;
  for (unsigned bz = 0; bz < grid.z && !b.aborted.load(); ++bz) {
    for (unsigned by = 0; by < grid.y && !b.aborted.load(); ++by) {
      for (unsigned bx = 0; bx < grid.x && !b.aborted.load(); ++bx) {
        // Fresh block state; all workers are parked at their gates.
        b.idx = dim3(bx, by, bz);
        b.census.store(kOneAlive * static_cast<uint64_t>(b.nthreads), std::memory_order_relaxed);
        b.bar_arrived = 0;
        for (int w = 0; w < b.nwarps; ++w) b.warps[w].groups.clear(), b.warps[w].exited = 0;
        for (int t = 0; t < b.nthreads; ++t) b.threads[t].where.store(Where::kRunning, std::memory_order_relaxed);
        std::memset(b.shared.data(), 0xFF, b.shared.size());  // NaN / -1: uninitialised reads show
        done = 0;
        ++round;
        std::shuffle(order.begin(), order.end(), rng);
        for (int t : order) {
          {
            std::lock_guard lk(gates[t].m);
            gates[t].round = round;
          }
          gates[t].cv.notify_one();
        }
        std::unique_lock lk(done_m);
        done_cv.wait(lk, [&] { return done == b.nthreads; });
      }
    }
  }
  stop = true;
  for (int t = 0; t < b.nthreads; ++t) {
    {
      std::lock_guard lk(gates[t].m);
      gates[t].round = round + 1;
    }
    gates[t].cv.notify_one();
  }
  for (auto& w : workers) w.join();
  if (b.aborted.load()) throw KernelError("fastgpt emulation: " + b.error);
}

}  // namespace fastgpt::cuda::emu
