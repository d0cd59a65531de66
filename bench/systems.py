"""The systems measured, each serving the world's requests with exactly `new_tokens` greedy tokens apiece.

  ours-mixed / ours-base   `run_ours`: this engine, with each request's adapter or with none
  peft-seq                 `run_peft_sequential`: load the request's adapter, `generate`, one at a time
  peft-group               `run_peft_grouped`: one left-padded `generate` per adapter
  hf-batch                 `run_hf_batch`: one left-padded `generate` of all requests, no adapters

`warm_up` runs each once on a tiny job; `time_systems` times them all in rounds, keeping each one's fastest run.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from bench.timing import Result, sync
from bench.workload import Request, World
from server.engine.engine import Engine
from server.engine.fast_path import FastPaths
from server.engine.kv_cache import DEFAULT_KV_CACHE_BYTES
from server.engine.request import SamplingParams, Sequence

# ----------------------------------------------------------------------------------------------
# Our engine


def run_ours(world: World, with_adapters: bool, requests: list[Request] | None = None, new_tokens: int | None = None,
             name: str = "", instrument=None, kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
             compile: bool = False, paths: FastPaths = FastPaths()) -> Result:
    requests = world.requests if requests is None else requests
    new_tokens = world.args.new_tokens if new_tokens is None else new_tokens
    base = world.base
    engine = Engine(base.model, base.tokenizer, base.spec, max_batch_size=len(requests),
                    max_waiting=max(256, len(requests)), max_prefill_tokens=world.args.max_prefill_tokens,
                    kv_cache_bytes=kv_cache_bytes, compile=compile, paths=paths)
    if instrument is not None:
        instrument(engine)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    sync(world.device)
    start = time.monotonic()
    seqs = [engine.submit(Sequence(list(r.prompt), params, world.adapters[r.adapter] if with_adapters else None))
            for r in requests]
    while engine.has_work():
        engine.step()
    sync(world.device)
    wall = time.monotonic() - start
    assert all(len(s.output_ids) == new_tokens for s in seqs), "a request did not make exactly new_tokens tokens"
    return Result(
        name, len(requests), sum(len(s.output_ids) for s in seqs), wall,
        {r.index: s.first_token_time - start for r, s in zip(requests, seqs)},
        {r.index: list(s.output_ids) for r, s in zip(requests, seqs)},
        extra={"steps": engine.stats["steps"], "prefill_tokens": engine.stats["prefill_tokens"],
               "preemptions": engine.scheduler.preemptions, "compactions": engine.runner.pool.compactions},
    )


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
    sync(device)
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
    sync(world.device)
    start = time.perf_counter()
    for r in requests:
        t0 = time.perf_counter()
        model = _load_peft(world, r.adapter)
        sync(world.device)
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
    sync(world.device)
    start = time.perf_counter()
    for adapter in sorted(groups):
        group = groups[adapter]
        t0 = time.perf_counter()
        model = _load_peft(world, adapter)
        sync(world.device)
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
    sync(world.device)
    start = time.perf_counter()
    gen, first = _hf_generate(world.model, [r.prompt for r in requests], new_tokens, world.device,
                              world.base.tokenizer.pad_token_id)
    wall = time.perf_counter() - start
    return Result("hf-batch", len(requests), len(requests) * new_tokens, wall,
                  {r.index: first - start for r in requests}, {r.index: g for r, g in zip(requests, gen)})


# ----------------------------------------------------------------------------------------------
# Warm-up and timed rounds


def warm_up(world: World) -> None:
    """Each system once, on a tiny run (2 requests, 2 tokens)."""
    tiny = world.requests[:2]
    run_ours(world, True, tiny, 2)
    run_ours(world, False, tiny, 2)
    run_peft_sequential(world, tiny[:1], 2)
    run_peft_grouped(world, tiny, 2)
    run_hf_batch(world, tiny, 2)


def time_systems(world: World) -> dict[str, Result]:
    """Every system, `--repeats` rounds over all of them; each keeps its fastest run. peft-seq is timed on
    the first `--peft-subset` requests."""
    subset = world.requests[: world.args.peft_subset]
    systems = {
        "ours-mixed": lambda: run_ours(world, True, name="ours-mixed"),
        "ours-base": lambda: run_ours(world, False, name="ours-base"),
        "peft-seq": lambda: run_peft_sequential(world, subset),
        "peft-group": lambda: run_peft_grouped(world),
        "hf-batch": lambda: run_hf_batch(world),
    }
    results: dict[str, Result] = {}
    for _ in range(world.args.repeats):
        for name, run in systems.items():
            res = run()
            if name not in results or res.wall_s < results[name].wall_s:
                results[name] = res
    return results
