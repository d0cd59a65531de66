"""Fault containment under load, against a real server process over loopback.

1. About 1,100 requests at concurrency 64 over every generation route, five adapter kinds, 10% of
   the clients leaving early, adapters uploaded and deleted meanwhile, and forwards that fail at
   random when they admit newcomers (`fault_server`): every client is answered, a failed step
   fails its newcomers alone, and nothing leaks (KV slots, memory, store files).
2. SIGKILL in the middle of a burst of uploads: the restarted server finds only complete adapters,
   and every upload acknowledged before the kill.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .support import (REPO, ServerProcess, adapter_files, adapter_names, free_port, leftovers, metric, multipart,
                      scrape)

CONCURRENCY = 64
WARMUP_REQUESTS = 128
LOAD_REQUESTS = 1000
DISCONNECT_RATE = 0.10
EXTRA_ADAPTER_RATE = 0.10  # requests naming an adapter uploaded or deleted during the load
ADMIN_EVERY = 50  # requests started between two adapter uploads
FAIL_RATE = 0.05
LOAD_DEADLINE = 150.0  # seconds for the whole load, warm-up included
RSS_TOLERANCE = 0.10


class FaultServer(ServerProcess):
    """A ServerProcess started through `tests.integration.fault_server` (same flags, plus its own)."""

    def __init__(self, *args, fail_rate: float, fault_log: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.fault_flags = ["--fail-rate", str(fail_rate), "--fault-log", str(fault_log)]

    def _spawn(self) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTPROMPT_")}
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [sys.executable, "-m", "tests.integration.fault_server", *self.fault_flags,
               "--model", str(self.model_dir), "--adapter-dir", str(self.adapter_dir), "--port", str(self.port),
               "--host", "127.0.0.1", "--log-level", "warning", *self.extra]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)


# ---- one client -----------------------------------------------------------------------------------

ROUTES = ("generate", "generate_stream", "completions", "completions_stream")


@dataclass
class Call:
    index: int
    prompt: str
    route: str
    adapter: str | None
    max_new_tokens: int
    leave_after: int | None  # None: stays to the end; else events read (streams) or ms waited before leaving
    status: int | None = None
    error_type: str | None = None  # from the JSON error body, or from an error event inside a stream
    problems: list[str] = field(default_factory=list)

    @property
    def left(self) -> bool:
        return self.leave_after is not None

    @property
    def failed_internally(self) -> bool:
        return self.error_type == "generation_failed"


def _error_shape(payload: dict, route: str) -> bool:
    """TGI's `{"error", "error_type"}`, or OpenAI's `{"error": {"message", "type", "param", "code"}}`
    on its routes."""
    error = payload.get("error")
    if route.startswith("completions"):
        return isinstance(error, dict) and isinstance(error.get("message"), str) and isinstance(error.get("type"), str)
    return isinstance(error, str) and isinstance(payload.get("error_type"), str)


def _error_type(payload: dict) -> str | None:
    """Our error type: TGI's `error_type`, or the `code` OpenAI's shape carries it in."""
    error = payload.get("error")
    return error.get("code") if isinstance(error, dict) else payload.get("error_type")


def _check_error_body(call: Call, r: httpx.Response, body: bytes) -> None:
    try:
        payload = json.loads(body)
    except ValueError:
        call.problems.append(f"status {r.status_code} without JSON: {body[:200]!r}")
        return
    if not _error_shape(payload, call.route):
        call.problems.append(f"status {r.status_code}, not the error shape: {payload}")
    call.error_type = _error_type(payload)


def _check_events(call: Call, lines: list[str]) -> None:
    """A stream's events: an error event, or tokens ending in a finish reason (and [DONE] for OpenAI)."""
    events = [json.loads(line[5:]) if line[5:].strip() != "[DONE]" else "[DONE]"
              for line in lines if line.startswith("data:")]
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    if errors:
        call.error_type = _error_type(errors[0])
        if not _error_shape(errors[0], call.route):
            call.problems.append(f"bad error event {errors[0]}")
        return
    if call.route == "generate_stream":
        tokens = [e for e in events if isinstance(e, dict) and "token" in e]
        last = tokens[-1] if tokens else {}
        reason = (last.get("details") or {}).get("finish_reason")
        if reason is None or (reason == "length" and len(tokens) != call.max_new_tokens):
            call.problems.append(f"stream ended with {len(tokens)} tokens, finish {reason}")
    else:
        chunks = [e for e in events if isinstance(e, dict)]
        finishes = [c["finish_reason"] for e in chunks for c in e["choices"] if c["finish_reason"]]
        if finishes not in (["length"], ["stop"]) or events[-1:] != ["[DONE]"]:
            call.problems.append(f"OpenAI stream ended with finishes {finishes}, last {events[-1:]}")


