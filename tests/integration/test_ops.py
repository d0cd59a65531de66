"""Operations routes: /health, /info, /metrics (Prometheus text format)."""

from __future__ import annotations

import os

import pytest

from server import openmp
from server.engine.cpu.threads import cgroup_cpu_quota

from .conftest import PROMPT
from .support import (
    CONFIG_FILE,
    ServerProcess,
    WEIGHTS_FILE,
    adapter_files,
    generate,
    metric,
    parse_metrics,
    scrape,
    upload,
)

REQUIRED = {
    "softprompt_requests_total": "counter",
    "softprompt_generated_tokens_total": "counter",
    "softprompt_time_to_first_token_seconds": "histogram",
    "softprompt_queue_depth": "gauge",
    "softprompt_batch_size": "gauge",
    "softprompt_adapter_requests_total": "counter",
    "softprompt_adapter_generated_tokens_total": "counter",
    "softprompt_adapter_loads_total": "counter",
    "softprompt_adapter_load_failures_total": "counter",
}


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_info(server, client):
    r = client.get("/info")
    assert r.status_code == 200
    info = r.json()
    assert info["model_id"] == server.model_name
    assert info["model_dtype"] == "float32" and info["model_dtype_reason"] == "--dtype float32"
    assert info["model_device_type"] == "cpu"
    assert info["self_check"]["passed"] and info["self_check"]["relative_error"] < 1e-4
    paths = info["engine_paths"]  # what this machine takes by default
    assert paths["fast_path"] == "on" and paths["forward"] == "written out (lean_forward)"
    assert paths["linear"].startswith(("the AVX2 kernel", "oneDNN")) and paths == info["self_check"]["paths_checked"]
    assert isinstance(info["version"], str) and info["version"]
    for key in ("max_input_tokens", "max_new_tokens", "max_total_tokens", "max_batch_size",
                "max_waiting_requests", "max_upload_bytes", "max_adapters"):
        assert isinstance(info[key], int) and info[key] > 0, key
    assert info["max_new_tokens"] == 1024 and info["max_input_tokens"] == 2048  # the defaults
    assert info["adapters"] == len(client.get("/adapters").json()["adapters"])
    assert info["compile"] == {"mode": "off"}  # the default: the packed forward runs eager
    threads = info["cpu_threads"]  # --cpu-threads auto: torch's default within the CPUs and the quota
    assert 1 <= threads["threads"] <= len(os.sched_getaffinity(0)) and threads["cpus"] is None
    # OpenMP's idle workers spin longer (server/openmp.py), set by the entry point before torch loaded
    operators = os.environ.get("GOMP_SPINCOUNT") or (None if "OMP_WAIT_POLICY" in os.environ else openmp.SPIN_COUNT)
    assert threads["openmp_spin_count"] == operators


def test_start_up_heap_is_frozen(server):
    """Full garbage collections skip what start-up made (server.__main__.freeze_startup_heap)."""
    line = next(line for line in server.log_path.read_text().splitlines() if "start-up heap:" in line)
    assert int(line.split("start-up heap: ")[1].split()[0]) > 10_000  # the model, tokenizer, app, modules


def test_cpu_threads_confined_to_listed_cpus(start_server):
    cpu = max(os.sched_getaffinity(0))
    server = start_server("--cpu-threads", f"{cpu}-{cpu}")  # a list of one CPU ("3" would be a count)
    with server.client() as c:
        plan = c.get("/info").json()["cpu_threads"]
        assert (plan["threads"], plan["cpus"]) == (1, [cpu])
        # with another CPU for the event loop, tokens go over as the next step's layers start
        assert plan["spare"] is (len(os.sched_getaffinity(0)) > 1 and (cgroup_cpu_quota() or 2) >= 2)
        generate(c, PROMPT, max_new_tokens=4)  # serves
    confined = [tid for tid in os.listdir(f"/proc/{server.proc.pid}/task")
                if os.sched_getaffinity(int(tid)) == {cpu}]
    assert confined  # the engine thread; the event loop and the others are not confined
    assert os.sched_getaffinity(server.proc.pid) == os.sched_getaffinity(0)


def test_cpu_threads_naming_a_cpu_not_available_stops_start_up(model_dir, tmp_path):
    server = ServerProcess(model_dir, tmp_path / "store", tmp_path, "--cpu-threads", "0-4095", name="cpus")
    with pytest.raises(AssertionError, match="exited with 1"):
        server.start()
    assert "refusing to start: --cpu-threads 0-4095: CPUs" in server.log_tail()
    assert "are not available to this process" in server.log_tail()


def test_metrics_format_and_families(client, uploaded):
    generate(client, PROMPT, uploaded["prefix"], 3)
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert r.text.endswith("\n")
    samples, types = parse_metrics(r.text)
    for family, kind in REQUIRED.items():
        assert types.get(family) == kind, f"{family}: {types.get(family)}"
    assert metric(samples, "softprompt_adapter_requests_total", adapter=uploaded["prefix"]) >= 1
    assert metric(samples, "softprompt_requests_total", route="/generate", status="200") >= 1
    assert metric(samples, "softprompt_queue_depth") >= 0
    assert metric(samples, "softprompt_batch_size") >= 0
    # the steps' forward time is part of their time (the start-up self-check's forwards are not steps)
    assert 0 < metric(samples, "softprompt_engine_forward_seconds_total") < \
        metric(samples, "softprompt_engine_step_seconds_total")
    # a histogram's buckets are cumulative and end in +Inf == _count
    name = "softprompt_time_to_first_token_seconds"
    buckets = sorted(((float(dict(k[1])["le"]), v) for k, v in samples.items() if k[0] == name + "_bucket"))
    assert buckets and buckets[-1][0] == float("inf")
    counts = [v for _, v in buckets]
    assert counts == sorted(counts)
    assert counts[-1] == metric(samples, name + "_count") >= 1
    assert metric(samples, name + "_sum") >= 0


