"""Throughput and time-to-first-token of the engine serving many soft-prompt adapters, against PEFT.

One run builds one random Llama model and `--adapters` PEFT adapters of all five variants, draws
`--requests` random prompts, and serves the same requests, each making exactly `--new-tokens`
tokens, with:

  ours-mixed   this engine, every request with its adapter, all submitted at once
  ours-base    this engine, the same requests with no adapter (the ceiling for ours-mixed)
  peft-seq     PEFT one request at a time: load the request's adapter, greedy `generate`
  peft-group   PEFT batching by adapter: one left-padded `generate` per adapter
  hf-batch     Hugging Face `generate` of all requests at once, no adapters, left padded

It also measures this machine's matmul throughput at the model's linear-layer shapes and prints
the engine's achieved model FLOP/s as a fraction of it. See bench/README.md.

    python -m bench.bench_engine                 # the default config (a few minutes on 2 CPU cores)
    python -m bench.bench_engine --quick         # a small config, well under a minute
    python -m bench.bench_engine --profile       # plus where the engine's time goes

The modules, in the order a run uses them: `workload` (model, adapters, requests), `systems` (the
five rows, warm-up and timed rounds; `timing` holds their `Result`), `ttft` (prompt-tuning TTFT),
`flops` (FLOP counts and the matmul ceiling), `report` (what is printed), `engine_profile` (--profile).
This file reads the flags and runs them in that order, quiet (`process`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.engine_profile import profile_engine
from bench.flops import flop_figures
from bench.process import quiet, torch_threads
from bench.report import (print_agreement, print_flops, print_header, print_load, print_ratios, print_table,
                          print_ttft)
from bench.systems import time_systems, warm_up
from bench.ttft import peft_seq_ttft, prompt_ttft
from bench.workload import World, build_world

QUICK = {"hidden": 128, "layers": 2, "requests": 8, "adapters": 4, "new_tokens": 8, "min_prompt": 8,
         "max_prompt": 32, "min_virtual": 4, "max_virtual": 12, "peft_subset": 4}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.bench_engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=128)
    p.add_argument("--min-virtual", type=int, default=8, help="num_virtual_tokens of adapters, drawn uniformly")
    p.add_argument("--max-virtual", type=int, default=32)
    p.add_argument("--peft-subset", type=int, default=16,
                   help="requests timed for peft-seq (the first ones: they cycle through the adapters); 0 = all")
    p.add_argument("--max-prefill-tokens", type=int, default=4096, help="the engine's prefill budget per step")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=1,
                   help="time every system this many times (in rounds) and keep each one's fastest run")
    p.add_argument("--workdir", type=Path, default=None, help="where the model and adapters go (default: a temp dir)")
    p.add_argument("--profile", action="store_true", help="also print where the engine's time goes")
    p.add_argument("--quick", action="store_true", help="a small config, well under a minute (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.peft_subset <= 0 or args.peft_subset > args.requests:
        args.peft_subset = args.requests
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print the report; returns the numbers (for tests and scripts).

    Quiet while it runs (transformers/PEFT warnings, progress bars, INFO logs); the process's
    logging levels, warning filters and torch thread count are restored afterwards.
    """
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with quiet(), torch_threads(args.threads):
        run_start = time.perf_counter()
        load_before = os.getloadavg()
        with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
            root = args.workdir or Path(tmp)
            t = time.perf_counter()
            world = build_world(args, root)
            setup_s = time.perf_counter() - t
            return _run(world, args, run_start, setup_s, load_before)


def _run(world: World, args, run_start: float, setup_s: float, load_before) -> dict:
    """Measure and print, section by section, in the order the report reads."""
    print_header(world, setup_s)
    warm_up(world)
    results = time_systems(world)
    seq_ttft_all = peft_seq_ttft(results["peft-seq"], len(world.requests))
    print_table(results, len(world.requests), args.repeats, seq_ttft_all)
    prompt_requests, ttft_rows = prompt_ttft(world, results, seq_ttft_all)
    flops = flop_figures(world, results["ours-mixed"])
    ratios = print_ratios(results)
    print_ttft(prompt_requests, ttft_rows)
    print_flops(world, flops)
    agreement = print_agreement(results)
    total = print_load(load_before, run_start)

    if args.profile:
        profile_engine(world)

    return {
        "results": {k: {"tokens_per_s": v.tokens_per_s, "wall_s": v.wall_s, "tokens": v.tokens,
                        "mean_ttft_s": seq_ttft_all if k == "peft-seq" else v.mean_ttft} for k, v in results.items()},
        "ratios": ratios,
        "ttft_prompt": [{"what": a, "ours_s": b, "peft_s": c} for a, b, c in ttft_rows],
        "flops": {"achieved": flops.achieved, "ceiling": flops.ceiling["flops_per_s"], "fraction": flops.fraction,
                  "token_mix_ceiling": flops.mix_ceiling},
        "agreement": agreement,
        "wall_s": total,
    }


if __name__ == "__main__":
    main()
