// Products of a few rows (decode) with a weight matrix, for XLA's CPU backend.
//
// Why: at one to eight rows a product reads every weight once and is bound by memory bandwidth, but XLA's
// CPU dot reaches only part of it (bench/RESULTS.md): float32 layer products run at 17-22 GB/s where the
// machine reads 33+, and bfloat16 ones are converted and multiplied by a slow path. These loops stream the
// weights once, in order, split between the threads of XLA's own intra-op pool, and accumulate in float32.
//
//   y[m, n] = sum_k x[m, k] * w[k, n]    (w_layout 0: w is (K, N), nnx.Linear's kernel)
//   y[m, n] = sum_k x[m, k] * w[n, k]    (w_layout 1: w is (N, K), the tied embedding as LM head)
//
// x and w share a dtype, float32 or bfloat16; y is float32. Built on first use by gemma3/cpu_kernels.py
// for the machine's own CPU (-march=native); the loops use the compiler's vector extensions (eight float32
// lanes), so one source builds for AVX2, AVX-512 or NEON. Where the CPU has AVX512-BF16 (Zen 4, Sapphire
// Rapids), bfloat16 products multiply bfloat16 pairs directly (vdpbf16ps: 32 products per instruction,
// float32 sums): the widening loops cost more instructions per weight than memory allows (at 8 rows they
// are bound by arithmetic, and even one row read only 11-24 GB/s). Products of more rows (prefill) and
// attention over many query rows go through a packed GEMM, on every CPU (see GemmDp). Where the CPU also has
// AMX-BF16 (Sapphire Rapids and later), the GEMM's pairs and decode products of 5-8 bfloat16 rows go through
// AMX tiles (TileAmx, RowsKNAmx, RowsNKAmx).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

#ifdef __AVX2__
#include <immintrin.h>  // bfloat16 widening (Bfloat16Bits); AVX-512 and the screen need it too
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define GEMMA3_AVX512 1  // sixteen-lane float32 panels for the prefill GEMM
#if defined(__AVX512BF16__)
#define GEMMA3_DPBF16 1  // bfloat16 pair products
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define GEMMA3_AMX 1  // the GEMM's pair panels through AMX tiles, where Linux grants them (AmxReady)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif
#endif
#if defined(GEMMA3_AVX512) && defined(__AVX512VNNI__)
#define GEMMA3_VNNI 1  // int8 products by vpdpbusd for the bfloat16 head's greedy screen
#endif
#if defined(GEMMA3_VNNI) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define GEMMA3_SCREEN 1  // the bfloat16 head's greedy screen (ScreenArgmax): vpdpbusd, else vpmaddubsw (AVX2)
#endif

namespace ffi = xla::ffi;

namespace {

// Eight float32 lanes, built with the compiler's vector extensions: AVX2 or AVX-512 on x86, NEON on Arm.
typedef float f8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

inline float widen(float v) { return v; }
inline float widen(uint16_t v) {  // bfloat16 is the top half of a float32
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline f8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
// Eight bfloat16 as the bits of eight float32 (each in the top half). On AVX2 one vpmovzxwd from memory and a
// shift: GCC 12 lowers the portable conversion to two vpmovzxwd on halves, a shift of bytes and an insert,
// which held one-row bfloat16 products of (K, N) weights at 10-15 GB/s a core on AVX2 builds.
inline u32x8 Bfloat16Bits(const uint16_t* p) {
#ifdef __AVX2__
  const __m256i wide = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  u32x8 bits;
  std::memcpy(&bits, &wide, sizeof bits);
  return bits;
#else
  u16x8 h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, u32x8) << 16;
#endif
}
inline f8 load8(const uint16_t* p) {
  const u32x8 bits = Bfloat16Bits(p);
  f8 v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
inline void store8(float* p, f8 v) { std::memcpy(p, &v, sizeof v); }
// A float32 (N, K) matrix kept as two planes of halves (SplitHead): the top 16 bits of every float32 (its
// bfloat16 truncation) at `top`, the bottom 16 bits `plane` elements after. Indexed as a pointer to float.
struct SplitF32 {
  const uint16_t* top;
  int64_t plane;
  SplitF32 operator+(int64_t i) const { return {top + i, plane}; }
  float operator[](int64_t i) const {
    const uint32_t bits = static_cast<uint32_t>(top[i]) << 16 | top[i + plane];
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
};
inline f8 load8(SplitF32 p) {  // each bottom half below its top half: the float32's bytes, little-endian
  u16x8 h, l;
  std::memcpy(&h, p.top, sizeof h);
  std::memcpy(&l, p.top + p.plane, sizeof l);
  const u16x16 halves = __builtin_shufflevector(l, h, 0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  f8 v;
  std::memcpy(&v, &halves, sizeof v);
  return v;
}
inline void Prefetch(const void* p) { __builtin_prefetch(p, 0, 2); }  // to L2
inline void Prefetch(SplitF32 p) {
  Prefetch(p.top);
  Prefetch(p.top + p.plane);
}
// Sixteen bfloat16 as two vectors of eight float32 by interleaving zeros below them (one shuffle each,
// no shifts); the lanes come out as elements 0-3 and 8-11, then 4-7 and 12-15 (the order of x86's
// unpack instructions), so the other operand of a dot product is permuted the same way (Interleave).
inline void load16(const uint16_t* p, f8& lo, f8& hi) {
  u16x16 v;
  std::memcpy(&v, p, sizeof v);
  const u16x16 z = {};
  const u16x16 a = __builtin_shufflevector(z, v, 0, 16, 1, 17, 2, 18, 3, 19, 8, 24, 9, 25, 10, 26, 11, 27);
  const u16x16 b = __builtin_shufflevector(z, v, 4, 20, 5, 21, 6, 22, 7, 23, 12, 28, 13, 29, 14, 30, 15, 31);
  std::memcpy(&lo, &a, sizeof lo);
  std::memcpy(&hi, &b, sizeof hi);
}
// x[0..k_main) in load16's lane order, block by block of sixteen.
constexpr int kOrder[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};
void Interleave(const float* x, float* out, int64_t k_main) {
  for (int64_t k = 0; k < k_main; k += 16)
    for (int j = 0; j < 16; ++j) out[k + j] = x[k + kOrder[j]];
}
inline float sum8(f8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// M rows (1..8) of float32 x against (K, N) weights (float32, or bfloat16 widened: attention's values, and every
// product of (K, N) bfloat16 weights where the CPU has no pair products),
// weight rows k0..k1 at ldw apart, summed into acc (M x N) while the weights stream through once, in order,
// R rows at a time (RowsKNStream's scheme, eight lanes). Column blocks walking down the weight rows read
// 12-19 GB/s at 2-8 rows; this reads 25-30.
template <int M, int R = 8, typename T = float>  // R even
void RowsKNSum(const float* x, const T* w, float* acc, int64_t K, int64_t N, int64_t k0, int64_t k1,
               int64_t ldw) {
  const int64_t n_main = N / 8 * 8;
  for (int64_t k = k0; k < k1; k += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, k1 - k));
    float xs[M][R];  // zeros past k1
    for (int m = 0; m < M; ++m)
      for (int i = 0; i < R; ++i) xs[m][i] = i < rows ? x[m * K + k + i] : 0.f;
    const T* r[R];  // rows past k1 read row k, times a zero of x
    for (int i = 0; i < R; ++i) r[i] = w + (k + (i < rows ? i : 0)) * ldw;
    const bool ahead = k + 2 * R <= k1;
    for (int64_t n = 0; n < n_main; n += 8) {
      if (ahead && n % 16 == 0) {  // the next pass's rows, to L2, a 64-byte line per row
        _Pragma("GCC unroll 8") for (int i = R; i < 2 * R; ++i) __builtin_prefetch(w + (k + i) * ldw + n, 0, 2);
      }
      f8 wv[R];
      _Pragma("GCC unroll 8") for (int i = 0; i < R; ++i) wv[i] = load8(r[i] + n);
      _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) {
        f8 even = xs[m][0] * wv[0], odd = xs[m][1] * wv[1];  // two chains: half the adder latency
        _Pragma("GCC unroll 8") for (int i = 2; i < R; i += 2) {
          even += xs[m][i] * wv[i];
          odd += xs[m][i + 1] * wv[i + 1];
        }
        store8(acc + m * N + n, load8(acc + m * N + n) + (even + odd));
      }
    }
    for (int64_t n = n_main; n < N; ++n)
      for (int m = 0; m < M; ++m) {
        float s = acc[m * N + n];
        for (int i = 0; i < rows; ++i) s += xs[m][i] * widen(r[i][n]);
        acc[m * N + n] = s;
      }
  }
}

constexpr int64_t kMaxRows = 8;
// Weight rows of an (N, K) matrix that share each load of x (RowsNK, RowsNKDp): one sum register per input
// row and weight row, half the vector registers (32 with AVX-512, 16 otherwise), at most four rows.
#ifdef __AVX512F__
constexpr int kVectorRegisters = 32;
#else
constexpr int kVectorRegisters = 16;
#endif
constexpr int SharedRows(int m) { return std::clamp(kVectorRegisters / 2 / m, 1, 4); }

// M rows (1..8), (N, K) weights (float32, or bfloat16 widened: attention's keys) at ldw apart, rows n0..n1:
// y[m, n] = <x[m, :], w[n, :]>, W weight rows at a time (adjacent, so one stream; the next W prefetched)
// sharing each load of x: at eight rows x (37 KB for the 1b model) no longer fits L1 beside the stream, and
// one weight row at a time read the head at 11 GB/s. Each sum runs in one order, but a row summed in a group
// of W and the same row summed alone (a part's last rows: another compiled loop) can differ in the last bit, so
// the thread split can move a result by an ulp.
template <int M, int W = SharedRows(M), typename P = const float*>  // P: const float*, const uint16_t*, SplitF32
void RowsNK(const float* x, P w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1, int64_t ldw) {
  const int64_t k_main = K / 8 * 8;
  int64_t n = n0;
  for (; n + W <= n1; n += W) {
    const P row = w + n * ldw;
    f8 acc[M][W] = {};
    const bool ahead = n + 2 * W <= n1;
    for (int64_t k = 0; k < k_main; k += 8) {
      if (ahead && k % 16 == 0) {  // the next W rows, to L2, a 64-byte line per row
        _Pragma("GCC unroll 4") for (int r = W; r < 2 * W; ++r) Prefetch(row + r * ldw + k);
      }
      f8 wv[W];
      _Pragma("GCC unroll 4") for (int r = 0; r < W; ++r) wv[r] = load8(row + r * ldw + k);
      _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) {
        const f8 xv = load8(x + m * K + k);
        _Pragma("GCC unroll 4") for (int r = 0; r < W; ++r) acc[m][r] += xv * wv[r];
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < W; ++r) {
        float s = sum8(acc[m][r]);
        for (int64_t k = k_main; k < K; ++k) s += x[m * K + k] * widen(row[r * ldw + k]);
        y[m * N + n + r] = s;
      }
  }
  if (n < n1) RowsNK<M, 1>(x, w, y, K, N, n, n1, ldw);  // the last rows of the part, one at a time
}

// RowsNK for bfloat16 weights: sixteen at a time through load16, against x in the same lane order
// (xi: each row of x interleaved up to K's last multiple of 16, from MultiplyRows). One input row keeps
// four partial sums (two blocks of sixteen per step).
template <int M>
void RowsNK(const float* x, const float* xi, const uint16_t* w, float* y, int64_t K, int64_t N, int64_t n0,
            int64_t n1) {
  constexpr int kBlocks = M == 1 ? 2 : 1;
  const int64_t k_main = K / (16 * kBlocks) * (16 * kBlocks);
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* __restrict row = w + n * K;
    f8 acc[M][2 * kBlocks] = {};
    for (int64_t k = 0; k < k_main; k += 16 * kBlocks)
      _Pragma("GCC unroll 2") for (int b = 0; b < kBlocks; ++b) {
        f8 lo, hi;
        load16(row + k + 16 * b, lo, hi);
        _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) {
          acc[m][2 * b] += load8(xi + m * K + k + 16 * b) * lo;
          acc[m][2 * b + 1] += load8(xi + m * K + k + 16 * b + 8) * hi;
        }
      }
    for (int m = 0; m < M; ++m) {
      f8 total = acc[m][0];
      for (int c = 1; c < 2 * kBlocks; ++c) total += acc[m][c];
      float s = sum8(total);
      for (int64_t k = k_main; k < K; ++k) s += x[m * K + k] * widen(row[k]);
      y[m * N + n] = s;
    }
  }
}

#ifdef GEMMA3_DPBF16
// M rows (1..8) of bfloat16 x against bfloat16 (N, K) weights, rows n0..n1, by bfloat16 pair products:
// W weight rows at a time (adjacent, so one stream; the next W prefetched: without, their short runs starved
// the prefetchers), each 32-wide slice of x loaded once for them all. One weight row at a time, with x
// reloaded for each, read the 1b head at 11 GB/s at eight rows, this at 30.
template <int M, int W = SharedRows(M)>
void RowsNKDp(const uint16_t* x, const uint16_t* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t k_pair = K / 32 * 32;
  int64_t n = n0;
  for (; n + W <= n1; n += W) {
    const uint16_t* __restrict row = w + n * K;
    __m512 acc[M][W];
    _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m)
      _Pragma("GCC unroll 4") for (int r = 0; r < W; ++r) acc[m][r] = _mm512_setzero_ps();
    const bool ahead = n + 2 * W <= n1;
    for (int64_t k = 0; k < k_pair; k += 32) {
      if (ahead) {  // the next W rows, to L2, a 64-byte line per row
        _Pragma("GCC unroll 4") for (int r = W; r < 2 * W; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(row + r * K + k), _MM_HINT_T1);
      }
      __m512bh wv[W];
      _Pragma("GCC unroll 4") for (int r = 0; r < W; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(row + r * K + k);
      _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
        _Pragma("GCC unroll 4") for (int r = 0; r < W; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < W; ++r) {
        float s = _mm512_reduce_add_ps(acc[m][r]);
        for (int64_t j = k_pair; j < K; ++j) s += widen(x[m * K + j]) * widen(row[r * K + j]);
        y[m * N + n + r] = s;
      }
  }
  if (n < n1) RowsNKDp<M, 1>(x, w, y, K, N, n, n1);  // the last rows of the part, one at a time
}

// M rows (1..8) of bfloat16 x against bfloat16 (K, N) weights, weight rows k0..k1 (k0 even), summed into
// acc (M x N float32) by pair products while the weights stream through once, in order: 2P weight rows
// at a time, 32 columns each, paired by unpack (within 128-bit lanes) and multiplied by the broadcast pairs
// of x. So acc holds the columns below N's last multiple of 32 in the unpack order (kPairOrder; Multiply
// puts them back). The loop before it walked column blocks down 128 weight rows at a time: too many
// streams for the prefetchers, 11-18 GB/s at one row where this reads 25-31 (bench/RESULTS.md).
constexpr int kStreamPairs = 4;  // eight weight rows per pass: at 8 rows, half the passes over acc of four
constexpr int kPairOrder[32] = {0,  1,  2,  3,  8,  9,  10, 11, 16, 17, 18, 19, 24, 25, 26, 27,
                                4,  5,  6,  7,  12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
template <int M, int P = kStreamPairs>
void RowsKNStream(const uint16_t* x, const uint16_t* w, float* acc, int64_t K, int64_t N, int64_t k0, int64_t k1) {
  const int64_t n_main = N / 32 * 32;
  for (int64_t k = k0; k < k1; k += 2 * P) {
    const int rows = static_cast<int>(std::min<int64_t>(2 * P, k1 - k));
    int32_t xp[M][P];  // (x[m, k + 2j], x[m, k + 2j + 1]), zeros past k1
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < P; ++j) {
        const uint32_t lo = 2 * j < rows ? x[m * K + k + 2 * j] : 0, hi = 2 * j + 1 < rows ? x[m * K + k + 2 * j + 1] : 0;
        xp[m][j] = static_cast<int32_t>(lo | hi << 16);
      }
    const uint16_t* r[2 * P];  // rows past k1 read row k, times a zero of x
    for (int i = 0; i < 2 * P; ++i) r[i] = w + (k + (i < rows ? i : 0)) * N;
    const bool ahead = k + 4 * P <= k1;
    for (int64_t n = 0; n < n_main; n += 32) {
      if (ahead) {  // the next pass's rows, to L2: without, the rows' short runs starved the prefetchers
        _Pragma("GCC unroll 8") for (int i = 2 * P; i < 4 * P; ++i)
          _mm_prefetch(reinterpret_cast<const char*>(w + (k + i) * N + n), _MM_HINT_T1);
      }
      __m512bh lo[P], hi[P];
      _Pragma("GCC unroll 4") for (int j = 0; j < P; ++j) {
        const __m512i a = _mm512_loadu_si512(r[2 * j] + n), b = _mm512_loadu_si512(r[2 * j + 1] + n);
        lo[j] = (__m512bh)_mm512_unpacklo_epi16(a, b);
        hi[j] = (__m512bh)_mm512_unpackhi_epi16(a, b);
      }
      _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) {
        float* out = acc + m * N + n;
        __m512 l = _mm512_loadu_ps(out), h = _mm512_loadu_ps(out + 16);
        _Pragma("GCC unroll 4") for (int j = 0; j < P; ++j) {
          const __m512bh xv = (__m512bh)_mm512_set1_epi32(xp[m][j]);
          l = _mm512_dpbf16_ps(l, xv, lo[j]);
          h = _mm512_dpbf16_ps(h, xv, hi[j]);
        }
        _mm512_storeu_ps(out, l);
        _mm512_storeu_ps(out + 16, h);
      }
    }
    for (int64_t n = n_main; n < N; ++n)
      for (int m = 0; m < M; ++m) {
        float s = acc[m * N + n];
        for (int i = 0; i < rows; ++i) s += widen(x[m * K + k + i]) * widen(w[(k + i) * N + n]);
        acc[m * N + n] = s;
      }
  }
}

