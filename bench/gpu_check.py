"""What only a GPU can check (CI has none), in one short run: `python -m bench.gpu_check`.

  1. the start-up self-check of the packed forward on CUDA, fp32 and bf16;
  2. fp32: every request of a mixed-adapter batch gets the tokens it gets alone;
  3. bf16: whether the variable-length flash path is in use, and how many requests agree with fp32;
  3b. decode steps from CUDA graphs: the batch sizes recorded, tokens equal to the eager steps' (fp32,
      and bf16 as far as bf16 agrees with itself), and both throughputs;
  4. the default KV budget (0.9 of free memory) allocated and serving;
  5. fp32 under half the peak KV need: preemptions happen and every request keeps its tokens.
Prints PASS/FAIL per line; exits non-zero on a FAIL.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.bench_engine import parse_args
from bench.process import quiet
from bench.systems import run_ours
from bench.workload import build_world
from server.engine import flash_varlen
from server.engine.fast_path import FastPaths
from server.engine.engine import Engine
from server.engine.kv_cache import KVPool, budget_bytes
from server.engine.request import SamplingParams

FLAGS = ["--hidden", "512", "--layers", "8", "--requests", "48", "--adapters", "12", "--new-tokens", "48"]


def main(argv: list[str]) -> int:
    """argv: extra bench flags after the defaults (`--device cpu --quick` for a dry run without a GPU)."""
    flags = FLAGS + ["--device", "cuda"] + argv
    failures = []

    def report(ok: bool, what: str) -> None:
        print(("PASS  " if ok else "FAIL  ") + what, flush=True)
        if not ok:
            failures.append(what)

    with quiet(), tempfile.TemporaryDirectory() as tmp:
        worlds = {dtype: build_world(parse_args(flags + ["--dtype", dtype]), Path(tmp) / dtype)
                  for dtype in ("float32", "bfloat16")}
        for dtype, world in worlds.items():
            base = world.base
            result = Engine(base.model, base.tokenizer, base.spec, kv_cache_bytes=2**28, check=True).self_check
            report(result["passed"], f"self-check {dtype}: {result}")

        world = worlds["float32"]
        mixed = run_ours(world, True)
        engine = Engine(world.base.model, world.base.tokenizer, world.base.spec, kv_cache_bytes=2**28)
        params = SamplingParams(max_new_tokens=world.args.new_tokens, ignore_eos=True)
        alone = {r.index: engine.generate(r.prompt, params, world.adapters[r.adapter]).output_ids
                 for r in world.requests}
        same = sum(mixed.outputs[i] == alone[i] for i in alone)
        report(same == len(alone), f"fp32 mixed batch equals each request alone: {same}/{len(alone)}")

        bf16 = run_ours(worlds["bfloat16"], True)
        agree = sum(bf16.outputs[i] == mixed.outputs[i] for i in alone)
        print(f"info  bf16 vs fp32 greedy tokens, whole requests identical: {agree}/{len(alone)}; varlen flash "
              f"in use: {flash_varlen._OK}")

        for dtype, graphed in (("float32", mixed), ("bfloat16", bf16)):
            eager = run_ours(worlds[dtype], True, paths=FastPaths(cuda_graphs="off"))
            same = sum(eager.outputs[i] == graphed.outputs[i] for i in alone)
            recorded = Engine(worlds[dtype].base.model, worlds[dtype].base.tokenizer, worlds[dtype].base.spec,
                              max_batch_size=len(alone), kv_cache_bytes=2**28).runner.describe()["cuda_graphs"]
            ok = recorded is not None and (same == len(alone) or dtype == "bfloat16")
            report(ok, f"{dtype} decode from CUDA graphs {recorded}: requests identical to eager {same}/{len(alone)}; "
                   f"{graphed.tokens_per_s:.0f} tok/s against {eager.tokens_per_s:.0f} eager")

        spec = world.base.spec
        t = time.perf_counter()
        big = Engine(world.base.model, world.base.tokenizer, spec, kv_cache_bytes=budget_bytes(None, spec.device))
        pool = big.runner.pool
        seq = big.generate(world.requests[0].prompt, params, world.adapters[0])
        report(seq.output_ids == alone[0], f"default budget: {pool.nbytes() / 2**30:.1f} GiB, {pool.slots} tokens, "
               f"allocated and serving in {time.perf_counter() - t:.1f} s")
        del big, pool, seq
        torch.cuda.empty_cache()

        peak = max(sum(len(r.prompt) + world.virtual[r.adapter] + world.args.new_tokens for r in world.requests) // 2, 1)
        slot = KVPool.slot_bytes(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype)
        limited = run_ours(world, True, kv_cache_bytes=peak * slot)
        same = sum(limited.outputs[i] == mixed.outputs[i] for i in alone)
        report(same == len(alone),
               f"fp32 in half the peak KV need: {limited.extra['preemptions']} preemptions, "
               f"{limited.extra['compactions']} compactions, identical requests {same}/{len(alone)}, "
               f"{limited.tokens_per_s:.0f} vs {mixed.tokens_per_s:.0f} tok/s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
