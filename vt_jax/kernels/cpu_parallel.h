// Work splitting over XLA's intra-op thread pool for the CPU kernels.
#ifndef VT_JAX_KERNELS_CPU_PARALLEL_H_
#define VT_JAX_KERNELS_CPU_PARALLEL_H_

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace vt_cpu {

// Runs fn(i) for every i in [0, n) on the caller and the intra-op pool, `per_task` items at a time. Tasks
// claim runs of items from a shared counter, so the caller finishes alone when no pool thread is free; the
// state is shared-owned because a late task may start after the caller has returned.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, int64_t per_task, Fn fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  const int64_t tasks = (n + per_task - 1) / per_task;
  auto state = std::make_shared<State>();
  auto work = [state, tasks, n, per_task, fn]() {
    for (int64_t t; (t = state->next.fetch_add(1, std::memory_order_relaxed)) < tasks;) {
      const int64_t end = std::min(n, (t + 1) * per_task);
      for (int64_t i = t * per_task; i < end; ++i) fn(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  while (state->done.load(std::memory_order_acquire) < tasks) _mm_pause();
}

}  // namespace vt_cpu

#endif  // VT_JAX_KERNELS_CPU_PARALLEL_H_
