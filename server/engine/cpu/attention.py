"""Attention on CPU in one C++ kernel: every request of a packed step, decoding and prefilling, in one call.

`attend` computes, for each request's query rows (one when decoding, a prompt chunk when
prefilling), softmax(q K^T * scale) V against its keys: its adapter's shared prefix, then its own pool
segment, read in place, row i of n seeing the keys up to its own position (the last `window` of them
with a sliding window); query head h reads kv head h // (heads // kv_heads). Float32 and bfloat16,
accumulated in float32, with the softmax's maximum subtracted. Each row is computed on its own, so
the same whatever its step holds or however its prompt was chunked (batch-invariant in bfloat16 as
well; SDPA's bfloat16 rounding changed with the chunk's length). The kernel (csrc/attention.cpp)
shares (request, kv head, run of rows) tasks among torch's threads (csrc/common.cpp) and takes a kv
head's query heads together, so each key and value row is read once per query row. Its per-row code
is written for AVX-512 (csrc/avx512.cpp: head sizes multiple of 16 up to 128; bfloat16 scores in
`vdpbf16ps` where the CPU has AVX512-BF16) and as
plain loops built for AVX2 with FMA and for baseline x86-64, picked by the CPU at run time (`isa`
holds it to one, for tests and benchmarks).

Measured with `python -m bench.attention_micro` (one layer, 8 heads, 4 KV heads, head_dim 64, 2
threads of an AVX-512 Xeon, median of 400 calls): 64 decoding requests with 40-200 keys, float32
0.36 ms (0.55 ms on AVX2 loops, 1.47 ms with one SDPA call per request), bfloat16 0.23 ms (0.64, 1.80);
--prefill --prefix 16, 64 prompts of 40-90 tokens (4,257 rows): float32 3.5 ms (13.2 on the AVX2 loops, 11.2
with one SDPA call per request), bfloat16 3.7 (15.1, 12.6). So the engine sends prompt rows here only
where the AVX-512 code runs (`prefill_pays`); elsewhere the kernel takes the decoding rows.

The kernel is built with the engine's other CPU kernels (`cpu_kernels`); when they cannot be built,
`supports` is False and attention takes one SDPA call per request.
"""

from __future__ import annotations

import contextlib

import torch

from . import kernels as cpu_kernels

DTYPES = (torch.float32, torch.bfloat16)
ISAS = ("avx512-bf16", "avx512", "avx2", "baseline")  # the kernel's instruction sets, best first


_taken: str | None = None  # the instruction set the kernel now takes, once asked


def taken() -> str:
    """The one of ISAS the kernel takes now (the best the CPU has, unless `isa` holds it lower)."""
    global _taken
    if _taken is None:
        _taken = cpu_kernels.ops().attention_isa("auto")
    return _taken


def prefill_pays() -> bool:
    """Whether the kernel's prompt rows beat one SDPA call per prefilling request: its AVX-512 code
    (3.3-3.7 ms a layer against 10.4-12.6 at `bench.attention_micro --prefill --prefix 16`); its portable
    loops are slower (12-17 ms), so without AVX-512 it takes the decoding rows only. Only after `supports`."""
    return taken().startswith("avx512")


def describe() -> str:
    """What the kernel takes on this CPU, for /info (only where the kernels are built)."""
    if prefill_pays():
        return f"C++ kernel ({taken()}), decoding and prefilling rows"
    return f"C++ kernel ({taken()}) for decoding rows, SDPA per prefilling request"


def supports(query: torch.Tensor, kv: torch.Tensor) -> bool:
    """Whether `attend` takes these tensors: on CPU, in one dtype it handles, with the kernel loaded."""
    return query.device.type == "cpu" and query.dtype in DTYPES and kv.dtype == query.dtype and cpu_kernels.available()


def attend(query: torch.Tensor, kv: torch.Tensor, q_lens: torch.Tensor, starts: torch.Tensor, kv_lens: torch.Tensor,
           prefix_starts: torch.Tensor, prefix_lens: torch.Tensor, scale: float | None,
           window: int | None) -> torch.Tensor:
    """Each request's query rows against its prefix, then its own pool segment.

    query: [tokens, heads, head_dim] contiguous, each request's q_lens[i] rows back to back; kv: [2,
    kv_heads, slots, head_dim] contiguous (a layer of the pool); q_lens, starts, kv_lens, prefix_starts,
    prefix_lens: [requests] int64: its rows in this step, its own segment's first slot, its keys (prefix
    included; its rows are the last q_lens of them), its shared prefix's first slot and length (0: none).
    scale: None for 1 / sqrt(head_dim); window: None or 0 for no sliding window.
    Returns [tokens, heads, head_dim] in query's dtype.
    """
    if scale is None:
        scale = query.shape[-1] ** -0.5
    return cpu_kernels.ops().attention(query, kv, q_lens, starts, kv_lens, prefix_starts, prefix_lens, scale,
                                       window or 0)


def write(kv: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """A step's new keys and values into a layer of the pool: kv [2, kv_heads, slots, head_dim]; k, v
    [tokens, kv_heads, head_dim]; slots [tokens] int64. Only where `supports` says so."""
    cpu_kernels.ops().write_kv(kv, slots, k, v)


@contextlib.contextmanager
def isa(most: str):
    """Holds the kernel to `most` of ISAS or below (tests and benchmarks run each path the CPU has);
    yields the one it takes, the best this CPU has within that. Back to the best on exit."""
    global _taken
    try:
        with cpu_kernels.held_isa("attention_isa", most) as _taken:
            yield _taken
    finally:
        _taken = None  # asked again (the best) at its next use
