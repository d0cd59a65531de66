"""Decoding steps replayed from CUDA graphs, one per batch-size bucket, captured at start-up.

A decoding step of a small or mid-sized model on a GPU is bound by its kernel launches, not by the
GPU: the written-out forward (`lean_forward.py`) launches about 15 kernels a layer, each a few
microseconds of CPU, for a step whose arithmetic takes less. vLLM and TGI record the decode step
once per batch size as a CUDA graph and replay it; so does this module.

At start-up, for each bucket of batch sizes (1, 2, 4, then every 8 up to --max-batch-size, as
vLLM's), the lean forward of a step in which every row decodes is recorded over static buffers:
the token ids, positions and KV slots of the rows, the variable-length flash attention's index
tensors (`flash_varlen.py`: each row's own segment and its adapter's shared prefix, both calls
taken for every row), and the rows whose logits are kept. A step of n decoding requests copies its
values into the buffers of the smallest bucket that holds it and replays that graph. The padding
rows write their keys to a scratch slot of the pool (held by this module, one slot), attend that
one key, and their logits are dropped; rows without a prefix keep their own call's output.

Taken where a decode step can be recorded as it is: CUDA; the lean forward (not torch.compile);
flash attention usable on every layer (no sliding window); RoPE that does not depend on the
length (`rope.install`). Steps with a prefill, and steps of more requests than the largest bucket,
run eagerly as before. `--cuda-graphs auto|on|off` (`fast_path.py`); the start-up self-check runs
after the capture, through the graphs.

On CPU there is nothing to record, but the same static-buffer step runs without capture
(`DecodeGraphs(..., capture=False)`): tests/unit/test_cuda_graphs.py checks it, with a CPU
reference of the flash kernel, against the eager step's tokens, padding and prefixes included.
"""

from __future__ import annotations

import logging
import time

import torch

from . import flash_varlen
from .ragged import RaggedStep

log = logging.getLogger(__name__)


def buckets(largest: int) -> list[int]:
    """The batch sizes recorded: 1, 2, 4, then every multiple of 8, up to the one that holds `largest`."""
    sizes = [1, 2, 4] + list(range(8, largest + 8, 8))
    return [b for b in sizes if b < largest] + [next(b for b in sizes if b >= largest)]


class _Graph:
    """One bucket's static buffers (device tensors, refilled before each replay) and its recording."""

    def __init__(self, size: int, pool, device: torch.device):
        self.size = size
        longs = lambda: torch.zeros(size, dtype=torch.long, device=device)  # noqa: E731
        ints = lambda n: torch.zeros(n, dtype=torch.int32, device=device)  # noqa: E731
        self.ids, self.positions, self.slots = longs(), longs(), longs()
        self.own_starts, self.own_lens = ints(size + 1), ints(size)  # flash's cu_seq_k (+ the pool's end), seqused_k
        self.prefix_starts, self.prefix_lens = ints(size + 1), ints(size)
        self.has_prefix = torch.zeros(size, dtype=torch.bool, device=device)
        rows = torch.arange(size, device=device)
        cu_q = torch.arange(size + 1, dtype=torch.int32, device=device)  # one query per row
        self.own_starts[size] = self.prefix_starts[size] = pool.slots
        self.step = RaggedStep(pool, self.slots, starts=[], q_lens=[1] * size, kv_lens=[], prefix_starts=[],
                               prefix_lens=[], kernels=True)
        self.step._varlen = {  # flash_varlen's arguments, fixed: max_q 1, max_k the whole pool
            "own": (cu_q, self.own_starts, 1, pool.slots, self.own_lens),
            "rows": rows,
            "prefix": (cu_q, self.prefix_starts, 1, pool.slots, self.prefix_lens),
            "has_prefix": self.has_prefix,
        }
        self.keep = rows
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # [size, vocab], the recorded forward's output

    def fill(self, ids: list[int], positions: list[int], slots: list[int], own: list[tuple[int, int]],
             prefixes: list[tuple[int, int]], scratch: int) -> None:
        """The step's rows, then padding: a row writing its key to `scratch` and attending only it."""
        pad = self.size - len(ids)
        device = self.ids.device
        self.ids.copy_(torch.tensor(ids + [0] * pad), non_blocking=True)
        self.positions.copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.slots.copy_(torch.tensor(slots + [scratch] * pad), non_blocking=True)
        own = own + [(scratch, 1)] * pad
        prefixes = prefixes + [(scratch, 0)] * pad
        starts = torch.tensor([s for s, _ in own] + [s for s, _ in prefixes], dtype=torch.int32)
        lens = torch.tensor([n for _, n in own] + [n for _, n in prefixes], dtype=torch.int32)
        self.own_starts[:self.size].copy_(starts[:self.size].to(device, non_blocking=True))
        self.prefix_starts[:self.size].copy_(starts[self.size:].to(device, non_blocking=True))
        self.own_lens.copy_(lens[:self.size].to(device, non_blocking=True))
        self.prefix_lens.copy_(lens[self.size:].to(device, non_blocking=True))
        self.has_prefix.copy_(lens[self.size:] > 0, non_blocking=True)


