// One decode step's attention against a layer of the KV cache on x86-64 CPUs with AVX-512: for every row b
// and query head h (kv head h / G), softmax over the cache slots s <= index whose segment id equals the
// query's, of scale * q.k_s in fp32, the probabilities cast to the cache dtype, times v, summed in fp32 and
// cast to the query dtype -- the rounding points of `attention._xla_attention`.
//
// XLA:CPU runs this step as ~10 small ops per layer over the whole cache (every slot, filled or not); here
// each (row, kv head) is one task that reads its filled slots once for the scores and once for the values.
// Scores: 16 slots at a time, each slot's dot kept as a 16-lane partial sum (bf16 pairs through VDPBF16PS,
// products exact in fp32), then the 16 vectors reduced to one by a transpose-add tree. Where no slot is
// kept the XLA path's softmax is uniform over all S slots (every logit the same mask value): so is this one.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#define VT_TARGET __attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl,avx512dq")))

// v[16] -> one vector whose lane L holds the sum of the lanes of v[kReduceOrder[L]] (15 shuffle-add steps).
VT_TARGET inline __m512 Reduce16(__m512 (&v)[16]) {
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0x44), _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
}

// The permutation that puts Reduce16's lanes back in slot order: out[s] = reduced[kUnshuffle[s]].
struct Order {
  alignas(64) int32_t idx[16];
};

VT_TARGET Order Unshuffle() {
  __m512 v[16];
  for (int i = 0; i < 16; ++i) v[i] = _mm512_set1_ps(static_cast<float>(i));
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, Reduce16(v));
  Order order;
  for (int lane = 0; lane < 16; ++lane) order.idx[static_cast<int>(lanes[lane]) / 16] = lane;
  return order;
}

// Element access for the two dtypes: fp32 values, 16 at a time.
struct Bf16 {
  using T = uint16_t;
  VT_TARGET static __m512 Load16(const T* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
  VT_TARGET static __m512 Round(__m512 x) {  // to the nearest bf16 (ties to even), as fp32
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
  }
  VT_TARGET static void Store16(T* p, __m512 x) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(x)); }
  // 16 lanes of partial sums of q . k over d (bf16 pairs: products exact in fp32).
  VT_TARGET static __m512 Dot(const T* q, const T* k, int64_t d) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 32)
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(k + i), (__m512bh)_mm512_loadu_si512(q + i));
    return acc;
  }
};

struct F32 {
  using T = float;
  VT_TARGET static __m512 Load16(const T* p) { return _mm512_loadu_ps(p); }
  VT_TARGET static __m512 Round(__m512 x) { return x; }
  VT_TARGET static void Store16(T* p, __m512 x) { _mm512_storeu_ps(p, x); }
  VT_TARGET static __m512 Dot(const T* q, const T* k, int64_t d) {
    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(k), _mm512_loadu_ps(q));
    for (int64_t i = 16; i < d; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(k + i), _mm512_loadu_ps(q + i), acc);
    return acc;
  }
};

// out[g, :] = sum over kept slots j of p[g, j] * v[j, :], DV 16-lane columns of d per pass (G * DV sums in
// registers, each value row read once per pass).
template <typename E, int G, int DV>
VT_TARGET void Values(const float* p, const __mmask16* keep, int64_t chunks, const typename E::T* v,
                      typename E::T* out, int64_t d) {
  for (int64_t i = 0; i < d; i += 16 * DV) {
    __m512 acc[G][DV];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < DV; ++c) acc[g][c] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      for (__mmask16 m = keep[c]; m; m &= m - 1) {
        const int64_t j = c * 16 + __builtin_ctz(m);
        __m512 vv[DV];
        for (int t = 0; t < DV; ++t) vv[t] = E::Load16(v + j * d + i + 16 * t);
        for (int g = 0; g < G; ++g) {
          const __m512 pg = _mm512_set1_ps(p[g * chunks * 16 + j]);
          for (int t = 0; t < DV; ++t) acc[g][t] = _mm512_fmadd_ps(pg, vv[t], acc[g][t]);
        }
      }
    }
    for (int g = 0; g < G; ++g)
      for (int t = 0; t < DV; ++t) E::Store16(out + g * d + i + 16 * t, acc[g][t]);
  }
}

