"""What the Ray Serve hop costs: the same workload through the single server, through Ray Serve with
1 engine replica, and with 2, on one machine.

    python -m bench.ray_serve                         # the demo model, 32 requests x 32 new tokens
    python -m bench.ray_serve --model DIR --requests 64 --new-tokens 64 --repeats 3

Each round sends every request at once to `/v1/completions` (non-streaming, greedy, ignore_eos
so each generates exactly --new-tokens), spread over the demo adapters and the base model, and
prints generated tokens per second. The figures to read: Ray 1 replica / single (the hop's
overhead; goal >= 0.9) and 2 replicas / 1 replica (scaling; on a 2-core machine the two
replicas share the cores, so it only checks that a second replica costs little).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time

import httpx

from tests.integration.support import free_port


def wait_healthy(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not become healthy")


async def round_(url: str, models: list[str], n: int, new_tokens: int) -> float:
    """Tokens per second of `n` requests sent at once."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(i: int) -> int:
            r = await client.post("/v1/completions", json={
                "model": models[i % len(models)], "prompt": f"Request {i}: tell me a story", "max_tokens": new_tokens,
                "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        began = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i) for i in range(n))))
        return tokens / (time.perf_counter() - began)


def measure(url: str, args) -> float:
    models = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]]
    asyncio.run(round_(url, models, min(8, args.requests), 4))  # warm-up: loads every adapter
    rates = [asyncio.run(round_(url, models, args.requests, args.new_tokens)) for _ in range(args.repeats)]
    return statistics.median(rates)


def flags(args) -> dict:
    out = {"dtype": args.dtype, "device": "cpu", "kv_cache_memory": args.kv_cache_memory,
           "cpu_threads": args.cpu_threads}
    if args.model:
        out["model"] = args.model
    return out


def single(args) -> float:
    port = free_port()
    argv = [sys.executable, "-m", "server", "--port", str(port)]
    for k, v in flags(args).items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}")
        return measure(f"http://127.0.0.1:{port}", args)
    finally:
        proc.terminate()
        proc.wait(60)


def on_ray(args, replicas: int) -> float:
    import ray
    from ray import serve

    from server.ray_serve import app

    ray.init(num_cpus=max(2, replicas), include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app({**flags(args), "replicas": replicas, "num_cpus": 1}), name="bench", route_prefix="/")
        return measure(f"http://127.0.0.1:{port}", args)
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory or hub id (default: the demo model)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-memory", default="256MiB")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu-threads", default="1", help="each engine's torch threads, the same on every side "
                        "(a Ray replica with num_cpus 1 runs one thread; a single server would take every core)")
    args = parser.parse_args()
    base = single(args)
    one = on_ray(args, 1)
    two = on_ray(args, 2)
    print(f"single server      {base:8.1f} tok/s")
    print(f"Ray, 1 replica     {one:8.1f} tok/s   {one / base:.2f}x the single server (the Serve hop)")
    print(f"Ray, 2 replicas    {two:8.1f} tok/s   {two / one:.2f}x 1 replica")


if __name__ == "__main__":
    main()
