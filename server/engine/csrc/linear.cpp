// Linear layers on x86 CPUs with AVX2 and FMA: y = x W^T + b, float32, W packed once into column blocks.
// Built by server/engine/cpu_kernels.py, called by cpu_linear.py, which documents when and why.
//
// The packed weight is [blocks, in, 16]: block b holds output columns 16b..16b+15, one row of 16 per
// input feature, so a block is one contiguous stream of memory (the last block zero-padded). Each
// (block, chunk of up to kChunkRows rows) is a task, shared out by `shared_for` (common.cpp) in
// block-major runs, so a thread's tasks walk blocks in memory order. A task runs register tiles of
// up to 6 rows by 16 columns (12 accumulators of FMAs) over the block:
// - few rows (decoding; up to kSlicedRows): memory-bound. The tiles take the block slice by slice
//   (kDepth input features, 4 KB), so the first tile reads a slice from memory and the others from
//   L1, while every tile prefetches the next slice: the block streams in once, during the compute.
// - more rows (prefill): compute-bound. Each tile runs down the whole block, the block in L2 after
//   the first, and prefetches the next block.
// Every output is the same sequence of FMAs down the input features either way: results do not
// depend on the row count or the blocking.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <optional>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace softprompt {  // common.cpp
void shared_for(int64_t tasks, const std::function<void(int64_t, int64_t)>& fn);
bool cpu_has_avx2_fma();
}  // namespace softprompt

namespace {

constexpr int64_t kBlock = 16;       // output columns per packed block: two 8-float AVX registers
constexpr int64_t kTileRows = 6;     // rows per register tile: 12 accumulators + 2 weights + 1 input
constexpr int64_t kChunkRows = 48;   // rows per task: a chunk's inputs stay in L2 across its tiles
constexpr int64_t kDepth = 64;       // input features per pass of the tiles: 4 KB of a block, in L1
constexpr int64_t kSlicedRows = 24;  // chunks of more rows are compute-bound: one pass, no partial sums

#if defined(__x86_64__)

// Rows [0, R) of x (row stride ldx) times `depth` rows of one packed block, added to the partial sums
// `acc_rows` [R, 16] (set, not added, when `first`).
template <int R>
__attribute__((target("avx2,fma"))) void tile(const float* x, int64_t ldx, const float* block, int64_t depth,
                                               float* acc_rows, bool first, const float* prefetch) {
  __m256 acc[R][2];
  _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
    acc[r][0] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc_rows + r * kBlock);
    acc[r][1] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc_rows + r * kBlock + 8);
  }
  for (int64_t k = 0; k < depth; ++k) {
    const __m256 w0 = _mm256_loadu_ps(block + k * kBlock);
    const __m256 w1 = _mm256_loadu_ps(block + k * kBlock + 8);
    if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(prefetch + k * kBlock), _MM_HINT_T0);
    _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * ldx + k);
      acc[r][0] = _mm256_fmadd_ps(a, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, w1, acc[r][1]);
    }
  }
  _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(acc_rows + r * kBlock, acc[r][0]);
    _mm256_storeu_ps(acc_rows + r * kBlock + 8, acc[r][1]);
  }
}

// Up to kChunkRows rows of x times one packed block. The input dimension is walked in slices of
// kDepth: each slice of the block (4 KB) is read from memory by the first tile and from L1 by the
// others, so the block streams in once while every tile computes.
void rows_times_block(const float* x, int64_t rows, int64_t in, const float* block, const float* bias, float* y,
                      int64_t out_features, int64_t cols, const float* next_block) {
  float acc[kChunkRows * kBlock];
  const int64_t pass = rows <= kSlicedRows ? kDepth : in;
  for (int64_t k0 = 0; k0 < in; k0 += pass) {
    const int64_t depth = std::min(pass, in - k0);
    const float* slice = block + k0 * kBlock;
    const bool first = k0 == 0;
    const float* ahead = k0 + pass < in ? slice + pass * kBlock : next_block;  // read while this slice computes
    int64_t r = 0;
    for (; r + kTileRows <= rows; r += kTileRows)
      tile<kTileRows>(x + r * in + k0, in, slice, depth, acc + r * kBlock, first, ahead);
    const float* xr = x + r * in + k0;
    float* ar = acc + r * kBlock;
    switch (rows - r) {
      case 5: tile<5>(xr, in, slice, depth, ar, first, ahead); break;
      case 4: tile<4>(xr, in, slice, depth, ar, first, ahead); break;
      case 3: tile<3>(xr, in, slice, depth, ar, first, ahead); break;
      case 2: tile<2>(xr, in, slice, depth, ar, first, ahead); break;
      case 1: tile<1>(xr, in, slice, depth, ar, first, ahead); break;
      default: break;
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) y[r * out_features + c] = acc[r * kBlock + c] + (bias ? bias[c] : 0.f);
}

#else

void rows_times_block(const float*, int64_t, int64_t, const float*, const float*, float*, int64_t, int64_t,
                      const float*) {}

#endif

// x [rows, in] float32 contiguous; packed [blocks, in, 16]; bias [out_features] or none.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                         int64_t out_features) {
  TORCH_CHECK(softprompt::cpu_has_avx2_fma(), "packed_linear needs an x86 CPU with AVX2 and FMA");
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && packed.size(2) == kBlock, "x [rows, in] and a packed weight "
              "[blocks, in, ", kBlock, "] expected");
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat && packed.scalar_type() == at::kFloat, "float32 tensors expected");
  TORCH_CHECK(x.is_contiguous() && packed.is_contiguous(), "x and the packed weight must be contiguous");
  const int64_t rows = x.size(0), in = x.size(1), blocks = packed.size(0);
  TORCH_CHECK(packed.size(1) == in, "x has ", in, " features, the weight ", packed.size(1));
  TORCH_CHECK(out_features > (blocks - 1) * kBlock && out_features <= blocks * kBlock, out_features,
              " output features do not fit ", blocks, " blocks");
  const float* bias_data = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out_features,
                "a contiguous float32 bias of ", out_features, " expected");
    bias_data = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({rows, out_features}, x.options());
  if (rows == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  // block-major: consecutive tasks share a block, which stays in cache while they sweep the rows
  softprompt::shared_for(blocks * chunks, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / chunks, r0 = (task % chunks) * kChunkRows;
      const int64_t n0 = b * kBlock, cols = std::min(kBlock, out_features - n0);
      const float* next = b + 1 < blocks ? wp + (b + 1) * in * kBlock : nullptr;
      rows_times_block(xp + r0 * in, std::min(kChunkRows, rows - r0), in, wp + b * in * kBlock,
                       bias_data ? bias_data + n0 : nullptr, yp + r0 * out_features + n0, out_features, cols, next);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(softprompt, m) {
  m.def("packed_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(softprompt, CPU, m) { m.impl("packed_linear", packed_linear); }
