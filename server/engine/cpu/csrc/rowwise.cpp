// A layer's row-wise work in one pass each instead of a chain of ATen operations: the RMS norm of
// bfloat16 rows (alone, or after the residual add it follows), and the rotary embedding of float32 or
// bfloat16 queries and keys. Built by server/engine/cpu/kernels.py, called by rowwise.py (the Python
// layers) and forward.cpp (the native decode), so both compute the same bits; rowwise.py documents
// when and why.
//
// Each ATen operation of the chains replaced here costs 10-30 us on a decoding step's [64, 512] rows,
// most of it the call, and a bfloat16 RMS norm is eight of them (two casts, pow, mean, add, rsqrt, two
// multiplies). These loops round where ATen's chain rounds:
// - rotary: x * cos + rotate_half(x) * sin as three roundings (two products, their sum), so the same
//   bits as the ATen chain in float32 and bfloat16 alike. Never contracted into a fused multiply-add
//   (see the entry points below).
// - RMS norm (bfloat16 only): transformers' LlamaRMSNorm: the row in float32, its mean square, times
//   1 / sqrt(mean square + eps), rounded to bfloat16, times the weight, rounded again. Only the order
//   of the mean square's sum differs from ATen's (16 partial sums, added up in one fixed order): a
//   row's result depends on that row alone, never on the row count or the threads. float32 rows keep
//   ATen's chain, whose sum transformers' float32 results are equal to, to the last bit.
// - residual add then RMS norm (bfloat16 only): the sum rounded as ATen's add rounds it, then the norm
//   of that sum, as above: the bits of the two ops, in one pass over the rows instead of two.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/silu.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>

namespace softprompt {
bool cpu_has_avx2_fma();  // common.cpp
int isa_index(const std::string& most, const char* const* names, int count, const char* op);
bool cpu_has_avx512();    // avx512.cpp
void avx512_silu_mul(const c10::BFloat16* gate, const c10::BFloat16* up, c10::BFloat16* out, int64_t begin,
                     int64_t end);
}  // namespace softprompt

namespace {

constexpr int64_t kLanes = 16;  // partial sums of a row's squares: vectorizable without reassociating one sum

// The loops below are inlined whole into three entry points each: baseline x86-64 (SSE2), AVX2 without
// FMA, and AVX-512 with contraction off (never a fused multiply-add: the same bits each way). The CPU
// check picks one (`level`).
#define SP_INLINE inline __attribute__((always_inline))

SP_INLINE float widen(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Round to nearest even, as c10::BFloat16's constructor (a NaN becomes the quiet NaN it makes).
SP_INLINE c10::BFloat16 narrow(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(f != f ? 0x7fc0u : rounded), c10::BFloat16::from_bits());
}

SP_INLINE float value(float x) { return x; }
SP_INLINE float value(c10::BFloat16 x) { return widen(x); }
SP_INLINE void store(float x, float* out) { *out = x; }
SP_INLINE void store(float x, c10::BFloat16* out) { *out = narrow(x); }
// x rounded to T and back: what an ATen operation producing T leaves
SP_INLINE float rounded(float x, float*) { return x; }
SP_INLINE float rounded(float x, c10::BFloat16*) { return widen(narrow(x)); }

// Rows to run per task: a few thousand elements, so a decoding step's rows take one thread.
int64_t grain(int64_t row_elements) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elements)); }

// One token's `heads` heads of `dim`, with its position's cos and sin [dim]: a * cos + rotated * sin, rounded
// to T after each product and after the sum, as ATen's operations round.
template <typename T>
SP_INLINE void rotate_token(const T* x, const T* cos, const T* sin, T* out, int64_t heads, int64_t dim) {
  T* const tag = nullptr;
  const int64_t half = dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const T* xh = x + h * dim;
    T* oh = out + h * dim;
    for (int64_t d = 0; d < half; ++d)
      store(rounded(value(xh[d]) * value(cos[d]), tag) + rounded(-value(xh[d + half]) * value(sin[d]), tag), oh + d);
    for (int64_t d = half; d < dim; ++d)
      store(rounded(value(xh[d]) * value(cos[d]), tag) + rounded(value(xh[d - half]) * value(sin[d]), tag), oh + d);
  }
}

