"""The packed forward compiled by torch.compile (inductor); on CUDA, replayed from CUDA graphs.

The runner calls the model's own forward, so compiling it compiles whatever architecture is
loaded. Attention over the KV pool stays eager: `ragged_attention` reads host lists and writes the
pool, so it is a graph break (`attention.install` registers it through `torch.compiler.disable`), and dynamo compiles
the pieces between attentions: embeddings, norms, projections, rotary embeddings, MLP, lm_head.
The number of tokens in a step is a dynamic dimension, so one compile serves every step.

On CUDA the pieces run as CUDA graphs (`mode="reduce-overhead"`, cudagraph trees), as vLLM's
piecewise graphs do: a small model's step is otherwise launch-bound (measured on an H200: 96k
kernel launches in 131 steps). A CUDA graph is recorded per input shape, so the runner pads a step
to a bucket of tokens (`bucket`) and the kept logits' rows likewise; the padding tokens compute
nothing that is read (attention skips them, their logits are dropped). Cudagraph trees are per
thread, so the engine thread records its own graphs on first use of each bucket.

Measured, ours-mixed, compiled against eager (`python -m bench.compile_bench`):
- 2-core CPU, the bench model (hidden 512, 8 layers, 64 requests): 652 against 774 tok/s in float32,
  163 against 168 in bfloat16. The matmuls are 65% of a step and inductor calls the same ones; dynamo's
  guards and the graph breaks cost more than the fused elementwise kernels save.
- H200, bfloat16, hidden 2048, 16 layers, 128 requests x 128 tokens: 6,089 against 9,302 tok/s, one
  round that still recorded CUDA graphs for new bucket sizes; float32 bench model 3,358 against 3,476.
  Tokens identical to eager on 64/64 requests in float32.
So compiling is off unless asked for (`--compile on`).
"""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger(__name__)

SMALL_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # below this, buckets double; above, they grow by its last
WARM_UP_DECODES = (1, 2)  # the warm-up's batches: dynamo specializes on size 1, then compiles sizes > 1 once


def bucket(n: int, largest: int) -> int:
    """The padded size of n: the next of 1, 2, 4, ... 64, then multiples of 64; n itself past `largest`."""
    if n > largest:
        return n
    for size in SMALL_BUCKETS:
        if n <= size:
            return size
    step = SMALL_BUCKETS[-1]
    return -(-n // step) * step


class CompiledForward:
    """model.forward compiled for the runner's packed steps (other callers keep the eager forward)."""

    def __init__(self, model, device: torch.device, max_tokens: int):
        """max_tokens: the most tokens a step holds (decoding requests + a prefill budget): the last bucket."""
        self.graphs = device.type == "cuda"
        self.max_tokens = max_tokens
        self.seconds = 0.0  # spent compiling (the warm-up), for the log and /info
        mode = "reduce-overhead" if self.graphs else "default"
        self.mode = mode
        self._forward = torch.compile(model.forward, dynamic=True, mode=mode)

    def pad(self, n: int) -> int:
        """How many tokens (or kept rows) a step of n runs as: a bucket with CUDA graphs, else n."""
        return bucket(n, self.max_tokens) if self.graphs else n

    def __call__(self, **inputs):
        if self.graphs:  # outputs of the last step (its logits) are read by now: their memory may be reused
            torch.compiler.cudagraph_mark_step_begin()
        return self._forward(**inputs)

    def describe(self) -> dict:
        return {"mode": self.mode, "cuda_graphs": self.graphs, "seconds": round(self.seconds, 2)}


def warm_up(runner) -> float:
    """Compile now, not in the first requests: a prefill step then decode steps of 1 and 2 requests
    (dynamo specializes on 1). Returns the seconds it took; the runner is left idle."""
    from .model_runner import ScheduledStep
    from .request import SamplingParams, Sequence

    began = time.perf_counter()
    try:
        for n in WARM_UP_DECODES:
            seqs = [Sequence([3 + i] * (4 + i), SamplingParams(max_new_tokens=2)) for i in range(n)]
            runner.forward(ScheduledStep(prefill=[(s, s.pending) for s in seqs]))
            for seq in seqs:
                seq.output_ids.append(3)
            runner.forward(ScheduledStep(decode=seqs))
    finally:
        runner.reset()
    seconds = time.perf_counter() - began
    log.info("compiled the packed forward (torch.compile, mode %s) in %.1f s", runner.compiled.mode, seconds)
    return seconds