#endif

// Products of more than 8 rows (prefill), where XLA's CPU GEMM reached 0.6-0.9x of oneDNN's (transformers')
// at the 270m and 1b bfloat16 prefill shapes: panels of kPanelCols columns and kPanelDepth weight rows are
// packed once (zeros past K and N), then tiles of kTileRows rows x kPanelCols columns keep their float32 sums
// in registers while the packed panel streams from L1/L2 and each input is broadcast once for the tile's
// vectors. Where the CPU has AVX512-BF16 a panel may hold (w[k, n], w[k + 1, n]) bfloat16 pairs (vdpbf16ps);
// everywhere it may hold float32 (bfloat16 widened as it is packed), multiplied by FMAs: AVX-512's 16 lanes,
// or eight (the vector extensions: AVX2, NEON) on every other CPU.
constexpr int kTileRows = 6;
#ifdef GEMMA3_AVX512
constexpr int64_t kPanelCols = 64;  // four vectors: a tile's 24 sums in AVX-512's 32 registers
#else
constexpr int64_t kPanelCols = 16;  // two vectors of eight: 12 sums, two panel vectors and a broadcast in 16
#endif
constexpr int64_t kPanelDepth = 256;
static_assert(kPanelDepth % 2 == 0, "a panel's depth is whole pairs, so only the last one can be odd");

#ifdef GEMMA3_DPBF16

// Columns n..n+cols (cols <= kPanelCols) of weight rows k0..k1 (at ldw apart) as pairs, kPanelCols wide.
void PackPairs(const uint16_t* w, uint16_t* out, int64_t ldw, int64_t n, int64_t cols, int64_t k0, int64_t k1) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                      37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55, 23, 54,
                                      22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  for (int64_t k = k0; k < k1; k += 2) {
    uint16_t* o = out + (k - k0) * kPanelCols;
    for (int64_t j = 0; j < kPanelCols; j += 32) {
      const int64_t valid = std::clamp<int64_t>(cols - j, 0, 32);
      const __mmask32 mask = valid == 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << valid) - 1);
      const __m512i a = _mm512_maskz_loadu_epi16(mask, w + k * ldw + n + j);
      const __m512i b = k + 1 < k1 ? _mm512_maskz_loadu_epi16(mask, w + (k + 1) * ldw + n + j) : _mm512_setzero_si512();
      _mm512_storeu_si512(o + 2 * j, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_storeu_si512(o + 2 * j + 32, _mm512_permutex2var_epi16(a, hi, b));
    }
  }
}

// The same panel from a matrix stored transposed, (N, K) at ldw apart (attention's keys, whose rows are the
// columns of k^T): each column's pair of rows is one 32-bit load.
void PackPairsNK(const uint16_t* w, uint16_t* out, int64_t ldw, int64_t n, int64_t cols, int64_t k0, int64_t k1) {
  std::memset(out, 0, sizeof(uint16_t) * ((k1 - k0 + 1) / 2 * 2 * kPanelCols));
  for (int64_t j = 0; j < cols; ++j) {
    const uint16_t* col = w + (n + j) * ldw;
    for (int64_t k = k0; k < k1; k += 2) {
      uint16_t* o = out + (k - k0) * kPanelCols + 2 * j;
      o[0] = col[k];
      o[1] = k + 1 < k1 ? col[k + 1] : 0;
    }
  }
}

#endif

#ifdef GEMMA3_AVX512
// A tile's column masks (cols of kPanelCols valid) and its R x kPanelCols sums: zero on the first panel of
// the depth, else what y holds; EndTile stores them back. Shared by the pair and float32 tiles.
template <int R>
inline void StartTile(const float* y, int64_t N, int64_t cols, bool first, __mmask16* masks,
                      __m512 (*acc)[kPanelCols / 16]) {
  constexpr int V = kPanelCols / 16;
  for (int v = 0; v < V; ++v) {
    const int64_t valid = std::clamp<int64_t>(cols - 16 * v, 0, 16);
    masks[v] = valid == 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << valid) - 1);
  }
  _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v)
      acc[r][v] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(masks[v], y + r * N + 16 * v);
}

template <int R>
inline void EndTile(float* y, int64_t N, const __mmask16* masks, __m512 (*acc)[kPanelCols / 16]) {
  _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 4") for (int v = 0; v < kPanelCols / 16; ++v)
      _mm512_mask_storeu_ps(y + r * N + 16 * v, masks[v], acc[r][v]);
}

#endif

#ifdef GEMMA3_DPBF16
// R rows of x (row stride K, from column k0) against a packed panel of `depth` weight rows into
// y[:, n..n+cols] (row stride N): set on the first panel of the depth, added to after.
template <int R>
void TileDp(const uint16_t* x, int64_t K, int64_t k0, int64_t depth, const uint16_t* panel, float* y, int64_t N,
            int64_t cols, bool first) {
  constexpr int V = kPanelCols / 16;
  __mmask16 masks[V];
  __m512 acc[R][V];
  StartTile<R>(y, N, cols, first, masks, acc);
  const int64_t pairs = depth / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh b[V];
    _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v)
      b[v] = (__m512bh)_mm512_loadu_si512(panel + p * 2 * kPanelCols + 32 * v);
    _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
      int32_t xp;
      std::memcpy(&xp, x + r * K + k0 + 2 * p, sizeof xp);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(xp);
      _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
    }
  }
  if (depth % 2) {  // K's odd last row, paired with zeros (the input's next element may not exist)
    __m512bh b[V];
    for (int v = 0; v < V; ++v) b[v] = (__m512bh)_mm512_loadu_si512(panel + pairs * 2 * kPanelCols + 32 * v);
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(x[r * K + k0 + depth - 1]));
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
    }
  }
  EndTile<R>(y, N, masks, acc);
}

#endif

#ifdef GEMMA3_AVX512
// The same product as float32 FMAs: on every CPU without pair products, and on those that run vdpbf16ps on
// one port and FMA on two (Intel's Sapphire and Emerald Rapids): the panel is widened as it is packed (PackF32)
// and x beforehand, so the inner loop is FMAs alone. On an Emerald Rapids it ran the 1b prefill's products 1.7x
// faster than the pairs; on Zen 4 the pairs are twice as fast. `Gemma3PairsOutpaceFloat32` times both.
void PackF32(const uint16_t* w, float* out, int64_t ldw, int64_t n, int64_t cols, int64_t k0, int64_t k1) {
  for (int64_t k = k0; k < k1; ++k) {
    float* o = out + (k - k0) * kPanelCols;
    for (int64_t j = 0; j < kPanelCols; j += 16) {
      const int64_t valid = std::clamp<int64_t>(cols - j, 0, 16);
      const __mmask32 mask = static_cast<__mmask32>((1u << valid) - 1);
      const __m256i h = _mm512_castsi512_si256(_mm512_maskz_loadu_epi16(mask, w + k * ldw + n + j));
      _mm512_storeu_ps(o + j, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    }
  }
}

// A float32 matrix's panel as it is (attention's float32 values).
void PackF32(const float* w, float* out, int64_t ldw, int64_t n, int64_t cols, int64_t k0, int64_t k1) {
  for (int64_t k = k0; k < k1; ++k)
    for (int64_t j = 0; j < kPanelCols; j += 16) {
      const __mmask16 mask = static_cast<__mmask16>((1u << std::clamp<int64_t>(cols - j, 0, 16)) - 1);
      _mm512_storeu_ps(out + (k - k0) * kPanelCols + j, _mm512_maskz_loadu_ps(mask, w + k * ldw + n + j));
    }
}

template <int R>
void TileDp(const float* x, int64_t K, int64_t k0, int64_t depth, const float* panel, float* y, int64_t N,
            int64_t cols, bool first) {
  constexpr int V = kPanelCols / 16;
  __mmask16 masks[V];
  __m512 acc[R][V];
  StartTile<R>(y, N, cols, first, masks, acc);
  for (int64_t k = 0; k < depth; ++k) {
    __m512 b[V];
    _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v) b[v] = _mm512_loadu_ps(panel + k * kPanelCols + 16 * v);
    _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * K + k0 + k]);
      _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
  EndTile<R>(y, N, masks, acc);
}
#else
// The float32 panels and tile in eight-lane vectors (AVX2 or NEON), kPanelCols (two vectors) wide.
template <typename S>
void PackF32(const S* w, float* out, int64_t ldw, int64_t n, int64_t cols, int64_t k0, int64_t k1) {
  for (int64_t k = k0; k < k1; ++k) {
    const S* row = w + k * ldw + n;
    float* o = out + (k - k0) * kPanelCols;
    if (cols == kPanelCols) {
      _Pragma("GCC unroll 4") for (int64_t j = 0; j < kPanelCols; j += 8) store8(o + j, load8(row + j));
    } else {
      for (int64_t j = 0; j < kPanelCols; ++j) o[j] = j < cols ? widen(row[j]) : 0.f;
    }
  }
}

// R rows of x (row stride K, from column k0) against a packed float32 panel of `depth` weight rows into
// y[:, 0..cols) (row stride N): set on the first panel of the depth, added to after. A tile narrower than
// the panel (N's last) goes through a whole-width copy.
template <int R>
void TileDp(const float* x, int64_t K, int64_t k0, int64_t depth, const float* panel, float* y, int64_t N,
            int64_t cols, bool first) {
  constexpr int V = kPanelCols / 8;
  const bool whole = cols == kPanelCols;
  float part[R][kPanelCols];
  f8 acc[R][V];
  _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
    const float* from = y + r * N;
    if (!first && !whole) {
      for (int64_t j = 0; j < kPanelCols; ++j) part[r][j] = j < cols ? y[r * N + j] : 0.f;
      from = part[r];
    }
    _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v) acc[r][v] = first ? f8{} : load8(from + 8 * v);
  }
  for (int64_t k = 0; k < depth; ++k) {
    f8 b[V];
    _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v) b[v] = load8(panel + k * kPanelCols + 8 * v);
    _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
      const float a = x[r * K + k0 + k];
      _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v) acc[r][v] += a * b[v];
    }
  }
  _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
    float* to = whole ? y + r * N : part[r];
    _Pragma("GCC unroll 4") for (int v = 0; v < V; ++v) store8(to + 8 * v, acc[r][v]);
    if (!whole) std::memcpy(y + r * N, part[r], sizeof(float) * cols);
  }
}
#endif

// The same panel from a matrix stored transposed, (N, K) at ldw apart (attention's keys), as PackPairsNK;
// bfloat16 widened, or float32.
template <typename S>
void PackF32NK(const S* w, float* out, int64_t ldw, int64_t n, int64_t cols, int64_t k0, int64_t k1) {
  std::memset(out, 0, sizeof(float) * (k1 - k0) * kPanelCols);
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t k = k0; k < k1; ++k) out[(k - k0) * kPanelCols + j] = widen(w[(n + j) * ldw + k]);
}

#ifdef GEMMA3_DPBF16
inline void Pack(const uint16_t* w, uint16_t* out, int64_t ldw, int64_t n, int64_t cols, int64_t k0, int64_t k1) {
  PackPairs(w, out, ldw, n, cols, k0, k1);
}
#endif
inline void Pack(const uint16_t* w, float* out, int64_t ldw, int64_t n, int64_t cols, int64_t k0, int64_t k1) {
  PackF32(w, out, ldw, n, cols, k0, k1);
}
inline void Pack(const float* w, float* out, int64_t ldw, int64_t n, int64_t cols, int64_t k0, int64_t k1) {
  PackF32(w, out, ldw, n, cols, k0, k1);
}

#ifdef GEMMA3_AMX
// Whether this process may use AMX tiles: Linux hands out their 8 KB of register state only on request, once per
// process (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA); a kernel that refuses (before 5.16, or a sandbox that
// hides it) leaves the AVX-512 tiles. GEMMA3_AMX=0 turns them off (for comparisons and tests).
bool AmxReady() {
  static const bool ready = [] {
    const char* off = std::getenv("GEMMA3_AMX");
    if (off && std::strcmp(off, "0") == 0) return false;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  }();
  return ready;
}

// Decode products of this many rows or more go through AMX tiles (RowsKNAmx, RowsNKAmx): one core read a 1b
// layer's or head's weights at 10-15 GB/s at 5-8 rows, where the pair loops fell to 5-9 (each row's
// vdpbf16ps on one port); at 1-2 rows the pair loops read 15-32 GB/s, 1.2-2x the tiles, and at 4 they tie.
constexpr int64_t kAmxRows = 5;

// ldtilecfg's 64 bytes: every tile 16 rows of 64 bytes (16 float32 sums, 32 bfloat16 inputs, or 16 pairs).
// With rows < 16 the sums and x of TileAmxWide (tiles 0-4) hold that many rows, for the rows after the last
// block of 16 (a decode step's 1-8).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
  explicit TileConfig(int r = 16) { std::fill(rows, rows + 5, static_cast<uint8_t>(r)); }
};