struct Shape {
  int64_t kv_heads, slots, d, n;  // n: slots 0 .. n - 1 can be kept (index + 1)
  float scale;
};

// One (row, kv head): q [G, d], k / v [S, d] of that row and head, out [G, d].
template <typename E, int G>
VT_TARGET void Task(const typename E::T* q, const typename E::T* k, const typename E::T* v, int32_t q_seg,
                    const int32_t* kv_seg, typename E::T* out, const Shape& s, const int32_t* order) {
  const __m512i unshuffle = _mm512_load_si512(order);
  using T = typename E::T;
  const int64_t chunks = (s.n + 15) / 16, d = s.d;
  thread_local std::vector<float> buf;
  thread_local std::vector<__mmask16> keep;
  buf.resize(static_cast<size_t>(G * chunks * 16));
  keep.resize(static_cast<size_t>(chunks));
  float* scores = buf.data();  // [G, chunks * 16]
  __m512 top[G];
  for (int g = 0; g < G; ++g) top[g] = _mm512_set1_ps(-INFINITY);
  bool any = false;
  const __m512i seg = _mm512_set1_epi32(q_seg);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t s0 = c * 16, live = std::min<int64_t>(16, s.n - s0);
    const __mmask16 in_range = live == 16 ? 0xFFFF : (__mmask16)((1u << live) - 1);
    keep[c] = _mm512_mask_cmpeq_epi32_mask(in_range, _mm512_maskz_loadu_epi32(in_range, kv_seg + s0), seg);
    any |= keep[c] != 0;
    for (int g = 0; g < G; ++g) {
      __m512 parts[16];
      for (int j = 0; j < 16; ++j)
        parts[j] = j < live ? E::Dot(q + g * d, k + (s0 + j) * d, d) : _mm512_setzero_ps();
      const __m512 logits = _mm512_mul_ps(_mm512_permutexvar_ps(unshuffle, Reduce16(parts)), _mm512_set1_ps(s.scale));
      _mm512_storeu_ps(scores + g * chunks * 16 + s0, logits);
      top[g] = _mm512_mask_max_ps(top[g], keep[c], top[g], logits);
    }
  }
  if (!any) {  // uniform over all S slots, as the XLA path's softmax of S equal mask values
    const __m512 p = E::Round(_mm512_set1_ps(1.0f / static_cast<float>(s.slots)));
    for (int64_t i = 0; i < d; i += 16) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t j = 0; j < s.slots; ++j) acc = _mm512_fmadd_ps(p, E::Load16(v + j * d + i), acc);
      for (int g = 0; g < G; ++g) E::Store16(out + g * d + i, acc);
    }
    return;
  }
  for (int g = 0; g < G; ++g) {
    float* row = scores + g * chunks * 16;
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(top[g]));
    __m512 total = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512 e = _mm512_maskz_mov_ps(keep[c], vt_cpu::Exp(_mm512_sub_ps(_mm512_loadu_ps(row + c * 16), mx)));
      _mm512_storeu_ps(row + c * 16, e);
      total = _mm512_add_ps(total, e);
    }
    const __m512 sum = _mm512_set1_ps(_mm512_reduce_add_ps(total));
    for (int64_t c = 0; c < chunks; ++c)
      _mm512_storeu_ps(row + c * 16, E::Round(_mm512_div_ps(_mm512_loadu_ps(row + c * 16), sum)));
  }
  const int64_t vectors = d / 16;
  if (G * 4 <= 28 && vectors % 4 == 0) {
    Values<E, G, 4>(scores, keep.data(), chunks, v, out, d);
  } else if (vectors % 2 == 0) {
    Values<E, G, 2>(scores, keep.data(), chunks, v, out, d);
  } else {
    Values<E, G, 1>(scores, keep.data(), chunks, v, out, d);
  }
}

