// A decode step's token choice from fp32 logits [N, V] on x86-64 CPUs with AVX-512, as `sampler.choose_tokens`
// without top-k / top-p: greedy (the most likely token, the lowest id on ties) or a draw from
// softmax(logits / temperature) by inverse CDF with two uniforms per row (u0 picks a block of 128 entries by
// its mass, u1 an entry inside it); and log p(token) = logits[token] / temperature - logsumexp.
//
// XLA:CPU makes ~4 passes over the logits for this (max, exp-sum, exp again, block sums) and its top_k for
// the greedy choice is slower still; here one row is a task: a max pass, then one exp pass that sums each
// block, and the chosen block's 128 entries again. The draw's distribution is the XLA path's; the fp32 sums
// run in another order, so a uniform within rounding distance of a block boundary may pick the neighbour.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#define VT_TARGET __attribute__((target("avx512f,avx512dq")))

constexpr int64_t kCdfBlock = 128;  // sampler._CDF_BLOCK

// 16 scaled logits from x + i (masked past v: -inf).
VT_TARGET inline __m512 Load(const float* x, int64_t i, int64_t v, bool divide, __m512 t) {
  const int64_t left = v - i;
  const __mmask16 m = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
  const __m512 raw = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, x + i);
  return divide ? _mm512_div_ps(raw, t) : raw;
}

// Index of the first entry whose running sum exceeds target (entries >= 0); stays below n, on a positive entry.
inline int64_t FirstAbove(const float* w, int64_t n, float target) {
  float cum = 0.0f;
  int64_t last = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (w[i] > 0.0f) last = i;
    cum += w[i];
    if (cum > target && w[i] > 0.0f) return i;
  }
  return last;
}

struct Row {
  int32_t token;
  float logp;
};

VT_TARGET Row Choose(const float* x, int64_t v, float temperature, bool greedy, float u0, float u1) {
  const bool divide = !greedy && temperature != 1.0f;
  const __m512 t = _mm512_set1_ps(temperature);
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < v; i += 16) top = _mm512_max_ps(top, Load(x, i, v, divide, t));
  const float mx = _mm512_reduce_max_ps(top);
  const float shift = std::isfinite(mx) ? mx : 0.0f;  // as jax.nn.logsumexp
  const __m512 sh = _mm512_set1_ps(shift);
  const int64_t blocks = (v + kCdfBlock - 1) / kCdfBlock;
  thread_local std::vector<float> mass;
  mass.resize(static_cast<size_t>(blocks));
  __m512 total = _mm512_setzero_ps();
  int64_t best = -1;
  for (int64_t b = 0; b < blocks; ++b) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = b * kCdfBlock; i < std::min(v, (b + 1) * kCdfBlock); i += 16) {
      const __m512 s = Load(x, i, v, divide, t);
      if (greedy && best < 0) {
        const __mmask16 hit = _mm512_cmp_ps_mask(s, _mm512_set1_ps(mx), _CMP_EQ_OQ);
        if (hit) best = i + __builtin_ctz(hit);
      }
      acc = _mm512_add_ps(acc, vt_cpu::Exp(_mm512_sub_ps(s, sh)));
    }
    mass[b] = _mm512_reduce_add_ps(acc);
    total = _mm512_add_ps(total, acc);
  }
  const float lse = shift + std::log(_mm512_reduce_add_ps(total));
  int64_t token;
  if (greedy) {
    token = best < 0 ? 0 : best;
  } else {
    // Summed in FirstAbove's order (not `total`'s): its running sum ends at exactly `sum`, so a target below
    // it is always passed.
    float sum = 0.0f;
    for (int64_t b = 0; b < blocks; ++b) sum += mass[b];
    const int64_t b = FirstAbove(mass.data(), blocks, std::min(u0 * sum, std::nextafter(sum, 0.0f)));
    const int64_t lo = b * kCdfBlock, n = std::min(v, lo + kCdfBlock) - lo;
    alignas(64) float w[kCdfBlock];
    for (int64_t i = 0; i < n; i += 16)
      _mm512_store_ps(w + i, vt_cpu::Exp(_mm512_sub_ps(Load(x, lo + i, v, divide, t), sh)));
    float inner = 0.0f;
    for (int64_t i = 0; i < n; ++i) inner += w[i];
    token = lo + FirstAbove(w, n, std::min(u1 * inner, std::nextafter(inner, 0.0f)));
  }
  const float picked = divide ? x[token] / temperature : x[token];
  return {static_cast<int32_t>(token), picked - lse};
}

// logits [N, V] fp32, u [N, 2] fp32 in [0, 1) -> tokens [N] int32, logp [N] fp32. attrs temperature, greedy.
ffi::Error Sample(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::F32> u,
                  ffi::Result<ffi::Buffer<ffi::S32>> tokens, ffi::Result<ffi::Buffer<ffi::F32>> logp,
                  float temperature, bool greedy) {
  auto ld = logits.dimensions(), ud = u.dimensions();
  if (ld.size() != 2 || ud.size() != 2 || ud[0] != ld[0] || ud[1] != 2 || tokens->element_count() != ld[0] ||
      logp->element_count() != ld[0])
    return ffi::Error::InvalidArgument("vt_cpu_sample: logits [N, V], u [N, 2], tokens / logp [N] expected");
  if (!greedy && !(temperature > 0.0f))
    return ffi::Error::InvalidArgument("vt_cpu_sample: temperature must be > 0 unless greedy");
  const int64_t n = ld[0], v = ld[1];
  const float* x = logits.typed_data();
  const float* uu = u.typed_data();
  int32_t* tok = tokens->typed_data();
  float* lp = logp->typed_data();
  vt_cpu::ParallelFor(pool, n, 1, [=](int64_t r) {
    const Row row = Choose(x + r * v, v, temperature, greedy, uu[2 * r], uu[2 * r + 1]);
    tok[r] = row.token;
    lp[r] = row.logp;
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VtCpuSample, Sample,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("temperature")
                                  .Attr<bool>("greedy"));
