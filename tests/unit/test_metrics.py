"""/metrics: every family keeps its name, type and labels; each Metrics object has its own
registry; and a scrape reads the engine safely while the engine thread changes it."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch

from server.engine.kv_cache import KVPool
from server.engine.request import SamplingParams
from tests.conftest import PROMPTS
from tests.integration.support import metric, parse_metrics

FAMILIES = {
    "softprompt_requests_total": "counter",
    "softprompt_adapter_requests_total": "counter",
    "softprompt_adapter_generated_tokens_total": "counter",
    "softprompt_prompt_tokens_total": "counter",
    "softprompt_generated_tokens_total": "counter",
    "softprompt_request_duration_seconds": "histogram",
    "softprompt_time_to_first_token_seconds": "histogram",
    "softprompt_adapter_load_seconds": "histogram",
    "softprompt_adapter_loads_total": "counter",
    "softprompt_adapter_load_failures_total": "counter",
    "softprompt_batch_size": "gauge",
    "softprompt_engine_steps_total": "counter",
    "softprompt_engine_step_seconds_total": "counter",
    "softprompt_engine_forward_seconds_total": "counter",
    "softprompt_engine_failed_steps_total": "counter",
    "softprompt_prefill_tokens_total": "counter",
    "softprompt_queue_depth": "gauge",
    "softprompt_running_requests": "gauge",
    "softprompt_adapters": "gauge",
    "softprompt_adapters_resident": "gauge",
    "softprompt_adapter_cache_bytes": "gauge",
    "softprompt_adapter_cache_capacity_bytes": "gauge",
    "softprompt_adapter_cache_hits_total": "counter",
    "softprompt_adapter_cache_misses_total": "counter",
    "softprompt_adapter_cache_evictions_total": "counter",
    "softprompt_adapter_prefix_reads_total": "counter",
    "softprompt_kv_cache_bytes": "gauge",
    "softprompt_kv_cache_slots": "gauge",
    "softprompt_kv_cache_slots_held": "gauge",
    "softprompt_kv_cache_slots_used": "gauge",
    "softprompt_kv_cache_usage": "gauge",
    "softprompt_preemptions_total": "counter",
    "softprompt_kv_cache_compactions_total": "counter",
}


@pytest.fixture
def engine(llama):
    return llama.engine()


def _metrics(llama, engine, **kwargs):
    from adapters import AdapterRegistry
    from server.api.metrics import Metrics

    return Metrics(engine, AdapterRegistry(llama.spec, llama.model), **kwargs)


def test_every_family_keeps_its_name_type_and_labels(llama, engine):
    metrics = _metrics(llama, engine)
    engine.generate(llama.ids(PROMPTS[0]), SamplingParams(max_new_tokens=3))
    metrics.requests.labels(route="/generate", status="200").inc()
    metrics.count_adapter("", 3)
    metrics.prompt_tokens.inc(2)
    metrics.generated_tokens.inc(3)
    metrics.latency.observe(0.3)
    metrics.ttft.observe(0.02)
    samples, types = parse_metrics(metrics.render())
    assert types == FAMILIES
    assert not [name for name, _ in samples if name.endswith("_created")]
    assert metric(samples, "softprompt_requests_total", route="/generate", status="200") == 1
    assert metric(samples, "softprompt_adapter_requests_total", adapter="") == 1
    assert metric(samples, "softprompt_adapter_generated_tokens_total", adapter="") == 3
    assert metric(samples, "softprompt_generated_tokens_total") == 3
    assert metric(samples, "softprompt_engine_steps_total") == engine.stats["steps"] >= 3
    assert metric(samples, "softprompt_kv_cache_slots") == engine.runner.pool.slots
    name = "softprompt_request_duration_seconds"
    buckets = {float(dict(labels)["le"]): v for (n, labels), v in samples.items() if n == name + "_bucket"}
    assert buckets[0.25] == 0 and buckets[0.5] == buckets[float("inf")] == metric(samples, name + "_count") == 1
    assert metric(samples, name + "_sum") == 0.3


def test_each_metrics_object_counts_in_its_own_registry(llama, engine):
    from prometheus_client import REGISTRY, CollectorRegistry

    first, second = _metrics(llama, engine), _metrics(llama, engine)
    assert isinstance(first.registry, CollectorRegistry) and first.registry is not second.registry
    first.generated_tokens.inc(5)
    assert metric(parse_metrics(first.render())[0], "softprompt_generated_tokens_total") == 5
    assert metric(parse_metrics(second.render())[0], "softprompt_generated_tokens_total") == 0
    assert "softprompt_generated_tokens_total" not in REGISTRY._names_to_collectors


def test_the_adapter_label_is_bounded(llama, engine):
    metrics = _metrics(llama, engine, max_adapter_labels=2)
    for name in ("a", "b", "c", "d", "", "a"):
        metrics.count_adapter(name, 1)
    samples, _ = parse_metrics(metrics.render())
    series = {dict(labels)["adapter"]: v for (n, labels), v in samples.items()
              if n == "softprompt_adapter_requests_total"}
    assert series == {"a": 2, "b": 1, "__other__": 2, "": 1}


def test_slots_written_are_read_safely_while_segments_change():
    """KVPool.written is read by /metrics on the event loop while the engine thread allocates and
    releases segments: it must never walk a set that changes under it."""
    pool = KVPool(1, 1, 4, "cpu", torch.float32, slots=8192)
    for _ in range(3000):
        pool.allocate(1).length = 1
    stop, errors = threading.Event(), []

    def churn():
        while not stop.is_set():
            seg = pool.allocate(2)
            seg.length = 2
            pool.release(seg)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    churner = threading.Thread(target=churn)
    churner.start()
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not errors:
            try:
                assert pool.written in (3000, 3002)
            except RuntimeError as exc:
                errors.append(exc)
    finally:
        stop.set()
        churner.join()
        sys.setswitchinterval(interval)
    assert not errors, errors[0]


def test_slots_written_follow_every_change_of_the_segments():
    pool = KVPool(1, 1, 4, "cpu", torch.float32, slots=256)
    a, b, c = pool.allocate(20), pool.allocate(20), pool.allocate(20)
    a.length, b.length, c.length = 5, 20, 7
    assert pool.written == 32
    pool.write_prefix(a, torch.zeros(1, 2, 1, 3, 4))
    assert pool.written == 30
    pool.release(b)
    assert pool.written == 10
    pool.extend(a, 200)  # moves it (c is in the way), compacting the pool
    assert (pool.written, a.length) == (10, 3) and pool.compactions == 1
    b.length = 9  # released: not the pool's any more
    assert pool.written == 10
    pool.clear()
    assert pool.written == 0 and pool.held == 0
