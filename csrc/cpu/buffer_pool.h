// A small cache of the large buffers that hold causal matrices (B, H, T, T).
//
// Why: a fresh multi-megabyte buffer comes from mmap, and the OS zeroes and maps every page on
// first touch, which can cost as much as the GEMM that fills the buffer (more with 4 KiB pages than
// with 2 MiB huge pages). Training allocates the same
// few sizes every step (S, P, dP, dS per layer), so freed buffers are kept and handed out again,
// already mapped; kernels write every element, zeros above the diagonal included.
//
// Bounded: at most FASTGPT_EXT_CACHE_MB (default 1024) of free buffers are kept; 0 disables the
// cache. torch.ops.fastgpt.empty_cache() returns them all to the OS.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastgpt::cpu {

class BufferPool {
 public:
  static BufferPool& instance() {
    static BufferPool* pool = new BufferPool();  // never destroyed: tensors may outlive statics at exit
    return *pool;
  }

  // An uninitialised tensor of `sizes`; large ones from the cache or a fresh huge-page mapping.
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__)
    int64_t numel = 1;
    for (int64_t s : sizes) numel *= s;
    const size_t nbytes = static_cast<size_t>(numel) * options.dtype().itemsize();
    if (nbytes >= kMinBytes) {
      const size_t len = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
      void* data = take(len);
      if (data == nullptr) data = map(len);
      if (data != nullptr) {
        return at::from_blob(data, sizes, [len](void* p) { BufferPool::instance().give_back(p, len); }, options);
      }
    }
#endif
    return at::empty(sizes, options);
  }

  void empty_cache() {
    std::lock_guard<std::mutex> guard(mutex_);
    for (auto& [len, p] : free_) unmap(p, len);
    free_.clear();
    cached_bytes_ = 0;
  }

 private:
  static constexpr size_t kHugePage = size_t{2} << 20;
  static constexpr size_t kMinBytes = size_t{4} << 20;  // smaller ones: malloc recycles them anyway

  BufferPool() {
    const char* env = std::getenv("FASTGPT_EXT_CACHE_MB");
    limit_bytes_ = (env != nullptr ? std::strtoull(env, nullptr, 10) : 1024ull) << 20;
  }

  void* take(size_t len) {
    std::lock_guard<std::mutex> guard(mutex_);
    auto it = free_.find(len);
    if (it == free_.end()) return nullptr;
    void* p = it->second;
    free_.erase(it);
    cached_bytes_ -= len;
    return p;
  }

  void give_back(void* p, size_t len) {
    {
      std::lock_guard<std::mutex> guard(mutex_);
      if (cached_bytes_ + len <= limit_bytes_) {
        free_.emplace(len, p);
        cached_bytes_ += len;
        return;
      }
    }
    unmap(p, len);
  }

#if defined(__linux__)
  // len bytes on a 2 MiB boundary (so the huge-page hint can apply to all of it), or nullptr.
  static void* map(size_t len) {
    void* base = mmap(nullptr, len + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return nullptr;
    const uintptr_t b = reinterpret_cast<uintptr_t>(base);
    const uintptr_t start = (b + kHugePage - 1) / kHugePage * kHugePage;
    if (start > b) munmap(base, start - b);                             // trim the unaligned head
    munmap(reinterpret_cast<void*>(start + len), b + kHugePage - start);  // and the tail
#if defined(MADV_HUGEPAGE)
    madvise(reinterpret_cast<void*>(start), len, MADV_HUGEPAGE);  // a hint; plain pages without THP
#endif
    return reinterpret_cast<void*>(start);
  }
  static void unmap(void* p, size_t len) { munmap(p, len); }
#else
  static void* map(size_t) { return nullptr; }
  static void unmap(void*, size_t) {}
#endif

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // length -> buffer
  size_t cached_bytes_ = 0;
  size_t limit_bytes_ = 0;
};

}  // namespace fastgpt::cpu
