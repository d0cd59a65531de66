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
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapters import AdapterRegistry
from server.demo.tiny import save_tiny_model
from server.engine.engine import Engine
from server.engine.request import SamplingParams, Sequence
from server.model import load_base_model

VARIANTS = ("prompt", "ptuning-mlp", "ptuning-lstm", "prefix", "prefix-proj")
PROMPT_KINDS = ("prompt",)  # variants whose TTFT is compared (PEFT re-runs their virtual tokens per request)
FIRST_ID = 3  # prompt token ids avoid <pad>, <s>, </s>
GOALS = {"base": 0.9, "peft-seq": 5.0, "peft-group": 2.0, "flops": 0.5}

QUICK = {"hidden": 128, "layers": 2, "requests": 8, "adapters": 4, "new_tokens": 8, "min_prompt": 8,
         "max_prompt": 32, "min_virtual": 4, "max_virtual": 12, "peft_subset": 4}


# ----------------------------------------------------------------------------------------------
# Set-up: model, adapters, requests


@dataclass
class Request:
    index: int
    prompt: list[int]
    adapter: int  # index into World.adapter_dirs


@dataclass
class World:
    args: argparse.Namespace
    model_dir: Path
    base: object  # server.model.BaseModel
    adapter_dirs: list[Path]
    variants: list[str]  # per adapter
    virtual: list[int]  # per adapter: num_virtual_tokens
    adapters: list  # per adapter: the registry's materialized Adapter
    requests: list[Request]
    load_s: float = 0.0  # time to register all adapters with the AdapterRegistry

    @property
    def model(self):
        return self.base.model

    @property
    def device(self) -> torch.device:
        return self.base.spec.device


def peft_config(variant: str, n: int, hidden: int):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    enc = max(32, hidden // 4)
    if variant == "prompt":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)
    if variant == "ptuning-mlp":
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, encoder_hidden_size=enc)
    if variant == "ptuning-lstm":
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, encoder_hidden_size=enc,
                                   encoder_reparameterization_type="LSTM")
    if variant == "prefix":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)
    if variant == "prefix-proj":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, prefix_projection=True,
                                  encoder_hidden_size=enc)
    raise ValueError(variant)


def build_world(args, root: Path) -> World:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model_dir = root / "model"
    save_tiny_model(model_dir, "llama", seed=args.seed, hidden_size=args.hidden, num_layers=args.layers)
    rng = random.Random(args.seed)
    variants = [VARIANTS[i % len(VARIANTS)] for i in range(args.adapters)]
    virtual = [rng.randint(args.min_virtual, args.max_virtual) for _ in range(args.adapters)]
    trainer_base = AutoModelForCausalLM.from_pretrained(model_dir)  # float32, as training would save
    adapter_dirs = []
    for i, (variant, n) in enumerate(zip(variants, virtual)):
        torch.manual_seed(args.seed + 1000 + i)
        peft = get_peft_model(trainer_base, peft_config(variant, n, args.hidden))
        with torch.no_grad():
            for param in peft.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.5)
        out = root / "adapters" / f"a{i:02d}-{variant}"
        peft.save_pretrained(out)
        adapter_dirs.append(out)
    del trainer_base

    base = load_base_model(str(model_dir), device=args.device, dtype=args.dtype)
    registry = AdapterRegistry(base.spec, base.model)
    t = time.perf_counter()
    adapters = [registry.add_dir(d.name, d, source="bench") for d in adapter_dirs]
    load_s = time.perf_counter() - t

    vocab = base.model.config.vocab_size
    requests = [
        Request(i, [rng.randrange(FIRST_ID, vocab) for _ in range(rng.randint(args.min_prompt, args.max_prompt))],
                i % args.adapters)
        for i in range(args.requests)
    ]
    return World(args, model_dir, base, adapter_dirs, variants, virtual, adapters, requests, load_s)


# ----------------------------------------------------------------------------------------------
# Results


