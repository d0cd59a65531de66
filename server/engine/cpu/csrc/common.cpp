// What the kernels share: work sharing (tasks handed out from a shared counter instead of split up
// front) and the CPU feature check. Built by server/engine/cpu/kernels.py.
//
// ATen's parallel_for splits its range into one fixed part per thread. When the OS takes a core from
// one of those threads (the server's event loop writing a step's tokens, a client on the same
// machine, a noisy neighbour), the others finish their parts and wait for it at the barrier: a
// millisecond taken from one thread costs the whole team a millisecond. Here each thread takes the
// next run of tasks from a shared counter, runs shrinking as the range runs out (guided
// scheduling), so the others take over a preempted thread's share and the op is delayed by its own
// part of the interruption only. Runs stay long at first, so each thread still walks memory in order.

#include <ATen/Parallel.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <string>

namespace softprompt {

void shared_for(int64_t tasks, const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  if (threads <= 1 || at::in_parallel_region()) {
    if (tasks > 0) fn(0, tasks);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    int64_t begin = next.load(std::memory_order_relaxed);
    while (begin < tasks) {
      const int64_t end = begin + std::max<int64_t>(1, (tasks - begin) / (2 * threads));
      if (next.compare_exchange_weak(begin, end, std::memory_order_relaxed)) {
        fn(begin, end);
        begin = next.load(std::memory_order_relaxed);
      }
    }
  });
}

// The index in names[0..count) of `most` (0 for "auto": the best), for an op's `*_isa(most)` setter;
// refuses another name, listing the ones it takes.
int isa_index(const std::string& most, const char* const* names, int count, const char* op) {
  if (most == "auto") return 0;
  for (int at = 0; at < count; ++at)
    if (most == names[at]) return at;
  std::string known = "auto";
  for (int at = 0; at < count; ++at) known += (at + 1 < count ? ", " : " or ") + std::string(names[at]);
  TORCH_CHECK(false, op, ": ", known, ", not ", most);
}

#if defined(__x86_64__)
bool cpu_has_avx2_fma() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#else
bool cpu_has_avx2_fma() { return false; }
#endif

}  // namespace softprompt
