// A step's layers in one call (server/engine/cpu/native_decode.py; decoding and prefilling rows alike): the same operations as
// the written-out Python forward (ATen's, oneDNN's linear op, our kernels), in the same order, so the
// same numbers, without returning to Python between them. Why: the server's event loop and the engine share one
// interpreter, and the engine thread needs the GIL between every two of its operations. While the
// loop writes a step's tokens (holding the GIL), the engine stalled at its next operation, so
// serving cost as much engine time as the loop spent. A whole step's layers without the GIL run
// beside the loop instead. Built by server/engine/cpu/kernels.py.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace softprompt {  // rowwise.cpp
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up);
std::tuple<at::Tensor, at::Tensor> add_rms_norm_bf16(const at::Tensor& x, const at::Tensor& delta,
                                                     const at::Tensor& weight, double eps);
}  // namespace softprompt

namespace {

// Each layer's tensors in `weights`, in this order; a bias may be None. Where q/k/v (gate/up) are packed
// as one layer (cpu_linear's merge), its weight and bias are in kQ's (kGate's) slots and kK's and kV's
// (kUp's) are None: one call, its output cut into the layers' columns.
enum Slot : int64_t { kInNorm, kQ, kQBias, kK, kKBias, kV, kVBias, kO, kOBias, kPostNorm, kGate, kGateBias, kUp,
                      kUpBias, kDown, kDownBias, kSlots };
// Each layer's out_features in `out_features`, in this order.
enum Out : int64_t { kQOut, kKOut, kVOut, kOOut, kGateOut, kUpOut, kDownOut, kOuts };

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                         int64_t out_features) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("softprompt::packed_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         int64_t)>();
  return op.call(x, packed, bias, out_features);
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& q_lens, const at::Tensor& starts,
                     const at::Tensor& kv_lens, const at::Tensor& prefix_starts, const at::Tensor& prefix_lens,
                     double scale, int64_t window) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("softprompt::attention", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t)>();
  return op.call(q, kv, q_lens, starts, kv_lens, prefix_starts, prefix_lens, scale, window);
}

void write_kv(at::Tensor& kv, const at::Tensor& slots, const at::Tensor& k, const at::Tensor& v) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("softprompt::write_kv", "")
                       .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  op.call(kv, slots, k, v);
}

// linear.cpp's onednn_rows: a few rows on a oneDNN-packed weight (bfloat16 or float32), read in place.
at::Tensor onednn_rows(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("softprompt::onednn_rows", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>();
  return op.call(x, packed, bias);
}

// torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], ""): a oneDNN-packed weight's layer.
at::Tensor linear_pointwise(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         c10::string_view, c10::List<std::optional<c10::Scalar>>,
                                         std::optional<c10::string_view>)>();
  return op.call(x, packed, bias, "none", c10::List<std::optional<c10::Scalar>>(), c10::string_view(""));
}

// oneDNN builds a primitive (compiles its kernels) for each row count it meets, per weight shape, and a
// server's prefill steps meet new row counts all the time. In bfloat16 (AMX) that costs more than the
// product itself (figures in cpu_linear's docstring), so the rows are padded to one of about 60 counts
// (multiples of 8 up to 64, of 16 up to 256, of 64 up to 1,024, of 128 beyond), whose primitives are
// built once; the extra rows cost a copy of x and a few percent of the product. float32 rows are not
// padded: building cost nothing measurable there, the extra rows did (a 70-token prefill step 17 -> 20 ms).
int64_t padded_rows(int64_t rows, at::ScalarType dtype) {
  if (dtype != at::kBFloat16) return rows;
  const int64_t step = rows <= 64 ? 8 : rows <= 256 ? 16 : rows <= 1024 ? 64 : 128;
  return (rows + step - 1) / step * step;
}

// y [rows, out], x's rows' results, as x's leading dimensions by out.
at::Tensor shaped_as_rows_of(const at::Tensor& x, const at::Tensor& y) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = y.size(-1);
  return y.view(sizes);
}

// linear_pointwise on x's rows padded with zeros to padded_rows; the result of x's own rows.
at::Tensor padded_pointwise(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias) {
  const int64_t in = x.size(-1), rows = x.numel() / std::max<int64_t>(1, in);
  const int64_t padded = padded_rows(rows, packed.scalar_type());
  if (padded == rows) return linear_pointwise(x, packed, bias);
  at::Tensor full = at::empty({padded, in}, x.options());
  full.narrow(0, 0, rows).copy_(x.reshape({rows, in}));
  full.narrow(0, rows, padded - rows).zero_();
  return shaped_as_rows_of(x, linear_pointwise(full, packed, bias).narrow(0, 0, rows));  // leading rows: contiguous
}

