// What is written for AVX-512 (one file, as the code under its pragma must be: see below):
// - attention's per-row code (attention.cpp takes it where the CPU has AVX-512 F and BW and the head
//   size is a multiple of 16 up to 128; its portable loops take the rest);
// - the MLP's activation, silu(gate) * up, for bfloat16 rows (rowwise.cpp's `silu_mul`);
// - a linear layer's few rows on oneDNN's packed weight (linear.cpp's `onednn_rows`), bfloat16 and float32.
//
// Attention: the same work as attention.cpp's portable row: one query row, a kv head's `group` query heads, against
// the keys of its two ranges (shared prefix, own segment). What differs is how the registers are
// used, which the compiler did not find on its own:
// - scores: 16 keys at a time, each key's products summed in a register of its own, then the 16
//   registers reduced to 16 scores together (a transpose tree of 45 instructions), where the portable
//   loop summed each key's 8 lanes one by one;
// - bfloat16 scores, on CPUs with AVX512-BF16, as dot products of bfloat16 pairs (`vdpbf16ps`, 32
//   products an instruction, each exact, summed in float32) instead of widening each key first;
// - the softmax's exponentials 16 at a time (Cody-Waite reduction and a degree-7 polynomial: within
//   2 ulp of expf), where the portable loop called expf per score;
// - values: up to 4 query heads' sums of a head size of values kept in registers for the whole
//   range, each value row read once per 4 heads, bfloat16 widened in registers.
// bfloat16 keys and values are widened exactly (a bfloat16 is a float's top half), products summed
// in float32, outputs rounded to nearest even as c10::BFloat16 does.
//
// Everything in this file is compiled for AVX-512 F and BW (the pragma below) and is called only after the
// CPU check: the same build runs on CPUs without it. For that, the code under the pragma calls no
// library function or template (an inline one instantiated here could be emitted for AVX-512 and
// picked by the linker for other callers too): its scratch memory comes from the caller.

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cmath>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace softprompt {
template <typename T>  // attention.cpp's
using RowFn = void (*)(const T* q, const T* k0, const T* v0, int64_t n0, const T* k1, const T* v1, int64_t n1,
                       int64_t group, int64_t dim, float scale, T* out, float* work);

// What the code below needs: AVX-512 F and BW (every AVX-512 server CPU since Skylake has both); the
// bfloat16 dot products (`vdpbf16ps`) also AVX512-BF16.
#if defined(__x86_64__)
bool cpu_has_avx512() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"); }
bool cpu_has_avx512_bf16() { return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16"); }
#else
bool cpu_has_avx512() { return false; }
bool cpu_has_avx512_bf16() { return false; }
#endif
}  // namespace softprompt

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")

namespace {

#define SP_INLINE inline __attribute__((always_inline))
#define SP_LAMBDA __attribute__((always_inline))

// 16 floats of a row: float32 loaded, bfloat16 widened (shifted into a float's top half).
SP_INLINE __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
SP_INLINE __m512 load16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// x's bfloat16 bits, rounded to nearest even as c10::BFloat16's constructor (a NaN its quiet NaN), in
// each lane's low half.
SP_INLINE __m512i bf16_bits(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))),
                                            16);
  return _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

// x rounded to bfloat16 and widened back.
SP_INLINE __m512 round_bf16(__m512 x) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(x), 16)); }

SP_INLINE void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
SP_INLINE void store16(c10::BFloat16* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits(x)));
}

// s[i] = the sum of a[i]'s 16 lanes, for 16 registers at once.
SP_INLINE __m512 sum_each(__m512 a[16]) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: a[2i]'s partial sums at 0, 2; a[2i+1]'s at 1, 3
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: keys 4i .. 4i+3's sums over the lane
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)  // lanes 0+1 and 2+3 of two registers
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// e^x for x <= 0 (scores less their maximum); below -87.3 (e^x under float's normal range) gives 0
// where expf gives a denormal: the same weight in a sum that holds at least a 1.
SP_INLINE __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // x - n ln 2, ln 2 in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);      // |r| <= ln 2 / 2
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);  // p * 2^n
}

