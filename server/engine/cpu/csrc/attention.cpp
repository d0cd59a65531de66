// Attention over the KV pool for a whole packed step: every request's query rows (one when decoding,
// a prompt chunk when prefilling) against its keys, two ranges of the pool: its adapter's shared
// prefix, then its own segment. Built by server/engine/cpu/kernels.py, called by attention.py, which
// documents when and why.
//
// Each query row is computed on its own, the same way whatever else is in the step: a row's keys
// start at 0 (or at its window's first key), its scores, softmax and weighted sum of values are a
// function of its query and keys alone. So a prompt's outputs do not depend on how it was cut into
// chunks or what it was packed with, and a prompt's last row equals the decoding step that would
// have computed it, bit for bit (batch-invariant, in bfloat16 too, where SDPA's blocking was not).
//
// The work is shared as (request, kv head, up to kRowsPerTask rows) tasks among torch's threads
// (common.cpp); a task takes a kv head's query heads together, so each key and value row is read
// once per query row. The per-row code exists twice: the portable loops below (built for baseline
// x86-64 and for AVX2 with FMA) and avx512.cpp's, picked by the CPU at run time.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace softprompt {
void shared_for(int64_t tasks, const std::function<void(int64_t, int64_t)>& fn);  // common.cpp
bool cpu_has_avx2_fma();
int isa_index(const std::string& most, const char* const* names, int count, const char* op);
bool cpu_has_avx512();  // avx512.cpp
bool cpu_has_avx512_bf16();

// One query row's `group` heads (q, out: [group, dim]) against n0 keys from rows k0, v0 then n1 from
// k1, v1 (rows of dim contiguous); work: scratch of row_scratch(group, dim, n0 + n1) floats.
// avx512_row_fn: nullptr where the AVX-512 code does not take this head size.
inline int64_t row_scratch(int64_t group, int64_t dim, int64_t keys) { return group * (2 * dim + keys + 1); }
template <typename T>
using RowFn = void (*)(const T* q, const T* k0, const T* v0, int64_t n0, const T* k1, const T* v1, int64_t n1,
                       int64_t group, int64_t dim, float scale, T* out, float* work);
RowFn<float> avx512_row_fn(float*, int64_t dim, bool pairs);
RowFn<c10::BFloat16> avx512_row_fn(c10::BFloat16*, int64_t dim, bool pairs);
}  // namespace softprompt

namespace {

constexpr int64_t kRowsPerTask = 16;  // a long prompt's rows are shared among threads in runs of this many

// The instruction sets the op may use, best first, and the most it may use (`attention_isa`): 0
// avx512-bf16 and 1 avx512 (avx512.cpp; the first for bfloat16 scores in vdpbf16ps), 2 avx2
// (with FMA), 3 baseline.
const char* const kIsas[] = {"avx512-bf16", "avx512", "avx2", "baseline"};
constexpr int kIsaCount = 4;
std::atomic<int> most_isa{0};

// The best of kIsas this CPU has, within `most_isa`.
int isa() {
  const int best = softprompt::cpu_has_avx512_bf16() ? 0
                   : softprompt::cpu_has_avx512()    ? 1
                   : softprompt::cpu_has_avx2_fma()  ? 2
                                                     : 3;
  return std::max(best, most_isa.load(std::memory_order_relaxed));
}

constexpr int64_t kLanes = 8;  // independent partial sums: vectorizable without reassociating one sum

// The portable loops are inlined whole into two row functions, `row_baseline` (x86-64's SSE2) and
// `row_avx2` (AVX2 with FMA): the same loops, vectorized 8 wide with fused multiply-adds where the
// CPU has them (no -march: see kernels.py).
#define SP_INLINE inline __attribute__((always_inline))

// b: a row of the pool, float or bfloat16 (widened as it is read: exact, bfloat16 is float's top half).
template <typename T>
SP_INLINE float dot(const float* a, const T* b, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += a[i + l] * static_cast<float>(b[i + l]);
  float sum = 0.f;
  for (; i < n; ++i) sum += a[i] * static_cast<float>(b[i]);
  for (int64_t l = 0; l < kLanes; ++l) sum += acc[l];
  return sum;
}

// softprompt::RowFn, portable.
template <typename T>
SP_INLINE void attend_row(const T* q, const T* k0, const T* v0, int64_t n0, const T* k1, const T* v1, int64_t n1,
                          int64_t group, int64_t dim, float scale, T* out, float* work) {
  const int64_t n = n0 + n1;
  float* qf = work;               // [group, dim] scaled queries
  float* acc = qf + group * dim;  // [group, dim] weighted sums of values
  float* p = acc + group * dim;   // [group, n] scores, then unnormalized probabilities
  float* total = p + group * n;   // [group] sums of p
  auto row = [&](const T* first, const T* second, int64_t j) {  // key j's row (of keys or of values)
    return j < n0 ? first + j * dim : second + (j - n0) * dim;
  };
  for (int64_t i = 0; i < group * dim; ++i) {
    qf[i] = static_cast<float>(q[i]) * scale;
    acc[i] = 0.f;
  }
  for (int64_t j = 0; j < n; ++j) {
    const T* key = row(k0, k1, j);
    for (int64_t h = 0; h < group; ++h) p[h * n + j] = dot(qf + h * dim, key, dim);
  }
  for (int64_t h = 0; h < group; ++h) {
    float* ph = p + h * n;
    const float top = *std::max_element(ph, ph + n);
    float sum = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      ph[j] = std::exp(ph[j] - top);
      sum += ph[j];
    }
    total[h] = sum;
  }
  for (int64_t j = 0; j < n; ++j) {
    const T* value = row(v0, v1, j);
    for (int64_t h = 0; h < group; ++h) {
      const float w = p[h * n + j];
      float* a = acc + h * dim;
      for (int64_t i = 0; i < dim; ++i) a[i] += w * static_cast<float>(value[i]);
    }
  }
  for (int64_t h = 0; h < group; ++h)
    for (int64_t i = 0; i < dim; ++i) out[h * dim + i] = static_cast<T>(acc[h * dim + i] / total[h]);
}