// x's tokens `ldx` elements apart (a token's heads contiguous), out's back to back.
template <typename T>
SP_INLINE void rotate_tokens(const T* x, int64_t ldx, const T* cos, const T* sin, T* out, int64_t begin, int64_t end,
                             int64_t heads, int64_t dim) {
  for (int64_t t = begin; t < end; ++t)
    rotate_token(x + t * ldx, cos + t * dim, sin + t * dim, out + t * heads * dim, heads, dim);
}

SP_INLINE void norm_rows(const c10::BFloat16* x, const c10::BFloat16* weight, c10::BFloat16* out, int64_t begin,
                         int64_t end, int64_t hidden, float eps) {
  for (int64_t r = begin; r < end; ++r) {
    const c10::BFloat16* row = x + r * hidden;
    float acc[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= hidden; i += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) acc[l] += widen(row[i + l]) * widen(row[i + l]);
    float sum = 0.f;
    for (; i < hidden; ++i) sum += widen(row[i]) * widen(row[i]);
    for (int64_t l = 0; l < kLanes; ++l) sum += acc[l];
    const float scale = 1.f / std::sqrt(sum / static_cast<float>(hidden) + eps);
    c10::BFloat16* o = out + r * hidden;
    for (int64_t c = 0; c < hidden; ++c) o[c] = narrow(widen(weight[c]) * widen(narrow(widen(row[c]) * scale)));
  }
}

// sum = x + delta (rounded as ATen's add rounds), then out = the RMS norm of sum, row by row (the row
// still in cache for its norm).
SP_INLINE void add_norm_rows(const c10::BFloat16* x, const c10::BFloat16* delta, const c10::BFloat16* weight,
                             c10::BFloat16* sum, c10::BFloat16* out, int64_t begin, int64_t end, int64_t hidden,
                             float eps) {
  for (int64_t r = begin; r < end; ++r) {
    const int64_t at = r * hidden;
    for (int64_t c = 0; c < hidden; ++c) sum[at + c] = narrow(widen(x[at + c]) + widen(delta[at + c]));
    norm_rows(sum + at, weight, out + at, 0, 1, hidden, eps);
  }
}

#define SP_ENTRY_POINTS(suffix, target)                                                                          \
  target void rotate_f32_##suffix(const float* x, int64_t ldx, const float* cos, const float* sin, float* out,     \
                                  int64_t begin, int64_t end, int64_t heads, int64_t dim) {                       \
    rotate_tokens(x, ldx, cos, sin, out, begin, end, heads, dim);                                                 \
  }                                                                                                               \
  target void rotate_bf16_##suffix(const c10::BFloat16* x, int64_t ldx, const c10::BFloat16* cos,                 \
                                   const c10::BFloat16* sin, c10::BFloat16* out, int64_t begin, int64_t end,      \
                                   int64_t heads, int64_t dim) {                                                  \
    rotate_tokens(x, ldx, cos, sin, out, begin, end, heads, dim);                                                 \
  }                                                                                                               \
  target void norm_bf16_##suffix(const c10::BFloat16* x, const c10::BFloat16* weight, c10::BFloat16* out,        \
                                 int64_t begin, int64_t end, int64_t hidden, float eps) {                         \
    norm_rows(x, weight, out, begin, end, hidden, eps);                                                           \
  }                                                                                                               \
  target void add_norm_bf16_##suffix(const c10::BFloat16* x, const c10::BFloat16* delta,                         \
                                     const c10::BFloat16* weight, c10::BFloat16* sum, c10::BFloat16* out,         \
                                     int64_t begin, int64_t end, int64_t hidden, float eps) {                     \
    add_norm_rows(x, delta, weight, sum, out, begin, end, hidden, eps);                                           \
  }

SP_ENTRY_POINTS(baseline, )
#if defined(__x86_64__)
SP_ENTRY_POINTS(avx2, __attribute__((target("avx2"))))
SP_ENTRY_POINTS(avx512, __attribute__((target("avx512f,avx512bw"), optimize("fp-contract=off"))))
#else
SP_ENTRY_POINTS(avx2, )
SP_ENTRY_POINTS(avx512, )
#endif

// The instruction sets the entry points are built for, best first, and the most they may use
// (`rowwise_isa`): 0 avx512 (also the bfloat16 MLP activation in avx512.cpp), 1 avx2, 2 baseline.
const char* const kIsas[] = {"avx512", "avx2", "baseline"};
constexpr int kIsaCount = 3;
std::atomic<int> most_isa{0};

