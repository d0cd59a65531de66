// Linear layers on x86 CPUs with AVX2 and FMA: y = x W^T + b in float32, W packed once into column
// blocks, in float32 or in bfloat16 (widened in registers as it is loaded: half the memory traffic).
// Built by server/engine/cpu/kernels.py, called by linear.py, which documents when and why.
//
// The packed weight is [blocks, in, 16]: block b holds output columns 16b..16b+15, one row of 16 per
// input feature, so a block is one contiguous stream of memory (the last block zero-padded). Each
// (block, chunk of up to kChunkRows rows) is a task, shared out by `shared_for` (common.cpp) in
// block-major runs, so a thread's tasks walk blocks in memory order. A task runs register tiles of
// up to 6 rows by 16 columns (12 accumulators of FMAs) over the block:
// - few rows (decoding; up to kSlicedRows): memory-bound. The tiles take the block slice by slice
//   (kDepth input features, 4 KB in float32), so the first tile reads a slice from memory and the others from
//   L1, while every tile prefetches the next slice: the block streams in once, during the compute.
// - more rows (prefill): compute-bound. Each tile runs down the whole block, the block in L2 after
//   the first, and prefetches the next block.
// Every output is the same sequence of FMAs down the input features either way: results do not
// depend on the row count or the blocking.

#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <optional>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace softprompt {  // common.cpp
void shared_for(int64_t tasks, const std::function<void(int64_t, int64_t)>& fn);
bool cpu_has_avx2_fma();
bool cpu_has_avx512_bf16();  // avx512.cpp
void avx512_rows_block(const c10::BFloat16* x, int64_t rows, int64_t ldx, int64_t in, const c10::BFloat16* block,
                       float* out);
}  // namespace softprompt

#if AT_MKLDNN_ENABLED()
namespace at::native {  // exported by libtorch_cpu (ATen/native/mkldnn/MKLDNNCommon.h, not shipped in its headers)
void* data_ptr_from_mkldnn(const at::Tensor& mkldnn_tensor);
int64_t nbytes_from_mkldnn(const at::Tensor& mkldnn_tensor);
}  // namespace at::native
#endif

namespace {

constexpr int64_t kBlock = 16;       // output columns per packed block: two 8-float AVX registers
constexpr int64_t kTileRows = 6;     // rows per register tile: 12 accumulators + 2 weights + 1 input
constexpr int64_t kChunkRows = 48;   // rows per task: a chunk's inputs stay in L2 across its tiles
constexpr int64_t kDepth = 64;       // input features per pass of the tiles: 4 KB of a float32 block, in L1
constexpr int64_t kSlicedRows = 24;  // chunks of more rows are compute-bound: one pass, no partial sums
constexpr int64_t kWideDepth = 256;  // slices of a bfloat16 block widened for more rows: 16 KB, in L1

#if defined(__x86_64__)

// 16 weights of a block's row as two registers of 8 floats; bfloat16 is float32's top half.
__attribute__((target("avx2,fma"))) inline void load_row(const float* w, __m256& w0, __m256& w1) {
  w0 = _mm256_loadu_ps(w);
  w1 = _mm256_loadu_ps(w + 8);
}
__attribute__((target("avx2,fma"))) inline void load_row(const c10::BFloat16* w, __m256& w0, __m256& w1) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(bits)), 16));
  w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(bits, 1)), 16));
}

