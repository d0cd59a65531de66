"""The printed report: the set-up, the table of systems, the ratios against the goals, TTFT of
prompt-tuning requests, model FLOP/s against the matmul ceiling, and greedy agreement as a sanity check.

Each `print_*` prints one section and returns the figures it judged, for `main`'s returned dict.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from bench.flops import FlopFigures, layer_params
from bench.timing import Result
from bench.workload import VARIANTS, World

GOALS = {"base": 0.9, "peft-seq": 5.0, "peft-group": 2.0, "flops": 0.5}


def agreement(a: dict[int, list[int]], b: dict[int, list[int]]) -> tuple[int, int, float]:
    """Requests with identical tokens, requests compared, and the mean share of the common prefix."""
    keys = [k for k in a if k in b]
    same = sum(a[k] == b[k] for k in keys)
    prefix = []
    for k in keys:
        n = 0
        for x, y in zip(a[k], b[k]):
            if x != y:
                break
            n += 1
        prefix.append(n / max(1, len(a[k])))
    return same, len(keys), statistics.mean(prefix) if prefix else float("nan")


def _fmt_rate(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}FLOP/s"
    return f"{x:.0f} FLOP/s"


def _verdict(value: float, goal: float, higher: bool = True) -> str:
    ok = value >= goal if higher else value < goal
    return "PASS" if ok else "MISS"


def print_header(world: World, setup_s: float) -> None:
    """The run's settings, model, requests and adapters; a warning when the CPU is already busy."""
    args, reqs = world.args, world.requests
    cfg = world.model.config
    counts = {v: world.variants.count(v) for v in VARIANTS}
    print(f"softprompt-server engine benchmark  (torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.device}, {args.dtype})")
    print(f"model: random llama hidden={cfg.hidden_size} layers={cfg.num_hidden_layers} heads={cfg.num_attention_heads}"
          f"/{cfg.num_key_value_heads} kv intermediate={cfg.intermediate_size} vocab={cfg.vocab_size}; "
          f"{layer_params(world.model) / 1e6:.2f} M decoder-layer params")
    print(f"requests: {len(reqs)}, prompts {args.min_prompt}-{args.max_prompt} tokens "
          f"(mean {statistics.mean(len(r.prompt) for r in reqs):.1f}), exactly {args.new_tokens} new tokens each, "
          f"seed {args.seed}")
    load = os.getloadavg()[0]
    if load > 0.5 and torch.get_num_threads() > 1:
        print(f"WARNING: load average {load:.2f} before the run: other processes use the CPU; torch's "
              f"{torch.get_num_threads()} intra-op threads stall on each other when one is descheduled, which can "
              f"slow small ops tens of times. Prefer an idle machine, or --threads 1.")
    print(f"adapters: {args.adapters} ({', '.join(f'{c} {v}' for v, c in counts.items())}), "
          f"num_virtual_tokens {min(world.virtual)}-{max(world.virtual)} (mean {statistics.mean(world.virtual):.1f}); "
          f"registering all took {world.load_s:.2f} s; set-up {setup_s:.1f} s")


def print_table(results: dict[str, Result], requests: int, repeats: int, seq_ttft_all: float) -> None:
    """One row per system; peft-seq's TTFT is the estimate for all `requests` queued."""
    mixed, seq = results["ours-mixed"], results["peft-seq"]
    if repeats > 1:
        print(f"each system timed {repeats} times; its fastest run is shown")
    print(f"\n{'system':12s} {'requests':>8s} {'tokens':>7s} {'wall s':>8s} {'tokens/s':>9s} {'mean TTFT s':>12s} "
          f"{'mixed/this':>10s}  notes")
    notes = {
        "ours-mixed": f"{mixed.extra['steps']} steps, each request with its adapter",
        "ours-base": "no adapters (ceiling)",
        "peft-seq": (f"timed on {seq.requests} of {requests} requests; incl. {seq.extra['load_s']:.2f} s loading "
                     f"adapters; TTFT est. for all {requests} queued"),
        "peft-group": f"{results['peft-group'].extra['groups']} adapter groups; incl. "
                      f"{results['peft-group'].extra['load_s']:.2f} s loading adapters",
        "hf-batch": "no adapters, one left-padded batch",
    }
    for name, res in results.items():
        ttft = seq_ttft_all if name == "peft-seq" else res.mean_ttft
        ratio = mixed.tokens_per_s / res.tokens_per_s
        print(f"{name:12s} {res.requests:8d} {res.tokens:7d} {res.wall_s:8.2f} {res.tokens_per_s:9.1f} "
              f"{ttft:12.3f} {ratio:10.2f}  {notes[name]}")


