"""`--adapter-store s3://bucket/prefix`: real server processes sharing one store in a real
S3-compatible server (moto's, its own process on loopback). An upload to one server is stored in
the bucket; a second server finds it at start-up with the same tokens, serves one uploaded after
its start on first use (one fetch for concurrent requests), and follows a delete or replace made
through the first within 2 s (the registry's version check on use, adapters/registry.py)."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.s3 import client

from .conftest import PROMPT
from .support import (CONFIG_FILE, WEIGHTS_FILE, adapter_names, assert_error, generate, generate_body, metric, scrape,
                      token_ids, upload)

MAX_NEW = 10  # as test_adapters_http: the session caches PEFT's reference per (adapter, prompt, length)


def _flags(endpoint: str, bucket: str) -> list[str]:
    return ["--adapter-store", f"s3://{bucket}/models/tiny", "--s3-endpoint-url", endpoint]


def test_servers_share_an_s3_store(start_server, s3_endpoint, bucket, tmp_path, adapter_srcs, reference):
    first = start_server(*_flags(s3_endpoint, bucket), adapter_dir=tmp_path / "cache-1", name="s3-first")
    with first.client() as c:
        assert upload(c, "sea", adapter_srcs["ptuning-mlp"]).status_code == 201
        tokens = token_ids(generate(c, PROMPT, "sea", MAX_NEW))
        assert tokens == reference("ptuning-mlp", PROMPT, MAX_NEW)
        assert_error(upload(c, "sea", adapter_srcs["prompt"]), 409, "sea")
    keys = [o["Key"] for o in client(s3_endpoint).list_objects_v2(Bucket=bucket)["Contents"]]
    assert "models/tiny/adapters/sea.json" in keys and len(keys) == 3, keys

    second = start_server(*_flags(s3_endpoint, bucket), adapter_dir=tmp_path / "cache-2", name="s3-second")
    with first.client() as c1, second.client() as c2:
        assert adapter_names(c2) == ["sea"]
        assert c2.get("/adapters/sea").json()["source"] == "s3"
        assert token_ids(generate(c2, PROMPT, "sea", MAX_NEW)) == tokens

        # uploaded to the first server after the second started: the second loads it on first use, once
        assert upload(c1, "late", adapter_srcs["prefix-proj"]).status_code == 201
        loads = metric(scrape(c2), "softprompt_adapter_loads_total")

        async def many(source: str | None):
            extra = {"adapter_source": source} if source else {}
            async with httpx.AsyncClient(base_url=second.url, timeout=60) as ac:
                return await asyncio.gather(*(ac.post("/generate", json=generate_body(
                    PROMPT, "late", MAX_NEW, **extra)) for _ in range(4)))

        for r in asyncio.run(many(None)) + asyncio.run(many("s3")):
            assert r.status_code == 200, r.text
            assert token_ids(r.json()) == reference("prefix-proj", PROMPT, MAX_NEW)
        assert metric(scrape(c2), "softprompt_adapter_loads_total") == loads + 1, "one fetch for concurrent requests"
        assert_error(c2.post("/generate", json=generate_body(PROMPT, "nowhere", 2, adapter_source="s3")), 404,
                     "nowhere", f"s3://{bucket}/models/tiny")

        # first asked for with adapter_source "s3": registered as the store's, so a replace and a delete
        # through the first server are followed as for any stored adapter
        assert upload(c1, "fetched", adapter_srcs["prompt"]).status_code == 201
        r = c2.post("/generate", json=generate_body(PROMPT, "fetched", MAX_NEW, adapter_source="s3"))
        assert token_ids(r.json()) == reference("prompt", PROMPT, MAX_NEW)
        assert c2.get("/adapters/fetched").json()["source"] == "s3"
        files = {f: (f, (adapter_srcs["ptuning-lstm"] / f).read_bytes()) for f in (CONFIG_FILE, WEIGHTS_FILE)}
        replaced = c1.put("/adapters/fetched", files=files).json()["version"]
        assert _within(2.0, lambda: generate(c2, PROMPT, "fetched", 2)["details"]["adapter_version"] == replaced)
        assert token_ids(generate(c2, PROMPT, "fetched", MAX_NEW)) == reference("ptuning-lstm", PROMPT, MAX_NEW)
        assert c1.delete("/adapters/fetched").status_code == 204
        assert _within(2.0, lambda: c2.post("/generate", json=generate_body(PROMPT, "fetched", 2)).status_code == 404)

        # a delete on one server removes it from the store, and the other stops serving it within 2 s
        assert c1.delete("/adapters/late").status_code == 204
        assert not any("late" in o["Key"] for o in client(s3_endpoint).list_objects_v2(Bucket=bucket)["Contents"])
        assert _within(2.0, lambda: c2.post("/generate", json=generate_body(PROMPT, "late", 2)).status_code == 404)

        # a replace on one server: the pointer is overwritten, the old version's files removed; the
        # other server serves the new version within 2 s
        old_version = c1.get("/adapters/sea").json()["version"]
        files = {f: (f, (adapter_srcs["prefix"] / f).read_bytes()) for f in (CONFIG_FILE, WEIGHTS_FILE)}
        r = c1.put("/adapters/sea", files=files)
        assert r.status_code == 200, r.text
        new_version = r.json()["version"]
        assert new_version != old_version
        keys = [o["Key"] for o in client(s3_endpoint).list_objects_v2(Bucket=bucket)["Contents"]]
        assert "models/tiny/adapters/sea.json" in keys and len(keys) == 3, keys
        assert token_ids(generate(c1, PROMPT, "sea", MAX_NEW)) == reference("prefix", PROMPT, MAX_NEW)
        assert _within(2.0, lambda: generate(c2, PROMPT, "sea", MAX_NEW)["details"]["adapter_version"] == new_version)
        assert token_ids(generate(c2, PROMPT, "sea", MAX_NEW)) == reference("prefix", PROMPT, MAX_NEW)
        assert c2.get("/adapters/sea").json()["version"] == new_version


def _within(seconds: float, condition) -> bool:
    """Whether `condition()` holds at some point within `seconds` (polled every 0.1 s)."""
    deadline = time.monotonic() + seconds
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
