"""A server whose adapter cache holds two prefixes: a restarted server lists every adapter without
loading any, 50 concurrent requests for one cold adapter make one load (from its saved prefix, no
model forward), and adapters evicted and loaded again answer with PEFT's tokens."""

from __future__ import annotations

import asyncio

import httpx

from .conftest import PROMPT
from .support import generate, metric, scrape, token_ids, upload

NEW = 6
VARIANTS = {"prompt": "c-prompt", "prefix": "c-prefix", "ptuning-mlp": "c-mlp", "prefix-proj": "c-proj"}


def test_cold_adapters_load_once_and_evicted_ones_come_back(start_server, tmp_path, adapter_srcs, reference):
    store = tmp_path / "cache-store"
    first = start_server(adapter_dir=store, name="uploader")
    with first.client() as c:
        for variant, name in VARIANTS.items():
            assert upload(c, name, adapter_srcs[variant]).status_code == 201
        largest = max(c.get(f"/adapters/{n}").json().get("prefix_bytes", 0) for n in VARIANTS.values())
    first.stop()
    assert largest > 0
    capacity = 2 * largest
    server = start_server("--adapter-cache-memory", str(capacity), adapter_dir=store, name="cache")
    with server.client() as c:
        listed = c.get("/adapters").json()["adapters"]
        assert sorted(a["name"] for a in listed) == sorted(VARIANTS.values())
        assert not any(a["resident"] for a in listed) and all(a["peft_type"] for a in listed)
        assert metric(scrape(c), "softprompt_adapter_loads_total") == 0

    async def burst(name: str) -> list[list[int]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as ac:
            bodies = await asyncio.gather(*(ac.post("/generate", json={
                "inputs": PROMPT, "parameters": {"adapter_id": name, "max_new_tokens": NEW, "details": True}})
                for _ in range(50)))
        assert all(r.status_code == 200 for r in bodies), [r.text for r in bodies if r.status_code != 200][:1]
        return [token_ids(r.json()) for r in bodies]

    assert asyncio.run(burst("c-prompt")) == [reference("prompt", PROMPT, NEW)] * 50
    with server.client() as c:
        samples = scrape(c)
        assert metric(samples, "softprompt_adapter_loads_total") == 1
        assert metric(samples, "softprompt_adapter_prefix_reads_total") == 1  # its saved prefix: no forward
        for _ in range(2):
            for variant, name in VARIANTS.items():
                assert token_ids(generate(c, PROMPT, name, NEW)) == reference(variant, PROMPT, NEW), name
                assert metric(scrape(c), "softprompt_adapter_cache_bytes") <= capacity
        samples = scrape(c)
        assert metric(samples, "softprompt_adapter_cache_evictions_total") >= len(VARIANTS)
        assert metric(samples, "softprompt_adapter_prefix_reads_total") == metric(samples,
                                                                                  "softprompt_adapter_loads_total")
        assert metric(samples, "softprompt_adapter_load_seconds_count") == metric(samples,
                                                                                  "softprompt_adapter_loads_total")
