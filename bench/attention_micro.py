"""One layer's attention on CPU: the per-request SDPA loop against the C++ kernel, on each instruction set.

A step of `--requests` decoding requests (one query each), key counts uniform in [40, 200] (with
`--prefill`, each request's whole prompt of 40-90 tokens instead), 8 heads,
4 KV heads, head_dim 64, their segments scattered in a KV pool as the engine leaves them. Times
`attention._per_request` (the one call a layer makes to attend) with `cpu_attention`'s kernel
against its SDPA loop, in alternating rounds, and prints the median and the fastest call of each and their ratios
(the fastest is the steadier figure on a machine others are using).

    python -m bench.attention_micro                  # float32 and bfloat16, 2 threads, each instruction set
    python -m bench.attention_micro --prefix 128     # also: the kernel over 4 shared prefixes vs copies
    python -m bench.attention_micro --prefill --prefix 16

With `--prefix N`, each request's keys also start with an adapter prefix of N keys, one of
`--adapters` prefixes, read from one shared segment per adapter; for decoding steps the kernel is
then also timed against a copy at the start of each request's own segment (as the pool held them
before).
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import time

import torch

from server.engine import attention
from server.engine.cpu import attention as cpu_attention, kernels as cpu_kernels
from server.engine.kv_cache import GROWTH_SLOTS, KVPool

HEADS, KV_HEADS, HEAD_DIM = 8, 4, 64
MIN_KEYS, MAX_KEYS = 40, 200
MIN_PROMPT, MAX_PROMPT = 40, 90  # --prefill: each request's prompt, all its rows in the step


def build_step(requests: int, dtype, seed: int = 0, prefix: int = 0, adapters: int = 4, shared: bool = True,
               prefill: bool = False):
    """A decode-only step over a random pool (prefill: each request's whole prompt instead): (step,
    query [tokens, heads, head_dim], kv of the layer). prefix: keys each request reads first, from one
    of `adapters` shared segments, or (shared False) copied at the start of its own segment."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    kv_lens = [rng.randint(MIN_PROMPT, MAX_PROMPT) if prefill else rng.randint(MIN_KEYS, MAX_KEYS)
               for _ in range(requests)]
    q_lens = kv_lens if prefill else [1] * requests
    copied = 0 if shared else prefix
    pool = KVPool(1, KV_HEADS, HEAD_DIM, "cpu", dtype,
                  slots=sum(kv_lens) + (GROWTH_SLOTS + copied) * requests + prefix * adapters)
    prefixes = [pool.allocate(prefix).start for _ in range(adapters)] if prefix and shared else [0]
    starts = [pool.allocate(copied + n + rng.randrange(GROWTH_SLOTS)).start for n in kv_lens]
    pool.kv.normal_()
    order = rng.sample(range(requests), requests)  # packing order is not pool order after a while
    prefix_lens = [prefix if shared else 0] * requests
    step = attention.RaggedStep.build(pool, [starts[i] for i in order], [q_lens[i] for i in order],
                                      [prefix + kv_lens[i] for i in order], True,
                                      [prefixes[i % len(prefixes)] for i in order], prefix_lens)
    query = torch.randn(sum(q_lens), HEADS, HEAD_DIM).to(dtype)  # [tokens, heads, head_dim], as `attention.attend` takes it
    return step, query, pool.kv[0]


def _takes(isa: str) -> bool:
    """Whether this CPU runs the kernel's `isa` path."""
    with cpu_attention.isa(isa) as taken:
        return taken == isa