def _check_body(call: Call, body: dict) -> None:
    if call.route == "generate":
        details = body["details"]
        n, reason = details["generated_tokens"], details["finish_reason"]
        if reason not in ("length", "eos_token", "stop_sequence") or (reason == "length" and n != call.max_new_tokens):
            call.problems.append(f"{n} tokens, finish {reason}, asked {call.max_new_tokens}")
    else:
        n, reason = body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"]
        if reason not in ("length", "stop") or (reason == "length" and n != call.max_new_tokens):
            call.problems.append(f"{n} tokens, finish {reason}, asked {call.max_new_tokens}")


def _request(call: Call) -> tuple[str, str, dict]:
    if call.route.startswith("generate"):
        parameters = {"max_new_tokens": call.max_new_tokens, "details": True, "do_sample": False}
        if call.adapter:
            parameters["adapter_id"] = call.adapter
        return "POST", "/" + call.route, {"inputs": call.prompt, "parameters": parameters}
    body = {"prompt": call.prompt, "max_tokens": call.max_new_tokens, "temperature": 0,
            "stream": call.route.endswith("_stream")}
    if call.adapter:
        body["model"] = call.adapter
    return "POST", "/v1/completions", body


async def run_call(client: httpx.AsyncClient, call: Call) -> None:
    method, path, body = _request(call)
    streaming = call.route.endswith("stream")
    try:
        if streaming:
            async with client.stream(method, path, json=body) as r:
                call.status = r.status_code
                if r.status_code != 200:
                    _check_error_body(call, r, await r.aread())
                    return
                lines = []
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        lines.append(line)
                        if call.left and len(lines) > call.leave_after:
                            return  # leaving the block closes the connection mid-stream
                _check_events(call, lines)
        else:
            send = client.request(method, path, json=body)
            if call.left:
                try:
                    r = await asyncio.wait_for(send, timeout=call.leave_after / 1000)
                except asyncio.TimeoutError:
                    return  # the request was cancelled: its connection closed
            else:
                r = await send
            call.status = r.status_code
            if r.status_code != 200:
                _check_error_body(call, r, r.content)
            else:
                _check_body(call, r.json())
    except httpx.HTTPError as exc:
        if not call.left:
            call.problems.append(f"no answer: {type(exc).__name__}: {exc}")


# ---- the load -------------------------------------------------------------------------------------

@dataclass
class Admin:
    """Adapter uploads and deletes made during the load, and which the server acknowledged."""

    uploaded: list[str] = field(default_factory=list)  # 201
    deleted: list[str] = field(default_factory=list)  # 204
    refused: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # each upload's latency


def make_calls(rng: random.Random, first: int, count: int, base_adapters: list[str], extra_names) -> list[Call]:
    calls = []
    for i in range(first, first + count):
        roll = rng.random()
        adapter = (rng.choice(extra_names(i)) if roll < EXTRA_ADAPTER_RATE
                   else rng.choice([None, *base_adapters]))
        max_new = rng.randint(4, 16)
        route = ROUTES[i % len(ROUTES)]
        leave = None
        if rng.random() < DISCONNECT_RATE:
            leave = rng.randint(0, max_new - 1) if route.endswith("stream") else rng.randint(5, 400)
        calls.append(Call(i, f"request {i} says hello", route, adapter, max_new, leave))
    return calls