// cpu_linear._onednn_forward: in the packed weight's dtype when x has it (bfloat16 on AVX512-BF16, AMX),
// up to `small_rows` rows (the layer's cpu_linear.ROWS) on onednn_rows, more on oneDNN (bfloat16: padded);
// bfloat16 x on a weight packed widened to float32 computed in float32, the result rounded back.
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                         int64_t small_rows) {
  if (packed.scalar_type() == x.scalar_type()) {
    const int64_t rows = x.numel() / x.size(-1);
    if (rows > 0 && rows <= small_rows && x.stride(-1) == 1)
      return shaped_as_rows_of(x, onednn_rows(x.reshape({rows, x.size(-1)}), packed, bias));
    return padded_pointwise(x, packed, bias);
  }
  std::optional<at::Tensor> b = bias;
  if (b) b = b->to(packed.scalar_type());
  return padded_pointwise(x.to(packed.scalar_type()), packed, b).to(x.scalar_type());
}

// The layer on whichever backend packed its weight (cpu_linear.install): oneDNN's op for a oneDNN
// (mkldnn) tensor, our AVX2 kernel for a [blocks, in, 16] one. For the kernel, as
// cpu_linear._kernel_forward: bfloat16 rows and bias computed in float32, the result rounded back.
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                  int64_t out_features, int64_t small_rows) {
  if (packed.is_mkldnn()) return onednn_linear(x, packed, bias, small_rows);
  at::Tensor rows = x.reshape({-1, x.size(-1)});
  std::optional<at::Tensor> b = bias;
  if (x.scalar_type() != at::kFloat) {
    rows = rows.to(at::kFloat);
    if (b) b = b->to(at::kFloat);
  }
  return packed_linear(rows.contiguous(), packed, b, out_features).to(x.scalar_type());
}

// transformers' LlamaRMSNorm (and Qwen2's, Mistral's); bfloat16 rows in one pass (rowwise.cpp), as
// rowwise.py's `rms_norm` computes them.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  if (x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16)
    return softprompt::rms_norm_bf16(x, weight, eps);
  const at::Tensor h = x.to(at::kFloat);
  const at::Tensor variance = h.pow(2).mean(-1, /*keepdim=*/true);
  return weight * (h * at::rsqrt(variance + eps)).to(x.scalar_type());
}

// (x + delta, rms_norm of that sum): for bfloat16 in one pass (rowwise.cpp), the same bits as the two ops.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight,
                                                double eps) {
  if (x.scalar_type() == at::kBFloat16 && delta.scalar_type() == at::kBFloat16 &&
      weight.scalar_type() == at::kBFloat16)
    return softprompt::add_rms_norm_bf16(x, delta, weight, eps);
  at::Tensor sum = x + delta;
  return {sum, rms_norm(sum, weight, eps)};
}

// x * cos + rotate_half(x) * sin in one pass (rowwise.cpp): the same bits as those ATen operations.
at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return softprompt::rotary(x, cos, sin);
}

std::optional<at::Tensor> get(const c10::List<std::optional<at::Tensor>>& weights, int64_t i) { return weights[i]; }

at::Tensor need(const c10::List<std::optional<at::Tensor>>& weights, int64_t i) {
  const std::optional<at::Tensor> t = weights[i];
  TORCH_CHECK(t.has_value(), "weight ", i, " is missing");
  return *t;
}