template <typename T>
void row_baseline(const T* q, const T* k0, const T* v0, int64_t n0, const T* k1, const T* v1, int64_t n1,
                  int64_t group, int64_t dim, float scale, T* out, float* work) {
  attend_row(q, k0, v0, n0, k1, v1, n1, group, dim, scale, out, work);
}

#if defined(__x86_64__)
template <typename T>
__attribute__((target("avx2,fma"))) void row_avx2(const T* q, const T* k0, const T* v0, int64_t n0, const T* k1,
                                                  const T* v1, int64_t n1, int64_t group, int64_t dim, float scale,
                                                  T* out, float* work) {
  attend_row(q, k0, v0, n0, k1, v1, n1, group, dim, scale, out, work);
}
#else
template <typename T>
void row_avx2(const T* q, const T* k0, const T* v0, int64_t n0, const T* k1, const T* v1, int64_t n1, int64_t group,
              int64_t dim, float scale, T* out, float* work) {
  attend_row(q, k0, v0, n0, k1, v1, n1, group, dim, scale, out, work);
}
#endif

// A step: query, out [tokens, heads, dim]; pool [2, kv_heads, slots, dim]; per request its first
// query row, rows, own segment start, keys (prefix included), prefix start and length.
template <typename T>
struct Step {
  const T* q;
  const T* pool;
  T* out;
  const int64_t* first_row;
  const int64_t* q_len;
  const int64_t* start;
  const int64_t* len;
  const int64_t* prefix_start;
  const int64_t* prefix_len;
  int64_t heads, kv_heads, slots, dim, window;
  float scale;
};

// Request r's query rows [row, row + rows), kv head g: row i is key kv_len - q_len + i's query and sees
// the keys before it and itself (the last `window` of them with a sliding window).
template <typename T>
void attend_rows(const Step<T>& s, softprompt::RowFn<T> fn, int64_t r, int64_t g, int64_t row, int64_t rows,
                 std::vector<float>& work) {
  const int64_t group = s.heads / s.kv_heads, dim = s.dim, prefix = s.prefix_len[r];
  const T* keys = s.pool + g * s.slots * dim;
  const T* values = s.pool + (s.kv_heads + g) * s.slots * dim;
  for (int64_t i = row; i < row + rows; ++i) {
    const int64_t hi = s.len[r] - s.q_len[r] + i + 1;  // this row's keys: [lo, hi)
    const int64_t lo = s.window > 0 ? std::max<int64_t>(0, hi - s.window) : 0;
    const int64_t in_prefix = std::max<int64_t>(0, std::min(prefix, hi) - lo);
    const int64_t own_from = std::max(lo, prefix) - prefix;  // first own-segment key, counted in the segment
    const int64_t p0 = (s.prefix_start[r] + std::min(lo, prefix)) * dim, o0 = (s.start[r] + own_from) * dim;
    const int64_t at = ((s.first_row[r] + i) * s.heads + g * group) * dim;
    work.resize(std::max<size_t>(work.size(), softprompt::row_scratch(group, dim, hi - lo)));
    fn(s.q + at, keys + p0, values + p0, in_prefix, keys + o0, values + o0, hi - lo - in_prefix, group, dim, s.scale,
       s.out + at, work.data());
  }
}