async def run_load(server: ServerProcess, calls: list[Call], sources: list[Path], admin: Admin | None) -> None:
    """`calls` by CONCURRENCY workers; with `admin`, an upload every ADMIN_EVERY started calls and
    a delete of the one before last."""
    started, done = 0, False
    queue: asyncio.Queue = asyncio.Queue()
    for c in calls:
        queue.put_nowait(c)
    # Idle connections expire on our side well before uvicorn's 5 s keep-alive timeout closes them:
    # httpx's default (also 5 s) races it, and a request sent as the server closes gets no answer.
    limits = httpx.Limits(max_connections=CONCURRENCY + 8, max_keepalive_connections=CONCURRENCY + 8,
                          keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:

        async def worker():
            nonlocal started
            while not queue.empty():
                call = queue.get_nowait()
                started += 1
                await run_call(client, call)

        async def adapters():
            n = 0
            while not done:
                if started < (n + 1) * ADMIN_EVERY:
                    await asyncio.sleep(0.02)
                    continue
                name = f"extra-{n}"
                t = time.monotonic()
                r = await client.post("/adapters", data={"name": name},
                                      files=multipart(adapter_files(sources[n % len(sources)])))
                admin.seconds.append(time.monotonic() - t)
                if r.status_code == 201:
                    admin.uploaded.append(name)
                else:
                    admin.refused.append(f"upload {name}: {r.status_code} {r.text}")
                if n >= 2 and f"extra-{n - 2}" in admin.uploaded:
                    r = await client.delete(f"/adapters/extra-{n - 2}")
                    if r.status_code == 204:
                        admin.deleted.append(f"extra-{n - 2}")
                    else:
                        admin.refused.append(f"delete extra-{n - 2}: {r.status_code} {r.text}")
                n += 1

        async def everything():
            nonlocal done
            changes = asyncio.ensure_future(adapters()) if admin else None
            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
            done = True
            if changes:
                await changes

        await asyncio.wait_for(everything(), LOAD_DEADLINE)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def wait_released(client: httpx.Client, within: float = 5.0) -> dict:
    """The engine idle and every KV slot back in the pool; the last scrape."""
    deadline = time.monotonic() + within
    while True:
        samples = scrape(client)
        if (metric(samples, "softprompt_kv_cache_slots_held") == 0
                and metric(samples, "softprompt_running_requests") == 0
                and metric(samples, "softprompt_queue_depth") == 0):
            return samples
        assert time.monotonic() < deadline, (
            f"still held after {within}s: slots {metric(samples, 'softprompt_kv_cache_slots_held')}, running "
            f"{metric(samples, 'softprompt_running_requests')}, queued {metric(samples, 'softprompt_queue_depth')}")
        time.sleep(0.1)


def test_load_with_faults_disconnects_and_adapter_changes(model_dir, adapter_srcs, tokenizer, tmp_path):
    t0 = time.monotonic()
    fault_log = tmp_path / "faults.json"
    store = tmp_path / "store"
    server = FaultServer(model_dir, store, tmp_path, fail_rate=FAIL_RATE, fault_log=fault_log, name="faults")
    try:
        server.start()
        sources = list(adapter_srcs.values())
        with server.client() as c:
            base = []
            for variant, src in adapter_srcs.items():
                r = c.post("/adapters", data={"name": f"ad-{variant}"}, files=multipart(adapter_files(src)))
                assert r.status_code == 201, r.text
                base.append(f"ad-{variant}")

        rng = random.Random(1234)
        admin = Admin()

        def extra_names(i: int) -> list[str]:  # the ones uploaded or deleted around request i
            n = i // ADMIN_EVERY
            return [f"extra-{k}" for k in range(max(0, n - 3), n + 1)]

        warmup = make_calls(rng, 0, WARMUP_REQUESTS, base, lambda i: ["extra-none"])
        asyncio.run(run_load(server, warmup, sources, None))
        with server.client() as c:
            wait_released(c)
        rss_warm = rss_kib(server.proc.pid)

        load = make_calls(rng, WARMUP_REQUESTS, LOAD_REQUESTS, base, lambda i: extra_names(i - WARMUP_REQUESTS))
        asyncio.run(run_load(server, load, sources, admin))
        load_seconds = time.monotonic() - t0

        with server.client() as c:
            samples = wait_released(c)
            rss_end = rss_kib(server.proc.pid)
            listed = adapter_names(c)
        calls = warmup + load

        # which requests each fault failed: the newcomers of its step (traced by their prompt ids)
        log = json.loads(fault_log.read_text())
        by_prompt = {tuple(tokenizer(c.prompt).input_ids): c for c in calls}
        assert len(by_prompt) == len(calls), "two requests share a prompt: faults cannot be traced to them"
        failed_per_fault, faulted = [], set()
        for fault in log["steps"]:
            victims = [by_prompt[tuple(n["prompt_ids"])] for n in fault["newcomers"] if not n["aborted"]]
            failed_per_fault.append(len(victims))
            faulted.update(v.index for v in victims)
        internal = {c.index for c in calls if c.failed_internally}

        statuses = Counter("left" if c.left else "no-answer" if c.status is None else
                           f"{c.status}/stream-error" if c.status == 200 and c.error_type else str(c.status)
                           for c in calls)
        print(f"\nSUMMARY requests={len(calls)} (warm-up {len(warmup)}) statuses={dict(sorted(statuses.items()))} "
              f"disconnects={sum(c.left for c in calls)} injected_faults={log['faults']} "
              f"failed_per_fault max={max(failed_per_fault, default=0)} "
              f"mean={sum(failed_per_fault) / max(1, len(failed_per_fault)):.2f} "
              f"internal_errors={len(internal)} uploads={len(admin.uploaded)} deletes={len(admin.deleted)} "
              f"upload_s_max={max(admin.seconds, default=0):.2f} "
              f"rss_warm={rss_warm}KiB rss_end={rss_end}KiB ({(rss_end / rss_warm - 1) * 100:+.1f}%) "
              f"seconds={load_seconds:.1f}")

        # every client that stayed got an answer of the documented kinds
        problems = [f"#{c.index} {c.route} adapter={c.adapter}: {p}" for c in calls if not c.left for p in c.problems]
        for c in calls:
            if c.left or c.problems:
                continue
            extra = (c.adapter or "").startswith("extra-")
            if c.status == 200 and c.error_type in (None, "generation_failed"):
                continue
            if c.status in (404, 422) and extra:
                continue
            if c.status == 503 and c.error_type == "overloaded":
                continue
            if c.status == 500 and c.error_type == "generation_failed":
                continue
            problems.append(f"#{c.index} {c.route} adapter={c.adapter}: status {c.status} {c.error_type}")
        assert not problems, (f"{len(problems)} bad answers:\n" + "\n".join(problems[:30])
                              + f"\nserver log:\n{server.log_tail()}")

        # each fault failed its newcomers only: exactly the requests answered with an internal error
        assert log["faults"] > 0, "no fault injected: the containment path did not run"
        assert metric(samples, "softprompt_engine_failed_steps_total") == log["faults"]
        assert internal <= faulted, f"internal errors outside the faults' newcomers: {sorted(internal - faulted)}"
        unseen = faulted - internal
        assert all(calls[i].left for i in unseen), (
            f"failed by a fault but answered otherwise: {[(i, calls[i].status) for i in unseen if not calls[i].left]}")

        # nothing leaked: KV slots (wait_released), memory, adapter files
        assert rss_end <= rss_warm * (1 + RSS_TOLERANCE), f"RSS grew from {rss_warm} KiB to {rss_end} KiB"
        expected = sorted((set(base) | set(admin.uploaded)) - set(admin.deleted))
        assert not admin.refused, admin.refused
        stored = sorted(p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith("."))
        assert stored == expected, f"store {stored}, acknowledged {expected}"
        assert listed == expected
        assert leftovers(store) == []
    finally:
        server.stop()


# ---- SIGKILL during uploads -----------------------------------------------------------------------

BURST = 20
ACKED_BEFORE_KILL = 3


def test_kill_during_upload_burst_leaves_only_complete_adapters(start_server, adapter_srcs, tmp_path):
    store = tmp_path / "kill-store"
    server = start_server(adapter_dir=store, name="killed")
    sources = [adapter_files(src) for src in adapter_srcs.values()]
    acked: list[str] = []

    async def burst():
        killed = asyncio.Event()
        async with httpx.AsyncClient(base_url=server.url, timeout=30,
                                     limits=httpx.Limits(max_connections=BURST + 2)) as client:

            async def one(i: int):
                name = f"burst-{i}"
                try:
                    r = await client.post("/adapters", data={"name": name}, files=multipart(sources[i % len(sources)]))
                except httpx.HTTPError:
                    return
                if r.status_code == 201:
                    acked.append(name)
                    if len(acked) >= ACKED_BEFORE_KILL and not killed.is_set():
                        killed.set()
                        server.kill()  # SIGKILL

            await asyncio.gather(*(one(i) for i in range(BURST)))

    asyncio.run(burst())
    assert server.proc.returncode == -9, f"server exited {server.proc.returncode} before the kill"
    on_disk = sorted(p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith("."))
    left_behind = leftovers(store)

    restarted = start_server(adapter_dir=store, name="restarted")
    with restarted.client() as c:
        listed = adapter_names(c)
        samples = scrape(c)
    assert set(acked) <= set(on_disk), f"acknowledged {acked}, on disk {on_disk}"
    assert listed == on_disk, f"restarted server lists {listed}, store holds {on_disk}"
    assert metric(samples, "softprompt_adapter_load_failures_total") == 0, restarted.log_tail()
    assert leftovers(store) == []
    for name in on_disk:  # PEFT's two files, and the prefix materialized at upload (unless killed before it)
        assert sorted(os.listdir(store / name))[:2] == ["adapter_config.json", "adapter_model.safetensors"]
        assert sorted(os.listdir(store / name))[2:] in ([], ["prefix.safetensors"])
    print(f"\nSUMMARY kill: uploads={BURST} acked_before_kill={len(acked)} on_disk_after_kill={len(on_disk)} "
          f"temporaries_left_by_kill={len(left_behind)} listed_after_restart={len(listed)}")


# ---- an internal error on a kept-alive connection ----------------------------------------------------

def test_internal_error_leaves_the_connection_usable(model_dir, tmp_path):
    """Every prefill fails: each request gets its 500, including those sent on the connection the
    previous 500 came back on (httpx reuses it at once, as the load's clients do)."""
    server = FaultServer(model_dir, tmp_path / "store", tmp_path, fail_rate=1.0, fault_log=tmp_path / "f.json",
                         name="always-fails")
    try:
        server.start()
        outcomes = Counter()
        with server.client() as c:
            for i in range(10):
                try:
                    r = c.post("/generate", json={"inputs": f"hello {i}", "parameters": {"max_new_tokens": 2}})
                    outcomes[f"{r.status_code} {r.json().get('error_type')}"] += 1
                except httpx.HTTPError as exc:
                    outcomes[f"no answer ({type(exc).__name__})"] += 1
        assert outcomes == {"500 generation_failed": 10}, f"{dict(outcomes)}\nserver log:\n{server.log_tail(1500)}"
    finally:
        server.stop()
