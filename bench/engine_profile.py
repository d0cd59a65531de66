"""Where the engine's time goes (`--profile`): ours-mixed re-run with timers around its phases and counts
of the work done, then once more under torch.profiler, printing the top ops and their share by kind.

Named `engine_profile`, not `profile`, so that it never shadows the standard library's `profile`.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from bench.systems import run_ours
from bench.timing import sync
from bench.workload import World


class _Timers:
    def __init__(self, device: torch.device):
        self.device = device
        self.acc: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, obj, attr: str, name: str):
        """Replace `obj.attr` by a version that adds its wall time (device synced) to `name`."""
        fn = getattr(obj, attr)

        def timed(*a, **k):
            sync(self.device)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync(self.device)
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

        def counted_forward(batch, tokens, sampling):
            shape["forwards"] += 1
            shape["tokens fed (prompts + fed-back)"] += sum(len(t) for t in tokens)
            shape["largest forward (tokens)"] = max(shape["largest forward (tokens)"], sum(len(t) for t in tokens))
            shape["keys attended (sum over forwards and requests)"] += sum(
                seq.prefix_length + seq.segment.length + len(t) for seq, t in zip(batch, tokens))
            out = forward(batch, tokens, sampling)
            shape["pool (slots)"] = runner.pool.slots
            shape["most slots held"] = max(shape["most slots held"], runner.pool.held)
            shape["most slots written"] = max(shape["most slots written"], runner.pool.written)
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

    originals = {name: getattr(attention, name) for name in ("attend", "_per_request", "_varlen")}
    timers.wrap(attention, "attend", "runner.run.model forward.attention (KV write + attend)")
    timers.wrap(attention, "_per_request", "runner.run.model forward.attention.attend")
    timers.wrap(attention, "_varlen", "runner.run.model forward.attention.attend")
    try:
        res = run_ours(world, True, name="ours-mixed (timed phases)", instrument=instrument)
    finally:
        for name, fn in originals.items():
            setattr(attention, name, fn)

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