def time_calls(fns: dict, repeats: int, rounds: int) -> dict[str, tuple[float, float]]:
    """(median, fastest) seconds per call of each fn, timed in alternating rounds so that load changes
    hit all alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(repeats // rounds):
                began = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - began)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1000, help="calls timed per path and dtype")
    parser.add_argument("--prefix", type=int, default=0, help="adapter prefix keys per request (0: none)")
    parser.add_argument("--adapters", type=int, default=4, help="adapters the requests' prefixes are of")
    parser.add_argument("--prefill", action="store_true", help="a step of whole prompts instead of decoding requests")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not cpu_kernels.available():
        raise SystemExit("the CPU attention kernel did not build: see the warning above")

    scale = HEAD_DIM ** -0.5
    isas = [isa for isa in cpu_attention.ISAS if _takes(isa)]
    results = {}
    what = (f"prefill attention, one layer: {args.requests} whole prompts of {MIN_PROMPT}-{MAX_PROMPT} tokens"
            if args.prefill else f"decode attention, one layer: {args.requests} requests, keys {MIN_KEYS}-{MAX_KEYS}")
    print(f"{what}, prefix {args.prefix}, heads {HEADS}, kv heads {KV_HEADS}, head_dim {HEAD_DIM}, {args.threads} "
          f"threads, {args.repeats} calls each; the kernel on each instruction set this CPU has")
    print(f"  {'dtype':9s} {'K+V read':>9s} {'':7s} {'SDPA loop':>9s} "
          + " ".join(f"{isa:>9s}" for isa in isas) + f" {'best/SDPA':>9s}")
    for dtype in (torch.float32, torch.bfloat16):
        step, query, kv = build_step(args.requests, dtype, prefix=args.prefix, adapters=args.adapters,
                                     prefill=args.prefill)

        def sdpa():  # what _per_request does without the kernel
            return torch.cat(attention._sdpa_each(step, query, kv, scale, None, range(args.requests)))

        def kernel(isa):
            with cpu_attention.isa(isa):
                return attention._per_request(step, query, kv, scale, None)

        calls = {"sdpa": sdpa} | {isa: functools.partial(kernel, isa) for isa in isas}
        for isa in isas:
            torch.testing.assert_close(kernel(isa), sdpa(), atol=2e-2, rtol=2e-2)
        t = time_calls(calls, args.repeats, rounds=10)
        read = 2 * KV_HEADS * HEAD_DIM * sum(step.kv_lens) * kv.element_size()
        name = str(dtype).removeprefix("torch.")
        results[name] = t
        for i, stat in enumerate(("median", "fastest")):
            first = f"{name:9s} {read / 1e6:7.1f}MB" if i == 0 else " " * 19
            print(f"  {first} {stat:7s} {t['sdpa'][i] * 1e3:7.3f}ms "
                  + " ".join(f"{t[isa][i] * 1e3:7.3f}ms" for isa in isas) + f" {t[isas[0]][i] / t['sdpa'][i]:9.2f}")
    if args.prefix and not args.prefill:
        results["prefix"] = _prefix_figures(args, scale)
    return results


def _prefix_figures(args, scale: float) -> dict:
    """The kernel with every request's first `args.prefix` keys in one of `args.adapters` shared
    segments, against the same keys copied into each request's segment."""
    print(f"the kernel with a prefix of {args.prefix} keys per request, of {args.adapters} adapters:")
    print(f"  {'dtype':9s} {'':7s} {'copies':>9s} {'shared':>9s} {'ratio':>6s}")
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        calls = {}
        for shared in (False, True):
            step, query, kv = build_step(args.requests, dtype, prefix=args.prefix, adapters=args.adapters,
                                         shared=shared)
            calls["shared" if shared else "copies"] = (
                lambda step=step, query=query, kv=kv: attention._per_request(step, query, kv, scale, None))
        t = time_calls(calls, args.repeats, rounds=10)
        name = str(dtype).removeprefix("torch.")
        results[name] = t
        for i, stat in enumerate(("median", "fastest")):
            copies_s, shared_s = t["copies"][i], t["shared"][i]
            print(f"  {name if i == 0 else '':9s} {stat:7s} {copies_s * 1e3:7.3f}ms {shared_s * 1e3:7.3f}ms "
                  f"{shared_s / copies_s:6.2f}")
    return results


if __name__ == "__main__":
    main()