def test_metrics_count_a_request(client, uploaded):
    name = uploaded["ptuning-mlp"]
    before = scrape(client)
    generate(client, PROMPT, name, 5)
    after = scrape(client)

    def delta(metric_name, **labels):
        return metric(after, metric_name, default=0.0, **labels) - metric(before, metric_name, default=0.0, **labels)

    assert delta("softprompt_generated_tokens_total") == 5
    assert delta("softprompt_prompt_tokens_total") == len(PROMPT)
    assert delta("softprompt_adapter_requests_total", adapter=name) == 1
    assert delta("softprompt_adapter_generated_tokens_total", adapter=name) == 5
    assert delta("softprompt_requests_total", route="/generate", status="200") == 1
    assert delta("softprompt_time_to_first_token_seconds_count") == 1
    assert delta("softprompt_request_duration_seconds_count") == 1
    # where the engine's time went: its steps' wall time, of which the model's forward is a part
    steps, forward = delta("softprompt_engine_step_seconds_total"), delta("softprompt_engine_forward_seconds_total")
    assert delta("softprompt_engine_steps_total") >= 5
    assert 0 < forward < steps


def test_metrics_count_adapter_loads_and_failures(client, adapter_srcs):
    before = scrape(client)
    assert upload(client, "metrics-load", adapter_srcs["prompt"]).status_code == 201
    bad = {CONFIG_FILE: b"{broken", WEIGHTS_FILE: adapter_files(adapter_srcs["prompt"])[WEIGHTS_FILE]}
    assert upload(client, "metrics-fail", bad).status_code == 422
    after = scrape(client)
    assert client.delete("/adapters/metrics-load").status_code == 204
    assert metric(after, "softprompt_adapter_loads_total") == metric(before, "softprompt_adapter_loads_total") + 1
    assert metric(after, "softprompt_adapter_load_failures_total") == \
        metric(before, "softprompt_adapter_load_failures_total") + 1
    assert metric(after, "softprompt_adapters") == metric(before, "softprompt_adapters") + 1
    assert metric(after, "softprompt_requests_total", route="/adapters", status="422") >= 1


def _auto_dtype() -> tuple[str, str]:
    from server.model import cpu_has_bf16

    return ("bfloat16", "AVX512-BF16 or AMX") if cpu_has_bf16() else ("float32", "without native bfloat16")


def test_dtype_auto_is_what_the_cpu_computes_natively_and_info_says_why(start_server):
    server = start_server("--dtype", "auto")
    info = server.client().get("/info").json()
    dtype, why = _auto_dtype()
    assert info["model_dtype"] == dtype and why in info["model_dtype_reason"]
    assert info["self_check"]["passed"]
    assert "--dtype auto" in server.log_tail(20000) and "engine paths:" in server.log_tail(20000)


KERNEL = object()  # stands for the CPU attention kernel's description on this machine


@pytest.mark.parametrize("flags, paths", [
    (["--fast-path", "off"], {"fast_path": "off", "forward": "transformers' own", "linear": "torch (plain F.linear)",
                              "native_decode": False, "attention": "SDPA per request", "cuda_graphs": None}),
    (["--cpu-linear", "avx2", "--native-decode", "on"], {"fast_path": "on", "forward": "written out (lean_forward)",
                                                         "linear": "the AVX2 kernel (float32)", "native_decode": True,
                                                         "attention": KERNEL, "cuda_graphs": None}),
    (["--cpu-linear", "onednn", "--native-decode", "on"], {"fast_path": "on", "forward": "written out (lean_forward)",
                                                           "linear": "oneDNN (float32)", "native_decode": True,
                                                           "attention": KERNEL, "cuda_graphs": None}),
])
def test_forced_paths_serve_the_same_tokens(start_server, client, flags, paths):
    """A server on a forced path: /info names it, and it generates what the default server does."""
    from server.engine.cpu import attention as cpu_attention, kernels as cpu_kernels, linear as cpu_linear

    if paths["attention"] is KERNEL:  # what the kernel takes depends on the CPU (its AVX-512 code or not)
        assert cpu_kernels.available()
        paths = {**paths, "attention": cpu_attention.describe()}

    for backend in ("avx2", "onednn"):
        if backend in flags and cpu_linear.unavailable(backend):
            pytest.skip(f"--cpu-linear {backend} cannot run here: {cpu_linear.unavailable(backend)}")
    server = start_server(*flags)
    with server.client() as forced:
        assert forced.get("/info").json()["engine_paths"] == paths
        want = generate(client, PROMPT, max_new_tokens=12)["details"]["tokens"]
        got = generate(forced, PROMPT, max_new_tokens=12)["details"]["tokens"]
        assert [t["id"] for t in got] == [t["id"] for t in want]
        assert [t["logprob"] for t in got] == pytest.approx([t["logprob"] for t in want], abs=1e-4)


def test_a_path_forced_where_it_cannot_run_stops_the_start(model_dir, tmp_path):
    """Flags that contradict each other are refused before anything loads, naming the conflict."""
    server = ServerProcess(model_dir, tmp_path / "store", tmp_path, "--native-decode", "on", "--cpu-linear", "torch")
    with pytest.raises(AssertionError, match="native decode needs packed linears"):
        server.start(timeout=30)