// The best of kIsas this CPU has, within `most_isa`.
int level() {
  const int best = softprompt::cpu_has_avx512() ? 0 : softprompt::cpu_has_avx2_fma() ? 1 : 2;
  return std::max(best, most_isa.load(std::memory_order_relaxed));
}

// The entry point of `level()`: pick(avx512, avx2, baseline).
template <typename F>
F pick(F avx512, F avx2, F baseline) {
  const int at = level();
  return at == 0 ? avx512 : at == 1 ? avx2 : baseline;
}

void rotate_part(const float* x, int64_t ldx, const float* cos, const float* sin, float* out, int64_t begin,
                 int64_t end, int64_t heads, int64_t dim) {
  pick(rotate_f32_avx512, rotate_f32_avx2, rotate_f32_baseline)(x, ldx, cos, sin, out, begin, end, heads, dim);
}
void rotate_part(const c10::BFloat16* x, int64_t ldx, const c10::BFloat16* cos, const c10::BFloat16* sin,
                 c10::BFloat16* out, int64_t begin, int64_t end, int64_t heads, int64_t dim) {
  pick(rotate_bf16_avx512, rotate_bf16_avx2, rotate_bf16_baseline)(x, ldx, cos, sin, out, begin, end, heads, dim);
}

template <typename T>
void rotate_rows(const T* x, int64_t ldx, const T* cos, const T* sin, T* out, int64_t tokens, int64_t heads,
                 int64_t dim) {
  at::parallel_for(0, tokens, grain(heads * dim), [&](int64_t begin, int64_t end) {
    rotate_part(x, ldx, cos, sin, out, begin, end, heads, dim);
  });
}

// `t` itself where its last two dimensions are contiguous (its rows may be columns of a wider tensor:
// a merged projection's output), else a contiguous copy.
at::Tensor rows_contiguous(const at::Tensor& t) {
  if (t.dim() < 2 || t.size(0) == 0) return t.contiguous();
  const int64_t row = t.numel() / t.size(0);
  const bool inner = t.stride(-1) == 1 && (t.dim() == 2 || (t.dim() == 3 && t.stride(1) == t.size(2)));
  return inner && t.stride(0) >= row ? t : t.contiguous();
}

}  // namespace

namespace softprompt {

// x: [tokens, heads, head_dim], a token's heads contiguous (its tokens may be strided); cos, sin:
// [tokens, 1, head_dim], in x's dtype (float32 or bfloat16). Returns x * cos + rotate_half(x) * sin, contiguous.
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && cos.dim() == 3 && sin.dim() == 3 && cos.size(0) == x.size(0) && cos.size(1) == 1 &&
                  cos.size(2) == x.size(2) && sin.sizes() == cos.sizes() && x.size(2) % 2 == 0,
              "x [tokens, heads, head_dim] and cos, sin [tokens, 1, head_dim] expected");
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
                  cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "float32 or bfloat16 CPU tensors of one dtype expected");
  const at::Tensor xc = rows_contiguous(x), cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t heads = x.size(1), dim = x.size(2), ldx = xc.stride(0);
  if (x.scalar_type() == at::kFloat)
    rotate_rows(xc.data_ptr<float>(), ldx, cc.data_ptr<float>(), sc.data_ptr<float>(), out.data_ptr<float>(),
                x.size(0), heads, dim);
  else
    rotate_rows(xc.data_ptr<c10::BFloat16>(), ldx, cc.data_ptr<c10::BFloat16>(), sc.data_ptr<c10::BFloat16>(),
                out.data_ptr<c10::BFloat16>(), x.size(0), heads, dim);
  return out;
}

// x: [rows, hidden] bfloat16; weight: [hidden] bfloat16. transformers' RMS norm of each row.
at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "bfloat16 CPU tensors expected");
  const int64_t hidden = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hidden, "a weight of ", hidden, " expected");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor out = at::empty_like(xc);
  const c10::BFloat16 *xp = xc.data_ptr<c10::BFloat16>(), *wp = wc.data_ptr<c10::BFloat16>();
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  const float epsilon = static_cast<float>(eps);
  const auto norm = pick(norm_bf16_avx512, norm_bf16_avx2, norm_bf16_baseline);
  at::parallel_for(0, xc.numel() / std::max<int64_t>(1, hidden), grain(hidden), [&](int64_t begin, int64_t end) {
    norm(xp, wp, op, begin, end, hidden, epsilon);
  });
  return out;
}

