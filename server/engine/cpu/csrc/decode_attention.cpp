// Decode attention over the KV pool: one query per request against its keys, two ranges of the pool:
// its adapter's shared prefix, then its own segment.
// Built by server/engine/cpu/kernels.py, called by attention.py, which documents when and why.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

namespace softprompt {
void shared_for(int64_t tasks, const std::function<void(int64_t, int64_t)>& fn);  // common.cpp
bool cpu_has_avx2_fma();
bool cpu_has_avx512f();  // decode_attention_avx512.cpp
bool decode_attention_avx512(const void* q, const void* pool, void* out, bool bf16, const int64_t* start,
                             const int64_t* len, const int64_t* prefix_start, const int64_t* prefix_len,
                             int64_t requests, int64_t heads, int64_t kv_heads, int64_t slots, int64_t dim,
                             int64_t window, float scale);
}  // namespace softprompt

namespace {

constexpr int64_t kLanes = 8;  // independent partial sums: vectorizable without reassociating one sum

// The instruction sets the op may use, best first, and the most it may use (`decode_attention_isa`).
const char* const kIsas[] = {"avx512", "avx2", "baseline"};
std::atomic<int> most_isa{0};

// The best of kIsas this CPU has, within `most_isa`: 0 avx512 (AVX-512F, see decode_attention_avx512.cpp),
// 1 avx2 (with FMA), 2 baseline.
int isa() {
  int best = softprompt::cpu_has_avx512f() ? 0 : softprompt::cpu_has_avx2_fma() ? 1 : 2;
  return std::max(best, most_isa.load(std::memory_order_relaxed));
}

// The portable loops: the code below is inlined whole into two entry points, `attend_items_baseline` (x86-64's SSE2) and
// `attend_items_avx2` (AVX2 with FMA), one of which the CPU check picks at run time: the same loops,
// vectorized 8 wide with fused multiply-adds where the CPU has them (no -march: see kernels.py).
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

// One request, one kv head: its `group` query heads against keys [lo, len), keys 0..prefix-1 being
// rows of `pk`, `pv` (its shared prefix) and the rest rows of `k`, `v` (its own segment, from key
// `prefix` on). q, out: [group, dim]; pk, pv, k, v: rows contiguous.
template <typename T>
SP_INLINE void attend_group(const T* q, const T* pk, const T* pv, int64_t prefix, const T* k, const T* v,
                            int64_t lo, int64_t len, int64_t group, int64_t dim, float scale, T* out,
                            std::vector<float>& work) {
  const int64_t n = len - lo;
  work.resize(group * (2 * dim + n + 1));
  float* qf = work.data();        // [group, dim] scaled queries
  float* acc = qf + group * dim;  // [group, dim] weighted sums of values
  float* p = acc + group * dim;   // [group, n] scores, then unnormalized probabilities
  float* total = p + group * n;   // [group] sums of p
  auto key_row = [&](const T* shared, const T* own, int64_t j) {  // key j's row (of keys or of values)
    return j < prefix ? shared + j * dim : own + (j - prefix) * dim;
  };
  for (int64_t i = 0; i < group * dim; ++i) {
    qf[i] = static_cast<float>(q[i]) * scale;
    acc[i] = 0.f;
  }
  for (int64_t j = 0; j < n; ++j) {
    const T* key = key_row(pk, k, lo + j);
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
    const T* value = key_row(pv, v, lo + j);
    for (int64_t h = 0; h < group; ++h) {
      const float w = p[h * n + j];
      float* a = acc + h * dim;
      for (int64_t i = 0; i < dim; ++i) a[i] += w * static_cast<float>(value[i]);
    }
  }
  for (int64_t h = 0; h < group; ++h)
    for (int64_t i = 0; i < dim; ++i) out[h * dim + i] = static_cast<T>(acc[h * dim + i] / total[h]);
}

// One step's decoding requests: query, out [requests, heads, dim]; pool [2, kv_heads, slots, dim].
template <typename T>
struct Batch {
  const T* q;
  const T* pool;
  T* out;
  const int64_t* start;
  const int64_t* len;
  const int64_t* prefix_start;
  const int64_t* prefix_len;
  int64_t heads, kv_heads, slots, dim, window;
  float scale;
};

// Tasks [begin, end) of the step: task r * kv_heads + g is request r's kv head g.
template <typename T>
SP_INLINE void attend_items(const Batch<T>& b, int64_t begin, int64_t end) {
  const int64_t group = b.heads / b.kv_heads;
  std::vector<float> work;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t r = item / b.kv_heads, g = item % b.kv_heads;
    const int64_t lo = b.window > 0 ? std::max<int64_t>(0, b.len[r] - b.window) : 0;
    const int64_t q_at = (r * b.heads + g * group) * b.dim;
    const T* k = b.pool + (g * b.slots + b.start[r]) * b.dim;
    const T* v = b.pool + ((b.kv_heads + g) * b.slots + b.start[r]) * b.dim;
    const T* pk = b.pool + (g * b.slots + b.prefix_start[r]) * b.dim;
    const T* pv = b.pool + ((b.kv_heads + g) * b.slots + b.prefix_start[r]) * b.dim;
    attend_group(b.q + q_at, pk, pv, b.prefix_len[r], k, v, lo, b.len[r], group, b.dim, b.scale, b.out + q_at,
                 work);
  }
}

template <typename T>
void attend_items_baseline(const Batch<T>& b, int64_t begin, int64_t end) { attend_items(b, begin, end); }

#if defined(__x86_64__)
template <typename T>
__attribute__((target("avx2,fma"))) void attend_items_avx2(const Batch<T>& b, int64_t begin, int64_t end) {
  attend_items(b, begin, end);
}
#else
template <typename T>
void attend_items_avx2(const Batch<T>& b, int64_t begin, int64_t end) { attend_items(b, begin, end); }
#endif