@dataclass
class Result:
    name: str
    requests: int
    tokens: int  # generated
    wall_s: float
    ttft_s: dict[int, float]  # request index -> time from the run's start to its first token
    outputs: dict[int, list[int]] = field(default_factory=dict)  # request index -> generated ids
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def mean_ttft(self) -> float:
        return statistics.mean(self.ttft_s.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# Our engine


def run_ours(world: World, with_adapters: bool, requests: list[Request] | None = None, new_tokens: int | None = None,
             name: str = "", instrument=None) -> Result:
    requests = world.requests if requests is None else requests
    new_tokens = world.args.new_tokens if new_tokens is None else new_tokens
    base = world.base
    engine = Engine(base.model, base.tokenizer, base.spec, max_batch_size=len(requests),
                    max_waiting=max(256, len(requests)), max_prefill_tokens=world.args.max_prefill_tokens)
    if instrument is not None:
        instrument(engine)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    _sync(world.device)
    start = time.monotonic()
    seqs = [engine.submit(Sequence(list(r.prompt), params, world.adapters[r.adapter] if with_adapters else None))
            for r in requests]
    while engine.has_work():
        engine.step()
    _sync(world.device)
    wall = time.monotonic() - start
    assert all(len(s.output_ids) == new_tokens for s in seqs), "a request did not make exactly new_tokens tokens"
    return Result(
        name, len(requests), sum(len(s.output_ids) for s in seqs), wall,
        {r.index: s.first_token_time - start for r, s in zip(requests, seqs)},
        {r.index: list(s.output_ids) for r, s in zip(requests, seqs)},
        extra={"steps": engine.stats["steps"], "prefill_tokens": engine.stats["prefill_tokens"]},
    )


def isolated_ttft(world: World, requests: list[Request], tries: int = 5) -> tuple[dict[int, float], dict[int, float]]:
    """Each request alone on an idle system, ours (a fresh engine) and PEFT (load its adapter, then
    generate), alternating; the best of `tries` each. Returns (ours, peft) request index -> seconds."""
    ours, peft = {}, {}
    for r in requests:
        for _ in range(tries):
            o = run_ours(world, True, [r], new_tokens=1).ttft_s[r.index]
            p = run_peft_sequential(world, [r], new_tokens=1).extra["isolated_ttft"][r.index]
            ours[r.index] = min(o, ours.get(r.index, o))
            peft[r.index] = min(p, peft.get(r.index, p))
    return ours, peft


# ----------------------------------------------------------------------------------------------
# Hugging Face / PEFT baselines


class _FirstToken:
    """A `generate` streamer noting when the first generated token arrives (the 1st put is the prompt)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.puts = 0
        self.first: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def _left_padded(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    return ids.to(device), mask.to(device)


def _hf_generate(model, prompts: list[list[int]], new_tokens: int, device, pad: int) -> tuple[list[list[int]], float]:
    """Greedy, exactly `new_tokens` per row; returns the generated ids and the first token's time."""
    ids, mask = _left_padded(prompts, pad, device)
    streamer = _FirstToken(device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad, streamer=streamer)
    _sync(device)
    gen = out[:, ids.shape[1]:].tolist()
    assert all(len(g) == new_tokens for g in gen), "generate did not make exactly new_tokens tokens"
    return gen, streamer.first


def _load_peft(world: World, adapter: int):
    from peft import PeftModel

    model = PeftModel.from_pretrained(world.model, world.adapter_dirs[adapter])
    return model.to(world.device, world.base.spec.dtype).eval()


def run_peft_sequential(world: World, requests: list[Request], new_tokens: int | None = None) -> Result:
    """One request at a time; each loads its adapter (PeftModel.from_pretrained) before generating."""
    new_tokens = world.args.new_tokens if new_tokens is None else new_tokens
    pad = world.base.tokenizer.pad_token_id
    ttft, isolated, outputs, durations, load_s = {}, {}, {}, [], 0.0
    _sync(world.device)
    start = time.perf_counter()
    for r in requests:
        t0 = time.perf_counter()
        model = _load_peft(world, r.adapter)
        _sync(world.device)
        load_s += time.perf_counter() - t0
        gen, first = _hf_generate(model, [r.prompt], new_tokens, world.device, pad)
        t1 = time.perf_counter()
        outputs[r.index] = gen[0]
        ttft[r.index] = first - start
        isolated[r.index] = first - t0
        durations.append(t1 - t0)
    wall = time.perf_counter() - start
    return Result("peft-seq", len(requests), len(requests) * new_tokens, wall, ttft, outputs,
                  extra={"isolated_ttft": isolated, "durations": durations, "load_s": load_s})


def run_peft_grouped(world: World, requests: list[Request] | None = None, new_tokens: int | None = None) -> Result:
    """Requests grouped by adapter; one left-padded batched generate per adapter, adapters in order."""
    requests = world.requests if requests is None else requests
    new_tokens = world.args.new_tokens if new_tokens is None else new_tokens
    pad = world.base.tokenizer.pad_token_id
    groups: dict[int, list[Request]] = defaultdict(list)
    for r in requests:
        groups[r.adapter].append(r)
    ttft, outputs, load_s = {}, {}, 0.0
    _sync(world.device)
    start = time.perf_counter()
    for adapter in sorted(groups):
        group = groups[adapter]
        t0 = time.perf_counter()
        model = _load_peft(world, adapter)
        _sync(world.device)
        load_s += time.perf_counter() - t0
        gen, first = _hf_generate(model, [r.prompt for r in group], new_tokens, world.device, pad)
        for r, g in zip(group, gen):
            outputs[r.index] = g
            ttft[r.index] = first - start
    wall = time.perf_counter() - start
    return Result("peft-group", len(requests), len(requests) * new_tokens, wall, ttft, outputs,
                  extra={"load_s": load_s, "groups": len(groups)})


def run_hf_batch(world: World, requests: list[Request] | None = None, new_tokens: int | None = None) -> Result:
    requests = world.requests if requests is None else requests
    new_tokens = world.args.new_tokens if new_tokens is None else new_tokens
    _sync(world.device)
    start = time.perf_counter()
    gen, first = _hf_generate(world.model, [r.prompt for r in requests], new_tokens, world.device,
                              world.base.tokenizer.pad_token_id)
    wall = time.perf_counter() - start
    return Result("hf-batch", len(requests), len(requests) * new_tokens, wall,
                  {r.index: first - start for r in requests}, {r.index: g for r, g in zip(requests, gen)})


# ----------------------------------------------------------------------------------------------
# FLOPs: the model's work and this machine's matmul ceiling


def linear_shapes(model) -> list[tuple[str, int, int, int]]:
    """(name, in_features, out_features, count per token) of the decoder layers' linear maps."""
    counts: dict[tuple[str, int, int], int] = defaultdict(int)
    for layer in model.model.layers:
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                counts[(name.split(".")[-1], mod.in_features, mod.out_features)] += 1
    return [(n, i, o, c) for (n, i, o), c in counts.items()]


def layer_params(model) -> int:
    return sum(p.numel() for layer in model.model.layers for p in layer.parameters())


def model_flops(world: World, with_adapters: bool) -> dict[str, float]:
    """Useful FLOPs of serving the requests: no padding, virtual tokens not re-run (their K/V are cached).

    linear:    2 * decoder-layer parameters per processed token (prompt tokens + generated tokens but
               the last, which is sampled and never fed back)
    lm_head:   2 * hidden * vocab per sampled token (the engine keeps one row of logits per step)
    attention: 4 * hidden * context per layer per processed token (Q.K^T and P.V over the keys the token
               sees: its prefix, the prompt and generated tokens before it, and itself)
    """
    model, args = world.model, world.args
    cfg = model.config
    hidden, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    q_width = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads)
    p_layers = layer_params(model)
    processed = linear = attention = 0
    for r in world.requests:
        prefix = world.virtual[r.adapter] if with_adapters else 0
        steps = len(r.prompt) + args.new_tokens - 1
        processed += steps
        # token j (0-based among prompt + fed-back tokens) sees prefix + j + 1 keys
        context = steps * prefix + steps * (steps + 1) // 2
        attention += 4 * q_width * context * layers
    linear = 2 * p_layers * processed
    lm_head = 2 * hidden * vocab * len(world.requests) * args.new_tokens
    return {"linear": linear, "lm_head": lm_head, "attention": attention, "total": linear + lm_head + attention,
            "processed_tokens": processed, "simple": 2 * (p_layers + hidden * vocab) * processed}


