"""Decode attention on CPU in one small C++ kernel: every decoding request of a step in one call.

`decode` computes, for each request, softmax(q K^T * scale) V of its one query (all heads) against
its keys/values 0..kv_len-1: its adapter's shared prefix, then its own pool segment, read in place
(the last `window` of them with a sliding window),
query head h reading kv head h // (heads // kv_heads). Float32 and bfloat16, accumulated in float32,
with the softmax's maximum subtracted. The kernel (csrc/decode_attention.cpp) shares the (request,
kv head) tasks among torch's threads (csrc/common.cpp) and takes a kv head's query heads together,
so each key and value row is read once. Its loops are plain C++ that the compiler vectorizes, built
twice: for baseline x86-64 and for AVX2 with FMA, picked by the CPU at run time.

`attention._per_request` sends a step's decoding requests here on CPU; prefilling requests keep one
SDPA call each, and CUDA has its own variable-length flash path. Measured with
`python -m bench.attention_micro` (64 decoding requests with 40-200 keys, 8 heads, 4 KV heads,
head_dim 64; 2 threads of an AMD EPYC shared with other jobs, fastest of 1000 calls per layer, two
alternating runs): float32 2.5-2.7 ms with one SDPA call per request, 0.60-0.66 ms with this kernel
(0.80-0.81 ms built for baseline x86-64 only); bfloat16 2.2-2.3 ms, 0.75 ms (1.08-1.10 ms). The
float32 keys and values, 16.5 MB, are then read at about 26 GB/s, this machine's memory speed.

The kernel is built with the engine's other CPU kernels (`cpu_kernels`); when they cannot be built,
`supports` is False and attention stays one SDPA call per request.
"""

from __future__ import annotations

import contextlib

import torch

from . import kernels as cpu_kernels

DTYPES = (torch.float32, torch.bfloat16)
ISAS = ("avx512", "avx2", "baseline")  # the kernel's instruction sets, best first


def supports(query: torch.Tensor, kv: torch.Tensor) -> bool:
    """Whether `decode` takes these tensors: on CPU, in one dtype it handles, with the kernel loaded."""
    return query.device.type == "cpu" and query.dtype in DTYPES and kv.dtype == query.dtype and cpu_kernels.available()


def decode(query: torch.Tensor, kv: torch.Tensor, starts: torch.Tensor, kv_lens: torch.Tensor,
           prefix_starts: torch.Tensor, prefix_lens: torch.Tensor, scale: float | None,
           window: int | None) -> torch.Tensor:
    """One decoding query per request against its prefix, then its own pool segment.

    query: [requests, heads, head_dim] contiguous; kv: [2, kv_heads, slots, head_dim] contiguous (a layer
    of the pool); starts, kv_lens, prefix_starts, prefix_lens: [requests] int64: each request's own
    segment's first slot, its keys (prefix included), its shared prefix's first slot and length (0: none).
    scale: None for 1 / sqrt(head_dim); window: None or 0 for no sliding window.
    Returns [requests, heads, head_dim] in query's dtype.
    """
    if scale is None:
        scale = query.shape[-1] ** -0.5
    return cpu_kernels.ops().decode_attention(query, kv, starts, kv_lens, prefix_starts, prefix_lens, scale,
                                              window or 0)



@contextlib.contextmanager
def isa(most: str):
    """Holds the kernel to `most` of ISAS or below (tests and benchmarks run each path the CPU has);
    yields the one it takes, the best this CPU has within that. Back to the best on exit."""
    try:
        yield cpu_kernels.ops().decode_attention_isa(most)
    finally:
        cpu_kernels.ops().decode_attention_isa("auto")