// A run of `count` contiguous key (or value) rows.
template <typename T>
struct Range {
  const T* rows;
  int64_t count;
};

// scores[j] = scale * the dot product of key j and the query, for the rows of one range: 16 keys at a
// time, dot(zeros, key row) giving a key's products with the query in 16 lanes, summed together.
template <typename T, typename Dot>
SP_INLINE void score_range(Range<T> keys, int64_t dim, float scale, float* scores, Dot dot) {
  const __m512 scaled = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < keys.count; j += 16) {
    const int64_t m = keys.count - j < 16 ? keys.count - j : 16;
    __m512 acc[16];
    for (int64_t i = 0; i < 16; ++i) acc[i] = i < m ? dot(_mm512_setzero_ps(), keys.rows + (j + i) * dim)
                                                   : _mm512_setzero_ps();
    _mm512_mask_storeu_ps(scores + j, static_cast<__mmask16>((1u << m) - 1),
                          _mm512_mul_ps(sum_each(acc), scaled));
  }
}

// acc + the dot products of a's and b's bfloat16 pairs, lane by lane (`vdpbf16ps`: each product exact,
// summed in float32). In assembly, not the intrinsic: the intrinsic needs this file compiled for
// AVX512-BF16, which would let the compiler use it in code run on CPUs without it; this runs only
// where the CPU check found it.
SP_INLINE __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
  asm("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

// 32 bfloat16 of a row as 16 pairs; `half`: only 16, the rest zeros (a head size an odd multiple of 16).
SP_INLINE __m512i load_pairs(const c10::BFloat16* p, bool half) {
  return half ? _mm512_maskz_loadu_epi16(0xFFFF, p) : _mm512_loadu_si512(p);
}

// Turns scores[0, n) into e^(score - max) in place; returns their sum.
SP_INLINE float softmax_weights(float* scores, int64_t n) {
  __m512 top = _mm512_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(scores + j));
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - j)) - 1);
  top = _mm512_mask_max_ps(top, tail, top, _mm512_maskz_loadu_ps(tail, scores + j));
  const __m512 most = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 sum = _mm512_setzero_ps();
  for (j = 0; j + 16 <= n; j += 16) {
    const __m512 w = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + j), most));
    _mm512_storeu_ps(scores + j, w);
    sum = _mm512_add_ps(sum, w);
  }
  const __m512 w = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, scores + j), most));
  _mm512_mask_storeu_ps(scores + j, tail, w);
  sum = _mm512_mask_add_ps(sum, tail, sum, w);
  return _mm512_reduce_add_ps(sum);
}

// acc[h] += sum_j weights[h][j] * value row j, for H query heads (weights[h] = w + h * stride).
template <int D16, int H, typename T>
SP_INLINE void weigh_range(Range<T> values, const float* w, int64_t stride, __m512 acc[H][D16]) {
  constexpr int64_t dim = 16 * D16;
  for (int64_t j = 0; j < values.count; ++j) {
    const T* row = values.rows + j * dim;
    __m512 v[D16];
    for (int c = 0; c < D16; ++c) v[c] = load16(row + 16 * c);
    for (int h = 0; h < H; ++h) {
      const __m512 weight = _mm512_set1_ps(w[h * stride + j]);
      for (int c = 0; c < D16; ++c) acc[h][c] = _mm512_fmadd_ps(weight, v[c], acc[h][c]);
    }
  }
}

// out[h] = (sum_j w[h][j] value j) / total[h] for H query heads, the values in two ranges.
template <int D16, int H, typename T>
SP_INLINE void weigh_heads(const Range<T> values[2], const float* w, int64_t stride, const float* total, T* out) {
  __m512 acc[H][D16];
  for (int h = 0; h < H; ++h)
    for (int c = 0; c < D16; ++c) acc[h][c] = _mm512_setzero_ps();
  weigh_range<D16, H>(values[0], w, stride, acc);
  weigh_range<D16, H>(values[1], w + values[0].count, stride, acc);
  for (int h = 0; h < H; ++h) {
    const __m512 t = _mm512_set1_ps(total[h]);
    for (int c = 0; c < D16; ++c) store16(out + h * 16 * D16 + 16 * c, _mm512_div_ps(acc[h][c], t));
  }
}