// Tiles 0-3 (float32 sums, 16 columns each) from y0..y3 at ldc bytes a row, or zeros on a depth's first panel;
// and stored back.
inline void StartSums(bool first, const float* y0, const float* y1, const float* y2, const float* y3,
                      int64_t ldc) {
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    _tile_loadd(0, y0, ldc);
    _tile_loadd(1, y1, ldc);
    _tile_loadd(2, y2, ldc);
    _tile_loadd(3, y3, ldc);
  }
}

inline void EndSums(float* y0, float* y1, float* y2, float* y3, int64_t ldc) {
  _tile_stored(0, y0, ldc);
  _tile_stored(1, y1, ldc);
  _tile_stored(2, y2, ldc);
  _tile_stored(3, y3, ldc);
}

// Rows m..m+32 of x against 32 columns of a pair panel (its depth a multiple of 32) into y: tiles 0-3 hold
// 2 x 2 blocks of 16 x 16 float32 sums, 4-5 two blocks of x (16 rows x 32 inputs), 6-7 the columns' two
// 16-wide slices of 16 pairs, as the panel holds them (a pair row's kPanelCols columns, 2 bfloat16 each, in
// order). One tdpbf16ps is 16 x 16 x 32 products: 1.9 TFLOP/s per core on an Emerald Rapids, against 175
// GFLOP/s of float32 FMAs there.
void TileAmx(const uint16_t* x, int64_t K, int64_t k0, int64_t depth, const uint16_t* panel, float* y,
             int64_t N, bool first) {
  const int64_t lda = K * sizeof(uint16_t), ldb = 2 * kPanelCols * sizeof(uint16_t), ldc = N * sizeof(float);
  StartSums(first, y, y + 16, y + 16 * N, y + 16 * N + 16, ldc);
  for (int64_t d = 0; d < depth; d += 32) {
    const uint16_t* b = panel + d * kPanelCols;  // pair row d / 2
    _tile_loadd(4, x + k0 + d, lda);
    _tile_loadd(6, b, ldb);
    _tile_loadd(7, b + 32, ldb);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, x + 16 * K + k0 + d, lda);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  EndSums(y, y + 16, y + 16 * N, y + 16 * N + 16, ldc);
}

// Rows of the product with a (N, K) matrix (the tied LM head) through AMX tiles, as y^T = w x^T: the weights'
// rows are the A operand as they lie in memory (16 rows x 32 inputs a tile: nothing packed, every line read
// once), x^T the B operand, packed once as pairs: xt[p * M + m] = (x[m, 2p], x[m, 2p + 1]). Blocks of B x 16
// weight rows from n (tiles 0-2 their sums, 3-5 their weights, 6 x), the rows `ahead` prefetched a line
// per step; each block's sums (16 rows x M) are stored and written to y transposed. K a multiple of 32.
template <int B>
void BlockNKAmx(const uint16_t* xt, int64_t M, const uint16_t* w, float* y, int64_t K, int64_t N, int64_t n,
                const uint16_t* ahead, int64_t ahead_rows) {
  const int64_t lda = K * sizeof(uint16_t), ldb = M * 2 * sizeof(uint16_t);
  _tile_zero(0);
  if (B > 1) _tile_zero(1);
  if (B > 2) _tile_zero(2);
  const uint16_t* a = w + n * K;
  for (int64_t d = 0; d < K; d += 32) {
    for (int64_t r = 0; r < ahead_rows; ++r) __builtin_prefetch(ahead + r * K + d, 0, 2);
    _tile_loadd(6, xt + d * M, ldb);  // pair row d / 2
    _tile_loadd(3, a + d, lda);
    _tile_dpbf16ps(0, 3, 6);
    if (B > 1) {
      _tile_loadd(4, a + 16 * K + d, lda);
      _tile_dpbf16ps(1, 4, 6);
    }
    if (B > 2) {
      _tile_loadd(5, a + 32 * K + d, lda);
      _tile_dpbf16ps(2, 5, 6);
    }
  }
  alignas(64) float sums[3][16 * 16];
  _tile_stored(0, sums[0], M * sizeof(float));
  if (B > 1) _tile_stored(1, sums[1], M * sizeof(float));
  if (B > 2) _tile_stored(2, sums[2], M * sizeof(float));
  for (int b = 0; b < B; ++b)
    for (int64_t m = 0; m < M; ++m)
      for (int r = 0; r < 16; ++r) y[m * N + n + 16 * b + r] = sums[b][r * M + m];
}

// Weight rows n0..n1 (multiples of 16) of that product, for M <= 16 rows.
void RowsNKAmx(const uint16_t* xt, int64_t M, const uint16_t* w, float* y, int64_t K, int64_t N, int64_t n0,
               int64_t n1) {
  TileConfig config;
  for (int t : {0, 1, 2, 6}) config.colsb[t] = static_cast<uint16_t>(M * sizeof(float));
  _tile_loadconfig(&config);
  for (int64_t n = n0; n < n1; n += 48) {
    // the block after next to L2 (in a probe the next block ran 1.1-1.7x slower, four blocks ahead no faster)
    const int64_t next = std::min<int64_t>(48, std::max<int64_t>(0, n1 - n - 96));
    switch (std::min<int64_t>(3, (n1 - n) / 16)) {
      case 3: BlockNKAmx<3>(xt, M, w, y, K, N, n, w + (n + 96) * K, next); break;
      case 2: BlockNKAmx<2>(xt, M, w, y, K, N, n, w + (n + 96) * K, next); break;
      default: BlockNKAmx<1>(xt, M, w, y, K, N, n, w + (n + 96) * K, next); break;
    }
  }
  _tile_release();
}

// Up to 16 rows of x (the tile shape's) against a whole pair panel (kPanelCols columns) into y: four chains of
// sums (tiles 0-3, 16 columns each) where half a panel has two, since each tdpbf16ps waits for the one before on
// its sums (a decode step's few rows are bound by that wait, not by the tiles' throughput). x in tile 4, the
// columns' slices in 5-7 (5 again for the last).
void TileAmxWide(const uint16_t* x, int64_t K, int64_t k0, int64_t depth, const uint16_t* panel, float* y,
                 int64_t N, bool first) {
  const int64_t lda = K * sizeof(uint16_t), ldb = 2 * kPanelCols * sizeof(uint16_t), ldc = N * sizeof(float);
  StartSums(first, y, y + 16, y + 32, y + 48, ldc);
  for (int64_t d = 0; d < depth; d += 32) {
    const uint16_t* b = panel + d * kPanelCols;  // pair row d / 2
    _tile_loadd(4, x + k0 + d, lda);
    _tile_loadd(5, b, ldb);
    _tile_loadd(6, b + 32, ldb);
    _tile_loadd(7, b + 64, ldb);
    _tile_dpbf16ps(0, 4, 5);
    _tile_dpbf16ps(1, 4, 6);
    _tile_dpbf16ps(2, 4, 7);
    _tile_loadd(5, b + 96, ldb);
    _tile_dpbf16ps(3, 4, 5);
  }
  EndSums(y, y + 16, y + 32, y + 48, ldc);
}

// Weight rows k0..k1 of a (K, N) bfloat16 matrix against M <= 16 rows of x through AMX tiles, summed into acc
// (M x Np floats, Np: N rounded up to 64). xp is x with its rows padded with zeros to Kp (a multiple of 32).
// Each pass takes 32 weight rows (16 pairs, one tile deep) and reads them along their length as
// RowsKNStream does, packing 64 columns at a time as pairs (4 KB, in L1, two buffers in turn) for TileAmxWide's
// four 16-column tiles, whose sums come from acc and go back: the GEMM's panels (256 rows x 128 bytes each) read
// memory at 7-8 GB/s a core against 18-20 for rows in order. The tile shape gives the sums and x M rows
// (TileConfig(M)).
void RowsKNAmx(const uint16_t* xp, int64_t Kp, int64_t M, const uint16_t* w, float* acc, int64_t K, int64_t N,
               int64_t k0, int64_t k1) {
  const TileConfig config(static_cast<int>(M));
  _tile_loadconfig(&config);
  const int64_t Np = (N + 63) / 64 * 64;
  alignas(64) uint16_t panels[2][16 * 2 * kPanelCols];
  int which = 0;
  for (int64_t k = k0; k < k1; k += 32) {
    const int64_t end = std::min(k1, k + 32);
    const bool ahead = end + 32 <= k1;
    if (end - k < 32) std::memset(panels, 0, sizeof panels);  // the pairs past k1 stay zero
    PackPairs(w, panels[which], N, 0, std::min<int64_t>(kPanelCols, N), k, end);
    for (int64_t n = 0; n < N; n += kPanelCols, which ^= 1) {
      if (ahead)  // the next pass's rows here, to L2
        for (int64_t r = end; r < end + 32; ++r)
          for (int64_t j = 0; j < kPanelCols; j += 32) _mm_prefetch(reinterpret_cast<const char*>(w + r * N + n + j), _MM_HINT_T1);
      // the next columns packed before these are multiplied: a tile load waits for the stores it reads to
      // reach L1 (no forwarding), so loading what was just packed stalled every pass
      const int64_t next = n + kPanelCols;
      if (next < N) PackPairs(w, panels[which ^ 1], N, next, std::min<int64_t>(kPanelCols, N - next), k, end);
      TileAmxWide(xp, Kp, k, 32, panels[which], acc + n, Np, false);
    }
  }
  _tile_release();
}

#endif

// Storage on 64-byte lines, for the GEMM's panels and the rows it reads: a tile row of AMX (64 bytes) that
// straddles two lines loads at 0.4x the speed (a 128-row tile loop ran 450 against 1,100 GFLOP/s).
template <typename T>
struct LineAllocator {
  using value_type = T;
  LineAllocator() = default;
  template <typename U>
  LineAllocator(const LineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const LineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LineAllocator<U>&) const { return false; }
};
template <typename T>
using Lines = std::vector<T, LineAllocator<T>>;

// Scratch kept between calls: one buffer per site and thread, grown when a call needs more, never shrunk nor
// cleared (the caller sets what it reads: zeroing a prefill attention's per-block buffers was a tenth of a
// SigLIP attention's samples under perf; `Zeroed` where a call sums into it). Decode calls these products
// every step, so a step allocates nothing: a buffer that glibc maps afresh (128 KB and up until its threshold
// moves; 1 MB and up where MALLOC_MMAP_THRESHOLD_ fixes it) is zero-filled page by page by the OS, which cost
// more than the screen's pass itself (ScreenArgmax's `kept`); a float32 batch-8 split head's scores alone are
// 8 MB. A thread holds one call's scratch at a time: RunParts' caller spins for its parts, it never
// runs another job's.
enum ScratchSite { kProductX, kProductXi, kProductAcc, kAttendQ, kAttendScores, kAttendAcc, kSplitMost,
                   kSplitTop, kSplitScale, kBlockX, kBlockScores, kBlockY, kGemmPanels,
                   kGemmDepthSums };
template <typename T, ScratchSite kSite>
T* Scratch(size_t n) {
  thread_local Lines<T> buffer;
  if (buffer.size() < n) {
    Lines<T>().swap(buffer);  // the old one goes first
    buffer.resize(n);
  }
  return buffer.data();
}
template <typename T, ScratchSite kSite>
T* Zeroed(size_t n) {
  T* p = Scratch<T, kSite>(n);
  std::fill_n(p, n, T{});
  return p;
}

// Slice i of `of` of the next panel's source (rows of kPanelCols weights at ldw apart; none without it) to L2,
// a 64-byte line at a time, so that packing it does not wait for memory.
template <typename S>
inline void PrefetchSlice(const S* ahead, int64_t rows, int64_t ldw, int64_t i, int64_t of) {
  if (ahead)
    for (int64_t r = rows * i / of; r < rows * (i + 1) / of; ++r)
      for (int64_t j = 0; j < kPanelCols; j += 64 / sizeof(S)) __builtin_prefetch(ahead + r * ldw + j, 0, 2);
}

// Rows m0..m1 of x against one packed panel (weight rows k0..k0+depth, columns n..n+cols) into y: set when
// `first` (the depth's first panel), added to after. With `ahead`, the source of the next panel (ahead_rows
// rows of kPanelCols weights, S each, at ldw apart) is prefetched to L2 a slice per tile, so that packing it
// does not wait for memory: at 128 rows (a 1b prefill) packing read the weights between the tiles'
// arithmetic, 10% of the product.
template <typename T, typename S = uint16_t>
void TilesDp(const T* x, int64_t K, int64_t k0, int64_t depth, const T* panel, float* y, int64_t N, int64_t n,
             int64_t cols, int64_t m0, int64_t m1, bool first, const S* ahead = nullptr,
             int64_t ahead_rows = 0, int64_t ldw = 0) {
#ifdef GEMMA3_AMX
  // Whole panels and blocks of 16 rows through AMX tiles (a depth's rest of under 32 after them, as pairs);
  // the rows after the last block of 16, and panels cut short by N, as below.
  if constexpr (std::is_same_v<T, uint16_t>) {
    const int64_t amx_depth = depth / 32 * 32, rows = m1 - m0, rest = rows % 16;
    // whole panels; or half of one (a padded head's values) where blocks of 32 rows cover them all
    if (amx_depth && (cols == kPanelCols || (cols == 32 && rows % 32 == 0)) && AmxReady()) {
      // a half of the panel's columns (16 KB of pairs) stays in L1 while the blocks of rows pass: both
      // halves and a block's x (32 rows) did not fit, and tiles loaded from L2 ran at a quarter of the speed.
      // Blocks of 32 rows; then one of 16 and the rest (under 16, with their own tile shape) a whole panel at
      // a time.
      const int64_t pairs = rows / 32, blocks = 2 * pairs + 2 * (rows % 32 >= 16) + 2 * (rest > 0);
      int64_t i = 0;
      auto prefetch = [&] { PrefetchSlice(ahead, ahead_rows, ldw, i++, blocks); };
      if (rows >= 16) {
        const TileConfig config;
        _tile_loadconfig(&config);
        for (int64_t h = 0; h < cols; h += 32)
          for (int64_t m = m0; m < m0 + 32 * pairs; m += 32) {
            prefetch();
            TileAmx(x + m * K, K, k0, amx_depth, panel + 2 * h, y + m * N + n + h, N, first);
          }
        if (rows % 32 >= 16) {
          const int64_t m = m0 + 32 * pairs;
          prefetch();
          prefetch();
          TileAmxWide(x + m * K, K, k0, amx_depth, panel, y + m * N + n, N, first);
        }
      }
      if (rest) {
        const TileConfig config(static_cast<int>(rest));
        _tile_loadconfig(&config);
        const int64_t m = m1 - rest;
        prefetch();
        prefetch();
        TileAmxWide(x + m * K, K, k0, amx_depth, panel, y + m * N + n, N, first);
      }
      _tile_release();
      if (amx_depth < depth)
        TilesDp(x, K, k0 + amx_depth, depth - amx_depth, panel + amx_depth * kPanelCols, y, N, n, cols, m0, m1,
                false);
      return;
    }
  }
#endif
  const int64_t tiles = std::max<int64_t>(1, (m1 - m0) / kTileRows);
  int64_t m = m0;
  for (int64_t i = 0; m + kTileRows <= m1; m += kTileRows, ++i) {
    PrefetchSlice(ahead, ahead_rows, ldw, i, tiles);
    // the next tile's sums, read and written once per depth block: past L2 (1b's 1,024 x 6,912) each tile
    // waited on their lines; prefetched, 1,024-row products went 600 -> 780 GFLOP/s on a Zen 5 (oneDNN ~850)
    for (int64_t r = m + kTileRows; r < std::min(m1, m + 2 * kTileRows); ++r)
      for (int64_t j = 0; j < cols; j += 16) __builtin_prefetch(y + r * N + n + j, 1, 3);
    TileDp<kTileRows>(x + m * K, K, k0, depth, panel, y + m * N + n, N, cols, first);
  }
  const T* xm = x + m * K;
  float* ym = y + m * N + n;
  switch (m1 - m) {
    case 1: TileDp<1>(xm, K, k0, depth, panel, ym, N, cols, first); break;
    case 2: TileDp<2>(xm, K, k0, depth, panel, ym, N, cols, first); break;
    case 3: TileDp<3>(xm, K, k0, depth, panel, ym, N, cols, first); break;
    case 4: TileDp<4>(xm, K, k0, depth, panel, ym, N, cols, first); break;
    case 5: TileDp<5>(xm, K, k0, depth, panel, ym, N, cols, first); break;
    default: break;
  }
}

