"""What the serving path costs: the same workload through the HTTP server and through the engine
in-process, in one run, on the peer benchmark's model, adapters and prompts.

    python -m bench.serving                       # 64 requests, 64 new tokens, fp32, 5 rounds
    python -m bench.serving --dtype bfloat16 --repeats 3
    python -m bench.serving --cpus 0-14 --client-cpus 15     # the client off the server's cores
    python -m bench.serving --vllm-python /tmp/vllm-venv/bin/python   # vLLM's serving path too, as a reference

Over HTTP: `/v1/completions` with `stream=true` (`bench.peer`'s client, all requests at once).
By default the client runs on the same cores as the server, so it is also told where the CPU went
during the HTTP runs: the server's event loop (its main thread: routes, SSE chunks, sockets), the
server's other threads (the engine and torch's), and the client itself. `--client-cpus` puts the
client on CPUs of its own, as a production client on another machine would be: then only the
server's own cost stands between the two figures.

In-process: the same prompts (tokenized as the server does), `SamplingParams` and adapters
submitted to an `Engine` at once and stepped to the end on this thread. Both generate exactly
`--new-tokens` per request (`ignore_eos`).

The server and the in-process engine are each loaded once, and each round runs every workload
both ways back to back, the order alternating between rounds (one idles while the other runs).
With `--vllm-python`, vLLM's OpenAI server and its `LLM` engine in-process (`bench/vllm_offline.py`)
are then measured the same way on the base workload, after ours' rounds, ours' server stopped: what
the serving path costs vLLM on the same machine.
This machine's speed drifts by 10-30% over tens of seconds, so the figure to read is the median
of the pairs' HTTP / in-process ratios; the best of each side and the pooled ratio (total time
in-process over total time over HTTP) are printed too.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import astuple, dataclass, replace
from pathlib import Path

import torch

from bench.peer import build_setup, make_server, run_bodies, run_client, vllm_command, vllm_env, warm_up, workloads
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


class InProcess:
    """The engine alone, loaded once: a workload's requests ('base' or 'mixed') submitted at once,
    the same prompts (tokenized as the server does), `SamplingParams` and adapters as over HTTP,
    stepped to the end on this thread."""

    def __init__(self, setup, args, dtype: str):
        from adapters import AdapterRegistry, AdapterStore
        from server.engine.engine import Engine
        from server.engine.request import SamplingParams
        from server.model import load_base_model

        base = load_base_model(str(setup.model_dir), device="cpu", dtype=dtype)
        self.registry = AdapterRegistry(base.spec, base.model, AdapterStore(setup.adapter_dir))
        self.registry.load_store()
        self.engine = Engine(base.model, base.tokenizer, base.spec, max_batch_size=max(64, args.requests),
                             max_waiting=max(256, 2 * args.requests))
        self.setup = setup
        self.params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
        self.prompts = [base.tokenizer(p, add_special_tokens=True).input_ids for p in setup.prompts]
        for workload in ("base", "mixed"):  # warm-up, as the HTTP side gets
            for i in range(4):
                self.engine.generate(self.prompts[i], SamplingParams(max_new_tokens=2), self.adapter(workload, i))

    def adapter(self, workload: str, i: int):
        adapters = self.setup.adapters
        return self.registry.get(adapters[i % len(adapters)]) if workload == "mixed" else None

    def run(self, workload: str) -> tuple[float, Steps]:
        """tokens/s, and the steps that made them."""
        from server.engine.request import Sequence

        before = Steps.of(self.engine)
        t = time.perf_counter()
        seqs = [self.engine.submit(Sequence(ids, self.params, self.adapter(workload, i)))
                for i, ids in enumerate(self.prompts)]
        while self.engine.has_work():
            self.engine.step()
        wall = time.perf_counter() - t
        return sum(len(s.output_ids) for s in seqs) / wall, replace(Steps.of(self.engine) - before, wall=wall)


class VllmOffline:
    """vLLM's engine alone (`bench/vllm_offline.py` under vLLM's python, loaded once): the base
    workload's prompts generated at once, greedy, `ignore_eos`, as its server gets them over HTTP.
    Idle, that process took 4.4% of a core here (vLLM's threads polling), so it is stopped
    (SIGSTOP) between its runs."""

    def __init__(self, setup, pargs, dtype: str):
        self.setup, self.new_tokens = setup, pargs.new_tokens
        self.proc = subprocess.Popen(
            [pargs.vllm_python, str(Path(__file__).with_name("vllm_offline.py")), str(setup.model_dir), dtype,
             str(pargs.max_model_len)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env=vllm_env(pargs), text=True)
        if not self.proc.stdout.readline():
            raise RuntimeError("vLLM's offline engine did not start (bench/vllm_offline.py)")
        self._ask(self.setup.prompts[:4], 2)  # warm-up, as its server gets

    def _ask(self, prompts: list[str], max_tokens: int) -> float:
        os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        os.kill(self.proc.pid, signal.SIGSTOP)
        return answer["tokens_per_s"]

    def run(self, workload: str) -> tuple[float, Steps]:
        return self._ask(self.setup.prompts, self.new_tokens), Steps()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def over_http(server, bodies: list[dict], setup, client_cpus: list[int] | None) -> tuple[float, Steps, dict, int]:
    """tokens/s of one workload's requests streamed from `server` at once, the server's steps meanwhile,
    the CPU seconds spent (`cpu_seconds`' keys) and the tokens streamed (vLLM's server: the rate alone)."""
    ours = server.system == "ours"
    start = Steps.scrape(server.url) if ours else Steps()
    before, t = cpu_seconds(server.proc.pid), time.perf_counter()  # the scrapes' CPU left out
    with on_cpus(client_cpus):
        outs, wall = run_client(run_bodies(server.url, bodies, setup.masked))
    spent = {key: value - before[key] for key, value in cpu_seconds(server.proc.pid).items()}
    steps = replace((Steps.scrape(server.url) if ours else Steps()) - start, wall=time.perf_counter() - t)
    tokens = sum(o.tokens for o in outs)
    return tokens / wall, steps, spent, tokens


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5, help="rounds; each runs every workload both ways")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads in-process (0: one per CPU with --cpus, else torch's default)")
    p.add_argument("--cpus", help="run everything (client, in-process engine, server) on these CPUs: '0-3', '0,2,4,6'")
    p.add_argument("--client-cpus", help="run the HTTP client on these CPUs instead (outside --cpus, as a remote "
                   "client would be)")
    p.add_argument("--server-args", default="", help="more flags for the server, e.g. '--cpu-threads 4'")
    p.add_argument("--hidden", type=int, default=512, help="the bench model's hidden size (bench.peer's model)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vllm-python", help="measure vLLM's serving path too, the same way: its server against its "
                   "`LLM` engine in-process (base workload); the python of the virtualenv vLLM's CPU build is in")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    pargs = peer_args(["--requests", str(args.requests), "--new-tokens", str(args.new_tokens), "--single", "0",
                       "--hidden", str(args.hidden), "--layers", str(args.layers), f"--server-args={args.server_args}"]
                      + (["--vllm-python", args.vllm_python] if args.vllm_python else []))
    vllm_cmd = vllm_command(pargs)
    if args.vllm_python and not vllm_cmd:
        p.error(f"--vllm-python: no vLLM found with {args.vllm_python}")
    cpus = cpu_list(p, "--cpus", args.cpus)
    client_cpus = cpu_list(p, "--client-cpus", args.client_cpus)
    if cpus:  # before any parallel op, and inherited by the server started
        os.sched_setaffinity(0, cpus)
    if args.threads or args.cpus:
        torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    sides = ("in-process", "http")
    rows = {"ours": ["base", "mixed"], "vllm": ["vllm base"] if vllm_cmd else []}  # row: "[system] workload"
    names = rows["ours"] + rows["vllm"]
    rates: dict[str, dict[str, list[float]]] = {side: {w: [] for w in names} for side in sides}
    cpu: dict[str, float] = {}  # CPU seconds during the HTTP runs, summed over them
    chunks = 0  # tokens streamed in them
    steps = {side: Steps() for side in sides}  # over every timed run
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        setup = build_setup(pargs, Path(tmp))
        print(f"serving path: {args.requests} requests x {args.new_tokens} new tokens, {args.dtype}, "
              f"{len(os.sched_getaffinity(0))} CPUs, {torch.get_num_threads()} torch threads in-process, "
              f"client on {'CPUs ' + args.client_cpus if client_cpus else 'the same CPUs'}, "
              f"model hidden {args.hidden} x {args.layers} layers, "
              f"server flags {args.server_args or '(none)'}, load average {os.getloadavg()[0]:.2f}")
        local = InProcess(setup, args, args.dtype)
        for system in (s for s in rows if rows[s]):  # one system's processes up at a time
            server = make_server(system, pargs, setup, args.dtype, vllm_cmd, Path(tmp) / "logs", "serving")
            engine = local if system == "ours" else VllmOffline(setup, pargs, args.dtype)
            try:
                server.start()
                warm_up(system, server, pargs, setup, args.dtype)
                bodies = workloads(system, server, pargs, setup, args.dtype)
                gc.collect()  # what set-up left, out of the client's collections
                gc.freeze()
                for rep in range(args.repeats):
                    for name in rows[system]:
                        workload = name.split()[-1]
                        for side in (sides if rep % 2 == 0 else sides[::-1]):  # who goes first alternates
                            if side == "in-process":
                                rate, spent = engine.run(workload)
                            else:
                                rate, spent, used, tokens = over_http(server, bodies[workload][0], setup, client_cpus)
                                if system == "ours":
                                    for key, value in used.items():
                                        cpu[key] = cpu.get(key, 0.0) + value
                                    chunks += tokens
                            rates[side][name].append(rate)
                            if system == "ours":  # vLLM's steps are not counted
                                steps[side] += spent
                    print(f"  {system} round {rep + 1}: " + " | ".join(
                        f"{side} " + ", ".join(f"{w} {rates[side][w][-1]:.1f}" for w in rows[system]) for side in sides)
                        + " tok/s", flush=True)
            finally:
                server.stop()
                if engine is not local:
                    engine.close()
    paired = {w: [h / i for h, i in zip(rates["http"][w], rates["in-process"][w])] for w in names}
    print(f"\n{'workload':10s} {'in-process':>12s} {'http':>10s} {'best/best':>10s} {'median of pairs':>16s} "
          f"{'pooled':>7s}")
    for w in names:
        a, b = max(rates["in-process"][w]), max(rates["http"][w])
        pooled = sum(1 / r for r in rates["in-process"][w]) / sum(1 / r for r in rates["http"][w])
        print(f"{w:10s} {a:12.1f} {b:10.1f} {b / a:10.2f} {statistics.median(paired[w]):16.2f} {pooled:7.2f}"
              + ("   (vLLM's server against its LLM engine)" if w.startswith("vllm") else "   (goal >= 0.95)"))
    print("  pairs: each round runs a workload in-process and over HTTP back to back, the order alternating; "
          "pooled: the in-process runs' total time over the HTTP runs' (the same tokens)")
    loop, client = cpu["event loop"], cpu["client"]
    engine = max(cpu["server"] - loop, 1e-9)  # CPU times come in clock ticks: a short run may read 0
    print(f"CPU during the HTTP runs: server event loop {loop:.1f} s ({loop / engine:.1%} of the engine and torch "
          f"threads' {engine:.1f} s); the client, {'on its own CPUs' if client_cpus else 'on the same cores'}, "
          f"{client:.1f} s ({client / engine:.1%})")
    for where, spent in steps.items():
        print(f"engine steps {where + ':':12s} {spent.describe()}")
    print(f"the event loop's CPU per streamed token: {1e6 * loop / chunks:.0f} us (request handling included); "
          f"the client's: {1e6 * client / chunks:.0f} us")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    best = {side: {w: max(r) for w, r in rates[side].items()} for side in sides}
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
