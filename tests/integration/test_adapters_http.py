"""Adapter management over HTTP: upload PEFT's own files, generate with them (parity with PEFT),
list, describe, delete, batches that mix adapters, and the store surviving a restart."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import httpx
import pytest

from tests.factory import VARIANTS

from .conftest import PROMPT
from .support import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    adapter_names,
    assert_error,
    generate,
    generate_body,
    leftovers,
    metric,
    scrape,
    token_ids,
    upload,
)

MAX_NEW = 10
PEFT_TYPES = {"prompt": "PROMPT_TUNING", "ptuning-mlp": "P_TUNING", "ptuning-lstm": "P_TUNING",
              "prefix": "PREFIX_TUNING", "prefix-proj": "PREFIX_TUNING"}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_upload_generate_delete(variant, client, store_dir, adapter_srcs, reference):
    name = f"cycle-{variant}"
    src = adapter_srcs[variant]
    peft_config = json.loads((src / CONFIG_FILE).read_text())
    before = adapter_names(client)

    r = upload(client, name, src)
    assert r.status_code == 201, r.text
    desc = r.json()
    assert desc["name"] == name
    assert desc["peft_type"] == PEFT_TYPES[variant] == peft_config["peft_type"]
    assert desc["num_virtual_tokens"] == peft_config["num_virtual_tokens"]
    assert desc["source"] == "upload"
    assert isinstance(desc["created_at"], (int, float))

    # stored as PEFT wrote it, byte for byte, and nothing else left behind
    assert (store_dir / name / CONFIG_FILE).read_bytes() == (src / CONFIG_FILE).read_bytes()
    assert (store_dir / name / WEIGHTS_FILE).read_bytes() == (src / WEIGHTS_FILE).read_bytes()
    assert leftovers(store_dir) == []

    assert adapter_names(client) == sorted(before + [name])
    listed = {a["name"]: a for a in client.get("/adapters").json()["adapters"]}
    assert listed[name] == desc
    r = client.get(f"/adapters/{name}")
    assert r.status_code == 200
    assert r.json() == desc

    for prompt in (PROMPT, "a"):
        body = generate(client, prompt, name, MAX_NEW)
        expected = reference(variant, prompt, MAX_NEW)
        assert token_ids(body) == expected, f"{variant} on {prompt!r}"
        details = body["details"]
        assert details["generated_tokens"] == len(expected)
        assert details["finish_reason"] == ("eos_token" if len(expected) < MAX_NEW else "length")
        assert details["prompt_tokens"] == len(prompt)  # the byte tokenizer: one token per byte
        assert "".join(t["text"] for t in details["tokens"]) == body["generated_text"]

    r = client.delete(f"/adapters/{name}")
    assert r.status_code == 204, r.text
    assert r.content == b""
    assert not (store_dir / name).exists()
    assert leftovers(store_dir) == []
    assert adapter_names(client) == before
    assert_error(client.get(f"/adapters/{name}"), 404, name)
    assert_error(client.post("/generate", json=generate_body(PROMPT, name)), 404, name)
    assert_error(client.post("/generate_stream", json=generate_body(PROMPT, name)), 404, name)
    assert_error(client.delete(f"/adapters/{name}"), 404, name)


def test_base_model_generation_matches_hf(client, reference):
    for prompt in (PROMPT, "the quick brown fox"):
        body = generate(client, prompt, None, MAX_NEW)
        assert token_ids(body) == reference(None, prompt, MAX_NEW)
    # adapter_id "" and the base model's own name also mean no adapter
    assert token_ids(generate(client, PROMPT, "", MAX_NEW)) == reference(None, PROMPT, MAX_NEW)


def test_mixed_batch_matches_peft(server, uploaded, reference):
    """Every adapter and the base model in flight at once: each still gets PEFT's greedy tokens."""
    prompts = (PROMPT, "the quick brown fox jumps")
    jobs = [(v, p) for v in [None, *uploaded] for p in prompts]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return await asyncio.gather(*(
                c.post("/generate", json=generate_body(p, uploaded.get(v), MAX_NEW)) for v, p in jobs))

    responses = asyncio.run(run())
    for (variant, prompt), r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        assert token_ids(r.json()) == reference(variant, prompt, MAX_NEW), f"{variant} on {prompt!r}"


def test_adapter_requests_metric_counts_by_adapter(client, uploaded):
    name = uploaded["prompt"]
    before = metric(scrape(client), "softprompt_adapter_requests_total", default=0.0, adapter=name)
    generate(client, PROMPT, name, 2)
    generate(client, PROMPT, name, 2)
    assert metric(scrape(client), "softprompt_adapter_requests_total", adapter=name) == before + 2