template <typename T>
void attend_step(const Step<T>& s, int64_t requests, softprompt::RowFn<T> fn) {
  std::vector<int64_t> task_request, task_row;  // each task's request and first row; kv heads inside
  for (int64_t r = 0; r < requests; ++r)
    for (int64_t row = 0; row < s.q_len[r]; row += kRowsPerTask) {
      task_request.push_back(r);
      task_row.push_back(row);
    }
  const int64_t tasks = static_cast<int64_t>(task_request.size());
  softprompt::shared_for(tasks * s.kv_heads, [&](int64_t begin, int64_t end) {
    std::vector<float> work;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / s.kv_heads, r = task_request[t], row = task_row[t];
      attend_rows(s, fn, r, item % s.kv_heads, row, std::min(kRowsPerTask, s.q_len[r] - row), work);
    }
  });
}

template <typename T>
softprompt::RowFn<T> row_fn(int64_t dim) {
  const int chosen = isa();
  softprompt::RowFn<T> fn = chosen <= 1 ? softprompt::avx512_row_fn(static_cast<T*>(nullptr), dim, chosen == 0)
                                        : nullptr;
  return fn ? fn : chosen <= 2 ? row_avx2<T> : row_baseline<T>;
}

at::Tensor longs(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.numel() == n, name, ": ", n, " int64 values expected (one per request)");
  return t.contiguous();
}

