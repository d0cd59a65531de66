"""A layer's row-wise work on CPU in one C++ pass each (csrc/rowwise.cpp): the rotary embedding, the
RMS norm of bfloat16 rows (alone, or with the residual add before it), and the MLP's silu(gate) * up of
bfloat16 rows on AVX-512.

Written out with ATen operations, transformers' rotary embedding is six of them (two slices, a negation,
a concatenation, two multiplies and an add) and its bfloat16 RMS norm eight (two casts, pow, mean, add,
rsqrt, two multiplies): a decoding step's rows are small ([64, 512] on the bench model), so each costs
its call, 10-30 us, and a step runs 32 of these chains. One pass each:
- `rotary` rounds where ATen's operations round (each product, then their sum), so its results are
  ATen's to the last bit, float32 and bfloat16 alike;
- `mlp`'s activation rounds where ATen's silu and multiply round, with an exponential of its own
  within 2 ulp of ATen's (float32 rows, and CPUs without AVX-512, take ATen's two operations). On a
  4,096-token bfloat16 prefill step of the bench model, ATen's silu and multiply were 30 ms of 217;
- `rms_norm` takes bfloat16 rows (float32 rows keep the module's own operations, which transformers'
  float32 results are equal to, to the last bit): the row's mean square in float32, summed in a fixed
  order of its own, then transformers' roundings. A row's result depends on that row alone;
- the residual add and the norm after it (`add_rms_norm_bf16`, bfloat16 rows) give the bits of ATen's
  add and `rms_norm`, in one pass instead of two: the native step (csrc/forward.cpp) takes it, the
  Python layers keep the two calls.

Each pass is built for AVX-512, for AVX2 and for baseline x86-64, and never contracts a multiply and an
add, so all three give the same bits; the CPU picks the best it has, and `isa` holds it lower (tests).

`LeanForward`'s Python layers call these on CPU, and csrc/forward.cpp (the native decode) calls the same
C++ functions, so both compute the same bits. Measured with torch's 1 thread on the 2-core Xeon here,
a [64, 8, 64] rotary / a [64, 512] RMS norm, fastest of 5 runs of 500 calls: bfloat16 rotary 36 us with
ATen, 25 here; float32 rotary 26, 8; bfloat16 RMS norm 42, 18. On a 2,048-token prefill step's rows
([2079, 512], 2 threads, median), AVX-512 against AVX2: RMS norm 0.20 against 0.26 ms, rotary of the
queries 0.23 against 0.40.
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels as cpu_kernels, linear as cpu_linear


def available(device: torch.device) -> bool:
    """Whether the layers on `device` can take these (on CPU, with the kernels built)."""
    return device.type == "cpu" and cpu_kernels.available()


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` for transformers' Llama/Qwen2/Mistral RMSNorm: bfloat16 rows in one pass, others by the module."""
    if x.dtype == torch.bfloat16 and norm.weight.dtype == torch.bfloat16:
        return cpu_kernels.ops().rms_norm_bf16(x, norm.weight, norm.variance_epsilon)
    return norm(x)


def mlp(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` for a Llama/Qwen2/Mistral MLP with SiLU: down(silu(gate(x)) * up(x)), the activation
    and product of bfloat16 rows in one pass on AVX-512 (csrc/avx512.cpp), else ATen's two operations."""
    gate, up = cpu_linear.siblings((module.gate_proj, module.up_proj), x)  # one call where they are merged
    return module.down_proj(cpu_kernels.ops().silu_mul(gate, up))


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin. x: [tokens, heads, head_dim]; cos, sin: [tokens, 1, head_dim]."""
    return cpu_kernels.ops().rotary(x, cos, sin)


ISAS = ("avx512", "avx2", "baseline")  # the passes' instruction sets, best first


def isa(most: str):
    """Holds the passes to `most` of ISAS or below (a context manager, yielding the one they take)."""
    return cpu_kernels.held_isa("rowwise_isa", most)