def _time_linear(m: int, k: int, n: int, device, dtype, repeats: int) -> float:
    """Best seconds per F.linear([m, k] x [n, k]^T) call, over `repeats` timed loops."""
    x = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype)
    f = torch.nn.functional.linear
    with torch.inference_mode():
        for _ in range(3):
            f(x, w)
        _sync(device)
        t = time.perf_counter()
        f(x, w)
        _sync(device)
        once = max(time.perf_counter() - t, 1e-7)
        iters = max(1, min(1000, int(0.03 / once)))
        best = float("inf")
        for _ in range(repeats):
            _sync(device)
            t = time.perf_counter()
            for _ in range(iters):
                f(x, w)
            _sync(device)
            best = min(best, (time.perf_counter() - t) / iters)
    return best


def matmul_ceiling(world: World, batch: int, repeats: int = 5) -> dict:
    """FLOP/s of the model's linear shapes at `batch` rows: per shape, and for one whole forward
    (total FLOPs / total best times, lm_head included)."""
    model = world.model
    cfg = model.config
    shapes = linear_shapes(model) + [("lm_head", cfg.hidden_size, cfg.vocab_size, 1)]
    per_shape, total_flops, total_time = {}, 0.0, 0.0
    for name, k, n, count in shapes:
        best = _time_linear(batch, k, n, world.device, world.base.spec.dtype, repeats)
        flops = 2 * batch * k * n
        per_shape[f"{name} [{batch}x{k}]x[{k}x{n}]"] = flops / best
        total_flops += flops * count
        total_time += best * count
    return {"per_shape": per_shape, "flops_per_s": total_flops / total_time, "batch": batch}