class DecodeGraphs:
    """The recorded decode steps of a runner's lean forward; `run` replays the one that holds a step."""

    def __init__(self, runner, largest: int, capture: bool = True):
        """largest: the most requests a step decodes (--max-batch-size). capture: record CUDA graphs
        (CUDA only); False runs the same static-buffer step eagerly (CPU tests)."""
        self.runner = runner
        self.capture = capture
        self.scratch = runner.pool.allocate(1)  # padding rows' keys go here
        runner.pool.reserved = 1
        device = runner.spec.device
        self.graphs = {size: _Graph(size, runner.pool, device) for size in buckets(largest)}
        self.largest = max(self.graphs)
        self.seconds = 0.0
        self.replays = 0
        if capture:
            began = time.perf_counter()
            self._record()
            self.seconds = time.perf_counter() - began
            log.info("recorded %d decode CUDA graphs (batch sizes %s) in %.1f s", len(self.graphs),
                     ", ".join(map(str, self.graphs)), self.seconds)

    @staticmethod
    def unavailable(runner) -> str:
        """Why decode steps of this runner cannot be recorded ('' when they can)."""
        if runner.spec.device.type != "cuda":
            return "the model is not on a CUDA device"
        if runner.lean is None:
            return "the written-out forward does not take this model"
        if runner.compiled is not None:
            return "torch.compile records its own graphs (--compile on)"
        if runner.rope:
            return "its RoPE depends on each request's length"
        if any(runner.lean.windows) or not runner.attention_kernels:
            return "attention is not variable-length flash attention on every layer"
        q = torch.empty(1, runner.spec.num_heads, runner.spec.head_dim, device=runner.spec.device,
                        dtype=runner.spec.dtype)
        if not flash_varlen.usable(q, runner.spec.num_kv_heads, None):
            return "variable-length flash attention is unavailable or failed its check here"
        return ""

    def reset(self) -> None:
        """After the pool was cleared (a failed step): the scratch slot taken again."""
        if self.scratch.capacity == 0:  # released with every other segment
            self.scratch = self.runner.pool.allocate(1)

    def takes(self, q_lens: list[int], sampling: list[int], scored: list) -> bool:
        """Whether a step is one for the graphs: every request decodes and samples, no prompt is scored,
        and a bucket holds them."""
        n = len(q_lens)
        return 0 < n <= self.largest and len(sampling) == n and not scored and all(q == 1 for q in q_lens)

    def run(self, ids: list[int], positions: list[int], ragged_rows: dict) -> torch.Tensor:
        """The step's logits [rows, vocab]. ragged_rows: per row, `slots`, `own` (start, keys), `prefix`
        (start, keys; (0, 0) for none)."""
        n = len(ids)
        graph = self.graphs[next(size for size in self.graphs if size >= n)]
        graph.fill(ids, positions, ragged_rows["slots"], ragged_rows["own"], ragged_rows["prefix"], self.scratch.start)
        self.runner.on_layers()
        if graph.graph is not None:
            graph.graph.replay()
            logits = graph.logits
        else:
            logits = self._forward(graph)
        self.replays += 1
        return logits[:n].clone()

    def _forward(self, graph: _Graph) -> torch.Tensor:
        out = self.runner.lean(input_ids=graph.ids[None], position_ids=graph.positions[None], ragged=graph.step,
                               logits_to_keep=graph.keep)
        return out.logits[0]

    @torch.inference_mode()
    def _record(self) -> None:
        """Each bucket, largest first, sharing one memory pool: warmed up on a side stream, then recorded.
        Every row is padding then, so the only KV written is the scratch slot's."""
        memory = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for size in sorted(self.graphs, reverse=True):
            graph = self.graphs[size]
            graph.fill([], [], [], [], [], self.scratch.start)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._forward(graph)
            torch.cuda.current_stream().wait_stream(stream)
            graph.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph.graph, pool=memory):
                graph.logits = self._forward(graph)
        torch.cuda.synchronize()

    def describe(self) -> dict:
        return {"batch_sizes": list(self.graphs), "recorded": self.capture, "seconds": round(self.seconds, 2),
                "replays": self.replays}
