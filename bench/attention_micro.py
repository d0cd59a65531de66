"""One layer's decode attention on CPU: the per-request SDPA loop against the C++ kernel.

A step of `--requests` decoding requests (one query each), key counts uniform in [40, 200], 8 heads,
4 KV heads, head_dim 64, their segments scattered in a KV pool as the engine leaves them. Times
`attention._per_request` (the one call a layer makes to attend) with `cpu_attention`'s kernel
against its SDPA loop, in alternating rounds, and prints the median and the fastest call of each and their ratios
(the fastest is the steadier figure on a machine others are using).

    python -m bench.attention_micro                  # float32 and bfloat16, 2 threads
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from server.engine import attention
from server.engine.cpu import kernels as cpu_kernels
from server.engine.kv_cache import GROWTH_SLOTS, KVPool

HEADS, KV_HEADS, HEAD_DIM = 8, 4, 64
MIN_KEYS, MAX_KEYS = 40, 200


def build_step(requests: int, dtype, seed: int = 0):
    """A decode-only step over a random pool: (step, query [1, heads, requests, head_dim], kv of the layer)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    kv_lens = [rng.randint(MIN_KEYS, MAX_KEYS) for _ in range(requests)]
    pool = KVPool(1, KV_HEADS, HEAD_DIM, "cpu", dtype, slots=sum(kv_lens) + GROWTH_SLOTS * requests)
    starts = [pool.allocate(n + rng.randrange(GROWTH_SLOTS)).start for n in kv_lens]
    pool.kv.normal_()
    order = rng.sample(range(requests), requests)  # packing order is not pool order after a while
    step = attention.RaggedStep.build(pool, [starts[i] for i in order], [1] * requests, [kv_lens[i] for i in order])
    query = torch.randn(requests, HEADS, HEAD_DIM).to(dtype)  # [tokens, heads, head_dim], as `attention.attend` takes it
    return step, query, pool.kv[0]


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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not cpu_kernels.available():
        raise SystemExit("the CPU decode attention kernel did not build: see the warning above")

    scale = HEAD_DIM ** -0.5
    results = {}
    print(f"decode attention, one layer: {args.requests} requests, keys {MIN_KEYS}-{MAX_KEYS}, heads {HEADS}, "
          f"kv heads {KV_HEADS}, head_dim {HEAD_DIM}, {args.threads} threads, {args.repeats} calls each")
    print(f"  {'dtype':9s} {'K+V read':>9s} {'':7s} {'SDPA loop':>9s} {'kernel':>9s} {'ratio':>6s}")
    for dtype in (torch.float32, torch.bfloat16):
        step, query, kv = build_step(args.requests, dtype)

        def sdpa():  # what _per_request does without the kernel
            return torch.cat(attention._sdpa_each(step, query, kv, scale, None, range(args.requests)))

        def kernel():
            return attention._per_request(step, query, kv, scale, None)

        torch.testing.assert_close(kernel(), sdpa(), atol=2e-2, rtol=2e-2)
        t = time_calls({"sdpa": sdpa, "kernel": kernel}, args.repeats, rounds=10)
        read = 2 * KV_HEADS * HEAD_DIM * sum(step.kv_lens) * kv.element_size()
        name = str(dtype).removeprefix("torch.")
        results[name] = t
        for i, stat in enumerate(("median", "fastest")):
            first = f"{name:9s} {read / 1e6:7.1f}MB" if i == 0 else " " * 19
            sdpa_s, kernel_s = t["sdpa"][i], t["kernel"][i]
            print(f"  {first} {stat:7s} {sdpa_s * 1e3:7.3f}ms {kernel_s * 1e3:7.3f}ms {kernel_s / sdpa_s:6.2f}")
    return results


if __name__ == "__main__":
    main()