# ----------------------------------------------------------------------------------------------
# Profile of the engine (--profile): where a step's time goes


class _Timers:
    def __init__(self, device: torch.device):
        self.device = device
        self.acc: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, obj, attr: str, name: str):
        """Replace `obj.attr` by a version that adds its wall time (device synced) to `name`."""
        fn = getattr(obj, attr)

        def timed(*a, **k):
            _sync(self.device)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                _sync(self.device)
                self.acc[name] += time.perf_counter() - t
                self.calls[name] += 1

        setattr(obj, attr, timed)


def profile_engine(world: World) -> None:
    """Re-run ours-mixed twice more: once with per-phase timers, once under torch.profiler."""
    from server.engine import attention

    timers = _Timers(world.device)
    shape = defaultdict(int)  # work done, independent of timing noise

    def count_structure(runner):
        forward = runner._forward

        def counted_forward(batch, tokens):
            shape["forwards"] += 1
            shape["tokens fed (prompts + fed-back)"] += sum(len(t) for t in tokens)
            shape["largest forward (tokens)"] = max(shape["largest forward (tokens)"], sum(len(t) for t in tokens))
            shape["keys attended (sum over forwards and requests)"] += sum(
                row.segment.length + len(t) for row, t in zip(batch, tokens))
            out = forward(batch, tokens)
            shape["largest pool (slots)"] = max(shape["largest pool (slots)"], runner.pool.slots)
            shape["largest pool bytes"] = max(shape["largest pool bytes"], runner.pool.nbytes())
            shape["most slots held"] = max(shape["most slots held"], runner.pool.held)
            return out

        runner._forward = counted_forward

    def instrument(engine):
        runner = engine.runner
        count_structure(runner)
        timers.wrap(engine.scheduler, "schedule", "scheduler.schedule")
        timers.wrap(engine, "_deliver", "engine._deliver (detokenize, finish checks)")
        timers.wrap(runner, "run", "runner.run")
        timers.wrap(runner, "_release", "runner.run.release (free segments)")
        timers.wrap(runner, "_admit", "runner.run.admit (allocate, copy prefix)")
        timers.wrap(runner, "_forward", "runner.run.model forward")
        timers.wrap(runner, "_sample", "runner.run.sample")
        attention.install(runner.model)  # registers the wrapped attention below

    originals = {name: getattr(attention, name) for name in ("ragged_attention", "_per_request", "_varlen")}
    timers.wrap(attention, "ragged_attention", "runner.run.model forward.attention (KV write + attend)")
    timers.wrap(attention, "_per_request", "runner.run.model forward.attention.attend")
    timers.wrap(attention, "_varlen", "runner.run.model forward.attention.attend")
    try:
        res = run_ours(world, True, name="ours-mixed (timed phases)", instrument=instrument)
    finally:
        for name, fn in originals.items():
            setattr(attention, name, fn)
        attention.install(world.model)

    wall = res.wall_s
    print(f"\n== Profile of ours-mixed: {res.extra['steps']} steps, wall {wall:.2f} s with timers "
          f"(timers add a little overhead) ==")
    acc = timers.acc
    rows = list(acc.items())
    rows.append(("engine loop rest (submit, step bookkeeping)", wall - acc["runner.run"] - acc["scheduler.schedule"]
                 - acc["engine._deliver (detokenize, finish checks)"]))
    rows.append(("runner.run.other (building inputs, python)", acc["runner.run"] - sum(
        v for k, v in acc.items() if k.startswith("runner.run.") and k.count(".") == 2)))
    print(f"  {'phase':62s} {'seconds':>8s} {'share':>7s} {'calls':>6s}")
    for k, v in sorted(rows, key=lambda kv: kv[0]):
        print(f"  {k:62s} {v:8.3f} {v / wall:7.1%} {timers.calls.get(k, ''):>6}")

    print("\n  work done (independent of timing noise):")
    for k, v in shape.items():
        print(f"  {k:62s} {v / 1e6:10.1f} MB" if "bytes" in k else f"  {k:62s} {v:10d}")
    print("  attention reads exactly each request's prefix + prompt + generated keys: no padding anywhere")

    # torch.profiler: which ops the forwards spend their time in
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if world.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        res2 = run_ours(world, True, name="ours-mixed (torch.profiler)")
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events) / 1e6
    print(f"\n  torch.profiler (wall {res2.wall_s:.2f} s under the profiler; sum of op self-CPU time "
          f"{total_self:.2f} s): top ops by self CPU time")
    print(f"  {'op':44s} {'self s':>8s} {'share':>7s} {'calls':>8s}")
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:18]:
        s = e.self_cpu_time_total / 1e6
        print(f"  {e.key[:44]:44s} {s:8.3f} {s / total_self:7.1%} {e.count:8d}")
    buckets = defaultdict(float)
    for e in events:
        key = e.key
        s = e.self_cpu_time_total / 1e6
        if key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
            buckets["matmul (linear layers, lm_head)"] += s
        elif "scaled_dot_product" in key or "flash_attention" in key or key in ("aten::_softmax", "aten::baddbmm"):
            buckets["attention kernels (sdpa)"] += s
        elif key in ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::index_put_",
                     "aten::_index_put_impl_", "aten::fill_", "aten::zero_", "aten::zeros", "aten::empty_like"):
            buckets["copies / fills (KV writes, cat, contiguous, masks)"] += s
        else:
            buckets["other ops (norms, rope, act, views, indexing, sampling)"] += s
    for k, v in sorted(buckets.items(), key=lambda kv: -kv[1]):
        print(f"  {k:56s} {v:8.3f} {v / total_self:7.1%}")