// softprompt::RowFn on AVX-512 for a head size of 16 * D16; Pairs: bfloat16 scores in vdpbf16ps.
template <int D16, typename T, bool Pairs = false>
void attend_row(const T* q, const T* k0, const T* v0, int64_t n0, const T* k1, const T* v1, int64_t n1,
                int64_t group, int64_t, float scale, T* out, float* work) {
  constexpr int64_t dim = 16 * D16;
  const Range<T> keys[2] = {{k0, n0}, {k1, n1}}, values[2] = {{v0, n0}, {v1, n1}};
  const int64_t n = n0 + n1;
  float* w = work;  // [group, n]: scores, then weights
  float* total = w + group * n;
  for (int64_t h = 0; h < group; ++h) {
    if constexpr (Pairs) {  // bfloat16 query and keys: (D16 + 1) / 2 registers of pairs
      __m512i qh[(D16 + 1) / 2];
      for (int c = 0; c < (D16 + 1) / 2; ++c) qh[c] = load_pairs(q + h * dim + 32 * c, 2 * c + 1 == D16);
      auto dot = [&](__m512 acc, const T* key) SP_LAMBDA {
        for (int c = 0; c < (D16 + 1) / 2; ++c) acc = dot_pairs(acc, qh[c], load_pairs(key + 32 * c, 2 * c + 1 == D16));
        return acc;
      };
      score_range(keys[0], dim, scale, w + h * n, dot);
      score_range(keys[1], dim, scale, w + h * n + n0, dot);
    } else {
      __m512 qh[D16];
      for (int c = 0; c < D16; ++c) qh[c] = load16(q + h * dim + 16 * c);
      auto dot = [&](__m512 acc, const T* key) SP_LAMBDA {
        for (int c = 0; c < D16; ++c) acc = _mm512_fmadd_ps(qh[c], load16(key + 16 * c), acc);
        return acc;
      };
      score_range(keys[0], dim, scale, w + h * n, dot);
      score_range(keys[1], dim, scale, w + h * n + n0, dot);
    }
    total[h] = softmax_weights(w + h * n, n);
  }
  int64_t h = 0;  // value rows read once per 4 query heads (2 at head sizes over 64: registers)
  if constexpr (D16 <= 4)
    for (; h + 4 <= group; h += 4) weigh_heads<D16, 4>(values, w + h * n, n, total + h, out + h * dim);
  for (; h + 2 <= group; h += 2) weigh_heads<D16, 2>(values, w + h * n, n, total + h, out + h * dim);
  for (; h < group; ++h) weigh_heads<D16, 1>(values, w + h * n, n, total + h, out + h * dim);
}

// out[i] = bf16(bf16(silu(gate[i])) * up[i]) for i in [begin, end): ATen's silu then multiply, each
// rounded to bfloat16 as theirs are; silu(x) = x / (1 + e^-x) in float32, e^-x from exp16 (within
// 2 ulp of ATen's, so a product can differ from ATen's in its last bfloat16 bit, rarely).
void silu_mul_bf16(const c10::BFloat16* gate, const c10::BFloat16* up, c10::BFloat16* out, int64_t begin,
                   int64_t end) {
  const __m512 one = _mm512_set1_ps(1.f);
  auto silu_times = [&](__m512 g, __m512 u) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    return _mm512_mul_ps(round_bf16(_mm512_div_ps(g, _mm512_add_ps(one, e))), u);
  };
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) store16(out + i, silu_times(load16(gate + i), load16(up + i)));
  if (i < end) {  // the last 1-15: masked loads and store
    const __mmask32 tail = (1u << (end - i)) - 1;
    auto load = [&](const c10::BFloat16* p) {
      const __m256i bits = _mm512_castsi512_si256(_mm512_maskz_loadu_epi16(tail, p));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    };
    const __m256i bits = _mm512_cvtepi32_epi16(bf16_bits(silu_times(load(gate + i), load(up + i))));
    _mm512_mask_storeu_epi16(out + i, tail, _mm512_castsi256_si512(bits));
  }
}