// query: [tokens, heads, dim], each request's q_lens[r] rows back to back in request order;
// kv: [2, kv_heads, slots, dim]; q_lens, starts, kv_lens, prefix_starts, prefix_lens: [requests] int64.
// Request r's keys: prefix_lens[r] slots from prefix_starts[r] (its shared prefix, none when 0), then
// kv_lens[r] - prefix_lens[r] from starts[r] (its own segment, this forward's rows the last q_lens[r]).
// window > 0: each row attends only to its last `window` keys (prefix included in the count).
// Returns [tokens, heads, dim].
at::Tensor attention(const at::Tensor& query, const at::Tensor& kv, const at::Tensor& q_lens, const at::Tensor& starts,
                     const at::Tensor& kv_lens, const at::Tensor& prefix_starts, const at::Tensor& prefix_lens,
                     double scale, int64_t window) {
  TORCH_CHECK(query.dim() == 3 && kv.dim() == 4 && kv.size(0) == 2, "query [tokens, heads, dim] and "
              "kv [2, kv_heads, slots, dim] expected");
  TORCH_CHECK(query.is_contiguous() && kv.is_contiguous(), "query and kv must be contiguous");
  TORCH_CHECK(query.device().is_cpu() && kv.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(query.scalar_type() == kv.scalar_type(), "query and kv must have one dtype");
  TORCH_CHECK(query.scalar_type() == at::kFloat || query.scalar_type() == at::kBFloat16,
              "float32 or bfloat16 expected, got ", query.scalar_type());
  const int64_t tokens = query.size(0), heads = query.size(1), dim = query.size(2);
  const int64_t kv_heads = kv.size(1), slots = kv.size(2), requests = q_lens.numel();
  TORCH_CHECK(kv.size(3) == dim && heads % kv_heads == 0, "head dims or head counts do not match");
  const at::Tensor q_lens_c = longs(q_lens, requests, "q_lens"), starts_c = longs(starts, requests, "starts");
  const at::Tensor lens_c = longs(kv_lens, requests, "kv_lens");
  const at::Tensor prefix_starts_c = longs(prefix_starts, requests, "prefix_starts");
  const at::Tensor prefix_lens_c = longs(prefix_lens, requests, "prefix_lens");
  const int64_t* q_len = q_lens_c.data_ptr<int64_t>();
  const int64_t* start = starts_c.data_ptr<int64_t>();
  const int64_t* len = lens_c.data_ptr<int64_t>();
  const int64_t* prefix_start = prefix_starts_c.data_ptr<int64_t>();
  const int64_t* prefix_len = prefix_lens_c.data_ptr<int64_t>();
  std::vector<int64_t> first_row(requests);
  int64_t rows = 0;
  for (int64_t r = 0; r < requests; ++r) {
    const int64_t own = len[r] - prefix_len[r];
    TORCH_CHECK(q_len[r] > 0 && q_len[r] <= own, "request ", r, ": ", q_len[r], " query rows for ", own,
                " keys of its own");
    TORCH_CHECK(start[r] >= 0 && start[r] + own <= slots, "request ", r, ": keys [", start[r], ", ", start[r] + own,
                ") are not in the pool's ", slots, " slots");
    TORCH_CHECK(prefix_len[r] >= 0 && prefix_start[r] >= 0 && prefix_start[r] + prefix_len[r] <= slots, "request ",
                r, ": prefix keys [", prefix_start[r], ", ", prefix_start[r] + prefix_len[r],
                ") are not in the pool's ", slots, " slots");
    first_row[r] = rows;
    rows += q_len[r];
  }
  TORCH_CHECK(rows == tokens, "q_lens add up to ", rows, " rows, query has ", tokens);
  at::Tensor out = at::empty_like(query);
  auto run = [&](auto* q, auto* pool, auto* o) {
    using T = std::remove_pointer_t<decltype(o)>;
    const Step<T> step{q, pool, o, first_row.data(), q_len, start, len, prefix_start, prefix_len, heads, kv_heads,
                       slots, dim, window, static_cast<float>(scale)};
    attend_step(step, requests, row_fn<T>(dim));
  };
  if (query.scalar_type() == at::kFloat)
    run(query.data_ptr<float>(), kv.data_ptr<float>(), out.data_ptr<float>());
  else
    run(query.data_ptr<c10::BFloat16>(), kv.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>());
  return out;
}

// Writes a step's new keys and values into the pool: kv [2, kv_heads, slots, dim]; k, v [tokens,
// kv_heads, dim] (rows of dim contiguous); slots [tokens] int64, each token's slot. What two
// index_copy_ calls did (a token's rows of every head copied in place), in one pass without their
// per-element index arithmetic: 5% of a bfloat16 decoding step before, most of a KV write's time.
void write_kv(at::Tensor& kv, const at::Tensor& slots, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(kv.dim() == 4 && kv.size(0) == 2 && kv.is_contiguous() && kv.device().is_cpu(),
              "kv: a contiguous CPU [2, kv_heads, slots, dim] expected");
  const int64_t kv_heads = kv.size(1), pool_slots = kv.size(2), dim = kv.size(3), tokens = slots.numel();
  for (const at::Tensor* t : {&k, &v})
    TORCH_CHECK(t->dim() == 3 && t->size(0) == tokens && t->size(1) == kv_heads && t->size(2) == dim &&
                    t->stride(2) == 1 && t->scalar_type() == kv.scalar_type() && t->device().is_cpu(),
                "k and v: [tokens, kv_heads, dim] in kv's dtype, rows contiguous, expected");
  const at::Tensor slots_c = longs(slots, tokens, "slots");
  const int64_t* slot = slots_c.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < pool_slots, "token ", t, ": slot ", slot[t], " is not in the pool's ",
                pool_slots, " slots");
  const int64_t row = dim * kv.element_size();
  char* pool = static_cast<char*>(kv.data_ptr());
  const char* src[2] = {static_cast<const char*>(k.data_ptr()), static_cast<const char*>(v.data_ptr())};
  const int64_t token_stride[2] = {k.stride(0) * k.element_size(), v.stride(0) * v.element_size()};
  const int64_t head_stride[2] = {k.stride(1) * k.element_size(), v.stride(1) * v.element_size()};
  at::parallel_for(0, tokens, 256, [&](int64_t begin, int64_t end) {
    for (int64_t plane = 0; plane < 2; ++plane)
      for (int64_t h = 0; h < kv_heads; ++h) {
        char* head = pool + (plane * kv_heads + h) * pool_slots * row;
        for (int64_t t = begin; t < end; ++t)
          std::memcpy(head + slot[t] * row, src[plane] + t * token_stride[plane] + h * head_stride[plane], row);
      }
  });
}

// Sets the most the op may use: "auto" (the best the CPU has), or one of kIsas (for tests and
// benchmarks, which run each path the machine can). Returns the one the op now takes where the head
// size allows (a head size its AVX-512 code does not take runs the portable loops).
std::string attention_isa(const std::string& most) {
  most_isa.store(softprompt::isa_index(most, kIsas, kIsaCount, "attention_isa"), std::memory_order_relaxed);
  return kIsas[isa()];
}

}  // namespace

TORCH_LIBRARY(softprompt, m) {
  m.def(
      "attention(Tensor query, Tensor kv, Tensor q_lens, Tensor starts, Tensor kv_lens, Tensor prefix_starts, "
      "Tensor prefix_lens, float scale, int window) -> Tensor");
  m.def("attention_isa(str most) -> str", attention_isa);
  m.def("write_kv(Tensor(a!) kv, Tensor slots, Tensor k, Tensor v) -> ()");
}

TORCH_LIBRARY_IMPL(softprompt, CPU, m) {
  m.impl("attention", attention);
  m.impl("write_kv", write_kv);
}
