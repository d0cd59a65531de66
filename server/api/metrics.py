"""Prometheus metrics in the text exposition format, with no dependency beyond the standard library."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v)}"'.replace("\n", " ") for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Metric:
    def __init__(self, name: str, help_: str, kind: str):
        self.name, self.help, self.kind = name, help_, kind
        self.lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(Metric):
    def __init__(self, name, help_):
        super().__init__(name, help_, "counter")
        self.values = defaultdict(float)

    def inc(self, amount: float = 1.0, **labels) -> None:
        with self.lock:
            self.values[tuple(sorted(labels.items()))] += amount

    def render(self) -> list[str]:
        values = sorted(self.values.items()) or [((), 0.0)]
        return self.header() + [f"{self.name}{_labels(dict(k))} {v}" for k, v in values]


class Gauge(Metric):
    """A value read when scraped (kind "counter" for totals kept elsewhere)."""

    def __init__(self, name, help_, read, kind="gauge"):
        super().__init__(name, help_, kind)
        self.read = read

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {float(self.read())}"]


class Histogram(Metric):
    def __init__(self, name, help_, buckets=LATENCY_BUCKETS):
        super().__init__(name, help_, "histogram")
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        with self.lock:
            self.sum += value
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self.counts[i] += 1
                    break
            else:
                self.counts[-1] += 1

    def render(self) -> list[str]:
        lines, cumulative = self.header(), 0
        for bound, count in zip(self.buckets, self.counts):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        cumulative += self.counts[-1]
        lines += [f'{self.name}_bucket{{le="+Inf"}} {cumulative}', f"{self.name}_sum {self.sum}",
                  f"{self.name}_count {cumulative}"]
        return lines


class Metrics:
    """Everything /metrics shows. Gauges read the engine and registry when scraped."""

    def __init__(self, engine, registry):
        p = "softprompt_"
        self.requests = Counter(p + "requests_total", "HTTP requests by route and status")
        self.adapter_requests = Counter(p + "adapter_requests_total", "Generation requests by adapter ('' = base model)")
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Prompt tokens of finished generation requests")
        self.generated_tokens = Counter(p + "generated_tokens_total", "Tokens generated")
        self.latency = Histogram(p + "request_duration_seconds", "Generation request latency")
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time from arrival to first token")
        self._all = [
            self.requests, self.adapter_requests, self.prompt_tokens, self.generated_tokens, self.latency, self.ttft,
            Gauge(p + "adapter_loads_total", "Adapters loaded and registered", lambda: registry.stats["loads"], "counter"),
            Gauge(p + "adapter_load_failures_total", "Adapters refused or failed to load",
                  lambda: registry.stats["load_failures"], "counter"),
            Gauge(p + "batch_size", "Requests in the last engine step", lambda: engine.last_batch_size),
            Gauge(p + "engine_steps_total", "Engine steps run", lambda: engine.stats["steps"], "counter"),
            Gauge(p + "engine_failed_steps_total", "Engine steps that raised (those retried without their "
                  "newcomers included)", lambda: engine.stats["failed_steps"], "counter"),
            Gauge(p + "prefill_tokens_total", "Prompt tokens computed in prefill (again after a preemption)",
                  lambda: engine.stats["prefill_tokens"], "counter"),
            Gauge(p + "queue_depth", "Requests waiting to be scheduled", lambda: engine.num_waiting),
            Gauge(p + "running_requests", "Requests in the running batch", lambda: engine.num_running),
            Gauge(p + "adapters", "Adapters registered", lambda: len(registry)),
            Gauge(p + "kv_cache_bytes", "Bytes of the key/value pool, allocated once (--kv-cache-memory)",
                  lambda: engine.runner.pool.nbytes()),
            Gauge(p + "kv_cache_slots", "Token slots of the key/value pool", lambda: engine.runner.pool.slots),
            Gauge(p + "kv_cache_slots_held", "Token slots held by running requests (written or reserved)",
                  lambda: engine.runner.pool.held),
            Gauge(p + "kv_cache_slots_used", "Token slots holding running requests' keys and values",
                  lambda: engine.runner.pool.written),
            Gauge(p + "kv_cache_usage", "Fraction of the key/value pool's slots held by running requests",
                  lambda: engine.runner.pool.held / max(engine.runner.pool.slots, 1)),
            Gauge(p + "preemptions_total", "Running requests preempted to make room in the key/value pool",
                  lambda: engine.scheduler.preemptions, "counter"),
            Gauge(p + "kv_cache_compactions_total", "Times the key/value pool's segments were compacted",
                  lambda: engine.runner.pool.compactions, "counter"),
        ]

    def render(self) -> str:
        return "\n".join(line for metric in self._all for line in metric.render()) + "\n"
