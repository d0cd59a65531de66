"""Adapter management over HTTP: upload PEFT's own files, generate with them (parity with PEFT),
list (paginated), describe, replace (PUT) while requests run, delete, batches that mix adapters,
the store surviving a restart, --max-adapters, and per-adapter metrics with bounded labels."""

from __future__ import annotations

import asyncio
import hashlib
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
    assert_unharmed,
    generate,
    generate_body,
    leftovers,
    metric,
    scrape,
    sse_events,
    stored,
    token_ids,
    upload,
)

MAX_NEW = 10
PEFT_TYPES = {"prompt": "PROMPT_TUNING", "ptuning-mlp": "P_TUNING", "ptuning-lstm": "P_TUNING",
              "prefix": "PREFIX_TUNING", "prefix-proj": "PREFIX_TUNING"}


def content_version(src) -> str:
    """What docs/adapters.md says an adapter's version is: sha256 over the two files' sha256 digests, 16 hex digits."""
    digests = b"".join(hashlib.sha256((src / f).read_bytes()).digest() for f in (CONFIG_FILE, WEIGHTS_FILE))
    return hashlib.sha256(digests).hexdigest()[:16]


def put(client: httpx.Client, name: str, src, form_name: str | None = None) -> httpx.Response:
    files = {f: (f, (src / f).read_bytes(), "application/octet-stream") for f in (CONFIG_FILE, WEIGHTS_FILE)}
    return client.put(f"/adapters/{name}", data={"name": form_name} if form_name else None, files=files)


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
    assert desc["version"] == content_version(src) and desc["resident"] is True

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
        assert details["adapter_version"] == desc["version"]

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
        assert adapter_names(c) == sorted(["broken", *kept.values()])  # listed by name: read when used
        for name, desc in descs.items():
            got = c.get(f"/adapters/{name}").json()
            for key in ("name", "peft_type", "num_virtual_tokens"):
                assert got[key] == desc[key], key
        for variant, name in kept.items():
            body = generate(c, PROMPT, name, MAX_NEW)
            assert token_ids(body) == tokens[name] == reference(variant, PROMPT, MAX_NEW)
        assert_error(c.post("/generate", json=generate_body(PROMPT, "keep-prompt")), 404, "keep-prompt")
        assert_error(c.post("/generate", json=generate_body(PROMPT, "broken")), 422, "adapter_config.json")
        samples = scrape(c)
        assert metric(samples, "softprompt_adapter_load_failures_total") >= 1
        assert metric(samples, "softprompt_adapter_loads_total") == len(kept)
    assert not (store / ".tmp-deadbeef").exists(), "start-up did not sweep a leftover temporary directory"
    assert (store / "broken").is_dir(), "a bad stored adapter must be skipped, not deleted"
    assert stored(store) == sorted([*kept.values(), "broken"]) and leftovers(store) == []


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
        # PEFT's two files, and the prefix materialized from them (README.md not kept)
        assert sorted(os.listdir(store_dir / "whole-dir")) == [CONFIG_FILE, WEIGHTS_FILE, "prefix.safetensors"]
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


def _long_request(server, client, name: str, n: int) -> tuple[threading.Thread, dict]:
    """A greedy request for `n` tokens with adapter `name` on a thread; returns once it runs.
    result["r"] is its response when the thread ends."""
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
    return t, result


def test_delete_while_a_request_uses_the_adapter(server, client, adapter_srcs, reference):
    """The running request finishes with the adapter it started with; new requests see the change."""
    name, n = "busy", 150
    expected = reference("ptuning-lstm", PROMPT, n)
    assert upload(client, name, adapter_srcs["ptuning-lstm"]).status_code == 201
    t, result = _long_request(server, client, name, n)
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


def test_put_replaces_while_a_request_runs_on_the_old_version(server, client, store_dir, adapter_srcs, reference):
    """The running request finishes on the version it started with, and says so; requests after the
    200 get the new version, on every route; the store holds the new version alone."""
    name, n = "swapped", 150
    old, new = content_version(adapter_srcs["ptuning-lstm"]), content_version(adapter_srcs["prefix"])
    expected = reference("ptuning-lstm", PROMPT, n)
    assert upload(client, name, adapter_srcs["ptuning-lstm"]).status_code == 201
    t, result = _long_request(server, client, name, n)
    try:
        r = put(client, name, adapter_srcs["prefix"], form_name=name)
        assert r.status_code == 200, r.text
        desc = r.json()
        assert desc["name"] == name and desc["version"] == new != old and desc["peft_type"] == "PREFIX_TUNING"
        assert desc["resident"] is True and desc["source"] == "upload"
        assert client.get(f"/adapters/{name}").json() == desc
        body = generate(client, PROMPT, name, MAX_NEW)
        assert token_ids(body) == reference("prefix", PROMPT, MAX_NEW)
        assert body["details"]["adapter_version"] == new
        completion = client.post("/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 2,
                                                          "temperature": 0})
        assert completion.status_code == 200 and completion.json()["adapter_version"] == new
        with client.stream("POST", "/generate_stream", json=generate_body(PROMPT, name, 3)) as s:
            events = sse_events(s.iter_lines())
        assert events[-1]["details"]["adapter_version"] == new
        assert (store_dir / name / WEIGHTS_FILE).read_bytes() == (adapter_srcs["prefix"] / WEIGHTS_FILE).read_bytes()
        assert os.listdir(store_dir / ".versions" / name) == [new] and leftovers(store_dir) == []
        t.join(timeout=60)
        assert result["r"].status_code == 200, result["r"].text
        assert token_ids(result["r"].json()) == expected
        assert result["r"].json()["details"]["adapter_version"] == old
    finally:
        t.join(timeout=60)
        client.delete(f"/adapters/{name}")