// A linear layer's few rows on oneDNN's packed bfloat16 weight (linear.cpp's `onednn_rows`): R rows of x
// (bfloat16, `in` features, rows `ldx` apart) times one block of 32 output columns in oneDNN's
// AB16b32a2b layout (per pair of input features, the 32 columns' pairs: 128 bytes), into out [R, 32]
// float32. Each output's pairs go alternately into two partial sums, added at the end: one order of
// sums whatever R. The weight is streamed once, prefetched 8 pairs ahead.
template <int R>
void rows_block(const c10::BFloat16* x, int64_t ldx, int64_t in, const c10::BFloat16* block, float* out) {
  __m512 acc[R][4];  // per row: columns 0-15 and 16-31 of the even pairs, then of the odd ones
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_setzero_ps();
  auto pair = [&](int r, int64_t p) SP_LAMBDA {  // row r's features 2p, 2p+1 in every lane
    return _mm512_broadcastd_epi32(_mm_loadu_si32(x + r * ldx + 2 * p));
  };
  auto weights = [&](int64_t p, int half) SP_LAMBDA {
    return _mm512_loadu_si512(block + p * 64 + half * 32);
  };
  const int64_t pairs = in / 2;
  int64_t p = 0;
  for (; p + 2 <= pairs; p += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(block + (p + 8) * 64), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(block + (p + 8) * 64 + 32), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(block + (p + 9) * 64), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(block + (p + 9) * 64 + 32), _MM_HINT_T0);
    const __m512i w0 = weights(p, 0), w1 = weights(p, 1), w2 = weights(p + 1, 0), w3 = weights(p + 1, 1);
    for (int r = 0; r < R; ++r) {
      const __m512i a = pair(r, p), b = pair(r, p + 1);
      acc[r][0] = dot_pairs(acc[r][0], w0, a);
      acc[r][1] = dot_pairs(acc[r][1], w1, a);
      acc[r][2] = dot_pairs(acc[r][2], w2, b);
      acc[r][3] = dot_pairs(acc[r][3], w3, b);
    }
  }
  if (p < pairs || in % 2) {  // a last even pair, or the odd last feature with a zero (its weight pair: oneDNN's zero padding)
    const __m512i w0 = weights(p, 0), w1 = weights(p, 1);
    for (int r = 0; r < R; ++r) {
      const __m512i a = p < pairs ? pair(r, p) : _mm512_set1_epi32(x[r * ldx + in - 1].x);
      acc[r][0] = dot_pairs(acc[r][0], w0, a);
      acc[r][1] = dot_pairs(acc[r][1], w1, a);
    }
    if (p < pairs && in % 2) {  // both: the odd feature is the next pair's first, into the odd sums
      const __m512i w2 = weights(p + 1, 0), w3 = weights(p + 1, 1);
      for (int r = 0; r < R; ++r) {
        const __m512i b = _mm512_set1_epi32(x[r * ldx + in - 1].x);
        acc[r][2] = dot_pairs(acc[r][2], w2, b);
        acc[r][3] = dot_pairs(acc[r][3], w3, b);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(out + r * 32, _mm512_add_ps(acc[r][0], acc[r][2]));
    _mm512_storeu_ps(out + r * 32 + 16, _mm512_add_ps(acc[r][1], acc[r][3]));
  }
}

// The float32 counterpart: R rows of x (float32) times one block of 64 output columns in oneDNN's AB16b64a
// layout (per input feature, its 64 columns: 256 bytes), into out [R, 64]. Each output is one chain of
// fused multiply-adds down the input features, whatever R.
template <int R>
void rows_block_f32(const float* x, int64_t ldx, int64_t in, const float* block, float* out) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < in; ++k) {
    const float* w = block + k * 64;
    for (int i = 0; i < 4; ++i) _mm_prefetch(reinterpret_cast<const char*>(w + 8 * 64 + 16 * i), _MM_HINT_T0);
    const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16), w2 = _mm512_loadu_ps(w + 32),
                 w3 = _mm512_loadu_ps(w + 48);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * ldx + k]);
      acc[r][0] = _mm512_fmadd_ps(a, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(a, w2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(a, w3, acc[r][3]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(out + r * 64 + 16 * i, acc[r][i]);
}

template <typename T, bool Pairs = false>
softprompt::RowFn<T> row_fn(int64_t dim) {
  switch (dim) {
    case 32: return attend_row<2, T, Pairs>;
    case 48: return attend_row<3, T, Pairs>;
    case 64: return attend_row<4, T, Pairs>;
    case 80: return attend_row<5, T, Pairs>;
    case 96: return attend_row<6, T, Pairs>;
    case 112: return attend_row<7, T, Pairs>;
    case 128: return attend_row<8, T, Pairs>;
    default: return nullptr;
  }
}

}  // namespace

#pragma GCC pop_options
#endif

namespace softprompt {

// attention.cpp's per-row function on AVX-512 for head sizes that are a multiple of 16 up to 128;
// nullptr for others (the portable loops take them). Call it only where cpu_has_avx512(), and with
// `pairs` (bfloat16 scores in vdpbf16ps) only where cpu_has_avx512_bf16().
#if defined(__x86_64__)
void avx512_silu_mul(const c10::BFloat16* gate, const c10::BFloat16* up, c10::BFloat16* out, int64_t begin,
                     int64_t end) {
  silu_mul_bf16(gate, up, out, begin, end);
}
// linear.cpp's `onednn_rows`: `rows` (1 to kOnednnRows) rows of x times one 32-column block of oneDNN's
// packed weight, into out [rows, 32]. Call it only where cpu_has_avx512_bf16().
void avx512_rows_block(const c10::BFloat16* x, int64_t rows, int64_t ldx, int64_t in, const c10::BFloat16* block,
                       float* out) {
  switch (rows) {
    case 1: rows_block<1>(x, ldx, in, block, out); break;
    case 2: rows_block<2>(x, ldx, in, block, out); break;
    case 3: rows_block<3>(x, ldx, in, block, out); break;
    case 4: rows_block<4>(x, ldx, in, block, out); break;
    default: break;
  }
}
// Its float32 counterpart (AB16b64a, 64-column blocks), in tiles of up to 6 rows. Call it only where cpu_has_avx512().
void avx512_rows_block(const float* x, int64_t rows, int64_t ldx, int64_t in, const float* block, float* out) {
  for (int64_t r = 0; r < rows; r += 6) {
    const float* xr = x + r * ldx;
    float* o = out + r * 64;
    switch (rows - r < 6 ? rows - r : 6) {
      case 1: rows_block_f32<1>(xr, ldx, in, block, o); break;
      case 2: rows_block_f32<2>(xr, ldx, in, block, o); break;
      case 3: rows_block_f32<3>(xr, ldx, in, block, o); break;
      case 4: rows_block_f32<4>(xr, ldx, in, block, o); break;
      case 5: rows_block_f32<5>(xr, ldx, in, block, o); break;
      default: rows_block_f32<6>(xr, ldx, in, block, o); break;
    }
  }
}
RowFn<float> avx512_row_fn(float*, int64_t dim, bool) { return row_fn<float>(dim); }
RowFn<c10::BFloat16> avx512_row_fn(c10::BFloat16*, int64_t dim, bool pairs) {
  return pairs ? row_fn<c10::BFloat16, true>(dim) : row_fn<c10::BFloat16>(dim);
}
#else
void avx512_silu_mul(const c10::BFloat16*, const c10::BFloat16*, c10::BFloat16*, int64_t, int64_t) {}
void avx512_rows_block(const c10::BFloat16*, int64_t, int64_t, int64_t, const c10::BFloat16*, float*) {}
void avx512_rows_block(const float*, int64_t, int64_t, int64_t, const float*, float*) {}
RowFn<float> avx512_row_fn(float*, int64_t, bool) { return nullptr; }
RowFn<c10::BFloat16> avx512_row_fn(c10::BFloat16*, int64_t, bool) { return nullptr; }
#endif

}  // namespace softprompt
