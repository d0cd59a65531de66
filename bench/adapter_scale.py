"""Adapters at scale: start-up with thousands of stored adapters, cold against warm time to first
token, and throughput over 10,000 adapters with Zipf popularity and a cache holding 5% of them.

    python -m bench.adapter_scale                  # the demo model and the bench model (hidden 512, 8 layers)
    python -m bench.adapter_scale --quick          # 1,000 adapters, the demo model only

Adapters are written by the project's own writer of PEFT's files: the adapter_config.json PEFT
saves for a prompt-tuning and a prefix-tuning adapter of the model, and a random
`prompt_embeddings` tensor of the shape PEFT saves, half of each kind, 20 virtual tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from adapters import AdapterRegistry, AdapterStore
from adapters.prefix_file import model_key
from bench.process import quiet
from server.demo.tiny import save_tiny_model
from server.engine.engine import Engine
from server.engine.request import SamplingParams, Sequence
from server.model import DEMO_MODEL, load_base_model

VIRTUAL = 20
KINDS = ("PROMPT_TUNING", "PREFIX_TUNING")


def write_adapters(store: AdapterStore, model_dir: Path, count: int, seed: int = 0) -> list[str]:
    """`count` adapters named a00000..., alternating prompt tuning and prefix tuning: the config PEFT
    writes for the model, and a random `prompt_embeddings` of the shape PEFT saves."""
    configs, widths = _peft_templates(model_dir)
    g = torch.Generator().manual_seed(seed)
    names = []
    for i in range(count):
        kind = KINDS[i % 2]
        table = torch.randn(VIRTUAL, widths[kind], generator=g) * (0.5 if kind == "PROMPT_TUNING" else 1.0)
        name = f"a{i:05d}"
        store.save(name, configs[kind], save_safetensors({"prompt_embeddings": table}))
        names.append(name)
    return names


def _peft_templates(model_dir: Path) -> tuple[dict[str, bytes], dict[str, int]]:
    """Per kind: adapter_config.json as PEFT writes it for this model, and the saved table's width."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    configs, widths = {}, {}
    for kind, peft_config in (("PROMPT_TUNING", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL)),
                              ("PREFIX_TUNING", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL))):
        peft_model = get_peft_model(model, peft_config)
        config = peft_model.peft_config["default"].to_dict()
        config["base_model_name_or_path"] = str(model_dir)
        configs[kind] = json.dumps(config, default=str).encode()
        widths[kind] = peft_model.get_prompt_embedding_to_save("default").shape[1]
        model = peft_model.unload() if hasattr(peft_model, "unload") else AutoModelForCausalLM.from_pretrained(model_dir)
    return configs, widths


# ----------------------------------------------------------------------------------------------
# 1. start-up: the real build_service in a fresh process


STARTUP_SCRIPT = """
import sys, time, json
t0 = time.perf_counter()
from server.config import load_config
from server.__main__ import build_service
def rss():
    return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) * 1024
config = load_config(sys.argv[1:])
t1 = time.perf_counter()
service = build_service(config)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "build_s": t2 - t1, "rss": rss(), "adapters": len(service.registry)}))
"""