// Rows [0, R) of x (row stride ldx) times `depth` rows of one packed block, added to the partial sums
// `acc_rows` [R, 16] (set, not added, when `first`).
template <int R, typename W, typename P>
__attribute__((target("avx2,fma"))) void tile(const float* x, int64_t ldx, const W* block, int64_t depth,
                                               float* acc_rows, bool first, const P* prefetch) {
  __m256 acc[R][2];
  _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
    acc[r][0] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc_rows + r * kBlock);
    acc[r][1] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc_rows + r * kBlock + 8);
  }
  for (int64_t k = 0; k < depth; ++k) {
    __m256 w0, w1;
    load_row(block + k * kBlock, w0, w1);
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

// A bfloat16 slice of `depth` block rows widened into `out` [depth, 16] float32.
__attribute__((target("avx2,fma"))) void widen(const c10::BFloat16* slice, int64_t depth, float* out) {
  for (int64_t k = 0; k < depth; ++k) {
    __m256 w0, w1;
    load_row(slice + k * kBlock, w0, w1);
    _mm256_storeu_ps(out + k * kBlock, w0);
    _mm256_storeu_ps(out + k * kBlock + 8, w1);
  }
}

// The tiles of `rows` rows of x over `depth` rows of a block (or of a slice widened from one),
// prefetching `ahead` (rows of the packed weight) as they go.
template <typename W, typename P>
void tiles(const float* x, int64_t rows, int64_t in, const W* slice, int64_t depth, float* acc, bool first,
           const P* ahead) {
  int64_t r = 0;
  for (; r + kTileRows <= rows; r += kTileRows)
    tile<kTileRows>(x + r * in, in, slice, depth, acc + r * kBlock, first, ahead);
  const float* xr = x + r * in;
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

// Up to kChunkRows rows of x times one packed block. The input dimension is walked in slices of
// kDepth: each slice of the block (4 KB in float32) is read from memory by the first tile and from L1
// by the others, so the block streams in once while every tile computes. A bfloat16 block read by
// more than one tile is walked in slices whatever the rows (kWideDepth when compute-bound), each
// widened once into L1 for all tiles; one tile (up to 6 rows: decoding) widens as it loads.
template <typename W>
void rows_times_block(const float* x, int64_t rows, int64_t in, const W* block, const float* bias, float* y,
                      int64_t out_features, int64_t cols, const W* next_block) {
  constexpr bool bfloat16 = std::is_same_v<W, c10::BFloat16>;
  const bool widen_slices = bfloat16 && rows > kTileRows;
  float acc[kChunkRows * kBlock];
  float widened[bfloat16 ? kWideDepth * kBlock : 1];
  const int64_t pass = rows <= kSlicedRows ? kDepth : widen_slices ? kWideDepth : in;
  for (int64_t k0 = 0; k0 < in; k0 += pass) {
    const int64_t depth = std::min(pass, in - k0);
    const W* slice = block + k0 * kBlock;
    const W* ahead = k0 + pass < in ? slice + pass * kBlock : next_block;  // read while this slice computes
    if constexpr (bfloat16) {
      if (widen_slices) {
        widen(slice, depth, widened);
        tiles(x + k0, rows, in, static_cast<const float*>(widened), depth, acc, k0 == 0, ahead);
        continue;
      }
    }
    tiles(x + k0, rows, in, slice, depth, acc, k0 == 0, ahead);
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) y[r * out_features + c] = acc[r * kBlock + c] + (bias ? bias[c] : 0.f);
}

#else

template <typename W>
void rows_times_block(const float*, int64_t, int64_t, const W*, const float*, float*, int64_t, int64_t, const W*) {}

#endif

// All of y: each (block, chunk of rows) a task.
template <typename W>
void all_blocks(const float* xp, const W* wp, const float* bias, float* yp, int64_t rows, int64_t in,
                int64_t blocks, int64_t out_features) {
  const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  // block-major: consecutive tasks share a block, which stays in cache while they sweep the rows
  softprompt::shared_for(blocks * chunks, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / chunks, r0 = (task % chunks) * kChunkRows;
      const int64_t n0 = b * kBlock, cols = std::min(kBlock, out_features - n0);
      const W* next = b + 1 < blocks ? wp + (b + 1) * in * kBlock : nullptr;
      rows_times_block(xp + r0 * in, std::min(kChunkRows, rows - r0), in, wp + b * in * kBlock,
                       bias ? bias + n0 : nullptr, yp + r0 * out_features + n0, out_features, cols, next);
    }
  });
}

// x [rows, in] float32 contiguous; packed [blocks, in, 16] float32 or bfloat16; bias [out_features]
// float32 or none. Returns y [rows, out_features] float32.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                         int64_t out_features) {
  TORCH_CHECK(softprompt::cpu_has_avx2_fma(), "packed_linear needs an x86 CPU with AVX2 and FMA");
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && packed.size(2) == kBlock, "x [rows, in] and a packed weight "
              "[blocks, in, ", kBlock, "] expected");
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "float32 x expected");
  TORCH_CHECK(packed.scalar_type() == at::kFloat || packed.scalar_type() == at::kBFloat16,
              "a float32 or bfloat16 packed weight expected");
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
  float* yp = y.data_ptr<float>();
  if (packed.scalar_type() == at::kFloat)
    all_blocks(xp, packed.data_ptr<float>(), bias_data, yp, rows, in, blocks, out_features);
  else
    all_blocks(xp, packed.data_ptr<c10::BFloat16>(), bias_data, yp, rows, in, blocks, out_features);
  return y;
}

// A bfloat16 layer's few rows on the weight oneDNN packed (linear.py's `_onednn_forward` and forward.cpp take
// it for up to kOnednnRows rows, where `onednn_layout` said yes for the weight): oneDNN's call costs
// about 16 us beyond its arithmetic, and this reads the same bytes in place, in AVX512-BF16 dot
// products of bfloat16 pairs (avx512.cpp's `rows_block`), so no second copy of the weight. oneDNN's
// layout for it on AMX CPUs is AB16b32a2b: blocks of 32 output columns one after another, in each the
// input features' pairs (padded with zeros to a multiple of 32 features), each pair's 32 columns side by side.
constexpr int64_t kOnednnBlock = 32;  // output columns per block of that layout; input features padded to it
constexpr int64_t kOnednnRows = 4;    // the most rows a call takes (avx512.cpp's rows_block tiles)

int64_t padded(int64_t n) { return (n + kOnednnBlock - 1) / kOnednnBlock * kOnednnBlock; }