def test_store_survives_restart(start_server, tmp_path, adapter_srcs, reference):
    store = tmp_path / "persistent-store"
    kept = {"ptuning-lstm": "keep-lstm", "prefix-proj": "keep-prefix-proj", "prompt": "keep-prompt"}
    first = start_server(adapter_dir=store, name="before-restart")
    with first.client() as c:
        for variant, name in kept.items():
            assert upload(c, name, adapter_srcs[variant]).status_code == 201
        assert c.delete("/adapters/keep-prompt").status_code == 204
        del kept["prompt"]
        descs = {a["name"]: a for a in c.get("/adapters").json()["adapters"]}
        tokens = {name: token_ids(generate(c, PROMPT, name, MAX_NEW)) for name in kept.values()}
        # SIGTERM with no request running (and this client's keep-alive connection open): a prompt exit 0
        t0 = time.monotonic()
        first.terminate()
        assert first.wait(timeout=30) == 0, first.log_tail()
        assert time.monotonic() - t0 < 10

    # what a crash could leave: a half-written upload, and a directory that is no adapter
    (store / ".tmp-deadbeef").mkdir()
    (store / ".tmp-deadbeef" / CONFIG_FILE).write_text("{")
    (store / "broken").mkdir()
    (store / "broken" / CONFIG_FILE).write_text("{not json")
    (store / "broken" / WEIGHTS_FILE).write_bytes(b"garbage")

    second = start_server(adapter_dir=store, name="after-restart")
    with second.client() as c:
        assert adapter_names(c) == sorted(kept.values())
        for name, desc in descs.items():
            got = c.get(f"/adapters/{name}").json()
            for key in ("name", "peft_type", "num_virtual_tokens"):
                assert got[key] == desc[key], key
        for variant, name in kept.items():
            body = generate(c, PROMPT, name, MAX_NEW)
            assert token_ids(body) == tokens[name] == reference(variant, PROMPT, MAX_NEW)
        assert_error(c.post("/generate", json=generate_body(PROMPT, "keep-prompt")), 404, "keep-prompt")
        assert_error(c.post("/generate", json=generate_body(PROMPT, "broken")), 404, "broken")
        samples = scrape(c)
        assert metric(samples, "softprompt_adapter_load_failures_total") >= 1
        assert metric(samples, "softprompt_adapter_loads_total") == len(kept)
    assert not (store / ".tmp-deadbeef").exists(), "start-up did not sweep a leftover temporary directory"
    assert (store / "broken").is_dir(), "a bad stored adapter must be skipped, not deleted"
    assert sorted(os.listdir(store)) == sorted([*kept.values(), "broken"])


def test_upload_the_whole_save_pretrained_directory(client, store_dir, adapter_srcs, reference):
    """Every file save_pretrained wrote (README.md too) as parts: the extra file is ignored."""
    src = adapter_srcs["ptuning-mlp"]
    files = {p.name: p.read_bytes() for p in sorted(src.iterdir()) if p.is_file()}
    assert "README.md" in files and CONFIG_FILE in files and WEIGHTS_FILE in files
    r = client.post("/adapters", data={"name": "whole-dir"},
                    files=[("files", (k, v, "application/octet-stream")) for k, v in files.items()])
    assert r.status_code == 201, r.text
    try:
        assert token_ids(generate(client, PROMPT, "whole-dir", MAX_NEW)) == reference("ptuning-mlp", PROMPT, MAX_NEW)
        assert sorted(os.listdir(store_dir / "whole-dir")) == [CONFIG_FILE, WEIGHTS_FILE]
    finally:
        assert client.delete("/adapters/whole-dir").status_code == 204


def test_reuse_a_deleted_name_for_another_adapter(client, adapter_srcs, reference):
    name = "reused"
    assert upload(client, name, adapter_srcs["prompt"]).status_code == 201
    assert token_ids(generate(client, PROMPT, name, MAX_NEW)) == reference("prompt", PROMPT, MAX_NEW)
    assert client.delete(f"/adapters/{name}").status_code == 204
    assert upload(client, name, adapter_srcs["prefix"]).status_code == 201
    try:
        assert client.get(f"/adapters/{name}").json()["peft_type"] == "PREFIX_TUNING"
        assert token_ids(generate(client, PROMPT, name, MAX_NEW)) == reference("prefix", PROMPT, MAX_NEW)
    finally:
        assert client.delete(f"/adapters/{name}").status_code == 204


def test_delete_while_a_request_uses_the_adapter(server, client, adapter_srcs, reference):
    """The running request finishes with the adapter it started with; new requests see the change."""
    name, n = "busy", 150
    expected = reference("ptuning-lstm", PROMPT, n)
    assert upload(client, name, adapter_srcs["ptuning-lstm"]).status_code == 201
    result = {}

    def long_request():
        with server.client() as c:
            result["r"] = c.post("/generate", json=generate_body(PROMPT, name, n))

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.monotonic() + 30
    while metric(scrape(client), "softprompt_running_requests") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        assert client.delete(f"/adapters/{name}").status_code == 204
        assert_error(client.post("/generate", json=generate_body(PROMPT, name, 2)), 404, name)
        # the name is free again at once, for a different adapter
        assert upload(client, name, adapter_srcs["prefix"]).status_code == 201
        assert token_ids(generate(client, PROMPT, name, MAX_NEW)) == reference("prefix", PROMPT, MAX_NEW)
        t.join(timeout=60)
        assert result["r"].status_code == 200, result["r"].text
        assert token_ids(result["r"].json()) == expected
    finally:
        t.join(timeout=60)
        client.delete(f"/adapters/{name}")