// query: [requests, heads, dim]; kv: [2, kv_heads, slots, dim]; starts, kv_lens, prefix_starts,
// prefix_lens: [requests] int64. Request r's keys: prefix_lens[r] slots from prefix_starts[r] (its
// shared prefix, none when 0), then kv_lens[r] - prefix_lens[r] from starts[r] (its own segment).
// window > 0: each request attends only to its last `window` keys (prefix included in the count).
// Returns [requests, heads, dim].
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& kv, const at::Tensor& starts,
                            const at::Tensor& kv_lens, const at::Tensor& prefix_starts, const at::Tensor& prefix_lens,
                            double scale, int64_t window) {
  TORCH_CHECK(query.dim() == 3 && kv.dim() == 4 && kv.size(0) == 2, "query [requests, heads, dim] and "
              "kv [2, kv_heads, slots, dim] expected");
  TORCH_CHECK(query.is_contiguous() && kv.is_contiguous(), "query and kv must be contiguous");
  TORCH_CHECK(query.device().is_cpu() && kv.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(query.scalar_type() == kv.scalar_type(), "query and kv must have one dtype");
  TORCH_CHECK(starts.scalar_type() == at::kLong && kv_lens.scalar_type() == at::kLong &&
                  prefix_starts.scalar_type() == at::kLong && prefix_lens.scalar_type() == at::kLong,
              "int64 starts, kv_lens, prefix_starts, prefix_lens");
  const int64_t requests = query.size(0), heads = query.size(1), dim = query.size(2);
  const int64_t kv_heads = kv.size(1), slots = kv.size(2);
  TORCH_CHECK(kv.size(3) == dim && heads % kv_heads == 0, "head dims or head counts do not match");
  TORCH_CHECK(starts.numel() == requests && kv_lens.numel() == requests && prefix_starts.numel() == requests &&
                  prefix_lens.numel() == requests,
              "one start, kv_len, prefix start and prefix length per request");
  const at::Tensor starts_c = starts.contiguous(), lens_c = kv_lens.contiguous();
  const at::Tensor prefix_starts_c = prefix_starts.contiguous(), prefix_lens_c = prefix_lens.contiguous();
  const int64_t* start = starts_c.data_ptr<int64_t>();
  const int64_t* len = lens_c.data_ptr<int64_t>();
  const int64_t* prefix_start = prefix_starts_c.data_ptr<int64_t>();
  const int64_t* prefix_len = prefix_lens_c.data_ptr<int64_t>();
  for (int64_t r = 0; r < requests; ++r) {
    const int64_t own = len[r] - prefix_len[r];
    TORCH_CHECK(own > 0 && start[r] >= 0 && start[r] + own <= slots, "request ", r, ": keys [", start[r], ", ",
                start[r] + own, ") are not in the pool's ", slots, " slots");
    TORCH_CHECK(prefix_len[r] >= 0 && prefix_start[r] >= 0 && prefix_start[r] + prefix_len[r] <= slots, "request ",
                r, ": prefix keys [", prefix_start[r], ", ", prefix_start[r] + prefix_len[r],
                ") are not in the pool's ", slots, " slots");
  }
  at::Tensor out = at::empty_like(query);
  TORCH_CHECK(query.scalar_type() == at::kFloat || query.scalar_type() == at::kBFloat16,
              "float32 or bfloat16 expected, got ", query.scalar_type());

  const int chosen = isa();
  if (chosen == 0 && softprompt::decode_attention_avx512(query.data_ptr(), kv.data_ptr(), out.data_ptr(),
                                                         query.scalar_type() == at::kBFloat16, start, len,
                                                         prefix_start, prefix_len, requests, heads, kv_heads,
                                                         slots, dim, window, static_cast<float>(scale)))
    return out;
  const bool avx2 = chosen <= 1;
  auto run = [&](auto* q, auto* pool, auto* o) {
    const Batch<std::remove_const_t<std::remove_pointer_t<decltype(q)>>> batch{
        q, pool, o, start, len, prefix_start, prefix_len, heads, kv_heads, slots, dim, window,
        static_cast<float>(scale)};
    softprompt::shared_for(requests * kv_heads, [&](int64_t begin, int64_t end) {
      avx2 ? attend_items_avx2(batch, begin, end) : attend_items_baseline(batch, begin, end);
    });
  };
  if (query.scalar_type() == at::kFloat)
    run(query.data_ptr<float>(), kv.data_ptr<float>(), out.data_ptr<float>());
  else
    run(query.data_ptr<c10::BFloat16>(), kv.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>());
  return out;
}

// Sets the most the op may use: "auto" (the best the CPU has), or one of kIsas (for tests and
// benchmarks, which run each path the machine can). Returns the one the op now takes where the head
// size allows (a head size its AVX-512 code does not take runs the portable loops).
std::string decode_attention_isa(const std::string& most) {
  int at = 0;
  if (most != "auto") {
    while (at < 3 && most != kIsas[at]) ++at;
    TORCH_CHECK(at < 3, "decode_attention_isa: auto, avx512, avx2 or baseline, not ", most);
  }
  most_isa.store(at, std::memory_order_relaxed);
  return kIsas[isa()];
}

}  // namespace

TORCH_LIBRARY(softprompt, m) {
  m.def(
      "decode_attention(Tensor query, Tensor kv, Tensor starts, Tensor kv_lens, Tensor prefix_starts, "
      "Tensor prefix_lens, float scale, int window) -> Tensor");
  m.def("decode_attention_isa(str most) -> str", decode_attention_isa);
}

TORCH_LIBRARY_IMPL(softprompt, CPU, m) { m.impl("decode_attention", decode_attention); }
