// A few rows against a packed weight matrix on x86-64 CPUs with AVX-512: out[m, v] = sum_d x[m, d] * w[v, d],
// accumulated in fp32 -- a decode step's logits (v over the 151,936-row output table) and projections.
//
// XLA:CPU hands such a dot (~8 rows) to a GEMM library that repacks the weights on every call, so a decode
// step reads and writes every weight ~3 times. Here the weights are packed once per generation
// (`pack_table` in kernels/cpu.py) into blocks of 32 output rows, `[V/32, D/P, 32, P]` with P = 2 bf16 (one
// VDPBF16PS pair) or P = 1 fp32, and each block is read once, in order, and contracted against every row
// of x: a row's 32 outputs accumulate in two vectors, so no horizontal sums. bf16 products are exact in
// fp32; the sums are fp32.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 32;        // output rows per packed block (two 16-lane vectors)
constexpr int64_t kRowsPerPass = 8;   // rows of x accumulated at once: 16 accumulators
constexpr int64_t kBlocksPerTask = 16;

// Stores rows [m0, m0 + M) of output block b (32 columns; those past `vocab` masked off).
template <int M>
__attribute__((target("avx512f"), always_inline)) inline void StoreBlock(const __m512 (&acc)[M][2], float* out,
                                                                          int64_t vocab, int64_t m0, int64_t b) {
  const int64_t v0 = b * kBlock, left = std::min<int64_t>(kBlock, vocab - v0);
  const __mmask16 k0 = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
  const __mmask16 k1 = left >= 32 ? 0xFFFF : left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1);
  for (int m = 0; m < M; ++m) {
    _mm512_mask_storeu_ps(out + (m0 + m) * vocab + v0, k0, acc[m][0]);
    _mm512_mask_storeu_ps(out + (m0 + m) * vocab + v0 + 16, k1, acc[m][1]);
  }
}

// Rows [m0, m0 + M) of out for output block b. w_block: the block's D/P x 32 x P elements.
template <int M>
__attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl"))) void Bf16Block(
    const uint16_t* x, const uint16_t* w_block, float* out, int64_t d, int64_t vocab, int64_t m0, int64_t b) {
  __m512 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < d / 2; ++p) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w_block + p * 64);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w_block + p * 64 + 32);
    for (int m = 0; m < M; ++m) {
      int32_t pair;
      __builtin_memcpy(&pair, x + (m0 + m) * d + 2 * p, 4);
      const __m512bh xm = (__m512bh)_mm512_set1_epi32(pair);
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, xm);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, xm);
    }
  }
  StoreBlock<M>(acc, out, vocab, m0, b);
}

template <int M>
__attribute__((target("avx512f"))) void F32Block(const float* x, const float* w_block, float* out, int64_t d,
                                                 int64_t vocab, int64_t m0, int64_t b) {
  __m512 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < d; ++k) {
    const __m512 w0 = _mm512_loadu_ps(w_block + k * 32);
    const __m512 w1 = _mm512_loadu_ps(w_block + k * 32 + 16);
    for (int m = 0; m < M; ++m) {
      const __m512 xm = _mm512_set1_ps(x[(m0 + m) * d + k]);
      acc[m][0] = _mm512_fmadd_ps(w0, xm, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(w1, xm, acc[m][1]);
    }
  }
  StoreBlock<M>(acc, out, vocab, m0, b);
}

#define VT_BLOCK_FN(NAME, T)                                                                        \
  using NAME##Fn = void (*)(const T*, const T*, float*, int64_t, int64_t, int64_t, int64_t);         \
  NAME##Fn NAME##For(int64_t rows) {                                                                \
    switch (rows) {                                                                                 \
      case 1: return NAME<1>; case 2: return NAME<2>; case 3: return NAME<3>; case 4: return NAME<4>; \
      case 5: return NAME<5>; case 6: return NAME<6>; case 7: return NAME<7>; default: return NAME<8>; \
    }                                                                                               \
  }
VT_BLOCK_FN(Bf16Block, uint16_t)
VT_BLOCK_FN(F32Block, float)
#undef VT_BLOCK_FN

template <typename T, typename BlockFn>
void Run(ffi::ThreadPool& pool, const T* x, const T* w, float* out, int64_t rows, int64_t d, int64_t vocab,
         BlockFn (*block_for)(int64_t)) {
  const int64_t blocks = (vocab + kBlock - 1) / kBlock, block_elems = d * kBlock;
  vt_cpu::ParallelFor(pool, blocks, kBlocksPerTask, [=](int64_t b) {
    for (int64_t m0 = 0; m0 < rows; m0 += kRowsPerPass) {
      const int64_t n = std::min(kRowsPerPass, rows - m0);
      block_for(n)(x, w + b * block_elems, out, d, vocab, m0, b);
    }
  });
}

// x [M, D]; w packed [ceil(V / 32), D / P, 32, P] (P = 2 for bf16, 1 for fp32); attr vocab = V.
ffi::Error PackedDot(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::Buffer<ffi::F32>> out,
                  int64_t vocab) {
  auto xd = x.dimensions(), wd = w.dimensions();
  const bool bf16 = x.element_type() == ffi::DataType::BF16;
  const int64_t pack = bf16 ? 2 : 1;
  if (x.element_type() != w.element_type() || (!bf16 && x.element_type() != ffi::DataType::F32))
    return ffi::Error::InvalidArgument("vt_cpu_packed_dot: x and w must both be bf16 or both fp32");
  if (xd.size() != 2 || wd.size() != 4 || wd[0] != (vocab + kBlock - 1) / kBlock || wd[1] * pack != xd[1] ||
      wd[2] != kBlock || wd[3] != pack)
    return ffi::Error::InvalidArgument("vt_cpu_packed_dot: x [M, D] and a packed w [ceil(V/32), D/P, 32, P] expected");
  auto od = out->dimensions();
  if (od.size() != 2 || od[0] != xd[0] || od[1] != vocab)
    return ffi::Error::InvalidArgument("vt_cpu_packed_dot: out must be [M, V]");
  const int64_t rows = xd[0], d = xd[1];
  float* o = out->typed_data();
  if (bf16) {
    Run(pool, static_cast<const uint16_t*>(x.untyped_data()), static_cast<const uint16_t*>(w.untyped_data()), o,
        rows, d, vocab, Bf16BlockFor);
  } else {
    Run(pool, static_cast<const float*>(x.untyped_data()), static_cast<const float*>(w.untyped_data()), o, rows,
        d, vocab, F32BlockFor);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VtCpuPackedDot, PackedDot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("vocab"));

// 1 where this CPU runs the kernel (AVX-512F and AVX512-BF16), else 0.
extern "C" int vt_cpu_packed_dot_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
}
