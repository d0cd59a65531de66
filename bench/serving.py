"""What the serving path costs: the same workload through the HTTP server and through the engine
in-process, in one run, alternating, on the peer benchmark's model, adapters and prompts.

    python -m bench.serving                       # 64 requests, 64 new tokens, fp32, 3 rounds
    python -m bench.serving --dtype bfloat16 --repeats 2
    python -m bench.serving --cpus 0-14 --client-cpus 15     # the client off the server's cores

Over HTTP: `/v1/completions` with `stream=true` (`bench.peer`'s client, all requests at once).
By default the client runs on the same cores as the server, so it is also told where the CPU went
during the HTTP rounds: the server's event loop (its main thread: routes, SSE chunks, sockets), the
server's other threads (the engine and torch's), and the client itself. `--client-cpus` puts the
client on CPUs of its own, as a production client on another machine would be: then only the
server's own cost stands between the two figures.

In-process: the same prompts (tokenized as the server does), `SamplingParams` and adapters
submitted to an `Engine` at once and stepped to the end on this thread. Both runs generate
exactly `--new-tokens` per request (`ignore_eos`). The best of the rounds is kept for each, and
each round's own HTTP / in-process ratio is printed with their median: the machine's speed drifts
between rounds, and a round's two runs are close in time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import astuple, dataclass, replace
from pathlib import Path

import torch

from bench.peer import Run, build_setup, make_server, measure, warm_up
from bench.peer import parse_args as peer_args
from server.config import parse_cpu_threads


@dataclass
class Steps:
    """The engine's steps over some span: how many, their wall time, the model's forward's part of it,
    and the span's wall time (the timed runs'), of which the steps are the busy part."""

    steps: float = 0.0
    seconds: float = 0.0
    forward: float = 0.0
    wall: float = 0.0

    def __add__(self, other: "Steps") -> "Steps":
        return Steps(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def __sub__(self, other: "Steps") -> "Steps":
        return Steps(*(a - b for a, b in zip(astuple(self), astuple(other))))

    def describe(self) -> str:
        n = max(self.steps, 1)
        return (f"{self.steps:5.0f} steps, {1e3 * self.seconds / n:5.1f} ms each (forward {1e3 * self.forward / n:5.1f}, "
                f"the rest {1e3 * (self.seconds - self.forward) / n:4.1f}); stepping {self.seconds / self.wall:6.1%} "
                f"of the runs' {self.wall:.1f} s")

    @classmethod
    def of(cls, engine) -> "Steps":
        return cls(engine.stats["steps"], engine.stats["step_seconds"], engine.stats["forward_seconds"])

    @classmethod
    def scrape(cls, url: str) -> "Steps":
        """The same from a server's /metrics."""
        import httpx

        text = httpx.get(url + "/metrics", timeout=30).text
        value = lambda name: float(re.search(rf"^softprompt_{name} (\S+)$", text, re.M).group(1))
        return cls(value("engine_steps_total"), value("engine_step_seconds_total"),
                   value("engine_forward_seconds_total"))