template <typename E, int G>
void RunAll(ffi::ThreadPool& pool, const void* q, const void* k, const void* v, const int32_t* q_seg,
            const int32_t* kv_seg, void* out, int64_t rows, const Shape& s) {
  using T = typename E::T;
  static const Order order = Unshuffle();
  const int32_t* perm = order.idx;
  vt_cpu::ParallelFor(pool, rows * s.kv_heads, 1, [=](int64_t t) {
    const int64_t b = t / s.kv_heads, h = t % s.kv_heads;
    const int64_t cache = (b * s.kv_heads + h) * s.slots * s.d, heads = (b * s.kv_heads + h) * G * s.d;
    Task<E, G>(static_cast<const T*>(q) + heads, static_cast<const T*>(k) + cache, static_cast<const T*>(v) + cache,
               q_seg[b], kv_seg + b * s.slots, static_cast<T*>(out) + heads, s, perm);
  });
}

template <typename E>
bool Dispatch(int64_t group, ffi::ThreadPool& pool, const void* q, const void* k, const void* v, const int32_t* q_seg,
              const int32_t* kv_seg, void* out, int64_t rows, const Shape& s) {
  switch (group) {
#define VT_CASE(G) \
  case G: RunAll<E, G>(pool, q, k, v, q_seg, kv_seg, out, rows, s); return true;
    VT_CASE(1) VT_CASE(2) VT_CASE(3) VT_CASE(4) VT_CASE(5) VT_CASE(6) VT_CASE(7) VT_CASE(8)
#undef VT_CASE
    default: return false;
  }
}

// q [B, H, D]; k, v [B, K, S, D] (q's dtype); q_seg [B], kv_seg [B, S] int32; index [] int32 (the query's
// position: slots 0 .. index are earlier); out [B, H, D] in q's dtype. attr scale.
ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                           ffi::Buffer<ffi::S32> q_seg, ffi::Buffer<ffi::S32> kv_seg, ffi::Buffer<ffi::S32> index,
                           ffi::Result<ffi::AnyBuffer> out, float scale) {
  auto qd = q.dimensions(), kd = k.dimensions();
  const auto type = q.element_type();
  const bool bf16 = type == ffi::DataType::BF16;
  if ((!bf16 && type != ffi::DataType::F32) || k.element_type() != type || v.element_type() != type ||
      out->element_type() != type)
    return ffi::Error::InvalidArgument("vt_cpu_decode_attention: q, k, v, out must all be bf16 or all fp32");
  if (qd.size() != 3 || kd.size() != 4 || kd[0] != qd[0] || kd[3] != qd[2] || qd[1] % kd[1] ||
      v.dimensions().size() != 4 || !std::equal(kd.begin(), kd.end(), v.dimensions().begin()) || kv_seg.dimensions().size() != 2 || kv_seg.dimensions()[1] != kd[2] ||
      q_seg.element_count() != qd[0] || (qd[2] % (bf16 ? 32 : 16)))
    return ffi::Error::InvalidArgument(
        "vt_cpu_decode_attention: q [B, H, D], k / v [B, K, S, D], q_seg [B], kv_seg [B, S]; D % 32 (bf16) / 16");
  const int64_t slots = kd[2];
  const int64_t position = *index.typed_data();
  const Shape s{kd[1], slots, qd[2], std::max<int64_t>(0, std::min<int64_t>(slots, position + 1)), scale};
  const int64_t group = qd[1] / kd[1];
  const bool ok = bf16 ? Dispatch<Bf16>(group, pool, q.untyped_data(), k.untyped_data(), v.untyped_data(),
                                        q_seg.typed_data(), kv_seg.typed_data(), out->untyped_data(), qd[0], s)
                       : Dispatch<F32>(group, pool, q.untyped_data(), k.untyped_data(), v.untyped_data(),
                                       q_seg.typed_data(), kv_seg.typed_data(), out->untyped_data(), qd[0], s);
  if (!ok) return ffi::Error::InvalidArgument("vt_cpu_decode_attention: query heads per kv head must be 1..8");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VtCpuDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("scale"));