#if AT_MKLDNN_ENABLED()
const c10::BFloat16* onednn_bytes(const at::Tensor& packed, int64_t out, int64_t in) {
  TORCH_CHECK(packed.is_mkldnn() && packed.scalar_type() == at::kBFloat16 && packed.dim() == 2 &&
                  packed.size(0) == out && packed.size(1) == in,
              "a oneDNN-packed bfloat16 weight [", out, ", ", in, "] expected");
  TORCH_CHECK(at::native::nbytes_from_mkldnn(packed) == padded(out) * padded(in) * 2,
              "the packed weight's size is not the AB16b32a2b layout's");
  return static_cast<const c10::BFloat16*>(at::native::data_ptr_from_mkldnn(packed));
}

// Whether `packed` (oneDNN's, bfloat16) holds `plain` [out, in] in the AB16b32a2b layout, padding zeros included.
bool onednn_layout(const at::Tensor& packed, const at::Tensor& plain) {
  if (!packed.is_mkldnn() || packed.scalar_type() != at::kBFloat16 || plain.dim() != 2 ||
      plain.scalar_type() != at::kBFloat16 || packed.sizes() != plain.sizes() ||
      at::native::nbytes_from_mkldnn(packed) != padded(plain.size(0)) * padded(plain.size(1)) * 2)
    return false;
  const int64_t out = plain.size(0), in = plain.size(1), in_pad = padded(in);
  const at::Tensor w = plain.contiguous();
  const uint16_t* want = reinterpret_cast<const uint16_t*>(w.data_ptr<c10::BFloat16>());
  const uint16_t* got = reinterpret_cast<const uint16_t*>(onednn_bytes(packed, out, in));
  for (int64_t n = 0; n < padded(out); ++n)
    for (int64_t k = 0; k < in_pad; ++k) {
      const int64_t at = (n / kOnednnBlock) * kOnednnBlock * in_pad + (k / 2) * 2 * kOnednnBlock + (n % kOnednnBlock) * 2 + k % 2;
      if (got[at] != (n < out && k < in ? want[n * in + k] : 0)) return false;
    }
  return true;
}

// x [rows <= kOnednnRows, in] bfloat16, rows contiguous; packed: oneDNN's, in that layout; bias bfloat16 or
// none. y = x W^T + b, each output summed in float32 and rounded to bfloat16, as oneDNN's output is.
at::Tensor onednn_rows(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(softprompt::cpu_has_avx512_bf16(), "onednn_rows needs a CPU with AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1 && x.size(0) <= kOnednnRows,
              "x [rows <= ", kOnednnRows, ", in] bfloat16, rows contiguous, expected");
  const int64_t rows = x.size(0), in = x.size(1), out = packed.size(0);
  const c10::BFloat16* w = onednn_bytes(packed, out, in);
  const c10::BFloat16* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() && bias->numel() == out,
                "a contiguous bfloat16 bias of ", out, " expected");
    b = bias->data_ptr<c10::BFloat16>();
  }
  at::Tensor y = at::empty({rows, out}, x.options());
  if (rows == 0) return y;
  const c10::BFloat16* xp = x.data_ptr<c10::BFloat16>();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  const int64_t ldx = x.stride(0), in_pad = padded(in);
  softprompt::shared_for(padded(out) / kOnednnBlock, [&](int64_t first, int64_t last) {
    float acc[kOnednnRows * kOnednnBlock];
    for (int64_t block = first; block < last; ++block) {
      softprompt::avx512_rows_block(xp, rows, ldx, in, w + block * kOnednnBlock * in_pad, acc);
      const int64_t n0 = block * kOnednnBlock, cols = std::min(kOnednnBlock, out - n0);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c)
          yp[r * out + n0 + c] = c10::BFloat16(acc[r * kOnednnBlock + c] + (b ? static_cast<float>(b[n0 + c]) : 0.f));
    }
  });
  return y;
}
#else
bool onednn_layout(const at::Tensor&, const at::Tensor&) { return false; }
at::Tensor onednn_rows(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&) {
  TORCH_CHECK(false, "this build of torch has no oneDNN");
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(softprompt, m) {
  m.def("packed_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
  m.def("onednn_layout(Tensor packed, Tensor plain) -> bool");
  m.def("onednn_rows(Tensor x, Tensor packed, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(softprompt, CPU, m) { m.impl("packed_linear", packed_linear); }
// The packed weight is a oneDNN (mkldnn) tensor: the dispatcher looks these up for its backend (and for
// CPU, where the call's other tensors decide).
TORCH_LIBRARY_IMPL(softprompt, MkldnnCPU, m) {
  m.impl("onednn_layout", onednn_layout);
  m.impl("onednn_rows", onednn_rows);
}
TORCH_LIBRARY_IMPL(softprompt, CPU, m) {
  m.impl("onednn_layout", onednn_layout);
  m.impl("onednn_rows", onednn_rows);
}
