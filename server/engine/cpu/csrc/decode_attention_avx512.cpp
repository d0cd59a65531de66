// Decode attention written for AVX-512 (decode_attention.cpp calls it where the CPU has AVX-512F and
// the head size is a multiple of 16 up to 128; its portable loops take the rest).
//
// Same task as decode_attention.cpp's loops: one (request, kv head) at a time, its `group` query
// heads against the keys of its two ranges (shared prefix, own segment). What differs is how the
// registers are used, which the compiler did not find on its own:
// - scores: 16 keys at a time, each key's products summed in a register of its own, then the 16
//   registers reduced to 16 scores together (a transpose tree of 45 instructions), where the portable
//   loop summed each key's 8 lanes one by one;
// - the softmax's exponentials 16 at a time (Cody-Waite reduction and a degree-7 polynomial: within
//   2 ulp of expf), where the portable loop called expf per score;
// - values: up to 4 query heads' sums of a head size of values kept in registers for the whole
//   range, each value row read once per 4 heads, bfloat16 widened in registers.
// bfloat16 keys and values are widened exactly (a bfloat16 is a float's top half), products summed
// in float32, outputs rounded to nearest even as c10::BFloat16 does.
//
// Everything in this file is compiled for AVX-512F (the pragma below) and is called only after the
// CPU check: the same build runs on CPUs without it.

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace softprompt {
void shared_for(int64_t tasks, const std::function<void(int64_t, int64_t)>& fn);

#if defined(__x86_64__)
bool cpu_has_avx512f() { return __builtin_cpu_supports("avx512f"); }
#else
bool cpu_has_avx512f() { return false; }
#endif
}  // namespace softprompt

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f")