// gate, up: [rows, intermediate] of one dtype, each row contiguous (the rows may be strided: gate and up
// the two halves of a merged projection's output). silu(gate) * up, contiguous: for bfloat16 on AVX-512
// in one pass (avx512.cpp: ATen's roundings, its exponential within 2 ulp of ATen's), else ATen's two operations.
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type() && gate.device().is_cpu(),
              "gate and up of one shape and dtype, on CPU, expected");
  if (gate.scalar_type() != at::kBFloat16 || level() != 0)  // on copies: ATen's silu of a view
    return at::mul(at::silu(gate.contiguous()), up.contiguous());        // takes another path, with other bits
  const int64_t width = gate.size(-1), rows = gate.numel() / std::max<int64_t>(1, width);
  at::Tensor g = rows_contiguous(gate).reshape({rows, width}), u = rows_contiguous(up).reshape({rows, width});
  if (g.stride(0) != u.stride(0)) g = g.contiguous(), u = u.contiguous();
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  const c10::BFloat16 *gp = g.data_ptr<c10::BFloat16>(), *upp = u.data_ptr<c10::BFloat16>();
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  const int64_t ld = g.stride(0);
  if (ld == width) {  // contiguous: one run over every element
    at::parallel_for(0, g.numel(), 16384, [&](int64_t begin, int64_t end) {
      softprompt::avx512_silu_mul(gp, upp, op, begin, end);
    });
  } else {
    at::parallel_for(0, rows, grain(width), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) softprompt::avx512_silu_mul(gp + r * ld, upp + r * ld, op + r * width, 0, width);
    });
  }
  return out;
}

// x, delta: [rows, hidden] bfloat16; weight: [hidden] bfloat16. (x + delta, the RMS norm of that sum):
// the bits of ATen's add and `rms_norm_bf16`, in one pass.
std::tuple<at::Tensor, at::Tensor> add_rms_norm_bf16(const at::Tensor& x, const at::Tensor& delta,
                                                     const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && delta.scalar_type() == at::kBFloat16 &&
                  weight.scalar_type() == at::kBFloat16 && delta.device().is_cpu(),
              "bfloat16 CPU tensors expected");
  TORCH_CHECK(x.sizes() == delta.sizes(), "x and delta of one shape expected");
  const int64_t hidden = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hidden, "a weight of ", hidden, " expected");
  const at::Tensor xc = x.contiguous(), dc = delta.contiguous(), wc = weight.contiguous();
  at::Tensor sum = at::empty_like(xc), out = at::empty_like(xc);
  const c10::BFloat16 *xp = xc.data_ptr<c10::BFloat16>(), *dp = dc.data_ptr<c10::BFloat16>(),
                      *wp = wc.data_ptr<c10::BFloat16>();
  c10::BFloat16 *sp = sum.data_ptr<c10::BFloat16>(), *op = out.data_ptr<c10::BFloat16>();
  const float epsilon = static_cast<float>(eps);
  const auto add_norm = pick(add_norm_bf16_avx512, add_norm_bf16_avx2, add_norm_bf16_baseline);
  at::parallel_for(0, xc.numel() / std::max<int64_t>(1, hidden), grain(hidden), [&](int64_t begin, int64_t end) {
    add_norm(xp, dp, wp, sp, op, begin, end, hidden, epsilon);
  });
  return {sum, out};
}

}  // namespace softprompt

namespace {

// Sets the most the row-wise passes may use: "auto" (the best the CPU has), or one of kIsas (for tests
// and benchmarks, which run each path the machine can). Returns the one they now take.
std::string rowwise_isa(const std::string& most) {
  most_isa.store(softprompt::isa_index(most, kIsas, kIsaCount, "rowwise_isa"), std::memory_order_relaxed);
  return kIsas[level()];
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(softprompt, m) {
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("rms_norm_bf16(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm_bf16(Tensor x, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("rowwise_isa(str most) -> str", rowwise_isa);
}

TORCH_LIBRARY_IMPL(softprompt, CPU, m) {
  m.impl("rotary", softprompt::rotary);
  m.impl("rms_norm_bf16", softprompt::rms_norm_bf16);
  m.impl("add_rms_norm_bf16", softprompt::add_rms_norm_bf16);
  m.impl("silu_mul", softprompt::silu_mul);
}
