"""Decode attention on CPU in one small C++ kernel: every decoding request of a step in one call.

`decode` computes, for each request, softmax(q K^T * scale) V of its one query (all heads) against
keys/values 0..kv_len-1 of its own pool segment (the last `window` of them with a sliding window),
query head h reading kv head h // (heads // kv_heads). Float32 and bfloat16, accumulated in float32,
with the softmax's maximum subtracted. The kernel (csrc/decode_attention.cpp) runs ATen's
`parallel_for` over (request, kv head) and takes a kv head's query heads together, so each key and
value row is read once; its loops are plain C++ that the compiler vectorizes.

`attention._per_request` sends a step's decoding requests here on CPU; prefilling requests keep one
SDPA call each, and CUDA has its own variable-length flash path. Measured with
`python -m bench.attention_micro` (64 decoding requests with 40-200 keys, 8 heads, 4 KV heads,
head_dim 64; 2 threads of an AMD EPYC shared with other jobs, fastest of 1000 calls per layer):
float32 3.1 ms with one SDPA call per request, 0.88 ms with this kernel; bfloat16 2.3 ms and 0.91 ms.
Reading the keys and values bounds it near 0.8 ms.

The kernel is compiled on first use with torch.utils.cpp_extension into torch's extension cache
(TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions; about 20 s once, then loaded from there) and
registered as the torch op `softprompt::decode_attention`, so it needs a C++ compiler and ninja but
no Python headers. Without them, or on any error while building or loading it, one warning is
logged and `available()` is False: attention stays one SDPA call per request.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "decode_attention.cpp"
DTYPES = (torch.float32, torch.bfloat16)
# Plain -O3, no -march: the cache may be shared by machines with different CPUs (a mounted home, a
# baked image), where a foreign instruction kills the process instead of falling back; and
# -mavx2 -mfma measured only about 10% faster on one thread, within the noise on two. -fopenmp makes
# ATen's parallel_for parallel (without it the header runs serially); libgomp resolves to torch's own.
CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_tried = False  # whether this process has tried to load the kernel
_kernel = None  # torch.ops.softprompt.decode_attention once loaded


def available() -> bool:
    """Whether the kernel is loaded; builds or loads it on the first call in this process."""
    global _tried, _kernel
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _kernel = _load()
                except Exception as exc:  # no compiler or ninja, a failed build, an unwritable cache
                    log.warning("CPU decode attention kernel unavailable (%s: %s); attending per request with "
                                "SDPA", type(exc).__name__, _last_lines(str(exc)))
                _tried = True
    return _kernel is not None


def supports(query: torch.Tensor, kv: torch.Tensor) -> bool:
    """Whether `decode` takes these tensors: on CPU, in one dtype it handles, with the kernel loaded."""
    return query.device.type == "cpu" and query.dtype in DTYPES and kv.dtype == query.dtype and available()


def decode(query: torch.Tensor, kv: torch.Tensor, starts: torch.Tensor, kv_lens: torch.Tensor,
           scale: float | None, window: int | None) -> torch.Tensor:
    """One decoding query per request against its own pool segment.

    query: [requests, heads, head_dim] contiguous; kv: [2, kv_heads, slots, head_dim] contiguous (a layer
    of the pool); starts, kv_lens: [requests] int64, each request's first slot and written keys.
    scale: None for 1 / sqrt(head_dim); window: None or 0 for no sliding window.
    Returns [requests, heads, head_dim] in query's dtype.
    """
    if scale is None:
        scale = query.shape[-1] ** -0.5
    return _kernel(query, kv, starts, kv_lens, scale, window or 0)


def _load():
    from torch.utils import cpp_extension

    with contextlib.suppress(ImportError):  # the ninja wheel (a dependency) when no ninja is on PATH
        import ninja

        if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = os.pathsep.join(filter(None, [os.environ.get("PATH"), ninja.BIN_DIR]))
    began = time.perf_counter()
    cpp_extension.load(name="softprompt_decode_attention", sources=[str(SOURCE)], extra_cflags=CFLAGS,
                       extra_ldflags=LDFLAGS, is_python_module=False)
    log.info("CPU decode attention kernel built or loaded in %.1f s", time.perf_counter() - began)
    return torch.ops.softprompt.decode_attention


def _last_lines(text: str, n: int = 3) -> str:
    """A build error's last lines: where compilers and ninja say what went wrong."""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-n:])