// Rows of x per block of the GEMM: a block's slice of x, kPanelDepth deep, stays in L2 (256 KiB of it) while
// the part's panels pass. AMX tiles go faster with blocks of 128 rows (their sums, a panel's 32 KiB, near at
// hand for the next depth): 700-800 GFLOP/s on one core at 512-2048 rows of a 2048-deep product, 450-480
// with blocks of 510.
template <typename T>
int64_t BlockRows() {
#ifdef GEMMA3_AMX
  if (std::is_same_v<T, uint16_t> && AmxReady()) return 128;
#endif
  return (256 << 10) / (kPanelDepth * sizeof(T)) / kTileRows * kTileRows;
}

// Whether a product of M rows (at most BlockRows) packs a depth block of all its part's panels at once, weight row
// by weight row (PackRows), rather than a panel at a time. Where AMX tiles multiply, a 1b prefill's products (128
// rows) waited on the weights: a panel's packing read 128 bytes of a row, then jumped a whole row (2.3-13.8 KB),
// and the next panel's prefetch did not hide it (with weights out of the caches a product took 1.5x its time
// with them in L3). Read along the rows, the 1b prefill of 128 tokens took 8-11% less time (session 36, an Intel
// Xeon; at 1,024 rows no difference showed). Elsewhere the arithmetic is slower and the prefetch keeps up.
template <typename T>
bool PacksByRows(int64_t M) {
#ifdef GEMMA3_AMX
  if (std::is_same_v<T, uint16_t> && M <= BlockRows<T>() && AmxReady()) return true;
#endif
  (void)M;
  return false;
}

// Depth block k0..k1 of panels p0..p1 (each kPanelDepth x kPanelCols, one after another in `panels`), read a pair
// of weight rows at a time: a row's columns of all the panels lie together, (p1 - p0) x kPanelCols of them.
template <typename T, typename S>
void PackRows(const S* w, T* panels, int64_t N, int64_t p0, int64_t p1, int64_t k0, int64_t k1) {
  for (int64_t k = k0; k < k1; k += 2)
    for (int64_t p = p0; p < p1; ++p)
      Pack(w, panels + (p - p0) * kPanelDepth * kPanelCols + (k - k0) * kPanelCols, N, p * kPanelCols,
           std::min(kPanelCols, N - p * kPanelCols), k, std::min(k + 2, k1));
}

// Panels p0..p1 (kPanelCols columns each) of y = x w for all M rows, over weight rows ka..kb (kb < 0: K; y is set,
// not added to); T: what the panels hold, S: the weights. Up to BlockRows rows (unless PacksByRows), each panel is
// packed and multiplied in turn, the next one's weights prefetched. More rows read every panel's slice of x from
// memory (1024 rows, a 1b prefill of batch 8, ran 0.8x of XLA's float32 GEMM in eight-lane panels): then a depth
// slice of every panel of the part is packed first, and blocks of rows pass over them all.
template <typename T, typename S>
void GemmDp(const T* x, const S* w, float* y, int64_t M, int64_t K, int64_t N, int64_t p0, int64_t p1,
            int64_t ka = 0, int64_t kb = -1) {
  if (kb < 0) kb = K;
  constexpr int64_t kPanel = kPanelDepth * kPanelCols;
  const bool by_rows = PacksByRows<T>(M);
  if (M <= BlockRows<T>() && !by_rows) {
    Lines<T> panel(static_cast<size_t>(kPanel));
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = p * kPanelCols, cols = std::min(kPanelCols, N - n);
      for (int64_t k0 = ka; k0 < kb; k0 += kPanelDepth) {
        const int64_t k1 = std::min(kb, k0 + kPanelDepth);
        Pack(w, panel.data(), N, n, cols, k0, k1);
        // the block packed next: the next rows of this panel, else the first of the next panel
        const bool down = k1 < kb;
        const S* ahead = down ? w + k1 * N + n : p + 1 < p1 ? w + ka * N + n + kPanelCols : nullptr;
        const int64_t rows = down ? std::min(kb, k1 + kPanelDepth) - k1 : std::min(kb - ka, kPanelDepth);
        TilesDp(x, K, k0, k1 - k0, panel.data(), y, N, n, cols, 0, M, k0 == ka, ahead, rows, N);
      }
    }
    return;
  }
  const size_t size = static_cast<size_t>((p1 - p0) * kPanel);
  Lines<T> owned(by_rows ? 0 : size);
  T* const panels = by_rows ? Scratch<T, kGemmPanels>(size) : owned.data();
  for (int64_t k0 = ka; k0 < kb; k0 += kPanelDepth) {
    const int64_t k1 = std::min(kb, k0 + kPanelDepth);
    if (by_rows)
      PackRows(w, panels, N, p0, p1, k0, k1);
    else
      for (int64_t p = p0; p < p1; ++p)
        Pack(w, panels + (p - p0) * kPanel, N, p * kPanelCols, std::min(kPanelCols, N - p * kPanelCols), k0, k1);
    for (int64_t m0 = 0; m0 < M; m0 += BlockRows<T>())
      for (int64_t p = p0; p < p1; ++p)
        TilesDp(x, K, k0, k1 - k0, panels + (p - p0) * kPanel, y, N, p * kPanelCols,
                std::min(kPanelCols, N - p * kPanelCols), m0, std::min(M, m0 + BlockRows<T>()), k0 == ka);
  }
}

// How many parts a GEMM of M rows splits its weight rows (depth) into, each summed into its own sums and added
// after; 1: it splits the panels (columns) instead (GemmParts). Where PacksByRows, packing reads the weights from
// memory without arithmetic beside it, so a part's runs along the weight rows set its speed: a narrow product
// (1b's down projection, N = 1152) cut in parts of three panels read 384 bytes a row, and one thread's share
// took 2.99 ms with its weights out of the caches where half the depth over all the columns, one stream, took
// 1.98 (session 37, an Intel Xeon; q and o projections 10-14% less). Wider products (the gate's 6912 columns)
// lost that way: their sums no longer stay near at hand.
template <typename T>
int64_t DepthParts(int64_t M, int64_t K, int64_t N, int64_t threads) {
  if (threads < 2 || !PacksByRows<T>(M) || N * static_cast<int64_t>(sizeof(uint16_t)) / threads >= 2048) return 1;
  return K / threads >= kPanelDepth ? threads : 1;
}

// Every panel of a (K, N) matrix packed once, for products that many row blocks share (attention's keys and
// values): panel p's depth block d at (p * blocks + d) * kPanelDepth * kPanelCols. pack(out, n, cols, k0, k1)
// is a packing (pairs, or float32 for T = float) with the matrix bound.
template <typename T, typename Pack>
Lines<T> PackPanels(int64_t K, int64_t N, const Pack& pack) {
  const int64_t panels = (N + kPanelCols - 1) / kPanelCols, blocks = (K + kPanelDepth - 1) / kPanelDepth;
  Lines<T> out(static_cast<size_t>(panels * blocks) * kPanelDepth * kPanelCols);
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t d = 0; d < blocks; ++d)
      pack(out.data() + (p * blocks + d) * kPanelDepth * kPanelCols, p * kPanelCols,
           std::min(kPanelCols, N - p * kPanelCols), d * kPanelDepth, std::min(K, (d + 1) * kPanelDepth));
  return out;
}

// Columns n0..n1 of y (rows x N) = x (rows x K) w over w's rows k0..k1 alone (the rest of x is taken as
// zeros), w from PackPanels; n0 a multiple of kPanelCols, k0 of kPanelDepth.
template <typename T>
void GemmPanels(const T* x, const T* panels, float* y, int64_t K, int64_t N, int64_t rows, int64_t n0, int64_t n1,
                int64_t k0, int64_t k1) {
  const int64_t blocks = (K + kPanelDepth - 1) / kPanelDepth;
  for (int64_t p = n0 / kPanelCols; p * kPanelCols < n1; ++p)
    for (int64_t d = k0 / kPanelDepth; d * kPanelDepth < k1; ++d) {
      const int64_t k = d * kPanelDepth;
      TilesDp(x, K, k, std::min(K, k + kPanelDepth) - k, panels + (p * blocks + d) * kPanelDepth * kPanelCols, y, N,
              p * kPanelCols, std::min(kPanelCols, N - p * kPanelCols), 0, rows, k == k0);
    }
}

// How many parts the GEMM's panels are cut into, claimed as threads come free: several a thread where they
// can be (one core of an Intel Xeon ran AMX tiles at 300 GFLOP/s while the other ran 700, a neighbour's load,
// and halves left the fast one waiting), but equal parts of two panels or more. On a Zen 4 the 1b products of
// N = 1152 (18 panels) ran at 315-358 GFLOP/s in 4, 8 or 12 uneven parts against 367-405 in 2 or 6 equal
// ones; parts of one panel each lost 7-24% at 128-342 rows, each waiting to read its first panel's weights.
int64_t GemmParts(int64_t panels, int64_t threads) {
  for (int64_t each : {3, 4, 5, 6, 7, 8, 2, 1})
    if (panels % (each * threads) == 0 && panels / (each * threads) >= 2) return each * threads;
  return std::min<int64_t>(panels, 4 * threads);
}

// Runs parts 0..parts-1 of a job on the calling thread and on XLA's intra-op pool. Whoever comes first
// claims the next part, so the caller never waits for a task that has not started (the pool may be busy,
// or the caller may be one of its threads); it waits only for parts another thread is running.
template <typename F>
void RunParts(ffi::ThreadPool& pool, int64_t parts, const F& part) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto shared = std::make_shared<Shared>();
  const F* job = &part;  // on the caller's stack: a task that starts after every part was claimed never reads it
  auto work = [shared, parts, job] {
    for (int64_t i; (i = shared->next.fetch_add(1)) < parts;) {
      (*job)(i);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < parts; ++t) pool.Schedule(decltype(work)(work));
  work();
  // A part runs for tens of microseconds to a few milliseconds: spin briefly, then give the core away
  // (on a machine shared with other processes the thread we wait for may need it).
  for (int spins = 0; shared->done.load(std::memory_order_acquire) < parts; ++spins) {
    if (spins < 4096) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

// Whether a product takes the pair-product loops, which read x as it is (the others read a float32 copy).
template <typename T>
constexpr bool UsesPairs() {
#ifdef GEMMA3_DPBF16
  return std::is_same_v<T, uint16_t>;
#else
  return false;
#endif
}

// y (M x N) = the sum of the parts' accumulators (parts x M rows of ld >= N floats, from loops that split the
// weight rows; ld 0: N), whose columns below N's last multiple of `block` lie in `order` within each block (no
// order: in order).
void AddParts(const float* acc, int64_t parts, int64_t M, int64_t N, float* y, const int* order = nullptr,
              int64_t block = 1, int64_t ld = 0) {
  const int64_t n_main = order ? N / block * block : 0, stride = ld ? ld : N;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float s = 0.f;
      for (int64_t i = 0; i < parts; ++i) s += acc[(i * M + m) * stride + n];
      y[m * N + (n < n_main ? n - n % block + order[n % block] : n)] = s;
    }
}

// f(std::integral_constant<int, m>) for m rows (1..8), so that loops can be compiled for each row count.
template <typename F>
void WithRows(int64_t m, const F& f) {
  switch (m) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

template <int M, typename T>
void MultiplyRows(ffi::ThreadPool& pool, int64_t parts, const T* x_in, const float* x, const T* w, float* y,
                  int64_t K, int64_t N, bool w_is_nk) {
#ifdef GEMMA3_DPBF16
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (w_is_nk) {
#ifdef GEMMA3_AMX
      if (M >= kAmxRows && K % 32 == 0 && N >= 16 && AmxReady()) {
        Lines<uint16_t> xt(static_cast<size_t>(K) * M);
        for (int64_t k = 0; k < K; ++k)
          for (int m = 0; m < M; ++m) xt[(k / 2 * M + m) * 2 + k % 2] = x_in[m * K + k];
        const int64_t blocks = N / 16;
        RunParts(pool, parts, [&](int64_t i) {
          RowsNKAmx(xt.data(), M, w, y, K, N, blocks * i / parts * 16, blocks * (i + 1) / parts * 16);
        });
        if (blocks * 16 < N) RowsNKDp<M>(x_in, w, y, K, N, blocks * 16, N);
        return;
      }
#endif
      RunParts(pool, parts, [&](int64_t i) { RowsNKDp<M>(x_in, w, y, K, N, N * i / parts, N * (i + 1) / parts); });
      return;
    }
    // each part sums its own even block of weight rows into its own acc, added after
    const int64_t pairs = (K + 1) / 2;
    float* const acc = Zeroed<float, kProductAcc>(static_cast<size_t>(parts) * M * N);
    RunParts(pool, parts, [&](int64_t i) {
      RowsKNStream<M>(x_in, w, acc + i * M * N, K, N, std::min(K, pairs * i / parts * 2),
                      std::min(K, pairs * (i + 1) / parts * 2));
    });
    AddParts(acc, parts, M, N, y, kPairOrder, 32);
    return;
  }
#endif
  if (w_is_nk) {
    if constexpr (std::is_same_v<T, uint16_t>) {
      float* const xi = Zeroed<float, kProductXi>(static_cast<size_t>(M) * K);
      for (int m = 0; m < M; ++m) Interleave(x + m * K, xi + m * K, K / 16 * 16);
      RunParts(pool, parts, [&](int64_t i) { RowsNK<M>(x, xi, w, y, K, N, N * i / parts, N * (i + 1) / parts); });
    } else {
      RunParts(pool, parts, [&](int64_t i) { RowsNK<M>(x, w, y, K, N, N * i / parts, N * (i + 1) / parts, K); });
    }
  } else {
    // float32, or bfloat16 widened where the CPU has no pair products: each part sums its own block of weight
    // rows into its own acc, added after (for bfloat16 at 1-8 rows on AVX2, 1.1-1.6x the column blocks and
    // four-row passes this replaced: bench/RESULTS.md)
    float* const acc = Zeroed<float, kProductAcc>(static_cast<size_t>(parts) * M * N);
    RunParts(pool, parts, [&](int64_t i) {
      RowsKNSum<M>(x, w, acc + i * M * N, K, N, K * i / parts, K * (i + 1) / parts, N);
    });
    AddParts(acc, parts, M, N, y);
  }
}

// How many parts a product that reads `bytes` of weights once is split into: one per thread, but one alone below
// ~256 KiB, where a second thread costs more (its wake-up) than it saves. (Four parts per thread, for balance
// when another process preempts one, measured slower: 24.5 against 25.9 tok/s at 270m float32 batch 1, 35.6
// against 41.5 in bfloat16.)
int64_t ReadParts(ffi::ThreadPool& pool, size_t bytes) {
  return bytes < (256 << 10) ? 1 : std::max<int64_t>(1, pool.num_threads());
}

template <typename T>
void Multiply(ffi::ThreadPool& pool, const T* x_in, const T* w, float* y, int64_t M, int64_t K, int64_t N,
              bool w_is_nk) {
  const int64_t parts = ReadParts(pool, static_cast<size_t>(K) * N * sizeof(T));
#ifdef GEMMA3_AMX
  // (K, N) bfloat16 weights through the GEMM's panels and AMX tiles: the pair loops below are bound by their
  // instructions at 8 rows (vdpbf16ps on one port, each row's sums loaded and stored per pass)
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (!w_is_nk && M >= kAmxRows && AmxReady()) {  // each part its own block of weight rows, summed after
      const int64_t Kp = (K + 31) / 32 * 32, Np = (N + 63) / 64 * 64, tiles = Kp / 32;
      uint16_t* const xp = Zeroed<uint16_t, kProductXi>(static_cast<size_t>(M * Kp));
      for (int64_t m = 0; m < M; ++m) std::memcpy(xp + m * Kp, x_in + m * K, K * sizeof(uint16_t));
      float* const acc = Zeroed<float, kProductAcc>(static_cast<size_t>(parts * M * Np));
      RunParts(pool, parts, [&](int64_t i) {
        RowsKNAmx(xp, Kp, M, w, acc + i * M * Np, K, N, std::min(K, tiles * i / parts * 32),
                  std::min(K, tiles * (i + 1) / parts * 32));
      });
      AddParts(acc, parts, M, N, y, nullptr, 1, Np);
      return;
    }
  }
#endif
  const size_t widened = UsesPairs<T>() ? 0 : static_cast<size_t>(M) * K;
  float* const x = Scratch<float, kProductX>(widened);
  for (size_t i = 0; i < widened; ++i) x[i] = widen(x_in[i]);
  WithRows(M, [&](auto rows) { MultiplyRows<rows()>(pool, parts, x_in, x, w, y, K, N, w_is_nk); });
}

