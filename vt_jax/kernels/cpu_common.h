// Shared by the CPU kernels: work splitting over XLA's intra-op thread pool, a vectorised exp.
#ifndef VT_JAX_KERNELS_CPU_COMMON_H_
#define VT_JAX_KERNELS_CPU_COMMON_H_

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

// exp(x) for x <= 0 in fp32 (Cephes' expf polynomial, ~1 ulp). x <= -104 (-inf included) gives exactly 0:
// 0.97 * 2^-150 rounds to zero, as the true exp(-104) = 6.8e-46 does.
__attribute__((target("avx512f"))) inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

}  // namespace vt_cpu

#endif  // VT_JAX_KERNELS_CPU_COMMON_H_