def test_a_refused_put_changes_nothing(client, store_dir, adapter_srcs, reference):
    name, src = "stays", adapter_srcs["prompt"]
    assert upload(client, name, src).status_code == 201
    try:
        before = client.get(f"/adapters/{name}").json()
        registered = adapter_names(client)
        assert_error(put(client, "never-uploaded", src), 404, "never-uploaded")
        broken = {CONFIG_FILE: (src / CONFIG_FILE).read_bytes(), WEIGHTS_FILE: b"garbage"}
        r = client.put(f"/adapters/{name}", files={k: (k, v) for k, v in broken.items()})
        assert_error(r, 422, WEIGHTS_FILE)
        assert_error(put(client, name, adapter_srcs["prefix"], form_name="other"), 422, "other", name)
        r = client.put(f"/adapters/{name}", files={CONFIG_FILE: (CONFIG_FILE, (src / CONFIG_FILE).read_bytes())})
        assert_error(r, 422, WEIGHTS_FILE)
        assert_error(client.put(f"/adapters/{name}", json={"x": 1}), 422, "multipart")
        assert_error(put(client, "bad%20name", src), 422, "bad name")
        assert client.get(f"/adapters/{name}").json() == before
        assert (store_dir / name / WEIGHTS_FILE).read_bytes() == (src / WEIGHTS_FILE).read_bytes()
        assert token_ids(generate(client, PROMPT, name, MAX_NEW)) == reference("prompt", PROMPT, MAX_NEW)
        assert_unharmed(client, store_dir, registered)
    finally:
        client.delete(f"/adapters/{name}")


def test_list_is_paginated_by_name(client, uploaded):
    everything = client.get("/adapters", params={"limit": 1000}).json()
    assert everything["next_after"] is None
    names = [a["name"] for a in everything["adapters"]]
    assert names == sorted(names) and set(uploaded.values()) <= set(names)
    assert client.get("/adapters").json() == everything  # fewer than the default page of 100
    for a in everything["adapters"]:
        assert a["resident"] is True and isinstance(a["version"], str) and len(a["version"]) == 16

    walked, after, pages = [], None, 0
    while True:
        page = client.get("/adapters", params={"limit": 2, **({"after": after} if after else {})}).json()
        assert len(page["adapters"]) <= 2
        walked += [a["name"] for a in page["adapters"]]
        pages += 1
        after = page["next_after"]
        if after is None:
            break
        assert after == walked[-1]
    assert walked == names and pages == max(1, -(-len(names) // 2))
    first = names[0]
    assert [a["name"] for a in client.get("/adapters", params={"after": first, "limit": 1}).json()["adapters"]] == \
        names[1:2]
    assert client.get("/adapters", params={"after": "~"}).json() == {"adapters": [], "next_after": None}
    for bad in ({"limit": 0}, {"limit": 1001}, {"limit": "many"}, {"limit": -1}):
        assert_error(client.get("/adapters", params=bad), 422, "limit")
    assert_error(client.get("/adapters", params={"after": "x" * 300}), 422, "after")


def test_max_adapters_and_bounded_metric_labels(start_server, adapter_srcs):
    """--max-adapters 3: a fourth upload gets 507 naming the limit, until one is deleted.
    --max-adapter-labels 2: the first two adapters seen keep their names in the per-adapter
    metrics, every later one counts under "__other__", and the base model under ""."""
    server = start_server("--max-adapters", "3", "--max-adapter-labels", "2", name="bounded")
    srcs = [adapter_srcs[v] for v in ("prompt", "prefix", "ptuning-mlp", "prefix-proj")]
    with server.client() as c:
        for name, src in zip("abc", srcs):
            assert upload(c, name, src).status_code == 201
        assert_error(upload(c, "d", srcs[3]), 507, "--max-adapters 3")
        assert adapter_names(c) == ["a", "b", "c"]
        assert put(c, "a", srcs[3]).status_code == 200  # a replace takes no room

        tokens = {}
        for name in ("a", "b", "c", "c", None):
            body = generate(c, PROMPT, name, 3)
            tokens[name or ""] = tokens.get(name or "", 0) + body["details"]["generated_tokens"]
        assert c.delete("/adapters/a").status_code == 204
        assert upload(c, "d", srcs[3]).status_code == 201
        tokens["d"] = generate(c, PROMPT, "d", 3)["details"]["generated_tokens"]
        samples = scrape(c)

    def series(family):
        return {dict(labels)["adapter"]: value for (name, labels), value in samples.items() if name == family}

    requests = series("softprompt_adapter_requests_total")
    assert requests == {"a": 1, "b": 1, "__other__": 3, "": 1}, requests  # a keeps its series once deleted
    generated = series("softprompt_adapter_generated_tokens_total")
    assert generated == {"a": tokens["a"], "b": tokens["b"], "__other__": tokens["c"] + tokens["d"],
                         "": tokens[""]}, generated