// Attention in place over a cache's keys and values (or a prefill chunk's own), per (row, kv head): scores
// q.k for every entry, the visibility mask and a float32 softmax, then the probabilities times the values.
// Why: XLA's CPU backend multiplied the scores and values as library dots that want their operands in another
// layout, so every decode step copied each layer's whole key and value cache transposed (4% of a 270m float32
// step at 256 entries, more at longer contexts), and a bfloat16 prefill widened q, k and v to float32 around
// its dots. A decode step's few query rows stream the entries once (RowsNK, RowsKNSum; with few (row, kv head)
// pairs the entries are split between the threads); many rows, where the kernel has its GEMM (AVX512-BF16),
// go through it against keys and values packed once per pair, each block of rows over the entries it sees
// (AttendGemm). Probabilities are rounded to bfloat16 before multiplying bfloat16 values, as the einsum path
// rounds them (AttendGemm rounds the exponentials and divides the products by their sum after).
//   q (B, T, N, H), already scaled, float32 or bfloat16; keys, values (Bc >= B, S, Kh, H) float32 or bfloat16
//   (as its bits), of which the first B rows are read; visible (B, T, S), or none: every entry seen (SigLIP's
//   patches); out (B, T, N, H) float32.
typedef int32_t i8v __attribute__((vector_size(32)));
// exp(x) for x <= 0 (a softmax's x - max), a vector F of float32 (I: int32 lanes alike) at a time: 2^n e^r with
// |r| <= ln 2 / 2 and Cephes' degree-6 polynomial (1-2 ulp against std::exp); 0 below float32's smallest normal
// exp (x < -87.3).
template <typename F, typename I>
inline F ExpLanes(F x) {
  const F low = F{} - 87.3f;
  const I under = x < low;
  x = x < low ? low : x;
  F n = x * 1.44269504088896341f + 0.5f;
  const F t = __builtin_convertvector(__builtin_convertvector(n, I), F);  // truncated: floor for n > t
  n = t > n ? t - 1.f : t;
  x -= n * 0.693359375f;
  x -= n * -2.12194440e-4f;
  F y = 1.9875691500e-4f * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * (x * x) + x + 1.f;
  const I scale = (__builtin_convertvector(n, I) + 127) << 23;
  F two_n;
  std::memcpy(&two_n, &scale, sizeof two_n);
  y *= two_n;
  return under ? F{} : y;
}

// The softmax's lanes: sixteen with AVX-512 (half the instructions of eight), else eight.
#ifdef GEMMA3_AVX512
constexpr int kSoftLanes = 16;
#else
constexpr int kSoftLanes = 8;
#endif
typedef float SoftF __attribute__((vector_size(4 * kSoftLanes)));
typedef int32_t SoftI __attribute__((vector_size(4 * kSoftLanes)));
typedef uint32_t SoftU __attribute__((vector_size(4 * kSoftLanes)));
typedef uint16_t SoftH __attribute__((vector_size(2 * kSoftLanes)));

// A probability as the attention's products read it: float32, or a bfloat16's bits (already rounded).
template <typename T>
inline T ToOut(float f) {
  if constexpr (std::is_same_v<T, float>) {
    return f;
  } else {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    return static_cast<uint16_t>(bits >> 16);
  }
}

inline float RoundToBfloat16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;  // nearest, ties to even (f is finite)
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// A row of scores (S) made probabilities in `out` (float32, maybe rounded to bfloat16; or bfloat16's bits), which
// may be the row itself: masked entries count as float32's lowest (as the einsum path masks them, so a row with
// nothing visible averages every entry), then softmax; seen null: every entry visible. kSoftLanes at a time in
// each of three passes (the maximum, the exponentials and their sum, the scaling): one scalar chain of maxima,
// 4 cycles an entry, was half of a SigLIP attention's time, and widening the mask's bytes to lanes a third.
// Returns what the products with the probabilities are still to be divided by: 1, or with `divide_later` (the
// probabilities rounded to bfloat16) the exponentials' sum, the exponentials themselves rounded and written in
// their own pass (a third pass over the row, to divide them, cost more than dividing the products' few columns).
template <typename T>
float SoftmaxRow(float* row, const bool* seen, int64_t S, bool round_to_bfloat16, T* out, bool divide_later = false) {
  constexpr float kMasked = -3.4028234663852886e38f;
  constexpr int L = kSoftLanes;
  const int64_t s_main = S / L * L;
  auto all_seen = [&](int64_t s) {  // L entries from s visible (widening the bytes to a lane mask cost more)
    if (!seen) return true;
    uint64_t words[kSoftLanes / 8];
    std::memcpy(words, seen + s, sizeof words);
    for (uint64_t w : words)
      if (w != 0x0101010101010101ull) return false;
    return true;
  };
  auto load = [&](int64_t s, float otherwise) {  // the lanes of entries not seen set to `otherwise`
    SoftF v;
    std::memcpy(&v, row + s, sizeof v);
    if (!all_seen(s))
      for (int i = 0; i < L; ++i) v[i] = seen[s + i] ? v[i] : otherwise;
    return v;
  };
  auto put = [&](int64_t s, SoftF v, bool rounded) {  // L probabilities to out, rounded to bfloat16 or not
    SoftU bits;
    std::memcpy(&bits, &v, sizeof bits);
    if (rounded) bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;  // nearest, ties to even
    if constexpr (std::is_same_v<T, float>) {
      std::memcpy(out + s, &bits, sizeof bits);
    } else {
      const SoftH halves = __builtin_convertvector(bits >> 16, SoftH);
      std::memcpy(out + s, &halves, sizeof halves);
    }
  };
  SoftF tops[2] = {SoftF{} + kMasked, SoftF{} + kMasked};  // two chains
  for (int64_t s = 0; s < s_main; s += L) {
    const SoftF v = load(s, kMasked);
    SoftF& top = tops[(s / L) & 1];
    top = top < v ? v : top;
  }
  float top = kMasked;
  for (int i = 0; i < L; ++i) top = std::max({top, tops[0][i], tops[1][i]});
  for (int64_t s = s_main; s < S; ++s) top = std::max(top, !seen || seen[s] ? row[s] : kMasked);
  if (top == kMasked) {  // nothing visible: every entry alike
    const float each = divide_later ? 1.f : round_to_bfloat16 ? RoundToBfloat16(1.f / S) : 1.f / S;
    for (int64_t s = 0; s < S; ++s) out[s] = ToOut<T>(each);
    return divide_later ? static_cast<float>(S) : 1.f;
  }
  SoftF sums = {};
  for (int64_t s = 0; s < s_main; s += L) {
    SoftF e = ExpLanes<SoftF, SoftI>(load(s, top) - top);
    if (!all_seen(s))
      for (int i = 0; i < L; ++i) e[i] = seen[s + i] ? e[i] : 0.f;
    sums += e;
    if (divide_later) put(s, e, true);
    else std::memcpy(row + s, &e, sizeof e);
  }
  float total = 0.f;
  for (int i = 0; i < L; ++i) total += sums[i];
  for (int64_t s = s_main; s < S; ++s) {
    const float e = !seen || seen[s] ? std::exp(row[s] - top) : 0.f;
    total += e;
    if (divide_later) out[s] = ToOut<T>(RoundToBfloat16(e));
    else row[s] = e;
  }
  if (divide_later) return total;
  // rounded to bfloat16, a product per entry rather than a division (a tenth of the time; the rounding hides the
  // difference); float32 probabilities divided, as XLA's softmax does (the product moved float32 logits by 1e-5)
  const bool rounded = round_to_bfloat16 || !std::is_same_v<T, float>;
  const float scale = 1.f / total;
  for (int64_t s = 0; s < s_main; s += L) {
    SoftF v;
    std::memcpy(&v, row + s, sizeof v);
    put(s, rounded ? v * scale : v / total, rounded);
  }
  for (int64_t s = s_main; s < S; ++s)
    out[s] = ToOut<T>(rounded ? RoundToBfloat16(row[s] * scale) : row[s] / total);
  return 1.f;
}

struct AttentionShape {
  int64_t B, Tq, N, H, S, Kh;
  int64_t G() const { return N / Kh; }
  int64_t R() const { return Tq * G(); }  // query rows (t, g) of a (row, kv head) pair
  int64_t units() const { return B * Kh; }
  int64_t ld() const { return Kh * H; }  // between a pair's entries
  int64_t base(int64_t u) const { return (u / Kh * S * Kh + u % Kh) * H; }  // the pair's entry 0
  int64_t q_row(int64_t u, int64_t r) const { return ((u / Kh * Tq + r / G()) * N + u % Kh * G() + r % G()) * H; }
  int64_t mask_row(int64_t u, int64_t r) const { return (u / Kh * Tq + r / G()) * S; }
};

// The few-rows path: each pair's rows stream its entries (split between threads when pairs are few).
template <typename Q, typename T>
void AttendRows(ffi::ThreadPool& pool, const AttentionShape& a, const Q* q, const T* keys, const T* values,
                const bool* visible, float* out) {
  const int64_t R = a.R(), S = a.S, H = a.H, units = a.units();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // Split each pair's entries between the threads when there are fewer pairs than threads and enough to read.
  const bool big = static_cast<size_t>(units) * 2 * S * H * sizeof(T) >= (256 << 10);
  const int64_t splits = units < threads && big ? std::min<int64_t>((threads + units - 1) / units, S) : 1;
  const int64_t parts = units * splits;
  float* const rows = Scratch<float, kAttendQ>(static_cast<size_t>(units) * R * H);
  float* const p = Zeroed<float, kAttendScores>(static_cast<size_t>(units) * R * S);
  for (int64_t u = 0; u < units; ++u)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t h = 0; h < H; ++h) rows[(u * R + r) * H + h] = widen(q[a.q_row(u, r) + h]);
  // Part i: entries s0..s1 of pair u, eight query rows r.. at a time: step(m, i, u, r, s0, s1).
  auto each_part = [&](const auto& step) {
    RunParts(pool, parts, [&](int64_t i) {
      const int64_t u = i / splits, s0 = S * (i % splits) / splits, s1 = S * (i % splits + 1) / splits;
      for (int64_t r = 0; r < R; r += kMaxRows)
        WithRows(std::min(kMaxRows, R - r), [&](auto m) { step(m, i, u, r, s0, s1); });
    });
  };
  each_part([&](auto m, int64_t, int64_t u, int64_t r, int64_t s0, int64_t s1) {
    RowsNK<m()>(rows + (u * R + r) * H, keys + a.base(u), p + (u * R + r) * S, H, S, s0, s1, a.ld());
  });
  for (int64_t u = 0; u < units; ++u)
    for (int64_t r = 0; r < R; ++r)
      SoftmaxRow(p + (u * R + r) * S, visible ? visible + a.mask_row(u, r) : nullptr, S,
                 std::is_same_v<T, uint16_t>, p + (u * R + r) * S);
  float* const acc = Zeroed<float, kAttendAcc>(static_cast<size_t>(parts) * R * H);
  each_part([&](auto m, int64_t i, int64_t u, int64_t r, int64_t s0, int64_t s1) {
    RowsKNSum<m()>(p + (u * R + r) * S, values + a.base(u), acc + (i * R + r) * H, S, H, s0, s1, a.ld());
  });
  for (int64_t u = 0; u < units; ++u)
    for (int64_t r = 0; r < R; ++r) {
      float* o = out + a.q_row(u, r);
      for (int64_t h = 0; h < H; ++h) {
        float sum = 0.f;
        for (int64_t i = u * splits; i < (u + 1) * splits; ++i) sum += acc[(i * R + r) * H + h];
        o[h] = sum;
      }
    }
}

// The entries rows r0..r0+rows of pair u see, [lo, hi) widened to whole depth blocks of kPanelDepth: a causal
// chunk's early rows see its early entries only, a sliding window's a band. All of them if a row sees nothing
// (it averages every entry, as the einsum path does). Outside the range a row's probabilities are exactly
// zero, so products over the range alone are the same sums.
std::pair<int64_t, int64_t> SeenRange(const AttentionShape& a, const bool* visible, int64_t u, int64_t r0,
                                      int64_t rows) {
  if (!visible) return {0, a.S};  // every entry (bidirectional: SigLIP's patches)
  int64_t lo = a.S, hi = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const bool* seen = visible + a.mask_row(u, r0 + r);
    const bool* first = std::find(seen, seen + a.S, true);
    if (first == seen + a.S) return {0, a.S};
    lo = std::min<int64_t>(lo, first - seen);
    int64_t last = a.S;
    while (!seen[last - 1]) --last;
    hi = std::max(hi, last);
  }
  return {lo / kPanelDepth * kPanelDepth, std::min(a.S, (hi + kPanelDepth - 1) / kPanelDepth * kPanelDepth)};
}