# ----------------------------------------------------------------------------------------------
# Report


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
    with _quiet(), _threads(args.threads):
        run_start = time.perf_counter()
        load_before = os.getloadavg()
        with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
            root = args.workdir or Path(tmp)
            t = time.perf_counter()
            world = build_world(args, root)
            setup_s = time.perf_counter() - t
            return _run(world, args, run_start, setup_s, load_before)


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _quiet():
    from transformers.utils import logging as hf_logging

    loggers = {name: logging.getLogger(name) for name in ("transformers", "peft", "server", "adapters")}
    levels = {name: lg.level for name, lg in loggers.items()}
    hf_verbosity, hf_bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers.values():
            lg.setLevel(logging.ERROR)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            hf_logging.set_verbosity(hf_verbosity)
            if hf_bars:
                hf_logging.enable_progress_bar()
            for name, lg in loggers.items():
                lg.setLevel(levels[name])


def _run(world: World, args, run_start: float, setup_s: float, load_before) -> dict:
    reqs = world.requests
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

    # Warm-up: each system once, on a tiny run (2 requests, 2 tokens)
    tiny = reqs[:2]
    run_ours(world, True, tiny, 2)
    run_ours(world, False, tiny, 2)
    run_peft_sequential(world, tiny[:1], 2)
    run_peft_grouped(world, tiny, 2)
    run_hf_batch(world, tiny, 2)

    subset = reqs[: args.peft_subset]
    systems = {
        "ours-mixed": lambda: run_ours(world, True, name="ours-mixed"),
        "ours-base": lambda: run_ours(world, False, name="ours-base"),
        "peft-seq": lambda: run_peft_sequential(world, subset),
        "peft-group": lambda: run_peft_grouped(world),
        "hf-batch": lambda: run_hf_batch(world),
    }
    results: dict[str, Result] = {}
    for _ in range(args.repeats):  # rounds over all systems; each keeps its fastest run
        for name, run in systems.items():
            res = run()
            if name not in results or res.wall_s < results[name].wall_s:
                results[name] = res

    mixed = results["ours-mixed"]
    seq = results["peft-seq"]
    # Under load, every request arrives at t=0; for peft-seq timed on a subset, request k of N waits for the
    # k before it: mean TTFT over all N = mean request duration * (N - 1) / 2 + mean isolated TTFT.
    seq_durations = seq.extra["durations"]
    seq_isolated = seq.extra["isolated_ttft"]
    seq_ttft_all = statistics.mean(seq_durations) * (len(reqs) - 1) / 2 + statistics.mean(seq_isolated.values())

    if args.repeats > 1:
        print(f"each system timed {args.repeats} times; its fastest run is shown")
    print(f"\n{'system':12s} {'requests':>8s} {'tokens':>7s} {'wall s':>8s} {'tokens/s':>9s} {'mean TTFT s':>12s} "
          f"{'mixed/this':>10s}  notes")
    notes = {
        "ours-mixed": f"{mixed.extra['steps']} steps, each request with its adapter",
        "ours-base": "no adapters (ceiling)",
        "peft-seq": (f"timed on {len(subset)} of {len(reqs)} requests; incl. {seq.extra['load_s']:.2f} s loading "
                     f"adapters; TTFT est. for all {len(reqs)} queued"),
        "peft-group": f"{results['peft-group'].extra['groups']} adapter groups; incl. "
                      f"{results['peft-group'].extra['load_s']:.2f} s loading adapters",
        "hf-batch": "no adapters, one left-padded batch",
    }
    for name, res in results.items():
        ttft = seq_ttft_all if name == "peft-seq" else res.mean_ttft
        ratio = mixed.tokens_per_s / res.tokens_per_s
        print(f"{name:12s} {res.requests:8d} {res.tokens:7d} {res.wall_s:8.2f} {res.tokens_per_s:9.1f} "
              f"{ttft:12.3f} {ratio:10.2f}  {notes[name]}")

    # TTFT of prompt-tuning requests
    prompt_reqs = [r for r in reqs if world.variants[r.adapter] in PROMPT_KINDS]
    prompt_subset = [r for r in subset if world.variants[r.adapter] in PROMPT_KINDS]
    ours_iso, peft_iso = isolated_ttft(world, prompt_subset) if prompt_subset else ({}, {})
    ttft_rows = []
    if prompt_reqs:
        under_load_ours = statistics.mean(mixed.ttft_s[r.index] for r in prompt_reqs)
        under_load_group = statistics.mean(results["peft-group"].ttft_s[r.index] for r in prompt_reqs)
        ttft_rows.append(("all arrive at t=0: ours-mixed vs peft-group (measured)", under_load_ours, under_load_group))
        ttft_rows.append(("all arrive at t=0: ours-mixed vs peft-seq (est. from subset)", under_load_ours, seq_ttft_all))
    if prompt_subset:
        ttft_rows.append((f"alone on an idle system, best of 5: ours vs PEFT (load + generate), {len(prompt_subset)} req.",
                          statistics.mean(ours_iso.values()), statistics.mean(peft_iso.values())))

    # FLOPs
    flops = model_flops(world, True)
    ceiling = matmul_ceiling(world, len(reqs))
    prefill_batch = min(args.max_prefill_tokens, sum(len(r.prompt) for r in reqs))
    ceiling_prefill = matmul_ceiling(world, prefill_batch, repeats=3)
    achieved = flops["total"] / mixed.wall_s
    achieved_simple = flops["simple"] / mixed.wall_s
    decode_tokens = len(reqs) * (args.new_tokens - 1)
    prompt_tokens = flops["processed_tokens"] - decode_tokens
    # the best a perfect engine could do: prompt tokens at the prefill-shape rate, the rest at the decode-shape rate
    per_token = flops["total"] / flops["processed_tokens"]
    mix_time = prompt_tokens * per_token / ceiling_prefill["flops_per_s"] + decode_tokens * per_token / ceiling["flops_per_s"]
    mix_ceiling = flops["total"] / mix_time

    print("\nratios (ours-mixed tokens/s over the other's):")
    r_base = mixed.tokens_per_s / results["ours-base"].tokens_per_s
    r_seq = mixed.tokens_per_s / seq.tokens_per_s
    r_group = mixed.tokens_per_s / results["peft-group"].tokens_per_s
    r_hf = mixed.tokens_per_s / results["hf-batch"].tokens_per_s
    print(f"  mixed / (a) ours-base   {r_base:7.2f}   goal >= {GOALS['base']}   {_verdict(r_base, GOALS['base'])}")
    print(f"  mixed / (b) peft-seq    {r_seq:7.2f}   goal >= {GOALS['peft-seq']}   {_verdict(r_seq, GOALS['peft-seq'])}")
    print(f"  mixed / (c) peft-group  {r_group:7.2f}   goal >= {GOALS['peft-group']}   "
          f"{_verdict(r_group, GOALS['peft-group'])}")
    print(f"  mixed / (d) hf-batch    {r_hf:7.2f}   (reference; ours-base / hf-batch = "
          f"{results['ours-base'].tokens_per_s / results['hf-batch'].tokens_per_s:.2f}, should be > 1)")

    print(f"\nTTFT of prompt-tuning requests ({len(prompt_reqs)} of them; goal: ours lower):")
    for label, ours_v, peft_v in ttft_rows:
        print(f"  {label:72s} {ours_v:8.3f} s vs {peft_v:8.3f} s  {_verdict(ours_v, peft_v, higher=False)}")

    print("\nmodel FLOP/s of ours-mixed (useful work: no padding; virtual tokens not re-run):")
    print(f"  counted: linear 2*{layer_params(world.model) / 1e6:.2f}M params x {flops['processed_tokens']} processed "
          f"tokens ({prompt_tokens} prompt + {decode_tokens} fed-back) = {flops['linear'] / 1e9:.1f} GFLOP; "
          f"lm_head on {len(reqs) * args.new_tokens} sampled tokens = {flops['lm_head'] / 1e9:.1f} GFLOP; "
          f"attention over real context = {flops['attention'] / 1e9:.1f} GFLOP")
    print(f"  achieved {_fmt_rate(achieved)}  (2 x non-embedding params x processed tokens alone: "
          f"{_fmt_rate(achieved_simple)})")
    print(f"  matmul ceiling at the decode shapes (batch {len(reqs)}): {_fmt_rate(ceiling['flops_per_s'])}; per shape: "
          + ", ".join(f"{k} {v / 1e9:.1f}G" for k, v in ceiling["per_shape"].items()))
    print(f"  matmul at the prefill shapes (batch {prefill_batch}): {_fmt_rate(ceiling_prefill['flops_per_s'])}; "
          f"token-mix ceiling (prompt tokens at that rate, decode at batch {len(reqs)}): {_fmt_rate(mix_ceiling)}")
    frac = achieved / ceiling["flops_per_s"]
    print(f"  achieved / decode-shape ceiling = {frac:.2f}   goal >= {GOALS['flops']}   {_verdict(frac, GOALS['flops'])}"
          f";  achieved / token-mix ceiling = {achieved / mix_ceiling:.2f}")

    same, n, pre = agreement(mixed.outputs, seq.outputs)
    same_b, n_b, pre_b = agreement(results["ours-base"].outputs, results["hf-batch"].outputs)
    print(f"\ngreedy agreement (sanity): ours-mixed vs peft-seq {same}/{n} requests identical "
          f"(mean common prefix {pre:.0%}); ours-base vs hf-batch {same_b}/{n_b} ({pre_b:.0%}) "
          f"[left padding and batch shapes change float rounding; ties on a random model can diverge]")
    load_after = os.getloadavg()
    total = time.perf_counter() - run_start
    print(f"load average at start {load_before[0]:.2f}, at end {load_after[0]:.2f} ({os.cpu_count()} CPUs); "
          f"whole run {total:.1f} s")

    if args.profile:
        profile_engine(world)

    return {
        "results": {k: {"tokens_per_s": v.tokens_per_s, "wall_s": v.wall_s, "tokens": v.tokens,
                        "mean_ttft_s": seq_ttft_all if k == "peft-seq" else v.mean_ttft} for k, v in results.items()},
        "ratios": {"base": r_base, "peft-seq": r_seq, "peft-group": r_group, "hf-batch": r_hf},
        "ttft_prompt": [{"what": a, "ours_s": b, "peft_s": c} for a, b, c in ttft_rows],
        "flops": {"achieved": achieved, "ceiling": ceiling["flops_per_s"], "fraction": frac,
                  "token_mix_ceiling": mix_ceiling},
        "agreement": {"mixed_vs_peft_seq": (same, n), "base_vs_hf_batch": (same_b, n_b)},
        "wall_s": total,
    }


if __name__ == "__main__":
    main()
