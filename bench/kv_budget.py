"""The engine under a KV memory budget: throughput when the pool holds half of what the workload
needs at its peak, and running streams' inter-token latency while long prompts arrive, with and
without chunked prefill. Same model, adapters and requests as `bench.bench_engine` (its flags).

    python -m bench.kv_budget              # the default workload (a few minutes on 2 CPU cores)
    python -m bench.kv_budget --quick      # a small config, well under a minute
    python -m bench.kv_budget --shared     # only 4. below, on its own workload (see SHARED)

Prints, in one run:
  1. ours-mixed with no limit and with half the peak need, best of --repeats each, alternating:
     tokens/s, ratio (goal >= 0.8), preemptions, compactions; the budget checked at every step.
  2. the shared prefixes' slots at the peak, and what per-request copies would have held.
  3. --streams requests decoding while --long-prompts prompts of --long-tokens tokens arrive:
     the streams' inter-token latency p50/p99 and the long prompts' TTFT, for each prefill chunk size.
  4. (--shared) one prefix per adapter in the pool against a copy per request, as the pool held
     them before they were shared: the KV slots and bytes held at the peak, the prefixes written, and
     tokens per second of wall time and of the process's CPU time (steadier on a shared machine),
     best of --repeats rounds each, alternating, with the range; whether every request's tokens agree.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_engine import parse_args
from bench.process import quiet, torch_threads
from bench.systems import run_ours
from bench.timing import sync
from bench.workload import FIRST_ID, World, build_world
from server.engine.engine import Engine
from server.engine.kv_cache import DEFAULT_KV_CACHE_BYTES, KVPool
from server.engine.request import SamplingParams, Sequence


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    extra = [a for a in argv if a.startswith(("--streams", "--long-", "--chunks"))]
    shared = "--shared" in argv
    if shared:  # its workload's defaults, before the flags given (which win)
        argv = [f"--{k.replace('_', '-')}={v}" for k, v in SHARED.items()] + [a for a in argv if a != "--shared"]
    args = parse_args([a for a in argv if a not in extra])
    opts = _own_flags(extra, quick=args.quick)
    with quiet(), torch_threads(args.threads), tempfile.TemporaryDirectory(prefix="bench-kv-") as tmp:
        world = build_world(args, args.workdir or Path(tmp))
        print(f"model hidden {args.hidden}, {args.layers} layers; {len(world.requests)} requests x "
              f"{args.new_tokens} tokens, {args.adapters} adapters of {args.min_virtual}-{args.max_virtual} "
              f"virtual tokens, {args.dtype} on {world.device}")
        if shared:
            return {"shared": shared_prefixes(world, args.repeats)}
        out = {"budget": budget_throughput(world, args.repeats)}
        out["itl"] = chunked_prefill_latency(world, **opts)
    return out


# --shared: 64 requests x 64 tokens over 4 adapters of 128 virtual tokens (prompt tuning, two p-tuning
# encoders, prefix tuning: `workload.VARIANTS` in order), the engine benchmark's model and prompts
SHARED = {"requests": 64, "new_tokens": 64, "adapters": 4, "min_virtual": 128, "max_virtual": 128, "repeats": 3}


def _own_flags(extra: list[str], quick: bool) -> dict:
    opts = {"streams": 8 if quick else 32, "long_prompts": 2 if quick else 4, "long_tokens": 256 if quick else 2000,
            "chunks": [64, 1 << 30] if quick else [256, 512, 1 << 30]}
    for flag in extra:
        name, _, value = flag.lstrip("-").partition("=")
        name = name.replace("-", "_")
        opts[name] = [int(v) for v in value.split(",")] if name == "chunks" else int(value)
    return opts


def _slot_bytes(world: World) -> int:
    spec = world.base.spec
    return KVPool.slot_bytes(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype)


def budget_throughput(world: World, repeats: int) -> dict:
    """ours-mixed with the default pool, then with half the peak need; the prefix-sharing estimate."""
    peak = {"held": 0, "prefix": 0, "shared_prefix": 0}

    def watch_peak(engine):
        step = engine.step

        def watched():
            outputs = step()
            seqs = engine.runner.seqs
            if engine.runner.pool.held > peak["held"]:
                peak["held"] = engine.runner.pool.held
                peak["prefix"] = sum(s.prefix_length for s in seqs)
                peak["shared_prefix"] = sum({s.adapter.prefix_key: s.prefix_length for s in seqs if s.adapter}.values())
            return outputs
        engine.step = watched

    run_ours(world, True, instrument=watch_peak)  # warm-up, and the peak need
    slot_bytes = _slot_bytes(world)
    half = peak["held"] // 2 * slot_bytes

    def check_budget(engine):
        step = engine.step

        def checked():
            assert engine.runner.pool.nbytes() <= half and engine.runner.pool.held <= engine.runner.pool.slots
            return step()
        engine.step = checked

    best = {}
    for _ in range(max(repeats, 1)):
        for name, kwargs in (("no limit", {}), ("half the peak", {"kv_cache_bytes": half, "instrument": check_budget})):
            result = run_ours(world, True, name=name, **kwargs)
            if name not in best or result.wall_s < best[name].wall_s:
                best[name] = result
    full, limited = best["no limit"], best["half the peak"]
    same = sum(limited.outputs[i] == full.outputs[i] for i in full.outputs)
    print(f"\npeak need: {peak['held']} slots ({peak['held'] * slot_bytes / 2**20:.1f} MiB); "
          f"budget: {half // slot_bytes} slots ({half / 2**20:.1f} MiB)")
    print(f"{'pool':<16}{'tokens/s':>10}{'wall s':>8}{'preemptions':>13}{'compactions':>13}{'steps':>7}")
    for r in (full, limited):
        print(f"{r.name:<16}{r.tokens_per_s:>10.1f}{r.wall_s:>8.2f}{r.extra['preemptions']:>13}"
              f"{r.extra['compactions']:>13}{r.extra['steps']:>7}")
    ratio = limited.tokens_per_s / full.tokens_per_s
    print(f"  half the peak / no limit = {ratio:.2f}   goal >= 0.8   {'PASS' if ratio >= 0.8 else 'MISS'}"
          f"   (requests with identical tokens: {same}/{len(full.outputs)})")
    saved = (peak["prefix"] - peak["shared_prefix"]) * slot_bytes
    print(f"  the shared prefixes (one per adapter) held {peak['shared_prefix']} slots at the peak; a copy per "
          f"request would have held {peak['prefix']}: {saved / 2**20:.2f} MiB more, "
          f"{saved / (peak['held'] * slot_bytes):.0%} of the peak")
    return {"no_limit": full.tokens_per_s, "half": limited.tokens_per_s, "ratio": ratio, "identical": same,
            "preemptions": limited.extra["preemptions"], "peak_slots": peak["held"], "prefix_saved_bytes": saved}


def shared_prefixes(world: World, repeats: int) -> dict:
    """The world's requests with one prefix per adapter in the pool ("shared"), and with a copy per
    request ("copies": each request given its own in-memory copy of its adapter, a version-less
    `Adapter` that nothing shares, so the pool writes and holds its prefix per request, as before
    prefixes were shared). Alternating rounds after a warm-up of each; the peak of slots held."""
    adapters = {
        "copies": [dataclasses.replace(world.adapters[r.adapter], version="") for r in world.requests],
        "shared": [world.adapters[r.adapter] for r in world.requests],
    }
    slot_bytes = _slot_bytes(world)
    runs: dict[str, list[dict]] = {name: [] for name in adapters}
    for round_ in range(max(repeats, 1) + 1):
        for name, per_request in adapters.items():
            result = _serve(world, per_request)
            if round_:  # the first round warms up
                runs[name].append(result)
    print(f"\n{len(world.requests)} requests x {world.args.new_tokens} tokens over {len(world.adapters)} adapters "
          f"({', '.join(f'{v} {n}' for v, n in zip(world.variants, world.virtual))} virtual tokens), "
          f"best of {len(runs['shared'])} alternating rounds")
    print(f"{'prefixes':<10}{'peak slots':>11}{'of them prefix':>15}{'peak KV MiB':>12}{'prefix writes':>14}"
          f"{'tokens/s':>10}{'range':>16}{'tokens/CPU s':>13}{'range':>16}")
    rows = {}
    for name, results in runs.items():
        best = max(results, key=lambda r: r["tokens_per_s"])
        wall = [r["tokens_per_s"] for r in results]
        cpu = [r["tokens_per_cpu_s"] for r in results]
        rows[name] = {**best, "tokens_per_s_range": (min(wall), max(wall)), "tokens_per_cpu_s": max(cpu),
                      "tokens_per_cpu_s_range": (min(cpu), max(cpu)), "peak_bytes": best["peak_held"] * slot_bytes}
        print(f"{name:<10}{best['peak_held']:>11}{best['peak_prefix']:>15}{best['peak_held'] * slot_bytes / 2**20:>12.1f}"
              f"{best['prefix_writes']:>14}{max(wall):>10.1f}{f'{min(wall):.1f}-{max(wall):.1f}':>16}"
              f"{max(cpu):>13.1f}{f'{min(cpu):.1f}-{max(cpu):.1f}':>16}")
    copies, shared = rows["copies"], rows["shared"]
    same = sum(copies["outputs"][i] == shared["outputs"][i] for i in range(len(world.requests)))
    print(f"  shared / copies, best of each: KV held at the peak {shared['peak_held'] / copies['peak_held']:.2f}, "
          f"tokens/s {shared['tokens_per_s'] / copies['tokens_per_s']:.2f}, "
          f"tokens/CPU s {shared['tokens_per_cpu_s'] / copies['tokens_per_cpu_s']:.2f}; "
          f"requests with identical tokens: {same}/{len(world.requests)}")
    return {name: {k: v for k, v in row.items() if k != "outputs"} for name, row in rows.items()} | {"identical": same}


def _serve(world: World, adapters: list) -> dict:
    """All of the world's requests at once, request i on adapters[i]; the peak of the pool's slots."""
    base = world.base
    engine = Engine(base.model, base.tokenizer, base.spec, max_batch_size=len(world.requests),
                    max_waiting=max(256, len(world.requests)), max_prefill_tokens=world.args.max_prefill_tokens,
                    kv_cache_bytes=DEFAULT_KV_CACHE_BYTES)
    pool = engine.runner.pool
    params = SamplingParams(max_new_tokens=world.args.new_tokens, ignore_eos=True)
    peak = {"peak_held": 0, "peak_prefix": 0, "prefix_writes": 0}
    write_prefix = pool.write_prefix

    def counted(seg, prefix):
        peak["prefix_writes"] += 1
        write_prefix(seg, prefix)

    pool.write_prefix = counted
    sync(world.device)
    start, cpu = time.perf_counter(), time.process_time()
    seqs = [engine.submit(Sequence(list(r.prompt), params, adapter)) for r, adapter in zip(world.requests, adapters)]
    while engine.has_work():
        engine.step()
        if pool.held > peak["peak_held"]:  # a host integer: no cost worth timing
            peak["peak_held"] = pool.held
            peak["peak_prefix"] = sum(p.segment.capacity for p in pool.prefixes.values())
    sync(world.device)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert all(len(s.output_ids) == world.args.new_tokens for s in seqs)
    tokens = sum(len(s.output_ids) for s in seqs)
    return {**peak, "wall_s": wall, "tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu,
            "outputs": [list(s.output_ids) for s in seqs]}


def chunked_prefill_latency(world: World, streams: int, long_prompts: int, long_tokens: int, chunks: list[int]) -> list:
    """Streams decode; a long prompt arrives every few steps. Inter-token latency of the streams
    while any long prompt is being prefilled, and the long prompts' TTFT, per chunk size."""
    base, rng = world.base, random.Random(1)
    vocab = base.model.config.vocab_size
    short = [world.requests[i % len(world.requests)] for i in range(streams)]
    longs = [[rng.randrange(FIRST_ID, vocab) for _ in range(long_tokens)] for _ in range(long_prompts)]
    rows = []
    print(f"\n{streams} streams decoding while {long_prompts} prompts of {long_tokens} tokens arrive "
          f"(with adapters), {world.args.dtype}")
    print(f"{'prefill chunk':<14}{'ITL p50 ms':>11}{'ITL p99 ms':>11}{'ITL max ms':>11}{'long TTFT s':>12}{'steps':>7}")
    for _ in range(2):  # the first round warms up; the second is printed
        rows = []
        for chunk in chunks:
            engine = Engine(base.model, base.tokenizer, base.spec, max_batch_size=streams + long_prompts,
                            max_prefill_tokens=chunk)
            stamps: dict[int, list[float]] = {}

            def on_token(seq, _event, stamps=stamps):
                stamps.setdefault(seq.id, []).append(time.perf_counter())

            n_new = 4096
            decoding = [engine.submit(Sequence(list(r.prompt), SamplingParams(max_new_tokens=n_new, ignore_eos=True),
                                               world.adapters[r.adapter], on_token=on_token)) for r in short]
            while not all(s.output_ids for s in decoding):
                engine.step()
            arrivals, pending = {}, list(enumerate(longs))
            start_step = engine.stats["steps"]
            while pending or any(not s.output_ids for s in arrivals.values()):
                if pending and (engine.stats["steps"] - start_step) % 4 == 0:
                    i, ids = pending.pop(0)
                    seq = Sequence(ids, SamplingParams(max_new_tokens=1), world.adapters[i % len(world.adapters)])
                    arrivals[time.perf_counter()] = engine.submit(seq)
                engine.step()
                sync(world.device)
            for s in decoding:
                engine.abort(s)
            while engine.has_work():
                engine.step()
            gaps = [b - a for s in decoding for a, b in zip(stamps[s.id][1:], stamps[s.id][2:])]
            ttft = statistics.mean(s.first_token_time - s.arrival_time for s in arrivals.values())
            q = statistics.quantiles(gaps, n=100)
            rows.append({"chunk": chunk, "p50_ms": q[49] * 1e3, "p99_ms": q[98] * 1e3, "max_ms": max(gaps) * 1e3,
                         "long_ttft_s": ttft, "steps": engine.stats["steps"]})
    for r in rows:
        label = "none" if r["chunk"] >= long_tokens else str(r["chunk"])
        print(f"{label:<14}{r['p50_ms']:>11.1f}{r['p99_ms']:>11.1f}{r['max_ms']:>11.1f}{r['long_ttft_s']:>12.2f}"
              f"{r['steps']:>7}")
    return rows


if __name__ == "__main__":
    main()
