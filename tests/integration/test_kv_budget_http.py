"""A server whose KV cache holds about three requests: concurrent streams of mixed adapters are
preempted and computed again, and each client still gets exactly its tokens, each once."""

from __future__ import annotations

import asyncio
import json

import httpx

from .conftest import PROMPT
from .support import assert_error, generate, metric, scrape, sse_events, token_ids, upload

NEW = 64  # two growths past the first capacity: running requests must grow by 32 slots
SLOTS = 200  # the pool: about two to three requests of prefix + prompt + NEW


def _slot_bytes(model_dir) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim * 4  # float32


async def _stream(client: httpx.AsyncClient, adapter: str | None) -> list[dict]:
    parameters = {"max_new_tokens": NEW, "do_sample": False}
    if adapter:
        parameters["adapter_id"] = adapter
    async with client.stream("POST", "/generate_stream", json={"inputs": PROMPT, "parameters": parameters}) as r:
        assert r.status_code == 200, await r.aread()
        return sse_events([line async for line in r.aiter_lines()])


def test_streams_through_preemptions_get_each_token_once(model_dir, adapter_srcs, start_server):
    server = start_server("--kv-cache-memory", str(SLOTS * _slot_bytes(model_dir)), "--dtype", "float32")
    names = [None, "kv-prompt", "kv-prefix", "kv-ptuning"]
    with server.client() as c:
        for name, variant in zip(names[1:], ("prompt", "prefix", "ptuning-mlp")):
            assert upload(c, name, adapter_srcs[variant]).status_code == 201
        info = c.get("/info").json()
        assert info["kv_cache_tokens"] == SLOTS and info["kv_cache_bytes"] == SLOTS * _slot_bytes(model_dir)
        alone = {name: generate(c, PROMPT, name, NEW) for name in names}
        assert metric(scrape(c), "softprompt_preemptions_total") == 0

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as ac:
            return await asyncio.gather(*(_stream(ac, names[i % len(names)]) for i in range(12)))

    for i, events in enumerate(asyncio.run(burst())):
        name = names[i % len(names)]
        assert [e["token"]["id"] for e in events] == token_ids(alone[name]), name
        for field in ("finish_reason", "generated_tokens"):
            assert events[-1]["details"][field] == alone[name]["details"][field]
        assert all(e["generated_text"] is None for e in events[:-1])
    with server.client() as c:
        samples = scrape(c)
        assert metric(samples, "softprompt_preemptions_total") > 0
        assert metric(samples, "softprompt_kv_cache_usage") == 0 and metric(samples, "softprompt_kv_cache_slots") == SLOTS
        too_big = c.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": SLOTS}})
        assert_error(too_big, 422, "max_new_tokens", f"more than the KV cache holds ({SLOTS} tokens")