// The many-rows path (prefill): each pair's keys (as k^T) and values packed once, then blocks of
// query rows: scores by the GEMM, softmax, exponentials (rounded to bfloat16) times the values by it, divided by
// their sum, over the entries the block sees (SeenRange: half the work of a causal prefill, a sliding window's
// band alone).
// T: uint16_t multiplies bfloat16 pairs, float multiplies float32 panels widened as they are packed (where
// the CPU runs FMAs faster, `float32_gemm`). In: what q, keys and values hold, bfloat16 (uint16_t) or float32
// (then T is float, and the probabilities stay float32, as XLA's float32 einsums keep them).
template <typename T, typename In>
void AttendGemm(ffi::ThreadPool& pool, const AttentionShape& a, const In* q, const In* keys, const In* values,
                const bool* visible, float* out) {
  const int64_t R = a.R(), S = a.S, H = a.H, units = a.units();
  constexpr bool kPairs = std::is_same_v<T, uint16_t>, kHalves = std::is_same_v<In, uint16_t>;
  static_assert(kHalves || !kPairs, "float32 attention multiplies float32 panels");
  // In AMX tiles the head is padded with zeros to whole tiles, 32 deep for the scores and 32 wide for the values
  // (SigLIP's heads of 72: the rest of 8 went through pair loops, which took as long as the tiles).
  bool amx = false;
#ifdef GEMMA3_AMX
  amx = kPairs && AmxReady();
#endif
  const int64_t Hp = amx ? (H + 31) / 32 * 32 : H;  // the padded head: depth of the scores, width of the values
  constexpr int64_t kMaxBlockRows = 64;
  const int64_t kBlockRows = amx ? kMaxBlockRows : 8 * kTileRows;  // AMX: two blocks of 32 rows (TileAmx's)
  const int64_t blocks = (R + kBlockRows - 1) / kBlockRows;
  std::vector<Lines<T>> keys_t(units), vals(units);
  RunParts(pool, units, [&](int64_t u) {
    keys_t[u] = PackPanels<T>(Hp, S, [&](T* o, int64_t n, int64_t cols, int64_t k0, int64_t k1) {
      if constexpr (kPairs) PackPairsNK(keys + a.base(u), o, a.ld(), n, cols, k0, std::min(k1, H));
      else PackF32NK(keys + a.base(u), o, a.ld(), n, cols, k0, k1);
    });
    vals[u] = PackPanels<T>(S, Hp, [&](T* o, int64_t n, int64_t cols, int64_t k0, int64_t k1) {
      Pack(values + a.base(u), o, a.ld(), n, std::min(cols, H - n), k0, k1);
    });
  });
  RunParts(pool, units * blocks, [&](int64_t i) {
    const int64_t u = i / blocks, r0 = i % blocks * kBlockRows, rows = std::min(kBlockRows, R - r0);
    const auto [s0, s1] = SeenRange(a, visible, u, r0, rows);
    // every element the products read is written first: x's query rows (padded with zeros to Hp), then the
    // exponentials over [s0, s1); the scores and y are set on the first panel of their depth
    T* const x = Scratch<T, kBlockX>(static_cast<size_t>(rows) * std::max(Hp, S));
    float* const scores = Scratch<float, kBlockScores>(static_cast<size_t>(rows) * S);
    float* const y = Scratch<float, kBlockY>(static_cast<size_t>(rows) * Hp);
    for (int64_t r = 0; r < rows; ++r) {
      const In* from = q + a.q_row(u, r0 + r);
      T* to = x + r * Hp;
      if constexpr (std::is_same_v<T, In>) std::memcpy(to, from, sizeof(T) * H);
      else for (int64_t h = 0; h < H; ++h) to[h] = widen(from[h]);
      std::fill(to + H, to + Hp, T{});
    }
    GemmPanels(x, keys_t[u].data(), scores, Hp, S, rows, s0, s1, 0, Hp);
    float divisors[kMaxBlockRows];
    for (int64_t r = 0; r < rows; ++r)
      divisors[r] = SoftmaxRow(scores + r * S + s0, visible ? visible + a.mask_row(u, r0 + r) + s0 : nullptr,
                               s1 - s0, kHalves, x + r * S + s0, /*divide_later=*/kHalves);
    GemmPanels(x, vals[u].data(), y, S, Hp, rows, 0, Hp, s0, s1);
    for (int64_t r = 0; r < rows; ++r) {
      float* o = out + a.q_row(u, r0 + r);
      for (int64_t h = 0; h < H; ++h) o[h] = y[r * Hp + h] / divisors[r];
    }
  });
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer keys, ffi::AnyBuffer values,
                     ffi::Buffer<ffi::PRED> visible, ffi::Result<ffi::Buffer<ffi::F32>> out, int64_t float32_gemm,
                     int64_t all_visible) {
  auto qd = q.dimensions();
  auto kd = keys.dimensions();
  auto md = visible.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || md.size() != 3)
    return ffi::Error::InvalidArgument("attention: q, keys and values must be 4-D, visible 3-D");
  const AttentionShape a{qd[0], qd[1], qd[2], qd[3], kd[1], kd[2]};
  if (values.dimensions().size() != 4 || !std::equal(kd.begin(), kd.end(), values.dimensions().begin()) ||
      kd[0] < a.B || kd[3] != a.H || a.Kh < 1 || a.N % a.Kh != 0 ||
      (!all_visible && (md[0] != a.B || md[1] != a.Tq || md[2] != a.S)))
    return ffi::Error::InvalidArgument("attention: shapes do not match");
  const auto kt = keys.element_type(), qt = q.element_type();
  const bool halves = kt == ffi::DataType::BF16 || kt == ffi::DataType::U16;  // bfloat16, maybe as its bits
  if (values.element_type() != kt || !(halves || kt == ffi::DataType::F32) ||
      !(qt == ffi::DataType::F32 || (halves && qt == ffi::DataType::BF16)))
    return ffi::Error::InvalidArgument("attention: keys and values float32 or bfloat16 alike, q float32 or theirs");
  const bool* seen = all_visible ? nullptr : visible.typed_data();  // none: every query sees every entry
  float* y = out->typed_data();
  if (!halves) {
    const auto* q32 = static_cast<const float*>(q.untyped_data());
    const auto* k32 = static_cast<const float*>(keys.untyped_data());
    const auto* v32 = static_cast<const float*>(values.untyped_data());
    if (a.R() > kMaxRows) {
      AttendGemm<float>(pool, a, q32, k32, v32, seen, y);
      return ffi::Error::Success();
    }
    AttendRows(pool, a, q32, k32, v32, seen, y);
    return ffi::Error::Success();
  }
  const auto* k16 = static_cast<const uint16_t*>(keys.untyped_data());
  const auto* v16 = static_cast<const uint16_t*>(values.untyped_data());
  if (qt == ffi::DataType::F32) {
    AttendRows(pool, a, static_cast<const float*>(q.untyped_data()), k16, v16, seen, y);
    return ffi::Error::Success();
  }
  const auto* q16 = static_cast<const uint16_t*>(q.untyped_data());
  if (a.R() > kMaxRows) {
#ifdef GEMMA3_DPBF16
    if (!float32_gemm) {
      AttendGemm<uint16_t>(pool, a, q16, k16, v16, seen, y);
      return ffi::Error::Success();
    }
#endif
    AttendGemm<float>(pool, a, q16, k16, v16, seen, y);
    return ffi::Error::Success();
  }
  AttendRows(pool, a, q16, k16, v16, seen, y);
  return ffi::Error::Success();
}

// The running argmax of the split and screened heads' exact candidates, offered in row order: the first of equal
// values, and a NaN counts as the largest (the first NaN), as jnp.argmax; row 0 when none was offered.
struct RunningArgmax {
  int64_t best = -1;
  float value = 0.f;
  void Offer(int64_t n, float v) {
    if (best < 0 || (!std::isnan(value) && (std::isnan(v) || v > value))) {
      best = n;
      value = v;
    }
  }
  int32_t Id() const { return static_cast<int32_t>(std::max<int64_t>(best, 0)); }
};

// The tied LM head of a float32 model kept as two planes of halves (SplitF32; gemma3.text.SplitFloat32Embed).
// Why: at batch 1 a float32 decode step reads every weight once and is bound by memory, and the head is a large
// part of it (gemma-3-270m: 0.67 of its 1.07 GB, gemma-3-1b: 1.2 of 4.0). A greedy step needs only the argmax:
// SplitArgmax reads the top plane alone (half the head's bytes), bounds what each row's bottom halves can add,
// and reads both planes only for the rows whose bound reaches the best (a handful of 262,144). Logits
// (SplitProduct) read both planes, summed as RowsNK sums a float32 matrix.
ffi::Error SplitProduct(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U16> planes,
                        ffi::Result<ffi::Buffer<ffi::F32>> y) {
  const auto xd = x.dimensions(), pd = planes.dimensions();
  if (xd.size() != 2 || pd.size() != 3 || pd[0] != 2 || pd[2] != xd[1] || y->dimensions()[1] != pd[1])
    return ffi::Error::InvalidArgument("split_product: x (M, K), planes (2, N, K), y (M, N)");
  const int64_t M = xd[0], K = xd[1], N = pd[1];
  const SplitF32 w{planes.typed_data(), N * K};
  const int64_t parts = ReadParts(pool, static_cast<size_t>(N) * K * sizeof(float));
  // More than eight rows: eight at a time over a block of weight rows small enough to stay in L2, so that the
  // planes are read from memory once
  const int64_t block = M <= kMaxRows ? N : std::max<int64_t>(8, (128 << 10) / (4 * K));
  RunParts(pool, parts, [&](int64_t i) {
    for (int64_t n = N * i / parts, end = N * (i + 1) / parts; n < end; n += block)
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows)
        WithRows(std::min(kMaxRows, M - m0), [&](auto rows) {
          RowsNK<rows()>(x.typed_data() + m0 * K, w, y->typed_data() + m0 * N, K, N, n, std::min(end, n + block), K);
        });
  });
  return ffi::Error::Success();
}

// Pass one of SplitArgmax, M rows (1..8) of x against the top plane (bfloat16 truncations t) of (N, K) weights,
// rows n0..n1: a[m, n] = <x[m], t[n]>, and s[n] = <xm, |t[n]|> for xm = max over m of |x[m]|, which bounds what
// the bottom halves add to any of the M rows (each adds less than 2^-7 of its top half's magnitude): one sum
// more per weight row, whatever M. W rows at a time, as RowsNK, where the CPU has AVX-512; one at a time elsewhere:
// on a Zen 3 (two threads, one row of x) four rows at a time read the 270m top plane at 9.5-10.9 GB/s, one row
// at 13.3-13.8 (1b: 11.1 against 12.6).
#ifdef GEMMA3_AVX512
constexpr int TopShared(int m) { return std::clamp((kVectorRegisters - 8) / (m + 1), 1, 4); }
#else
constexpr int TopShared(int) { return 1; }
#endif
template <int M, int W = TopShared(M)>
void TopRows(const float* x, const float* xm, const uint16_t* w, float* a, float* s, int64_t K, int64_t N, int64_t n0,
             int64_t n1) {
  const int64_t k_main = K / 8 * 8;
  int64_t n = n0;
  for (; n + W <= n1; n += W) {
    const uint16_t* row = w + n * K;
    f8 acc[M][W] = {}, bound[W] = {};
    const bool ahead = n + 2 * W <= n1;
    for (int64_t k = 0; k < k_main; k += 8) {
      if (ahead && k % 32 == 0) {
        _Pragma("GCC unroll 4") for (int r = W; r < 2 * W; ++r) Prefetch(row + r * K + k);
      }
      const f8 xmv = load8(xm + k);
      f8 tv[W];
      _Pragma("GCC unroll 4") for (int r = 0; r < W; ++r) {
        const u32x8 bits = Bfloat16Bits(row + r * K + k), magnitude = bits & 0x7fffffffu;
        f8 ta;
        std::memcpy(&tv[r], &bits, sizeof tv[r]);
        std::memcpy(&ta, &magnitude, sizeof ta);
        bound[r] += xmv * ta;
      }
      _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) {
        const f8 xv = load8(x + m * K + k);
        _Pragma("GCC unroll 4") for (int r = 0; r < W; ++r) acc[m][r] += xv * tv[r];
      }
    }
    for (int r = 0; r < W; ++r) {
      float ss = sum8(bound[r]);
      for (int64_t k = k_main; k < K; ++k) ss += xm[k] * std::fabs(widen(row[r * K + k]));
      s[n + r] = ss;
      for (int m = 0; m < M; ++m) {
        float sa = sum8(acc[m][r]);
        for (int64_t k = k_main; k < K; ++k) sa += x[m * K + k] * widen(row[r * K + k]);
        a[m * N + n + r] = sa;
      }
    }
  }
  if (n < n1) TopRows<M, 1>(x, xm, w, a, s, K, N, n, n1);
}

// ids[m] = argmax_n <x[m], w[n]> (the first on ties; a NaN counts as the largest, as jnp.argmax), w the float32
// rows that the planes hold. Exact: a row's value differs from its top plane's a by under 2^-7 s (truncation)
// plus the float32 rounding of either sum (under K ulps of s each, slack included), so every row whose
// a + bound falls below the best a - bound is below the best row's exact value, and only the others are summed
// exactly (as SplitProduct sums them).
ffi::Error SplitArgmax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U16> planes,
                       ffi::Result<ffi::Buffer<ffi::S32>> ids) {
  const auto xd = x.dimensions(), pd = planes.dimensions();
  if (xd.size() != 2 || pd.size() != 3 || pd[0] != 2 || pd[2] != xd[1] || ids->element_count() != xd[0])
    return ffi::Error::InvalidArgument("split_argmax: x (M, K), planes (2, N, K), ids (M,)");
  const int64_t M = xd[0], K = xd[1], N = pd[1];
  const float* xs = x.typed_data();
  const uint16_t* top = planes.typed_data();
  const int64_t groups = (M + kMaxRows - 1) / kMaxRows;  // of eight rows, one pass over the top plane each
  float* const xm = Zeroed<float, kSplitMost>(static_cast<size_t>(groups * K));
  float* const a = Scratch<float, kSplitTop>(static_cast<size_t>(M * N));
  float* const s = Scratch<float, kSplitScale>(static_cast<size_t>(groups * N));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      float& most = xm[m / kMaxRows * K + k];
      most = std::max(most, std::fabs(xs[m * K + k]));
    }
  const int64_t parts = ReadParts(pool, static_cast<size_t>(N) * K * sizeof(uint16_t));  // the top plane
  for (int64_t g = 0; g < groups; ++g)
    WithRows(std::min(kMaxRows, M - g * kMaxRows), [&](auto rows) {
      const int64_t m0 = g * kMaxRows;
      RunParts(pool, parts, [&](int64_t i) {
        TopRows<rows()>(xs + m0 * K, xm + g * K, top, a + m0 * N, s + g * N, K, N,
                        N * i / parts, N * (i + 1) / parts);
      });
    });
  const float slack = (0x1p-7f + 4.0f * static_cast<float>(K + 16) * 0x1p-24f) * (1.0f + 0x1p-10f);
  const SplitF32 w{top, N * K};
  RunParts(pool, M, [&](int64_t m) {
    float* am = a + m * N;  // each candidate's exact value is written over its a, once read
    const float* sm = s + m / kMaxRows * N;
    float floor = -INFINITY;  // the largest a - bound: the best row's exact value is at least this
    for (int64_t n = 0; n < N; ++n) floor = std::max(floor, am[n] - slack * sm[n] - 0x1p-100f);
    RunningArgmax argmax;
    for (int64_t n = 0; n < N; ++n) {
      if (am[n] + slack * sm[n] + 0x1p-100f < floor) continue;  // NaN stays: compared as jnp.argmax does
      RowsNK<1, 1>(xs + m * K, w, am, K, N, n, n + 1, K);
      argmax.Offer(n, am[n]);
    }
    ids->typed_data()[m] = argmax.Id();
  });
  return ffi::Error::Success();
}