namespace {

#define SP_INLINE inline __attribute__((always_inline))

// 16 floats of a row: float32 loaded, bfloat16 widened (shifted into a float's top half).
SP_INLINE __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
SP_INLINE __m512 load16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

SP_INLINE void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
SP_INLINE void store16(c10::BFloat16* p, __m512 x) {  // round to nearest even, NaN kept quiet
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
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

// scores[j] = scale * q . key j for the rows of one range; q: D16 registers of one query head.
template <int D16, typename T>
SP_INLINE void score_range(const __m512 q[D16], Range<T> keys, float scale, float* scores) {
  constexpr int64_t dim = 16 * D16;
  const __m512 scaled = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < keys.count; j += 16) {
    const int64_t m = std::min<int64_t>(16, keys.count - j);
    __m512 acc[16];
    for (int64_t i = 0; i < 16; ++i) {
      acc[i] = _mm512_setzero_ps();
      if (i < m) {
        const T* key = keys.rows + (j + i) * dim;
        for (int c = 0; c < D16; ++c) acc[i] = _mm512_fmadd_ps(q[c], load16(key + 16 * c), acc[i]);
      }
    }
    _mm512_mask_storeu_ps(scores + j, static_cast<__mmask16>((1u << m) - 1),
                          _mm512_mul_ps(sum_each(acc), scaled));
  }
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

// One request's kv head: `group` query heads (q, out: [group, dim]) against keys in two ranges.
template <int D16, typename T>
SP_INLINE void attend_group(const T* q, const Range<T> keys[2], const Range<T> values[2], int64_t group, float scale,
                            T* out, std::vector<float>& work) {
  constexpr int64_t dim = 16 * D16;
  const int64_t n = keys[0].count + keys[1].count;
  work.resize(group * (n + 1));
  float* w = work.data();  // [group, n]: scores, then weights
  float* total = w + group * n;
  for (int64_t h = 0; h < group; ++h) {
    __m512 qh[D16];
    for (int c = 0; c < D16; ++c) qh[c] = load16(q + h * dim + 16 * c);
    score_range<D16>(qh, keys[0], scale, w + h * n);
    score_range<D16>(qh, keys[1], scale, w + h * n + keys[0].count);
    total[h] = softmax_weights(w + h * n, n);
  }
  int64_t h = 0;  // value rows read once per 4 query heads (2 at head sizes over 64: registers)
  if constexpr (D16 <= 4)
    for (; h + 4 <= group; h += 4) weigh_heads<D16, 4>(values, w + h * n, n, total + h, out + h * dim);
  for (; h + 2 <= group; h += 2) weigh_heads<D16, 2>(values, w + h * n, n, total + h, out + h * dim);
  for (; h < group; ++h) weigh_heads<D16, 1>(values, w + h * n, n, total + h, out + h * dim);
}

template <int D16, typename T>
void attend_tasks(const T* q, const T* pool, T* out, const int64_t* start, const int64_t* len,
                  const int64_t* prefix_start, const int64_t* prefix_len, int64_t heads, int64_t kv_heads,
                  int64_t slots, int64_t window, float scale, int64_t begin, int64_t end) {
  constexpr int64_t dim = 16 * D16;
  const int64_t group = heads / kv_heads;
  std::vector<float> work;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t r = item / kv_heads, g = item % kv_heads;
    const int64_t lo = window > 0 ? std::max<int64_t>(0, len[r] - window) : 0;
    const int64_t prefix = prefix_len[r];
    // keys [lo, len): those below `prefix` from the shared prefix's rows, the rest from the request's own
    const int64_t first_own = std::max(lo, prefix);
    const int64_t in_prefix = std::max<int64_t>(0, prefix - lo);
    auto ranges = [&](int64_t plane, Range<T> out_ranges[2]) {
      const T* base = pool + (plane * kv_heads + g) * slots * dim;
      out_ranges[0] = {base + (prefix_start[r] + std::min(lo, prefix)) * dim, in_prefix};
      out_ranges[1] = {base + (start[r] + first_own - prefix) * dim, len[r] - first_own};
    };
    Range<T> keys[2], values[2];
    ranges(0, keys);
    ranges(1, values);
    const int64_t q_at = (r * heads + g * group) * dim;
    attend_group<D16>(q + q_at, keys, values, group, scale, out + q_at, work);
  }
}

template <typename T>
bool attend_all(const T* q, const T* pool, T* out, const int64_t* start, const int64_t* len,
                const int64_t* prefix_start, const int64_t* prefix_len, int64_t requests, int64_t heads,
                int64_t kv_heads, int64_t slots, int64_t dim, int64_t window, float scale) {
  void (*tasks)(const T*, const T*, T*, const int64_t*, const int64_t*, const int64_t*, const int64_t*, int64_t,
                int64_t, int64_t, int64_t, float, int64_t, int64_t) = nullptr;
  switch (dim) {
    case 32: tasks = attend_tasks<2, T>; break;
    case 48: tasks = attend_tasks<3, T>; break;
    case 64: tasks = attend_tasks<4, T>; break;
    case 80: tasks = attend_tasks<5, T>; break;
    case 96: tasks = attend_tasks<6, T>; break;
    case 112: tasks = attend_tasks<7, T>; break;
    case 128: tasks = attend_tasks<8, T>; break;
    default: return false;
  }
  softprompt::shared_for(requests * kv_heads, [&](int64_t begin, int64_t end) {
    tasks(q, pool, out, start, len, prefix_start, prefix_len, heads, kv_heads, slots, window, scale, begin, end);
  });
  return true;
}

}  // namespace

#pragma GCC pop_options
#endif

namespace softprompt {

// decode_attention.cpp's op on AVX-512F, for head sizes that are a multiple of 16 up to 128 (false
// for others: the caller runs its portable loops). Arguments as that op's, checked there; call only
// where cpu_has_avx512f().
bool decode_attention_avx512(const void* q, const void* pool, void* out, bool bf16, const int64_t* start,
                             const int64_t* len, const int64_t* prefix_start, const int64_t* prefix_len,
                             int64_t requests, int64_t heads, int64_t kv_heads, int64_t slots, int64_t dim,
                             int64_t window, float scale) {
#if defined(__x86_64__)
  if (bf16)
    return attend_all(static_cast<const c10::BFloat16*>(q), static_cast<const c10::BFloat16*>(pool),
                      static_cast<c10::BFloat16*>(out), start, len, prefix_start, prefix_len, requests, heads,
                      kv_heads, slots, dim, window, scale);
  return attend_all(static_cast<const float*>(q), static_cast<const float*>(pool), static_cast<float*>(out), start,
                    len, prefix_start, prefix_len, requests, heads, kv_heads, slots, dim, window, scale);
#else
  return false;
#endif
}

}  // namespace softprompt