// h: [tokens, hidden], each request's q_lens[r] new tokens back to back; cos, sin: [tokens, 1, head_dim];
// kv: one [2, kv_heads, slots, head_dim] per layer; slots: each row's new slot; q_lens, starts, kv_lens,
// prefix_starts, prefix_lens: each request's rows and keys, as the attention op takes them (the new keys
// included). Returns h after the last layer (before the final norm).
at::Tensor lean_decode(at::Tensor h, const at::Tensor& cos, const at::Tensor& sin,
                       const c10::List<std::optional<at::Tensor>>& weights, std::vector<int64_t> out_features,
                       std::vector<int64_t> small_rows,
                       std::vector<at::Tensor> kv, const at::Tensor& slots, const at::Tensor& q_lens,
                       const at::Tensor& starts,
                       const at::Tensor& kv_lens, const at::Tensor& prefix_starts, const at::Tensor& prefix_lens,
                       std::vector<double> eps, std::vector<double> scales,
                       std::vector<int64_t> windows, int64_t head_dim) {
  const int64_t layers = static_cast<int64_t>(kv.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers * kSlots && static_cast<int64_t>(out_features.size()) ==
                  layers * kOuts && static_cast<int64_t>(small_rows.size()) == layers * kOuts &&
                  static_cast<int64_t>(eps.size()) == 2 * layers &&
                  static_cast<int64_t>(scales.size()) == layers && static_cast<int64_t>(windows.size()) == layers,
              "per-layer arguments for ", layers, " layers expected");
  const int64_t tokens = h.size(0);
  c10::InferenceMode inference;
  at::Tensor x = layers > 0 ? rms_norm(h, need(weights, kInNorm), eps[0]) : h;  // each layer's input, normed
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t w = l * kSlots, o = l * kOuts;
    auto proj = [&](const at::Tensor& in, int64_t slot, int64_t out) {  // a weight's bias is the slot after it
      return linear(in, need(weights, w + slot), get(weights, w + slot + 1), out_features[o + out],
                    small_rows[o + out]);
    };
    // `count` layers from `slot` (their Outs from `first`): one call each, or one merged call cut into columns
    auto siblings = [&](const at::Tensor& in, int64_t slot, int64_t first, int64_t count) {
      std::vector<at::Tensor> outs;
      if (get(weights, w + slot + 2).has_value()) {
        for (int64_t i = 0; i < count; ++i) outs.push_back(proj(in, slot + 2 * i, first + i));
        return outs;
      }
      int64_t width = 0;
      for (int64_t i = 0; i < count; ++i) width += out_features[o + first + i];
      const at::Tensor all = linear(in, need(weights, w + slot), get(weights, w + slot + 1), width,
                                    small_rows[o + first]);
      for (int64_t i = 0, col = 0; i < count; col += out_features[o + first + i], ++i)
        outs.push_back(all.narrow(-1, col, out_features[o + first + i]));
      return outs;
    };
    const std::vector<at::Tensor> qkv = siblings(x, kQ, kQOut, 3);
    at::Tensor q = qkv[0].view({tokens, -1, head_dim});
    at::Tensor k = qkv[1].view({tokens, -1, head_dim});
    const at::Tensor v = qkv[2].view({tokens, -1, head_dim});
    q = rotate(q, cos, sin);
    k = rotate(k, cos, sin);
    write_kv(kv[l], slots, k, v);
    const at::Tensor attended = attention(q.contiguous(), kv[l], q_lens, starts, kv_lens, prefix_starts, prefix_lens,
                                          scales[l], windows[l]);
    std::tie(h, x) = add_rms_norm(h, proj(attended.reshape({tokens, -1}), kO, kOOut), need(weights, w + kPostNorm),
                                  eps[2 * l + 1]);
    const std::vector<at::Tensor> gate_up = siblings(x, kGate, kGateOut, 2);
    const at::Tensor mlp = proj(softprompt::silu_mul(gate_up[0], gate_up[1]), kDown, kDownOut);
    if (l + 1 < layers)  // the residual add and the next layer's input norm in one pass
      std::tie(h, x) = add_rms_norm(h, mlp, need(weights, w + kSlots + kInNorm), eps[2 * l + 2]);
    else
      h = h + mlp;
  }
  return h;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(softprompt, m) {
  m.def("onednn_linear(Tensor x, Tensor packed, Tensor? bias, int small_rows) -> Tensor");
  m.def(
      "lean_decode(Tensor h, Tensor cos, Tensor sin, Tensor?[] weights, int[] out_features, int[] small_rows, Tensor[] kv, "
      "Tensor slots, Tensor q_lens, Tensor starts, Tensor kv_lens, Tensor prefix_starts, Tensor prefix_lens, float[] eps, float[] scales, int[] windows, int head_dim) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(softprompt, CPU, m) {
  m.impl("lean_decode", lean_decode);
  m.impl("onednn_linear", onednn_linear);
}
// With oneDNN-packed weights among the arguments, the dispatcher looks the ops up for their backend.
TORCH_LIBRARY_IMPL(softprompt, MkldnnCPU, m) {
  m.impl("lean_decode", lean_decode);
  m.impl("onednn_linear", onednn_linear);
}
