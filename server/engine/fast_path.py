"""Which of the engine's fast paths a runner takes, each one switch away from the plain one.

The plain path is transformers' own forward of the model, its linear layers on torch's F.linear,
and attention one SDPA call per request over the KV pool. Each fast path replaces one piece of it:

  forward        the written-out forward (`lean_forward.LeanForward`) for the classes it supports
  linear (CPU)   the weights packed once: our AVX2 kernel (`csrc/linear.cpp`) or oneDNN (`cpu_linear`)
  native decode  (CPU) a decoding step's layers in one C++ call without the GIL (`csrc/forward.cpp`);
                 needs packed linears (either backend) and the attention kernel
  attention      a step's decoding requests in one call: our C++ kernel on CPU (`cpu_attention`),
                 variable-length flash attention on CUDA; else one SDPA call per request
  CUDA graphs    (CUDA) decoding steps replayed from graphs recorded at start-up per batch size
                 (`cuda_graphs.py`); needs the written-out forward and flash attention

`auto` takes each where this machine runs it best; a name forces one, and a forced path that cannot
run here stops the start with the reason. `--fast-path off` takes none. The start-up self-check
(`self_check.py`) compares whatever was taken with the plain forward on the original weights, and
falls back to the plain path when they disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

LINEAR = ("auto", "avx2", "onednn", "torch")  # --cpu-linear
NATIVE_DECODE = ("auto", "on", "off")  # --native-decode
ATTENTION = ("auto", "kernel", "sdpa")  # --attention-kernel
CUDA_GRAPHS = ("auto", "on", "off")  # --cuda-graphs


@dataclass(frozen=True)
class FastPaths:
    """The settings (`--fast-path`, `--cpu-linear`, `--native-decode`, `--attention-kernel`, `--cuda-graphs`)."""

    enabled: bool = True  # False: the plain path, whatever the others say
    linear: str = "auto"  # LINEAR: the CPU linear layers' backend
    native_decode: str = "auto"  # NATIVE_DECODE
    attention: str = "auto"  # ATTENTION: "sdpa" keeps one SDPA call per request
    cuda_graphs: str = "auto"  # CUDA_GRAPHS

    def __post_init__(self):
        for name, allowed in (("linear", LINEAR), ("native_decode", NATIVE_DECODE), ("attention", ATTENTION),
                              ("cuda_graphs", CUDA_GRAPHS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.native_decode == "on" and (self.linear == "torch" or self.attention == "sdpa"):
            raise ValueError("the native decode needs packed linears (the AVX2 kernel or oneDNN) and the attention "
                             f"kernel: it cannot be on with linear {self.linear!r} and attention {self.attention!r}")



PLAIN = FastPaths(enabled=False)