#ifdef GEMMA3_SCREEN
// The tied LM head of a bfloat16 model with an int8 screen beside it (gemma3.text.HeadScreen): q[n] =
// round(w[n] / s[n]), s[n] = max |w[n]| / 127, and per row rows[0..3][n] = s, r (at least max |w[n] - s q[n]|),
// sum |q[n]|, sum q[n]. Why: a greedy bfloat16 decode step at batch 1 reads every weight once, and the head is
// most of gemma-3-270m's (0.34 of 0.54 GB) and 30% of gemma-3-1b's; the screen is half its bytes, and only the
// few rows whose bound reaches the best are then summed exactly from the table.
//
// Pass one, M rows (1..8) of x quantized per row (u = round(x / sx) + the offset 2^kScreenShift, as bytes, sx =
// max |x[m]| / kScreenSteps; Kp = K rounded up to 64, padded with the offset) against int8 rows n0..n1: d[m, n] =
// sum_k u[m, k] q[n, k], exact in int32, W rows at a time (adjacent, the next W prefetched, as RowsNKDp).
#ifdef GEMMA3_VNNI
// AVX512-VNNI: vpdpbusd sums 64 products an instruction into int32; x in 127 steps (u up to 255).
constexpr int kScreenSteps = 127, kScreenShift = 7;
// W rows share x's loads while M x W sums, W rows and x's slice fit 24 of the 32 registers: with 28 (W = 4 at six
// rows, 3 at eight) the sums spilled, and a Zen 4 screened 1b's head 20-25% slower at 6-8 rows (session 39).
constexpr int ScreenShared(int m) { return std::clamp(24 / (m + 1), 1, 4); }
template <int M, int W = ScreenShared(M)>
void ScreenRows(const uint8_t* u, int64_t Kp, const int8_t* q, int32_t* d, int64_t K, int64_t N, int64_t n0,
                int64_t n1) {
  const int64_t k_main = K / 64 * 64;
  const __mmask64 tail = K % 64 ? (__mmask64{1} << (K % 64)) - 1 : 0;
  int64_t n = n0;
  for (; n + W <= n1; n += W) {
    const int8_t* __restrict row = q + n * K;
    __m512i acc[M][W];
    _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m)
      _Pragma("GCC unroll 4") for (int r = 0; r < W; ++r) acc[m][r] = _mm512_setzero_si512();
    const bool ahead = n + 2 * W <= n1;
    auto step = [&](int64_t k, __mmask64 mask) {
      __m512i wv[W];
      _Pragma("GCC unroll 4") for (int r = 0; r < W; ++r) wv[r] = _mm512_maskz_loadu_epi8(mask, row + r * K + k);
      _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) {
        const __m512i xv = _mm512_loadu_si512(u + m * Kp + k);
        _Pragma("GCC unroll 4") for (int r = 0; r < W; ++r) acc[m][r] = _mm512_dpbusd_epi32(acc[m][r], xv, wv[r]);
      }
    };
    for (int64_t k = 0; k < k_main; k += 64) {
      if (ahead) {
        _Pragma("GCC unroll 4") for (int r = W; r < 2 * W; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(row + r * K + k), _MM_HINT_T1);
      }
      step(k, ~__mmask64{0});
    }
    if (tail) step(k_main, tail);
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < W; ++r) d[m * N + n + r] = _mm512_reduce_add_epi32(acc[m][r]);
  }
  if (n < n1) ScreenRows<M, 1>(u, Kp, q, d, K, N, n, n1);
}
#else
// AVX2: vpmaddubsw sums two products into an int16 that saturates, so x keeps 64 steps (u up to 128: two
// products stay within 2 x 128 x 127 = 32,512), and vpmaddwd sums pairs of those into int32: 32 products in
// three instructions. The coarser x only widens each row's bound (more rows summed from the table). One weight
// row at a time: on a Zen 3 (two threads), two to eight adjacent rows at a time read the screen at 7-10 GB/s,
// one row at 15.6, a plain read's rate in the same minute.
constexpr int kScreenSteps = 64, kScreenShift = 6;
constexpr int ScreenShared(int) { return 1; }
inline int32_t SumLanes(__m256i v) {
  __m128i h = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  h = _mm_hadd_epi32(h, h);
  return _mm_cvtsi128_si32(_mm_hadd_epi32(h, h));
}
template <int M, int W = ScreenShared(M)>
void ScreenRows(const uint8_t* u, int64_t Kp, const int8_t* q, int32_t* d, int64_t K, int64_t N, int64_t n0,
                int64_t n1) {
  const int64_t k_main = K / 32 * 32;
  const __m256i ones = _mm256_set1_epi16(1);
  int64_t n = n0;
  for (; n + W <= n1; n += W) {
    const int8_t* __restrict row = q + n * K;
    __m256i acc[M][W];
    _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m)
      _Pragma("GCC unroll 4") for (int r = 0; r < W; ++r) acc[m][r] = _mm256_setzero_si256();
    const bool ahead = n + 2 * W <= n1;
    auto step = [&](int64_t k, int64_t width) {
      __m256i wv[W];
      _Pragma("GCC unroll 4") for (int r = 0; r < W; ++r) {
        if (width == 32) {
          wv[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + r * K + k));
        } else {  // the row's last K % 32 values, zero beyond
          alignas(32) int8_t part[32] = {};
          std::memcpy(part, row + r * K + k, static_cast<size_t>(width));
          wv[r] = _mm256_load_si256(reinterpret_cast<const __m256i*>(part));
        }
      }
      _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + m * Kp + k));
        _Pragma("GCC unroll 4") for (int r = 0; r < W; ++r)
          acc[m][r] = _mm256_add_epi32(acc[m][r], _mm256_madd_epi16(_mm256_maddubs_epi16(xv, wv[r]), ones));
      }
    };
    for (int64_t k = 0; k < k_main; k += 32) {
      if (ahead && k % 64 == 0) {
        _Pragma("GCC unroll 4") for (int r = W; r < 2 * W; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(row + r * K + k), _MM_HINT_T1);
      }
      step(k, 32);
    }
    if (k_main < K) step(k_main, K - k_main);
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < W; ++r) d[m * N + n + r] = SumLanes(acc[m][r]);
  }
  if (n < n1) ScreenRows<M, 1>(u, Kp, q, d, K, N, n, n1);
}
#endif

// ids[m] = argmax_n <x[m], w[n]> over the bfloat16 table w, each sum as a one-row product sums it, rounded to
// bfloat16 as the model's logits are (the first on ties; a NaN counts as the largest, as jnp.argmax). Products
// of more rows sum in another order on CPUs with AMX or without AVX512-BF16, so there a logit within a float32
// rounding of a bfloat16 boundary may tie differently, as between the kernel's thread splits. Every row's
// screen value a = sx s (d - 2^kScreenShift sum q) differs from <x, w[n]> by at most |x|_1 r + dx s sum |q| (dx:
// x's own rounding), and the exact sum from it by its float32 rounding (under 4 (K + 16) 2^-24 |x|_1 max |w[n]|,
// slack included): rows whose a + bound falls below the best a - bound cannot hold the maximum, and only the
// others are summed from the table. A row of x that is not finite, or a screen row that is not (s NaN: a table
// row that was not), is always summed.
ffi::Error ScreenArgmax(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer table, ffi::Buffer<ffi::S8> screen,
                        ffi::Buffer<ffi::F32> rows, ffi::Result<ffi::Buffer<ffi::S32>> ids) {
  const auto xd = x.dimensions(), td = table.dimensions(), sd = screen.dimensions(), rd = rows.dimensions();
  if (x.element_type() != ffi::DataType::BF16 || table.element_type() != ffi::DataType::BF16 || xd.size() != 2 ||
      td.size() != 2 || td[1] != xd[1] || sd.size() != 2 || sd[0] != td[0] || sd[1] != td[1] || rd.size() != 2 ||
      rd[0] != 4 || rd[1] != td[0] || ids->element_count() != xd[0])
    return ffi::Error::InvalidArgument(
        "screen_argmax: x (M, K) and table (N, K) bfloat16, screen (N, K) int8, rows (4, N), ids (M,)");
  const int64_t M = xd[0], K = xd[1], N = td[0], Kp = (K + 63) / 64 * 64;
  const auto* xs = static_cast<const uint16_t*>(x.untyped_data());
  const auto* w = static_cast<const uint16_t*>(table.untyped_data());
  const float* s = rows.typed_data();
  const float *r = s + N, *abs_q = s + 2 * N, *sum_q = s + 3 * N;
  Lines<uint8_t> u(static_cast<size_t>(M * Kp), 1 << kScreenShift);
  std::vector<float> xf(static_cast<size_t>(M * K)), sx(M), dx(M), l1(M);
  std::vector<char> whole(M, 0);  // rows of x summed against every table row
  for (int64_t m = 0; m < M; ++m) {
    float most = 0.f, sum = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float v = xf[m * K + k] = widen(xs[m * K + k]);
      most = std::max(most, std::fabs(v));
      sum += std::fabs(v);
      if (!std::isfinite(v)) whole[m] = 1;
    }
    sx[m] = most > 0.f && !whole[m] ? most / kScreenSteps : 1.f;
    float off = 0.f;
    for (int64_t k = 0; k < K && !whole[m]; ++k) {  // (a row that is not finite is summed against every row)
      const float steps = kScreenSteps, v = xf[m * K + k], qv = std::clamp(std::nearbyint(v / sx[m]), -steps, steps);
      u[m * Kp + k] = static_cast<uint8_t>(static_cast<int>(qv) + (1 << kScreenShift));
      off = std::max(off, std::fabs(v - sx[m] * qv));
    }
    dx[m] = off + most * 0x1p-22f;  // the residual's own rounding
    l1[m] = sum * (1.f + static_cast<float>(K) * 0x1p-23f);
  }
  const float slack = 4.0f * static_cast<float>(K + 16) * 0x1p-24f * 127.f;
  // kept between steps (fresh pages cost more than the pass itself); the caller's, so named by a pointer in
  // the parts (a thread_local named there is the pool thread's own)
  thread_local std::vector<int32_t> kept;
  kept.resize(static_cast<size_t>(M * N));
  int32_t* const d = kept.data();
  // rows n..n+8 (those below n1, the lanes `in`) against x's row m: each one's screen value a and its bound e
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  auto bounds = [&](int64_t m, int64_t n, int64_t n1, __m256i& in, __m256& a, __m256& e) {
    in = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n1 - n, 8))), lane);
    const __m256 sv = _mm256_maskload_ps(s + n, in);
    const __m256i offset = _mm256_slli_epi32(_mm256_cvttps_epi32(_mm256_maskload_ps(sum_q + n, in)), kScreenShift);
    const __m256i dv = _mm256_sub_epi32(_mm256_maskload_epi32(d + m * N + n, in), offset);
    a = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(sx[m]), sv), _mm256_cvtepi32_ps(dv));
    const __m256 rounding = _mm256_fmadd_ps(_mm256_set1_ps(slack), sv, _mm256_maskload_ps(r + n, in));
    const __m256 rows_bound = _mm256_fmadd_ps(_mm256_set1_ps(l1[m]), rounding, _mm256_mul_ps(
        _mm256_mul_ps(_mm256_set1_ps(dx[m]), sv), _mm256_maskload_ps(abs_q + n, in)));
    const __m256 magnitude = _mm256_andnot_ps(_mm256_set1_ps(-0.f), a);
    e = _mm256_fmadd_ps(rows_bound, _mm256_set1_ps(1.f + 0x1p-10f),
                        _mm256_fmadd_ps(magnitude, _mm256_set1_ps(0x1p-20f), _mm256_set1_ps(0x1p-100f)));
  };
  // the largest a - e of rows n0..n1: the best row's exact sum is at least this (a NaN's is skipped)
  auto floor_of = [&](int64_t m, int64_t n0, int64_t n1) {
    __m256 floors = _mm256_set1_ps(-INFINITY), a, e;
    __m256i in;
    for (int64_t n = n0; n < n1; n += 8) {
      bounds(m, n, n1, in, a, e);
      floors = _mm256_blendv_ps(floors, _mm256_max_ps(_mm256_sub_ps(a, e), floors), _mm256_castsi256_ps(in));
    }
    __m128 half = _mm_max_ps(_mm256_castps256_ps128(floors), _mm256_extractf128_ps(floors, 1));
    half = _mm_max_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half)));
  };
  // Each part screens its rows a chunk at a time and takes the chunk's floors while its sums are in cache,
  // then (once every floor is known) sums its candidates: both passes split between the threads at any M.
  constexpr int64_t kChunk = 2048;
  const int64_t groups = (M + kMaxRows - 1) / kMaxRows, parts = ReadParts(pool, static_cast<size_t>(N) * K);
  std::vector<float> floors(static_cast<size_t>(parts * M), -INFINITY);
  for (int64_t g = 0; g < groups; ++g)
    WithRows(std::min(kMaxRows, M - g * kMaxRows), [&](auto rows_) {
      const int64_t m0 = g * kMaxRows;
      RunParts(pool, parts, [&](int64_t i) {
        for (int64_t c = N * i / parts, end = N * (i + 1) / parts; c < end; c += kChunk) {
          const int64_t c1 = std::min(end, c + kChunk);
          ScreenRows<rows_()>(u.data() + m0 * Kp, Kp, screen.typed_data(), d + m0 * N, K, N, c, c1);
          for (int64_t m = m0; m < m0 + rows_(); ++m)
            floors[i * M + m] = std::max(floors[i * M + m], floor_of(m, c, c1));
        }
      });
    });
  // the logits are rounded to bfloat16 before the argmax (the model's product comes back in its dtype): a row
  // ties the best once its value rounds alike, so the floor drops by more than a bfloat16 step
  std::vector<float> limit(M);
  for (int64_t m = 0; m < M; ++m) {
    float most = -INFINITY;
    for (int64_t i = 0; i < parts; ++i) most = std::max(most, floors[i * M + m]);
    limit[m] = whole[m] ? -INFINITY : most - std::fabs(most) * 0x1p-6f - 0x1p-126f;
  }
  // the exact sums, as a one-row product of this build sums them (MultiplyRows)
  std::vector<float> xi(UsesPairs<uint16_t>() ? 0 : static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M && !UsesPairs<uint16_t>(); ++m)
    Interleave(xf.data() + m * K, xi.data() + m * K, K / 16 * 16);
  std::vector<RunningArgmax> found(static_cast<size_t>(parts * M));  // each part's best, per row of x
  RunParts(pool, parts, [&](int64_t i) {
    const int64_t n1 = N * (i + 1) / parts;
    for (int64_t m = 0; m < M; ++m) {
      const __m256 floor = _mm256_set1_ps(limit[m]);
      __m256 a, e;
      __m256i in;
      for (int64_t n = N * i / parts; n < n1; n += 8) {
        bounds(m, n, n1, in, a, e);
        // rows whose a + e reaches the floor, NaN included (compared as jnp.argmax does)
        const __m256 reach = _mm256_and_ps(_mm256_cmp_ps(_mm256_add_ps(a, e), floor, _CMP_NLT_UQ),
                                           _mm256_castsi256_ps(in));
        for (unsigned left = _mm256_movemask_ps(reach); left; left &= left - 1) {
          const int64_t c = n + __builtin_ctz(left);
          float v;
#ifdef GEMMA3_DPBF16
          RowsNKDp<1, 1>(xs + m * K, w + c * K, &v, K, 1, 0, 1);
#else
          RowsNK<1>(xf.data() + m * K, xi.data() + m * K, w + c * K, &v, K, 1, 0, 1);
#endif
          found[i * M + m].Offer(c, RoundToBfloat16(v));  // (NaN and infinities stay)
        }
      }
    }
  });
  for (int64_t m = 0; m < M; ++m) {
    RunningArgmax argmax;  // the parts' bests, offered in row order
    for (int64_t i = 0; i < parts; ++i)
      if (found[i * M + m].best >= 0) argmax.Offer(found[i * M + m].best, found[i * M + m].value);
    ids->typed_data()[m] = argmax.Id();
  }
  return ffi::Error::Success();
}
#endif

