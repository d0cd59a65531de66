"""A step's layers in one C++ call (`torch.ops.softprompt.lean_decode`, csrc/forward.cpp):
`LeanForward`'s operations in the same order, so the same numbers, without the GIL between them.
Named for decoding steps, which it was first written for (`--native-decode`); where the attention
kernel's prompt rows pay (its AVX-512 code) it takes prefilling steps too, so a short prompt's step
leaves Python as well.

The linear layers run on whichever backend `cpu_linear.install` packed them for: forward.cpp's `linear`
calls oneDNN's `mkldnn::_linear_pointwise` through the dispatcher for a oneDNN (mkldnn) weight, with
`cpu_linear._onednn_forward`'s dtype handling (bfloat16 natively where the weight is packed bfloat16,
widened to float32 where it is packed float32; a few rows on `onednn_rows`, as there), and our AVX2
kernel for a [blocks, in, 16] one. So on AVX-512 and AMX CPUs, where the linears go to oneDNN,
decoding steps leave Python too. A merged q/k/v or gate/up layer (`cpu_linear.merged`) is one call.

Without the GIL: a call through `torch.ops` releases it for the op's whole run (torch's
`invokeOperatorFromPython` runs the op under `gil_scoped_release`), and nothing in forward.cpp calls
back into Python, oneDNN's op included. Checked on the 2-core Xeon here: while another thread ran one
oneDNN linear of 200 ms through `torch.ops`, or our kernel's of 300 ms, the main thread's Python loop
ran about 2 million iterations, as fast as with that thread asleep; against a thread running Python,
a few hundred thousand.

Measured on the bench model (hidden 512, 8 layers; `python -m bench.bench_engine --requests 64
--new-tokens 64`; 2-core Xeon with AMX, oneDNN linears, alternating with the code before): see
bench/README.md, "bfloat16 on AVX-512 CPUs"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import attention
from ..ragged import ranges
from . import attention as cpu_attention, kernels as cpu_kernels, linear as cpu_linear

if TYPE_CHECKING:
    from ..lean_forward import LeanForward


@dataclass
class NativeDecode:
    """A step's layers in one call of `torch.ops.softprompt.lean_decode`. Taken when every
    linear layer runs on packed weights (`cpu_linear`: the AVX2 kernel or oneDNN), the MLP's activation
    is SiLU, and decode attention runs on the kernel (`fast_path`)."""

    weights: list[torch.Tensor | None]  # per layer, in forward.cpp's `Slot` order
    out_features: list[int]  # per layer, in forward.cpp's `Out` order
    small_rows: list[int]  # likewise: the most rows `onednn_rows` takes for the layer (`cpu_linear.ROWS`), 0 for none
    eps: list[float]  # per layer: the input norm's, the post-attention norm's
    scales: list[float]
    windows: list[int]  # 0: none
    layer_ids: list[int]  # each layer's index in the KV pool
    head_dim: int

    @staticmethod
    def unavailable(lean: LeanForward) -> str:
        """Why the call cannot take this model's layers ('' when it can)."""
        if not lean.layers or lean.layers[0].self_attn.q_proj.weight.device.type != "cpu":
            return "the model is not on the CPU"
        if not cpu_kernels.available():
            return "the CPU kernels did not build"
        for layer in lean.layers:
            if not all(cpu_linear.is_packed(m) for m in _linears(layer)):
                return "the linear layers are not packed (the AVX2 kernel or oneDNN)"
            if type(layer.mlp.act_fn).__name__ not in SILU:
                return f"the MLP's activation is {type(layer.mlp.act_fn).__name__}, not SiLU"
        return ""

    @classmethod
    def build(cls, lean: LeanForward) -> NativeDecode:
        """The call's arguments for `lean`'s layers; only where `unavailable` says ''."""
        native = cls([], [], [], [], [], [w or 0 for w in lean.windows], [], lean.head_dim)
        for layer in lean.layers:
            attn, pairs = layer.self_attn, _packed(layer)
            native.weights += [layer.input_layernorm.weight, *pairs[:8], layer.post_attention_layernorm.weight,
                               *pairs[8:]]
            native.out_features += [m.out_features for m in _linears(layer)]
            native.small_rows += [getattr(cpu_linear.merged(m) or m, cpu_linear.ROWS, 0) for m in _linears(layer)]
            native.eps += [layer.input_layernorm.variance_epsilon, layer.post_attention_layernorm.variance_epsilon]
            native.scales.append(attn.scaling if attn.scaling is not None else lean.head_dim ** -0.5)
            native.layer_ids.append(attn.layer_idx)
        return native

    def takes(self, ragged: attention.RaggedStep, h: torch.Tensor) -> bool:
        """Whether this step is one for the call: unpadded, in a dtype the kernels take, every request
        decoding unless the attention kernel's prompt rows pay (`attention.whole_step_on_kernel`)."""
        return (ragged.tokens == h.shape[0] and cpu_attention.supports(h, ragged.pool.kv[0])
                and attention.whole_step_on_kernel(ragged))

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 ragged: attention.RaggedStep) -> torch.Tensor:
        return cpu_kernels.ops().lean_decode(
            h, cos, sin, self.weights, self.out_features, self.small_rows, [ragged.pool.kv[i] for i in self.layer_ids],
            ragged.slots,
            *ranges(ragged), self.eps, self.scales, self.windows, self.head_dim)


SILU = {"SiLUActivation", "SiLU"}  # transformers' "silu" and "swish"


def _linears(layer) -> list:
    """A decoder layer's linears in forward.cpp's `Out` order."""
    attn, mlp = layer.self_attn, layer.mlp
    return [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]


def _packed(layer) -> list[torch.Tensor | None]:
    """(packed weight, bias) of each of a layer's linears, flat, in forward.cpp's `Slot` order: a merged
    group's (q/k/v, gate/up: `cpu_linear.merged`) in its first layer's place, None in the others'. A weight
    is None where its layer is not packed."""
    out = []
    for m in _linears(layer):
        one = cpu_linear.merged(m)
        if one is not None:
            out += [cpu_linear.packed_weight(one), one.bias]
        elif hasattr(m, cpu_linear.MERGED):  # packed inside the group's first layer
            out += [None, None]
        else:
            out += [cpu_linear.packed_weight(m), m.bias]
    return out