def startup(model_dir: Path, store_dir: Path) -> dict:
    args = ["--model", str(model_dir), "--adapter-dir", str(store_dir), "--dtype", "float32", "--log-level", "error"]
    out = subprocess.run([sys.executable, "-c", STARTUP_SCRIPT, *args], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# 2. cold against warm time to first token


class _ForwardCounter:
    def __init__(self, model):
        self.count = 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.count += 1


def ttft(registry: AdapterRegistry, engine: Engine, names: list[str], prompt: list[int]) -> dict:
    """Per adapter: evicted then asked for (cold: read its saved prefix), then asked again (warm)."""
    params = SamplingParams(max_new_tokens=1)
    counter = _ForwardCounter(registry.model)
    cold, warm, forwards_in_cold = [], [], 0
    for name in names:
        registry.cache.drop(registry._entries[name].key)
        before = counter.count
        t = time.perf_counter()
        adapter = registry.get(name)
        forwards_in_cold += counter.count - before
        engine.generate(prompt, params, adapter)
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        engine.generate(prompt, params, registry.get(name))
        warm.append(time.perf_counter() - t)
    return {"cold_ms": statistics.median(cold) * 1e3, "warm_ms": statistics.median(warm) * 1e3,
            "materialization_forwards": forwards_in_cold}


# ----------------------------------------------------------------------------------------------
# 3. Zipf traffic over every adapter, a cache of 5% of them


def zipf_run(registry: AdapterRegistry, engine: Engine, names: list[str], requests: list[tuple[int, list[int]]],
             new_tokens: int) -> dict:
    """A loader thread resolves each request's adapter (loading cold ones) and submits it, as the
    server's request handlers do; this thread steps the engine. Samples the cache's bytes each step."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    seqs, most_bytes, done = [], 0, threading.Event()

    def submit_all():
        for index, prompt in requests:
            seqs.append(engine.submit(Sequence(prompt, params, registry.get(names[index]))))
        done.set()

    start = time.perf_counter()
    loader = threading.Thread(target=submit_all)
    loader.start()
    while not done.is_set() or engine.has_work():
        if engine.has_work():
            engine.step()
        else:
            time.sleep(0.0005)
        most_bytes = max(most_bytes, registry.cache.bytes)
    loader.join()
    wall = time.perf_counter() - start
    tokens = sum(len(s.output_ids) for s in seqs)
    return {"tokens_per_s": tokens / wall, "wall_s": wall, "most_cache_bytes": most_bytes}


def zipf_requests(count: int, adapters: int, vocab: int, seed: int = 0) -> list[tuple[int, list[int]]]:
    rng = random.Random(seed)
    weights = [1 / (rank + 1) ** 1.1 for rank in range(adapters)]
    picks = rng.choices(range(adapters), weights=weights, k=count)
    return [(p, [rng.randrange(3, vocab) for _ in range(rng.randint(16, 64))]) for p in picks]


def run_model(label: str, model_dir: Path, root: Path, counts: list[int], args) -> None:
    print(f"\n=== {label}: {model_dir.name if model_dir != DEMO_MODEL else 'the demo model'} ===", flush=True)
    largest = max(counts)
    t = time.perf_counter()
    stores = {}
    for count in counts:
        stores[count] = AdapterStore(root / f"store-{count}")
        write_adapters(stores[count], model_dir, count)
    print(f"wrote {sum(counts)} adapters in {time.perf_counter() - t:.1f} s")

    rows = {count: startup(model_dir, stores[count].root) for count in counts}
    print(f"{'stored adapters':>16}{'start-up s':>12}{'RSS MiB':>10}{'registered':>12}")
    for count, r in rows.items():
        print(f"{count:>16}{r['build_s']:>12.2f}{r['rss'] / 2**20:>10.0f}{r['adapters']:>12}")
    base0 = rows[min(counts)]
    extra_s, extra_mb = rows[largest]["build_s"] - base0["build_s"], (rows[largest]["rss"] - base0["rss"]) / 2**20
    print(f"  {largest} adapters add {extra_s:.2f} s and {extra_mb:.0f} MiB   goal <= 2 s and 300 MB   "
          f"{'PASS' if extra_s <= 2 and extra_mb <= 300 else 'MISS'}")

    base = load_base_model(str(model_dir), device=args.device, dtype="float32")
    key = model_key(str(model_dir), None, base.model.config.to_dict(), base.spec.dtype)
    store = stores[largest]
    registry = AdapterRegistry(base.spec, base.model, store, model_key=key)
    registry.load_store()
    names = registry.names()
    t = time.perf_counter()
    for name in names:  # the first use of each: materialized once, its prefix saved next to its files
        registry.get(name)
        registry.cache.drop(registry._entries[name].key)
    print(f"first materialization of all {len(names)} (prefix files saved): {time.perf_counter() - t:.1f} s")

    engine = Engine(base.model, base.tokenizer, base.spec)
    prompt = [random.Random(1).randrange(3, base.model.config.vocab_size) for _ in range(32)]
    prompt_tuned = [n for i, n in enumerate(names[:40]) if i % 2 == 0]
    engine.generate(prompt, SamplingParams(max_new_tokens=1))  # warm-up
    t = ttft(registry, engine, prompt_tuned, prompt)
    ok = t["cold_ms"] <= t["warm_ms"] + 30 and t["materialization_forwards"] == 0
    print(f"TTFT, one request at a time, {len(prompt_tuned)} prompt-tuning adapters: cold {t['cold_ms']:.1f} ms, "
          f"warm {t['warm_ms']:.1f} ms, model forwards in cold loads {t['materialization_forwards']}   "
          f"goal cold <= warm + 30 ms, no forward   {'PASS' if ok else 'MISS'}")

    prefix_bytes = registry.get(names[0]).prefix_bytes
    capacity = max(1, len(names) // 20) * prefix_bytes
    requests = zipf_requests(args.requests, len(names), base.model.config.vocab_size)
    results = {}
    for label_, cache_bytes in (("all resident", 1 << 62), ("cache of 5%", capacity)):
        registry = AdapterRegistry(base.spec, base.model, store, model_key=key, cache_bytes=cache_bytes)
        registry.load_store()
        if cache_bytes > capacity:
            for name in names:
                registry.get(name)
        engine = Engine(base.model, base.tokenizer, base.spec, max_batch_size=64)
        before = (registry.cache.hits, registry.cache.misses, registry.cache.evictions)
        results[label_] = {**zipf_run(registry, engine, names, requests, args.new_tokens),
                           "hits": registry.cache.hits - before[0], "misses": registry.cache.misses - before[1],
                           "evictions": registry.cache.evictions - before[2], "capacity": cache_bytes}
    print(f"{args.requests} requests x {args.new_tokens} tokens over {len(names)} adapters, Zipf(1.1) popularity:")
    print(f"{'cache':<14}{'tokens/s':>10}{'hits':>7}{'misses':>8}{'evictions':>11}{'most bytes':>12}{'bound':>12}")
    for label_, r in results.items():
        bound = "-" if r["capacity"] > 1 << 60 else str(r["capacity"])
        print(f"{label_:<14}{r['tokens_per_s']:>10.1f}{r['hits']:>7}{r['misses']:>8}{r['evictions']:>11}"
              f"{r['most_cache_bytes']:>12}{bound:>12}")
    ratio = results["cache of 5%"]["tokens_per_s"] / results["all resident"]["tokens_per_s"]
    within = results["cache of 5%"]["most_cache_bytes"] <= capacity
    print(f"  cache of 5% / all resident = {ratio:.2f}   goal >= 0.9   {'PASS' if ratio >= 0.9 else 'MISS'};"
          f"  resident bytes within the bound at every step: {'yes' if within else 'NO'}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.adapter_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, default=10000)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="1,000 adapters, the demo model only")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.adapters, args.requests = 1000, 64
    counts = sorted({0, min(1000, args.adapters), args.adapters})
    with quiet(), tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        root = Path(tmp)
        run_model("demo", DEMO_MODEL, root / "demo", counts, args)
        if not args.quick:
            bench_model = save_tiny_model(root / "bench-model", "llama", seed=0, hidden_size=512, num_layers=8)
            run_model("bench", bench_model, root / "bench", counts, args)


if __name__ == "__main__":
    main()
