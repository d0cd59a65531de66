"""The engine's decode throughput as a fraction of the memory roofline, at several batch sizes.

A decoding step reads every weight once and each request's keys and values once; at the batch sizes
a server runs, that traffic, not arithmetic, bounds the step. The roofline's step time is those
bytes over the memory's bandwidth; the fraction printed is that time over the step time measured
(1.0 would be a step that does nothing but stream its bytes at the memory's full speed).

    python -m bench.roofline                          # CUDA: a ~1B Llama (hidden 2048, 22 layers), bf16,
                                                      # batches 1, 16, 64 and 256
    python -m bench.roofline --device cpu --quick     # a small model on the CPU, measured bandwidth

The bandwidth: `--bandwidth GB/s`, else the datasheet's for a known GPU (H100 SXM 3,350, H100 PCIe
2,000, H200 4,800, A100 80GB 2,039, L4 300 GB/s), else measured here: the fastest of several
copies of a buffer far larger than the caches (bytes read plus bytes written, per second). The
model is random (a byte tokenizer, so the vocabulary and the lm_head are small), built from a
config and saved, then loaded as the server loads one. Every request has a prompt of `--prompt`
random tokens; each batch's requests are prefilled together, decoded `--warm-up` steps, then `--steps`
decoding steps are timed (sampling included: greedy), the engine's whole step.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from bench.process import quiet, torch_threads
from bench.timing import sync
from server.demo.tiny import save_tiny_model
from server.engine.cpu import linear as cpu_linear
from server.engine.engine import Engine
from server.engine.kv_cache import KVPool
from server.engine.request import SamplingParams, Sequence
from server.model import load_base_model

DATASHEET_GBS = {"H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800,
                 "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100-SXM4-40GB": 1555, "L4": 300}
LARGE = dict(hidden=2048, layers=22, intermediate=5632, heads=32, kv_heads=4)  # TinyLlama-1.1B's shape
QUICK = dict(hidden=256, layers=2, intermediate=688, heads=4, kv_heads=2, batches="1,4", steps=4, prompt=16)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    for name, value in LARGE.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    p.add_argument("--batches", default="1,16,64,256", help="comma-separated batch sizes")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--warm-up", type=int, default=3, help="decoding steps before the timed ones")
    p.add_argument("--steps", type=int, default=32, help="decoding steps timed per batch size")
    p.add_argument("--bandwidth", type=float, default=None, help="GB/s; default: the GPU's datasheet, else measured")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: as they are)")
    p.add_argument("--quick", action="store_true", help="a small model and batches, for a smoke run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    args.batches = [int(b) for b in str(args.batches).split(",")]
    return args


def bandwidth(device: torch.device, given: float | None) -> tuple[float, str]:
    """Bytes per second, and where the figure comes from."""
    if given:
        return given * 1e9, "given"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, gbs in DATASHEET_GBS.items():
            if key in name:
                return gbs * 1e9, f"datasheet ({name})"
    return measured_bandwidth(device), "measured (copies)"


def measured_bandwidth(device: torch.device, mib: int = 1024, tries: int = 5) -> float:
    """Bytes read plus written per second by the fastest of `tries` copies of a `mib` MiB buffer."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(tries):
        sync(device)
        began = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - began)
    return 2 * src.numel() * 4 / best


def weight_bytes(model) -> int:
    """Bytes a decoding step reads of the weights: every layer's and the lm_head's (packed ones too);
    the embedding table only in its few looked-up rows, left out."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    total = 0
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param is embed and module is not head:
                continue
            total += param.numel() * param.element_size()
        if cpu_linear.is_packed(module) and module.weight.numel() == 0:  # packed on CPU: the plain one freed
            total += module.in_features * module.out_features * module.weight.element_size()
    return total


def measure(engine: Engine, batch: int, args, rng: random.Random) -> dict:
    """Prefill `batch` requests (in one step), decode `--warm-up` steps, then time `--steps` steps in which
    every request decodes."""
    vocab = engine.vocab_size
    params = SamplingParams(max_new_tokens=args.warm_up + args.steps + 2, ignore_eos=True)
    seqs = [engine.submit(Sequence([rng.randrange(3, vocab) for _ in range(args.prompt)], params))
            for _ in range(batch)]
    while not all(len(s.output_ids) > args.warm_up for s in seqs):
        engine.step()
    device = engine.runner.spec.device
    kv_before = sum(s.segment.length for s in seqs)
    sync(device)
    began = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    sync(device)
    seconds = time.perf_counter() - began
    kv_after = sum(s.segment.length for s in seqs)
    for s in seqs:
        engine.abort(s)
    while engine.has_work():
        engine.step()
    return {"step_s": seconds / args.steps, "kv_slots_read": (kv_before + kv_after) / 2, "batch": batch}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    rng = random.Random(args.seed)
    with quiet(), torch_threads(args.threads), tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        model_dir = save_tiny_model(Path(tmp) / "model", "llama", seed=args.seed, hidden_size=args.hidden,
                                    num_layers=args.layers, intermediate_size=args.intermediate,
                                    num_attention_heads=args.heads, num_key_value_heads=args.kv_heads)
        base = load_base_model(str(model_dir), device=args.device, dtype=args.dtype)
        spec = base.spec
        slot = KVPool.slot_bytes(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype)
        most = max(args.batches)
        kv_bytes = most * (args.prompt + args.warm_up + args.steps + 2 + 64) * slot
        engine = Engine(base.model, base.tokenizer, spec, max_batch_size=most, max_waiting=most,
                        max_prefill_tokens=most * args.prompt, kv_cache_bytes=kv_bytes)  # one prefill step
        weights = weight_bytes(base.model)
        bytes_per_s, source = bandwidth(device, args.bandwidth)
        params = sum(p.numel() for p in base.model.parameters()) + sum(
            cpu_linear.weight_numel(m) - m.weight.numel() for m in base.model.modules() if cpu_linear.is_packed(m))
        print(f"model: Llama hidden {args.hidden}, {args.layers} layers, {params / 1e9:.2f} B parameters, "
              f"{spec.dtype}, on {device} ({time.perf_counter() - began:.0f} s to build and load)")
        print(f"weights read per step {weights / 1e9:.3f} GB; KV {slot} bytes per token; memory bandwidth "
              f"{bytes_per_s / 1e9:,.0f} GB/s, {source}")
        print(f"prompt {args.prompt} tokens per request; {args.steps} decoding steps timed after {args.warm_up}")
        print(f"{'batch':>6} {'step ms':>9} {'tokens/s':>10} {'weights GB':>11} {'KV GB':>8} {'GB/s':>8} {'roofline':>9}")
        rows = []
        for batch in args.batches:
            got = measure(engine, batch, args, rng)
            kv = (got["kv_slots_read"] + batch) * slot  # each request's keys and values read, its new ones written
            moved = weights + kv
            row = {**got, "tokens_per_s": batch / got["step_s"], "weights_gb": weights / 1e9, "kv_gb": kv / 1e9,
                   "achieved_gbs": moved / got["step_s"] / 1e9, "fraction": moved / bytes_per_s / got["step_s"]}
            rows.append(row)
            print(f"{batch:>6} {row['step_s'] * 1e3:>9.2f} {row['tokens_per_s']:>10,.0f} {row['weights_gb']:>11.3f} "
                  f"{row['kv_gb']:>8.3f} {row['achieved_gbs']:>8,.0f} {row['fraction']:>9.2f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