def print_ratios(results: dict[str, Result]) -> dict[str, float]:
    """ours-mixed tokens/s over each other system's, against the goals."""
    mixed = results["ours-mixed"]
    print("\nratios (ours-mixed tokens/s over the other's):")
    r_base = mixed.tokens_per_s / results["ours-base"].tokens_per_s
    r_seq = mixed.tokens_per_s / results["peft-seq"].tokens_per_s
    r_group = mixed.tokens_per_s / results["peft-group"].tokens_per_s
    r_hf = mixed.tokens_per_s / results["hf-batch"].tokens_per_s
    print(f"  mixed / (a) ours-base   {r_base:7.2f}   goal >= {GOALS['base']}   {_verdict(r_base, GOALS['base'])}")
    print(f"  mixed / (b) peft-seq    {r_seq:7.2f}   goal >= {GOALS['peft-seq']}   "
          f"{_verdict(r_seq, GOALS['peft-seq'])}")
    print(f"  mixed / (c) peft-group  {r_group:7.2f}   goal >= {GOALS['peft-group']}   "
          f"{_verdict(r_group, GOALS['peft-group'])}")
    print(f"  mixed / (d) hf-batch    {r_hf:7.2f}   (reference; ours-base / hf-batch = "
          f"{results['ours-base'].tokens_per_s / results['hf-batch'].tokens_per_s:.2f}, should be > 1)")
    return {"base": r_base, "peft-seq": r_seq, "peft-group": r_group, "hf-batch": r_hf}


def print_ttft(prompt_requests: int, rows: list[tuple[str, float, float]]) -> None:
    print(f"\nTTFT of prompt-tuning requests ({prompt_requests} of them; goal: ours lower):")
    for label, ours_v, peft_v in rows:
        print(f"  {label:72s} {ours_v:8.3f} s vs {peft_v:8.3f} s  {_verdict(ours_v, peft_v, higher=False)}")


def print_flops(world: World, f: FlopFigures) -> None:
    args, requests = world.args, len(world.requests)
    flops, ceiling = f.counted, f.ceiling
    print("\nmodel FLOP/s of ours-mixed (useful work: no padding; virtual tokens not re-run):")
    print(f"  counted: linear 2*{layer_params(world.model) / 1e6:.2f}M params x {flops['processed_tokens']} processed "
          f"tokens ({f.prompt_tokens} prompt + {f.decode_tokens} fed-back) = {flops['linear'] / 1e9:.1f} GFLOP; "
          f"lm_head on {requests * args.new_tokens} sampled tokens = {flops['lm_head'] / 1e9:.1f} GFLOP; "
          f"attention over real context = {flops['attention'] / 1e9:.1f} GFLOP")
    print(f"  achieved {_fmt_rate(f.achieved)}  (2 x non-embedding params x processed tokens alone: "
          f"{_fmt_rate(f.achieved_simple)})")
    print(f"  matmul ceiling at the decode shapes (batch {requests}): {_fmt_rate(ceiling['flops_per_s'])}; per shape: "
          + ", ".join(f"{k} {v / 1e9:.1f}G" for k, v in ceiling["per_shape"].items()))
    print(f"  matmul at the prefill shapes (batch {f.prefill_batch}): {_fmt_rate(f.ceiling_prefill['flops_per_s'])}; "
          f"token-mix ceiling (prompt tokens at that rate, decode at batch {requests}): {_fmt_rate(f.mix_ceiling)}")
    print(f"  achieved / decode-shape ceiling = {f.fraction:.2f}   goal >= {GOALS['flops']}   "
          f"{_verdict(f.fraction, GOALS['flops'])};  achieved / token-mix ceiling = {f.achieved / f.mix_ceiling:.2f}")


def print_agreement(results: dict[str, Result]) -> dict[str, tuple[int, int]]:
    same, n, pre = agreement(results["ours-mixed"].outputs, results["peft-seq"].outputs)
    same_b, n_b, pre_b = agreement(results["ours-base"].outputs, results["hf-batch"].outputs)
    print(f"\ngreedy agreement (sanity): ours-mixed vs peft-seq {same}/{n} requests identical "
          f"(mean common prefix {pre:.0%}); ours-base vs hf-batch {same_b}/{n_b} ({pre_b:.0%}) "
          f"[left padding and batch shapes change float rounding; ties on a random model can diverge]")
    return {"mixed_vs_peft_seq": (same, n), "base_vs_hf_batch": (same_b, n_b)}


def print_load(load_before: tuple[float, float, float], run_start: float) -> float:
    """The load average at the start and now, and the whole run's seconds (returned)."""
    load_after = os.getloadavg()
    total = time.perf_counter() - run_start
    print(f"load average at start {load_before[0]:.2f}, at end {load_after[0]:.2f} ({os.cpu_count()} CPUs); "
          f"whole run {total:.1f} s")
    return total