ffi::Error RowsMatmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                      ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t w_layout, int64_t float32_gemm) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("rows_matmul: x and w must be 2-D");
  if (x.element_type() != w.element_type())
    return ffi::Error::InvalidArgument("rows_matmul: x and w must share a dtype");
  const bool nk = w_layout == 1;
  const int64_t M = xd[0], K = xd[1], N = nk ? wd[0] : wd[1];
  if ((nk ? wd[1] : wd[0]) != K) return ffi::Error::InvalidArgument("rows_matmul: contracting sizes differ");
  auto yd = y->dimensions();
  if (yd.size() != 2 || yd[0] != M || yd[1] != N)
    return ffi::Error::InvalidArgument("rows_matmul: output shape must be (rows, N)");
  float* out = y->typed_data();
  if (M > kMaxRows) {  // the GEMM: bfloat16, (K, N) weights (XLA's float32 GEMM is as fast as ours)
    if (nk || x.element_type() != ffi::DataType::BF16)
      return ffi::Error::InvalidArgument("rows_matmul: more than 8 rows only for bfloat16 (K, N) products");
    const int64_t panels = (N + kPanelCols - 1) / kPanelCols, threads = std::max<int64_t>(1, pool.num_threads());
    const int64_t parts = GemmParts(panels, threads);
    auto gemm = [&](const auto* xs, const auto* ws) {
      using T = std::remove_cv_t<std::remove_pointer_t<decltype(xs)>>;
      const int64_t depth_parts = DepthParts<T>(M, K, N, threads);
      if (depth_parts > 1) {  // part 0 sums into out, the others into sums of their own, added after
        float* const sums = Scratch<float, kGemmDepthSums>(static_cast<size_t>((depth_parts - 1) * M * N));
        RunParts(pool, depth_parts, [&](int64_t i) {
          GemmDp(xs, ws, i ? sums + (i - 1) * M * N : out, M, K, N, 0, panels, K * i / depth_parts / 32 * 32,
                 i + 1 < depth_parts ? K * (i + 1) / depth_parts / 32 * 32 : K);
        });
        for (int64_t i = 1; i < depth_parts; ++i)
          for (int64_t j = 0; j < M * N; ++j) out[j] += sums[(i - 1) * M * N + j];
        return;
      }
      RunParts(pool, parts, [&](int64_t i) { GemmDp(xs, ws, out, M, K, N, panels * i / parts, panels * (i + 1) / parts); });
    };
    const auto* xs = static_cast<const uint16_t*>(x.untyped_data());
    const auto* ws = static_cast<const uint16_t*>(w.untyped_data());
#ifdef GEMMA3_DPBF16
    if (!float32_gemm) {
      gemm(xs, ws);
      return ffi::Error::Success();
    }
#endif
    Lines<float> xf(static_cast<size_t>(M * K));  // float32 FMAs (PackF32): x widened once, in parts
    RunParts(pool, parts, [&](int64_t i) {
      for (int64_t j = M * K * i / parts; j < M * K * (i + 1) / parts; ++j) xf[j] = widen(xs[j]);
    });
    gemm(xf.data(), ws);
    return ffi::Error::Success();
  }
  if (M < 1) return ffi::Error::InvalidArgument("rows_matmul: x must have rows");
  switch (x.element_type()) {
    case ffi::DataType::F32:
      Multiply(pool, static_cast<const float*>(x.untyped_data()), static_cast<const float*>(w.untyped_data()),
               out, M, K, N, nk);
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      Multiply(pool, static_cast<const uint16_t*>(x.untyped_data()),
               static_cast<const uint16_t*>(w.untyped_data()), out, M, K, N, nk);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("rows_matmul: dtype must be float32 or bfloat16");
  }
}

#ifdef GEMMA3_DPBF16
// One row against kept panels p0..p1 (cpu_kernels.to_panels), three panels at a time: a part's panels lie end to end, one
// stream, which one thread read at 12-13 GB/s where the (K, N) loops read several rows at once (14-15); three
// streams matched them with both threads reading (26-27 GB/s on an Intel Xeon, session 37). vdpbf16ps, four
// sums (64 columns) a panel, x's pair broadcast once for the three.
template <int S>
void KeptRow(const uint16_t* x, const uint16_t* kept, float* y, int64_t K2, int64_t N, int64_t p0, int64_t p1) {
  const int64_t stride = K2 * 2 * kPanelCols, span = (p1 - p0) / S;
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(x);
  for (int64_t i = 0; i < span; ++i) {
    const uint16_t* b[S];
    __m512 acc[S][4];
    for (int s = 0; s < S; ++s) {
      b[s] = kept + (p0 + s * span + i) * stride;
      for (int j = 0; j < 4; ++j) acc[s][j] = _mm512_setzero_ps();
    }
    for (int64_t q = 0; q < K2; ++q) {
      const __m512i xb = _mm512_set1_epi32(static_cast<int>(xp[q]));
      for (int s = 0; s < S; ++s) {
        const uint16_t* r = b[s] + q * 2 * kPanelCols;
        for (int j = 0; j < 4; ++j)
          acc[s][j] = _mm512_dpbf16_ps(acc[s][j], (__m512bh)_mm512_loadu_si512(r + 32 * j), (__m512bh)xb);
      }
    }
    for (int s = 0; s < S; ++s)
      for (int j = 0; j < 4; ++j) _mm512_storeu_ps(y + (p0 + s * span + i) * kPanelCols + 16 * j, acc[s][j]);
  }
  if (S > 1 && p0 + S * span < p1) KeptRow<1>(x, kept, y, K2, N, p0 + S * span, p1);
}
#endif

// y (M x N) = x (M x K) w, with w kept as pair panels (cpu_kernels.to_panels): kept[p, q, 2c + j] = w[2q + j,
// 64p + c], each panel's whole depth in one run. Nothing is packed at any row count: a 1b prefill's products packed
// their weights from memory for 40-56% of their time with AMX tiles (session 37). One row: KeptRow; up to 16
// rows: AMX tiles a whole panel at a time (TilesDp: TileAmxWide), which read 13 GB/s a thread at every row count
// where RowsKNAmx, packing as it goes, read 8-10; without AMX (Zen 4 and 5), the pair tiles (TileDp) a depth block
// of a panel at a time, so the rows after a tile's first six find it in L1; more rows: the GEMM's depth blocks and
// blocks of rows, as GemmDp. K even (a pair a row of the panels); only where the CPU multiplies pairs.
ffi::Error KeptMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> kept,
                      ffi::Result<ffi::Buffer<ffi::F32>> y) {
  auto xd = x.dimensions();
  auto kd = kept.dimensions();
  if (xd.size() != 2 || kd.size() != 3 || kd[2] != 2 * kPanelCols)
    return ffi::Error::InvalidArgument("kept_matmul: x must be 2-D and the panels (P, K/2, 128)");
  const int64_t M = xd[0], K = xd[1], P = kd[0], K2 = kd[1], N = P * kPanelCols;
  if (K % 2 || K2 * 2 != K) return ffi::Error::InvalidArgument("kept_matmul: the panels' depth must be K / 2");
  if (M < 1) return ffi::Error::InvalidArgument("kept_matmul: x must have rows");
  auto yd = y->dimensions();
  if (yd.size() != 2 || yd[0] != M || yd[1] != N)
    return ffi::Error::InvalidArgument("kept_matmul: output shape must be (rows, 64 x panels)");
#ifdef GEMMA3_DPBF16
  const auto* xs = reinterpret_cast<const uint16_t*>(x.typed_data());
  const auto* ks = reinterpret_cast<const uint16_t*>(kept.typed_data());
  float* out = y->typed_data();
  const int64_t stride = K2 * 2 * kPanelCols, threads = std::max<int64_t>(1, pool.num_threads());
  bool amx = false;
#ifdef GEMMA3_AMX
  amx = AmxReady();
#endif
  const int64_t depth = amx ? K : kPanelDepth;  // of a panel at a time, below: AMX tiles take its whole depth
  if (M <= 16 || (!amx && M <= BlockRows<uint16_t>())) {
    const int64_t parts = M <= 16 ? std::min(P, ReadParts(pool, static_cast<size_t>(K) * N * sizeof(uint16_t)))
                                  : GemmParts(P, threads);
    RunParts(pool, parts, [&](int64_t i) {
      const int64_t p0 = P * i / parts, p1 = P * (i + 1) / parts;
      if (M == 1) {
        KeptRow<3>(xs, ks, out, K2, N, p0, p1);
        return;
      }
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t k0 = 0; k0 < K; k0 += depth)  // (k0 even: its pair row k0 / 2 starts k0 x kPanelCols in)
          TilesDp(xs, K, k0, std::min(depth, K - k0), ks + p * stride + k0 * kPanelCols, out, N, p * kPanelCols,
                  kPanelCols, 0, M, k0 == 0);
    });
    return ffi::Error::Success();
  }
  const int64_t parts = GemmParts(P, threads);
  RunParts(pool, parts, [&](int64_t i) {
    const int64_t p0 = P * i / parts, p1 = P * (i + 1) / parts;
    for (int64_t k0 = 0; k0 < K; k0 += kPanelDepth) {
      const int64_t k1 = std::min(K, k0 + kPanelDepth);
      for (int64_t m0 = 0; m0 < M; m0 += BlockRows<uint16_t>())
        for (int64_t p = p0; p < p1; ++p)
          TilesDp(xs, K, k0, k1 - k0, ks + p * stride + k0 * kPanelCols, out, N, p * kPanelCols, kPanelCols,
                  m0, std::min(M, m0 + BlockRows<uint16_t>()), k0 == 0);
    }
  });
  return ffi::Error::Success();
#else
  (void)pool;
  return ffi::Error::InvalidArgument("kept_matmul: this build has no bfloat16 pair products");
#endif
}

}  // namespace

// Whether this build multiplies bfloat16 pairs (AVX512-BF16), and so takes products of any row count.
extern "C" int Gemma3PairProducts() {
#ifdef GEMMA3_DPBF16
  return 1;
#else
  return 0;
#endif
}

// Whether this build screens a bfloat16 head's greedy decode through int8 rows (AVX512-VNNI or AVX2: ScreenArgmax).
extern "C" int Gemma3Int8Screen() {
#ifdef GEMMA3_SCREEN
  return 1;
#else
  return 0;
#endif
}

// Whether the GEMM multiplies its pair panels in AMX tiles (built for a CPU with AMX-BF16, granted by Linux).
extern "C" int Gemma3AmxTiles() {
#ifdef GEMMA3_AMX
  return AmxReady() ? 1 : 0;
#else
  return 0;
#endif
}

// Whether bfloat16 products of many rows (FLOAT32_GEMM_ROWS in cpu_kernels.py, and attention over a prefill
// chunk) run faster as pairs (vdpbf16ps) than as float32 FMAs on widened panels, on this CPU: one tile's
// arithmetic timed both ways (a packed panel in L1/L2 against six rows, accumulating so no call is
// redundant), the best of nine alternating rounds each. Under a millisecond.
extern "C" int Gemma3PairsOutpaceFloat32() {
#ifdef GEMMA3_AMX
  if (AmxReady()) return 1;  // tiles of pairs: ten times the float32 FMAs' arithmetic (TileAmx)
#endif
#ifdef GEMMA3_DPBF16
  std::vector<uint16_t> w(kPanelDepth * kPanelCols), x(kTileRows * kPanelDepth), pairs(kPanelDepth * kPanelCols);
  for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<uint16_t>(0x3e80 + i % 97);  // about 0.25..0.5
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<uint16_t>(0x3a80 + i % 89);  // about 0.001
  std::vector<float> wide(kPanelDepth * kPanelCols), xf(x.size()), y(kTileRows * kPanelCols, 0.0f);
  for (size_t i = 0; i < x.size(); ++i) xf[i] = widen(x[i]);
  PackPairs(w.data(), pairs.data(), kPanelCols, 0, kPanelCols, 0, kPanelDepth);
  PackF32(w.data(), wide.data(), kPanelCols, 0, kPanelCols, 0, kPanelDepth);
  auto seconds = [&](auto&& tile) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 64; ++i) tile();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  double pair = 1e30, f32 = 1e30;
  for (int round = 0; round < 9; ++round) {
    pair = std::min(pair, seconds([&] {
      TileDp<kTileRows>(x.data(), kPanelDepth, 0, kPanelDepth, pairs.data(), y.data(), kPanelCols, kPanelCols, false);
    }));
    f32 = std::min(f32, seconds([&] {
      TileDp<kTileRows>(xf.data(), kPanelDepth, 0, kPanelDepth, wide.data(), y.data(), kPanelCols, kPanelCols, false);
    }));
  }
  return pair <= f32 ? 1 : 0;
#else
  return 0;
#endif
}

// Yield flags: the LM engine decodes a burst of steps in one device call, and a request that comes meanwhile sets its
// engine's flag (gemma3_set_yield, from Python) so that the burst ends after the step under way, not after the last
// one (the host cannot reach into a running XLA program otherwise). The decode loop reads the flag each step through
// Gemma3YieldFlag, which takes the step's index (unread) so that XLA neither hoists nor merges the reads: a call marked
// as having side effects took jax off its C++ dispatch path (6 ms a call, session 38).
constexpr int kYieldFlags = 64;
std::atomic<int32_t> g_yield[kYieldFlags];

extern "C" void gemma3_set_yield(int32_t flag, int32_t value) {
  g_yield[static_cast<uint32_t>(flag) % kYieldFlags].store(value, std::memory_order_relaxed);
}

ffi::Error YieldFlag(ffi::Buffer<ffi::S32> flag, ffi::Buffer<ffi::S32> step, ffi::Result<ffi::Buffer<ffi::S32>> out) {
  (void)step;
  const uint32_t which = static_cast<uint32_t>(flag.typed_data()[0]) % kYieldFlags;
  out->typed_data()[0] = g_yield[which].load(std::memory_order_relaxed);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma3YieldFlag, YieldFlag,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma3RowsMatmul, RowsMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("w_layout")
                                  .Attr<int64_t>("float32_gemm"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma3KeptMatmul, KeptMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma3Attention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("float32_gemm")
                                  .Attr<int64_t>("all_visible"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma3SplitProduct, SplitProduct,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma3SplitArgmax, SplitArgmax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

#ifdef GEMMA3_SCREEN
XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma3ScreenArgmax, ScreenArgmax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
#endif