def in_process(setup, args, dtype: str, workload: str) -> tuple[float, Steps]:
    """tokens/s of the engine alone on a workload ('base' or 'mixed'), every request submitted at once,
    and its steps."""
    from adapters import AdapterRegistry, AdapterStore
    from server.engine.engine import Engine
    from server.engine.request import SamplingParams, Sequence
    from server.model import load_base_model

    base = load_base_model(str(setup.model_dir), device="cpu", dtype=dtype)
    registry = AdapterRegistry(base.spec, base.model, AdapterStore(setup.adapter_dir))
    registry.load_store()
    engine = Engine(base.model, base.tokenizer, base.spec, max_batch_size=max(64, args.requests),
                    max_waiting=max(256, 2 * args.requests))
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    prompts = [base.tokenizer(p, add_special_tokens=True).input_ids for p in setup.prompts]

    def adapter(i):
        return registry.get(setup.adapters[i % len(setup.adapters)]) if workload == "mixed" else None

    for i in range(4):  # warm-up, as the HTTP side gets
        engine.generate(prompts[i], SamplingParams(max_new_tokens=2), adapter(i))
    before = Steps.of(engine)
    t = time.perf_counter()
    seqs = [engine.submit(Sequence(ids, params, adapter(i))) for i, ids in enumerate(prompts)]
    while engine.has_work():
        engine.step()
    wall = time.perf_counter() - t
    return sum(len(s.output_ids) for s in seqs) / wall, replace(Steps.of(engine) - before, wall=wall)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads in-process (0: one per CPU with --cpus, else torch's default)")
    p.add_argument("--cpus", help="run everything (client, in-process engine, server) on these CPUs: '0-3', '0,2,4,6'")
    p.add_argument("--client-cpus", help="run the HTTP client on these CPUs instead (outside --cpus, as a remote "
                   "client would be)")
    p.add_argument("--server-args", default="", help="more flags for the server, e.g. '--cpu-threads 4'")
    p.add_argument("--hidden", type=int, default=512, help="the bench model's hidden size (bench.peer's model)")
    p.add_argument("--layers", type=int, default=8)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    pargs = peer_args(["--requests", str(args.requests), "--new-tokens", str(args.new_tokens), "--single", "0",
                       "--hidden", str(args.hidden), "--layers", str(args.layers), f"--server-args={args.server_args}"])
    cpus = cpu_list(p, "--cpus", args.cpus)
    client_cpus = cpu_list(p, "--client-cpus", args.client_cpus)
    if cpus:  # before any parallel op, and inherited by the servers started
        os.sched_setaffinity(0, cpus)
    if args.threads or args.cpus:
        torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    best = {"in-process": {}, "http": {}}
    paired: dict[str, list[float]] = {"base": [], "mixed": []}  # each round's http / in-process
    cpu: dict[str, float] = {}  # CPU seconds during the HTTP rounds, summed over them
    chunks = 0  # tokens streamed in them (every workload bench.peer runs: prompt tuning too)
    steps = {"in-process": Steps(), "http": Steps()}  # over every round's timed runs
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        setup = build_setup(pargs, Path(tmp))
        print(f"serving path: {args.requests} requests x {args.new_tokens} new tokens, {args.dtype}, "
              f"{len(os.sched_getaffinity(0))} CPUs, {torch.get_num_threads()} torch threads in-process, "
              f"client on {'CPUs ' + args.client_cpus if client_cpus else 'the same CPUs'}, "
              f"model hidden {args.hidden} x {args.layers} layers, "
              f"server flags {args.server_args or '(none)'}, load average {os.getloadavg()[0]:.2f}")
        for rep in range(args.repeats):
            local = {}
            for workload in ("base", "mixed"):
                rate, spent = in_process(setup, args, args.dtype, workload)
                local[workload] = rate
                steps["in-process"] += spent
                best["in-process"][workload] = max(rate, best["in-process"].get(workload, 0.0))
            server = make_server("ours", pargs, setup, args.dtype, None, Path(tmp) / "logs", f"r{rep}")
            try:
                server.start()
                warm_up("ours", server, pargs, setup, args.dtype)
                before = cpu_seconds(server.proc.pid)

                @contextlib.contextmanager
                def timed_steps(workload: str):  # the steps of base and mixed, as in-process runs them
                    start, t = Steps.scrape(server.url), time.perf_counter()
                    yield
                    if workload in ("base", "mixed"):
                        steps["http"] += replace(Steps.scrape(server.url) - start, wall=time.perf_counter() - t)

                with on_cpus(client_cpus):
                    runs: dict[str, Run] = measure("ours", server, pargs, setup, args.dtype, timed_steps)
                for key, value in cpu_seconds(server.proc.pid).items():
                    cpu[key] = cpu.get(key, 0.0) + value - before[key]
                chunks += sum(run.tokens for run in runs.values())
            finally:
                server.stop()
            for workload in ("base", "mixed"):
                best["http"][workload] = max(runs[workload].tokens_per_s, best["http"].get(workload, 0.0))
                paired[workload].append(runs[workload].tokens_per_s / local[workload])
            print(f"  round {rep + 1}: in-process " + ", ".join(f"{w} {local[w]:.1f}" for w in ("base", "mixed"))
                  + f" | http base {runs['base'].tokens_per_s:.1f}, mixed {runs['mixed'].tokens_per_s:.1f} tok/s",
                  flush=True)
    print(f"\n{'workload':10s} {'in-process':>12s} {'http':>10s} {'best/best':>10s} {'median of rounds':>17s}")
    for w in ("base", "mixed"):
        a, b = best["in-process"][w], best["http"][w]
        print(f"{w:10s} {a:12.1f} {b:10.1f} {b / a:10.2f} {statistics.median(paired[w]):17.2f}   (goal >= 0.95)")
    loop, engine, client = cpu["event loop"], cpu["server"] - cpu["event loop"], cpu["client"]
    print(f"CPU during the HTTP rounds: server event loop {loop:.1f} s ({loop / engine:.1%} of the engine and torch "
          f"threads' {engine:.1f} s); the client, {'on its own CPUs' if client_cpus else 'on the same cores'}, "
          f"{client:.1f} s ({client / engine:.1%})")
    for where, spent in steps.items():
        print(f"engine steps {where + ':':12s} {spent.describe()}")
    print(f"the event loop's CPU per streamed token: {1e6 * loop / chunks:.0f} us (request handling included)")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return best | {"cpu": cpu, "paired": paired, "steps": steps}


def cpu_list(p: argparse.ArgumentParser, flag: str, value: str | None) -> list[int] | None:
    if value is None:
        return None
    if value.strip().isdigit():  # one CPU (for --cpu-threads a bare number is a thread count)
        return [int(value)]
    try:
        cpus = parse_cpu_threads(value)
    except ValueError as exc:
        p.error(f"{flag}: {exc}")
    if not isinstance(cpus, list):
        p.error(f"{flag} takes CPUs ('0-3', '0,2,4,6', '5'), not {value!r}")
    return cpus


@contextlib.contextmanager
def on_cpus(cpus: list[int] | None):
    """This thread (the client: bench.peer's asyncio loop runs on it) on `cpus` for the block."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds so far: the server process, its main thread (uvicorn's event loop), and this process (the client)."""
    import psutil

    server = psutil.Process(pid)
    times = server.cpu_times()
    main_thread = next((t.user_time + t.system_time for t in server.threads() if t.id == pid), 0.0)
    return {"server": times.user + times.system, "event loop": main_thread, "client": time.process_time()}


if __name__ == "__main__":
    main()
