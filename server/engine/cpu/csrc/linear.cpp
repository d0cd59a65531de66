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
bool cpu_has_avx512();  // avx512.cpp
bool cpu_has_avx512_bf16();
void avx512_rows_block(const c10::BFloat16* x, int64_t rows, int64_t ldx, int64_t in, const c10::BFloat16* block,
                       float* out);
void avx512_rows_block(const float* x, int64_t rows, int64_t ldx, int64_t in, const float* block, float* out);
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

// A layer's few rows on the weight oneDNN packed (linear.py's `_onednn_forward` and forward.cpp take it
// for up to `max_rows` rows, where `onednn_layout` said yes for the weight): oneDNN's call costs about
// 16 us beyond its arithmetic, and this reads the same bytes in place (avx512.cpp's `rows_block`), so no
// second copy of the weight. oneDNN's layouts for a linear weight on this class of CPU: blocks of `cols`
// output columns one after another; in each, the input features (padded to a multiple of `depth`) in
// groups of `pair`, each group's `cols` columns side by side (bfloat16 AB16b32a2b: `vdpbf16ps` pairs;
// float32 AB16b64a).
struct Layout {
  int64_t cols, depth, pair, max_rows;
};
constexpr Layout kBFloat16Layout{32, 32, 2, 4};  // max_rows: avx512.cpp's rows_block tiles
constexpr Layout kFloatLayout{64, 16, 1, 16};    // max_rows: measured (linear.py's ONEDNN_ROWS)

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

#if AT_MKLDNN_ENABLED()
Layout layout_of(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16 ? kBFloat16Layout : kFloatLayout; }

int64_t layout_bytes(const Layout& l, int64_t out, int64_t in, int64_t element) {
  return round_up(out, l.cols) * round_up(in, l.depth) * element;
}

template <typename T>
const T* onednn_bytes(const at::Tensor& packed, int64_t out, int64_t in) {
  TORCH_CHECK(packed.is_mkldnn() && packed.scalar_type() == c10::CppTypeToScalarType<T>::value && packed.dim() == 2 &&
                  packed.size(0) == out && packed.size(1) == in,
              "a oneDNN-packed weight [", out, ", ", in, "] of x's dtype expected");
  TORCH_CHECK(at::native::nbytes_from_mkldnn(packed) == layout_bytes(layout_of(packed), out, in, sizeof(T)),
              "the packed weight's size is not its layout's");
  return static_cast<const T*>(at::native::data_ptr_from_mkldnn(packed));
}

template <typename Bits>
bool same_layout(const at::Tensor& packed, const at::Tensor& plain) {
  const Layout l = layout_of(plain);
  const int64_t out = plain.size(0), in = plain.size(1), in_pad = round_up(in, l.depth);
  const at::Tensor w = plain.contiguous();
  const Bits* want = static_cast<const Bits*>(w.data_ptr());
  const Bits* got = static_cast<const Bits*>(at::native::data_ptr_from_mkldnn(packed));
  for (int64_t n = 0; n < round_up(out, l.cols); ++n)
    for (int64_t k = 0; k < in_pad; ++k) {
      const int64_t at = (n / l.cols) * l.cols * in_pad + (k / l.pair) * l.pair * l.cols + (n % l.cols) * l.pair + k % l.pair;
      if (got[at] != (n < out && k < in ? want[n * in + k] : Bits{0})) return false;
    }
  return true;
}

// Whether `packed` (oneDNN's, bfloat16 or float32) holds `plain` [out, in] in its dtype's layout above, padding
// zeros included.
bool onednn_layout(const at::Tensor& packed, const at::Tensor& plain) {
  const at::ScalarType dtype = plain.scalar_type();
  if (!packed.is_mkldnn() || packed.scalar_type() != dtype || (dtype != at::kBFloat16 && dtype != at::kFloat) ||
      plain.dim() != 2 || packed.sizes() != plain.sizes() ||
      at::native::nbytes_from_mkldnn(packed) !=
          layout_bytes(layout_of(plain), plain.size(0), plain.size(1), plain.element_size()))
    return false;
  return dtype == at::kBFloat16 ? same_layout<uint16_t>(packed, plain) : same_layout<uint32_t>(packed, plain);
}

template <typename T>
void rows_times_blocks(const at::Tensor& x, const at::Tensor& packed, const T* bias, at::Tensor& y) {
  const Layout l = layout_of(packed);
  const int64_t rows = x.size(0), in = x.size(1), out = packed.size(0), ldx = x.stride(0), in_pad = round_up(in, l.depth);
  const T* w = onednn_bytes<T>(packed, out, in);
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  softprompt::shared_for(round_up(out, l.cols) / l.cols, [&](int64_t first, int64_t last) {
    float acc[16 * 64];  // the most rows of either layout times its columns
    for (int64_t block = first; block < last; ++block) {
      softprompt::avx512_rows_block(xp, rows, ldx, in, w + block * l.cols * in_pad, acc);
      const int64_t n0 = block * l.cols, cols = std::min(l.cols, out - n0);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c)
          yp[r * out + n0 + c] = static_cast<T>(acc[r * l.cols + c] + (bias ? static_cast<float>(bias[n0 + c]) : 0.f));
    }
  });
}

// x [rows <= the layout's max_rows, in], rows contiguous; packed: oneDNN's, of x's dtype (bfloat16 or float32),
// in its layout; bias of that dtype or none. y = x W^T + b, each output summed in float32 (bfloat16: rounded
// once, as oneDNN's is).
at::Tensor onednn_rows(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias) {
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || x.scalar_type() == at::kFloat, "bfloat16 or float32 x expected");
  TORCH_CHECK(bf16 ? softprompt::cpu_has_avx512_bf16() : softprompt::cpu_has_avx512(),
              "onednn_rows needs a CPU with AVX-512", bf16 ? " and AVX512-BF16" : "");
  const int64_t max_rows = layout_of(x).max_rows;
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(0) <= max_rows, "x [rows <= ", max_rows,
              ", in], rows contiguous, expected");
  const int64_t out = packed.size(0);
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->is_contiguous() && bias->numel() == out,
                "a contiguous bias of ", out, " in x's dtype expected");
  at::Tensor y = at::empty({x.size(0), out}, x.options());
  if (bf16)
    rows_times_blocks<c10::BFloat16>(x, packed, bias ? bias->data_ptr<c10::BFloat16>() : nullptr, y);
  else
    rows_times_blocks<float>(x, packed, bias ? bias->data_ptr<float>() : nullptr, y);
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
