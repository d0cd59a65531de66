"""The compiled packed forward against the eager one: `python -m bench.compile_bench [bench_engine flags]`.

Same model, adapters and requests as `bench.bench_engine` (its flags: `--device cuda --dtype bfloat16`
on a GPU). Prints the compile (warm-up) time, then ours-mixed eager and compiled, alternating, best
of `--repeats` each: tokens/s, their ratio, and on how many requests the greedy tokens agree (all of
them expected in float32; half precision may round differently after fused kernels). As in the
server, the first compile runs on the main thread and the timed runs on another (the engine's):
CUDA graphs are recorded per thread.
"""

from __future__ import annotations

import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
import time
from pathlib import Path

from bench.bench_engine import parse_args
from bench.process import quiet, torch_threads
from bench.systems import run_ours
from bench.workload import build_world


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with (quiet(), torch_threads(args.threads), tempfile.TemporaryDirectory(prefix="bench-compile-") as tmp,
          ThreadPoolExecutor(1, thread_name_prefix="engine") as engine_thread):
        world = build_world(args, Path(tmp))
        print(f"model: hidden {args.hidden}, {args.layers} layers, {args.dtype} on {world.device}; "
              f"{len(world.requests)} requests x {args.new_tokens} tokens, {args.adapters} adapters", flush=True)
        run_ours(world, True)  # eager warm-up (kernels, allocator)
        began = time.perf_counter()
        first = run_ours(world, True, compile=True)
        print(f"compile warm-up + first compiled run: {time.perf_counter() - began:.1f} s "
              f"(first run alone {first.wall_s:.1f} s: CUDA graphs recorded for new sizes)", flush=True)
        best = {"eager": None, "compiled": None}
        for _ in range(max(1, args.repeats)):
            for name in best:
                result = engine_thread.submit(run_ours, world, True, compile=name == "compiled").result()
                if best[name] is None or result.tokens_per_s > best[name].tokens_per_s:
                    best[name] = result
        eager, compiled = best["eager"], best["compiled"]
        same = sum(eager.outputs[i] == compiled.outputs[i] for i in eager.outputs)
        ratio = compiled.tokens_per_s / eager.tokens_per_s
        print(f"{'forward':10}{'tokens/s':>10}{'wall s':>8}{'mean TTFT s':>13}")
        for name, r in best.items():
            print(f"{name:10}{r.tokens_per_s:10.1f}{r.wall_s:8.2f}{r.mean_ttft:13.3f}")
        print(f"  compiled / eager = {ratio:.2f}; greedy tokens identical on {same}/{len(eager.outputs)} requests")
        _print_compile_counters()
        return {"eager": eager.tokens_per_s, "compiled": compiled.tokens_per_s, "ratio": ratio, "same": same}


def _print_compile_counters() -> None:
    """What dynamo and inductor counted: graphs, graph breaks, CUDA graphs skipped (and why)."""
    from torch._dynamo.utils import counters

    print("  dynamo:", dict(counters["stats"]), "graph breaks:", sum(counters["graph_break"].values()))
    skips = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}
    if skips:
        print("  inductor cudagraph counters:", skips)


if __name__ == "__main__":
    main()
