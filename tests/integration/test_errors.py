"""Refused requests: each gets its status and `{"error", "error_type"}`, and afterwards the server
still serves, the adapter list is unchanged and the store holds no half-written directories."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import time
import uuid

import httpx
import pytest

from server.demo.tiny import save_tiny_model
from tests.factory import make_adapter

from .conftest import PROMPT, running_server
from .support import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    adapter_files,
    adapter_names,
    assert_error,
    assert_unharmed,
    generate,
    generate_body,
    metric,
    scrape,
    token_ids,
    upload,
)

# ---- invalid adapters ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def foreign_adapters(material):
    """Adapters PEFT made for another llama (hidden size 32, not 64)."""
    other = material / "other-llama-h32"
    if not (other / "config.json").exists():
        save_tiny_model(other, "llama", seed=0, hidden_size=32)
    return {v: make_adapter(other, material / "foreign" / v, v) for v in ("prompt", "prefix")}


def _config(src, **changes) -> bytes:
    config = json.loads((src / CONFIG_FILE).read_text())
    config.update(changes)
    return json.dumps(config).encode()


INVALID = {
    "bad-safetensors-bytes": lambda a, f: {CONFIG_FILE: adapter_files(a["prompt"])[CONFIG_FILE],
                                           WEIGHTS_FILE: b"this is not a safetensors file at all"},
    "truncated-safetensors": lambda a, f: {CONFIG_FILE: adapter_files(a["prompt"])[CONFIG_FILE],
                                           WEIGHTS_FILE: adapter_files(a["prompt"])[WEIGHTS_FILE][:200]},
    "broken-config-json": lambda a, f: {CONFIG_FILE: b'{"peft_type": "PROMPT_TUNING", ',
                                        WEIGHTS_FILE: adapter_files(a["prompt"])[WEIGHTS_FILE]},
    "config-not-an-object": lambda a, f: {CONFIG_FILE: b"[1, 2, 3]",
                                          WEIGHTS_FILE: adapter_files(a["prompt"])[WEIGHTS_FILE]},
    "unsupported-peft-type-lora": lambda a, f: {
        CONFIG_FILE: _config(a["prompt"], peft_type="LORA", r=8, lora_alpha=16, target_modules=["q_proj"]),
        WEIGHTS_FILE: adapter_files(a["prompt"])[WEIGHTS_FILE]},
    "hidden-size-of-another-model-prompt": lambda a, f: adapter_files(f["prompt"]),
    "hidden-size-of-another-model-prefix": lambda a, f: adapter_files(f["prefix"]),
    "weights-of-another-variant": lambda a, f: {CONFIG_FILE: adapter_files(a["prompt"])[CONFIG_FILE],
                                                WEIGHTS_FILE: adapter_files(a["prefix"])[WEIGHTS_FILE]},
    "num-virtual-tokens-mismatch": lambda a, f: {CONFIG_FILE: _config(a["prompt"], num_virtual_tokens=9),
                                                 WEIGHTS_FILE: adapter_files(a["prompt"])[WEIGHTS_FILE]},
    "missing-weights-part": lambda a, f: {CONFIG_FILE: adapter_files(a["prompt"])[CONFIG_FILE]},
    "missing-config-part": lambda a, f: {WEIGHTS_FILE: adapter_files(a["prompt"])[WEIGHTS_FILE]},
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_adapter_is_422(case, client, store_dir, adapter_srcs, foreign_adapters):
    before = adapter_names(client)
    name = f"bad-{case}"
    r = upload(client, name, INVALID[case](adapter_srcs, foreign_adapters))
    body = assert_error(r, 422)
    assert body["error_type"] == "invalid_adapter", body
    assert not (store_dir / name).exists()
    assert_error(client.get(f"/adapters/{name}"), 404, name)
    assert_unharmed(client, store_dir, before)


def test_load_failures_are_counted(client, store_dir, adapter_srcs):
    before = scrape(client)
    r = upload(client, "bad-counted", {CONFIG_FILE: adapter_files(adapter_srcs["prompt"])[CONFIG_FILE],
                                       WEIGHTS_FILE: b"garbage"})
    assert_error(r, 422)
    after = scrape(client)
    assert metric(after, "softprompt_adapter_load_failures_total") == \
        metric(before, "softprompt_adapter_load_failures_total") + 1
    assert metric(after, "softprompt_adapter_loads_total") == metric(before, "softprompt_adapter_loads_total")


def test_upload_that_is_not_multipart_is_refused(client, store_dir):
    before = adapter_names(client)
    r = client.post("/adapters", json={"name": "json-upload"})
    assert r.status_code in (400, 415, 422), r.text
    assert_error(r, r.status_code)
    r = client.post("/adapters", files={CONFIG_FILE: (CONFIG_FILE, b"{}")})  # no name field
    assert_error(r, 422, "name")
    assert_unharmed(client, store_dir, before)


@pytest.mark.parametrize("name", ["../evil", ".x", "..", "a/b", "", "-lead", "x" * 129, "sp ace", "évil"])
def test_bad_name_is_422(name, client, store_dir, adapter_srcs):
    before = adapter_names(client)
    r = upload(client, name, adapter_srcs["prompt"])
    assert_error(r, 422)
    assert not (store_dir.parent / "evil").exists()
    assert_unharmed(client, store_dir, before)


# ---- name conflicts ------------------------------------------------------------------------------

def test_duplicate_name_is_409(client, store_dir, adapter_srcs, reference):
    name = "dup"
    assert upload(client, name, adapter_srcs["prompt"]).status_code == 201
    try:
        before = adapter_names(client)
        desc = client.get(f"/adapters/{name}").json()
        for variant in ("prompt", "prefix"):  # the same files, or different ones: the first stays
            assert_error(upload(client, name, adapter_srcs[variant]), 409, name)
        assert client.get(f"/adapters/{name}").json() == desc
        assert (store_dir / name / WEIGHTS_FILE).read_bytes() == (adapter_srcs["prompt"] / WEIGHTS_FILE).read_bytes()
        assert token_ids(generate(client, PROMPT, name, 6)) == reference("prompt", PROMPT, 6)
        assert_unharmed(client, store_dir, before)
    finally:
        client.delete(f"/adapters/{name}")


def test_concurrent_uploads_of_one_name(server, client, store_dir, adapter_srcs):
    """Two uploads of one name at once: exactly one 201 and one 409, and the store agrees with the registry."""
    before = adapter_names(client)
    contenders = {"prompt": adapter_files(adapter_srcs["prompt"]), "prefix": adapter_files(adapter_srcs["prefix"])}

    async def race(name):
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return await asyncio.gather(*(
                c.post("/adapters", data={"name": name},
                       files={k: (k, v, "application/octet-stream") for k, v in files.items()})
                for files in contenders.values()))

    names = [f"race-{i}" for i in range(4)]
    try:
        for name in names:
            responses = asyncio.run(race(name))
            assert sorted(r.status_code for r in responses) == [201, 409], [r.text for r in responses]
            winner = next(v for v, r in zip(contenders, responses) if r.status_code == 201)
            assert_error(next(r for r in responses if r.status_code == 409), 409, name)
            stored = (store_dir / name / WEIGHTS_FILE).read_bytes()
            assert stored == contenders[winner][WEIGHTS_FILE], "the store holds the loser's files"
            assert client.get(f"/adapters/{name}").json()["peft_type"] == \
                json.loads((store_dir / name / CONFIG_FILE).read_text())["peft_type"]
        assert_unharmed(client, store_dir, before + names)
    finally:
        for name in names:
            client.delete(f"/adapters/{name}")
    assert_unharmed(client, store_dir, before)


# ---- unknown adapters ----------------------------------------------------------------------------

def test_unknown_adapter_is_404(client, store_dir):
    before = adapter_names(client)
    name = f"nope-{uuid.uuid4().hex[:8]}"
    assert_error(client.post("/generate", json=generate_body(PROMPT, name)), 404, name)
    assert_error(client.post("/", json=generate_body(PROMPT, name)), 404, name)
    assert_error(client.post("/generate_stream", json=generate_body(PROMPT, name)), 404, name)
    assert_error(client.post("/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 2}), 404, name)
    assert_error(client.post("/v1/chat/completions", json={"model": name, "max_tokens": 2,
                                                          "messages": [{"role": "user", "content": "hi"}]}), 404, name)
    assert_error(client.delete(f"/adapters/{name}"), 404, name)
    assert_error(client.get(f"/adapters/{name}"), 404, name)
    assert_unharmed(client, store_dir, before)


# ---- request parameters --------------------------------------------------------------------------

@pytest.mark.parametrize("param,value", [
    ("best_of", 2), ("watermark", True),
    ("frequency_penalty", 0.5), ("adapter_source", "s3"),
])
def test_unsupported_parameter_value_is_422(param, value, client, store_dir):
    before = adapter_names(client)
    body = generate_body(PROMPT, None, 4, **{param: value})
    for route in ("/generate", "/generate_stream", "/"):
        r = client.post(route, json=body)
        assert_error(r, 422, param)
    assert_unharmed(client, store_dir, before)


def test_client_defaults_are_accepted(client, uploaded, reference):
    """Every parameter TGI's and LoRAX's clients send, at the null/false they send by default."""
    parameters = {
        "adapter_id": uploaded["prefix"], "adapter_source": None, "merged_adapters": None, "api_token": None,
        "best_of": None, "decoder_input_details": False, "details": True, "do_sample": False,
        "frequency_penalty": None, "grammar": None, "ignore_eos_token": False, "max_new_tokens": 6,
        "repetition_penalty": None, "response_format": None, "return_full_text": False,
        "return_k_alternatives": None, "seed": None, "stop": [], "temperature": None, "top_k": None,
        "top_n_tokens": None, "top_p": None, "truncate": None, "typical_p": None, "watermark": False,
    }
    for route in ("/generate", "/"):
        r = client.post(route, json={"inputs": PROMPT, "parameters": parameters, "stream": False})
        assert r.status_code == 200, r.text
        body = r.json()[0] if route == "/" else r.json()
        assert token_ids(body) == reference("prefix", PROMPT, 6)
    # and the explicit "off" values: best_of 1, typical_p 1.0, top_n_tokens 0, adapter_source "local"
    r = client.post("/generate", json=generate_body(PROMPT, uploaded["prefix"], 6, best_of=1, typical_p=1.0,
                                                    top_n_tokens=0, adapter_source="local"))
    assert r.status_code == 200, r.text
    assert token_ids(r.json()) == reference("prefix", PROMPT, 6)


@pytest.mark.parametrize("body,names", [
    ({"parameters": {"max_new_tokens": 2}}, "inputs"),
    ({"inputs": PROMPT, "parameters": {"max_new_tokens": 0}}, "max_new_tokens"),
    ({"inputs": PROMPT, "parameters": {"max_new_tokens": "many"}}, "max_new_tokens"),
    ({"inputs": PROMPT, "parameters": {"temperature": -1.0, "do_sample": True}}, "temperature"),
    ({"inputs": PROMPT, "parameters": {"top_p": 1.5, "do_sample": True}}, "top_p"),
    ({"inputs": PROMPT, "parameters": {"top_k": -3}}, "top_k"),
    ({"inputs": PROMPT, "parameters": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"inputs": PROMPT, "parameters": {"stop": [""]}}, "stop"),
    ({"inputs": PROMPT, "parameters": {"truncate": 0}}, "truncate"),
    ({"inputs": PROMPT, "parameters": {"seed": -1}}, "seed"),
])
def test_bad_parameter_is_422(body, names, client, store_dir):
    before = adapter_names(client)
    assert_error(client.post("/generate", json=body), 422, names)
    assert_unharmed(client, store_dir, before)


def test_body_that_is_not_json_is_refused(client, store_dir):
    before = adapter_names(client)
    r = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code in (400, 422)
    assert_error(r, r.status_code)
    assert_unharmed(client, store_dir, before)


# ---- limits (a server of its own) ----------------------------------------------------------------

MAX_UPLOAD = 4096
MAX_INPUT = 16
MAX_NEW_LIMIT = 300


@pytest.fixture(scope="module")
def limited(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("limited-server")
    with running_server(model_dir, root / "store", root, "--max-upload-bytes", MAX_UPLOAD,
                        "--max-input-tokens", MAX_INPUT, "--max-new-tokens", MAX_NEW_LIMIT,
                        "--max-batch-size", 1, "--max-waiting", 1, name="limited") as s:
        yield s


def test_limits_in_info(limited):
    with limited.client() as c:
        info = c.get("/info").json()
    assert info["max_input_tokens"] == MAX_INPUT
    assert info["max_new_tokens"] == MAX_NEW_LIMIT
    assert info["max_upload_bytes"] == MAX_UPLOAD
    assert info["max_batch_size"] == 1


def test_upload_over_max_upload_bytes_is_413(limited, adapter_srcs):
    store = limited.adapter_dir
    with limited.client() as c:
        # a normal adapter fits under the limit
        assert upload(c, "small", adapter_srcs["prompt"]).status_code == 201
        files = {CONFIG_FILE: adapter_files(adapter_srcs["prompt"])[CONFIG_FILE], WEIGHTS_FILE: b"\0" * (2 * MAX_UPLOAD)}
        body = assert_error(upload(c, "big", files), 413)
        assert body["error_type"] == "too_large"
        assert_unharmed(c, store, ["small"])

        # the same without a Content-Length (chunked): refused while streaming in
        boundary = uuid.uuid4().hex
        parts = [(b'Content-Disposition: form-data; name="name"', b"big-chunked")] + [
            (f'Content-Disposition: form-data; name="{k}"; filename="{k}"\r\n'
             f"Content-Type: application/octet-stream".encode(), v) for k, v in files.items()]

        def chunks():
            for head, data in parts:
                yield b"--" + boundary.encode() + b"\r\n" + head + b"\r\n\r\n"
                for i in range(0, len(data), 1024):
                    yield data[i:i + 1024]
                yield b"\r\n"
            yield b"--" + boundary.encode() + b"--\r\n"

        r = c.post("/adapters", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert "content-length" not in {k.lower() for k in r.request.headers}
        assert_error(r, 413)
        assert not (store / "big-chunked").exists() and not (store / "big").exists()
        assert_unharmed(c, store, ["small"])
        assert c.delete("/adapters/small").status_code == 204


def test_prompt_over_max_input_tokens_is_422(limited):
    with limited.client() as c:
        assert generate(c, "x" * MAX_INPUT, max_new_tokens=2)["details"]["prompt_tokens"] == MAX_INPUT
        too_long = "x" * (MAX_INPUT + 1)
        assert_error(c.post("/generate", json=generate_body(too_long, None, 2)), 422, "inputs", str(MAX_INPUT))
        assert_error(c.post("/generate_stream", json=generate_body(too_long, None, 2)), 422, "inputs")
        assert_error(c.post("/v1/completions", json={"prompt": too_long, "max_tokens": 2}), 400, "prompt")  # its name there
        # truncate keeps the last tokens, so a long prompt can still be served
        body = generate(c, "y" * 40, max_new_tokens=2, truncate=MAX_INPUT)
        assert body["details"]["prompt_tokens"] == MAX_INPUT
        assert_unharmed(c, limited.adapter_dir, [])


def test_max_new_tokens_over_limit_is_422(limited):
    with limited.client() as c:
        assert_error(c.post("/generate", json=generate_body(PROMPT, None, MAX_NEW_LIMIT + 1)), 422,
                     "max_new_tokens", str(MAX_NEW_LIMIT))
        assert_error(c.post("/generate_stream", json=generate_body(PROMPT, None, MAX_NEW_LIMIT + 1)), 422,
                     "max_new_tokens")
        assert_error(c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": MAX_NEW_LIMIT + 1}), 400,
                     "max_tokens")
        assert_unharmed(c, limited.adapter_dir, [])


def test_full_queue_is_503_with_retry_after(limited):
    """One running and one waiting at most: of six requests at once, some get 503, the rest finish."""
    n_tokens = 200
    kinds = ["generate", "stream", "generate", "stream", "generate", "completions"]

    async def one(c: httpx.AsyncClient, kind: str):
        if kind == "generate":
            r = await c.post("/generate", json=generate_body(PROMPT, None, n_tokens))
            return r, (r.json()["details"]["generated_tokens"] if r.status_code == 200 else None)
        if kind == "completions":
            r = await c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": n_tokens, "temperature": 0})
            return r, (r.json()["usage"]["completion_tokens"] if r.status_code == 200 else None)
        async with c.stream("POST", "/generate_stream", json=generate_body(PROMPT, None, n_tokens)) as r:
            await r.aread()
        count = None
        if r.status_code == 200:
            events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]
            count = len(events) if events[-1].get("details") else -1
        return r, count

    async def run():
        async with httpx.AsyncClient(base_url=limited.url, timeout=120,
                                     limits=httpx.Limits(max_connections=20)) as c:
            return await asyncio.gather(*(one(c, k) for k in kinds))

    results = asyncio.run(run())
    statuses = [r.status_code for r, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses, f"no request was refused: {statuses}"
    assert 200 in statuses, statuses
    for r, count in results:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
            assert_error(r, 503)
        else:
            assert count == n_tokens, f"{r.request.url.path}: {count} tokens"
    with limited.client() as c:
        assert_unharmed(c, limited.adapter_dir, [])


def test_request_bodies_are_capped_before_parsing(start_server):
    """--max-request-bytes: 413 on a declared Content-Length or on the bytes as they come, before
    any JSON is parsed; uploads keep their own cap."""
    server = start_server("--max-request-bytes", "2000")
    with server.client() as c:
        big = {"inputs": "x" * 3000, "parameters": {"max_new_tokens": 2}}
        r = c.post("/generate", json=big)
        assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(10):
                yield b" " * 500
        r = c.post("/generate", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error_type"] == "too_large"
        assert c.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_stop_sequences_are_capped(client):
    r = client.post("/generate", json={"inputs": "Hi", "parameters": {"stop": ["a", "b", "c", "d", "e"]}})
    assert r.status_code == 422 and "--max-stop-sequences" in r.json()["error"]
    r = client.post("/generate", json={"inputs": "Hi", "parameters": {"stop": ["z" * 300]}})
    assert r.status_code == 422 and "256" in r.json()["error"]
    r = client.post("/v1/completions", json={"prompt": "Hi", "stop": ["1", "2", "3", "4", "5"]})
    assert assert_error(r, 400, "--max-stop-sequences")["param"] == "stop"


def test_a_refused_prompt_list_leaves_nothing_running(start_server, tokenizer):
    """An OpenAI prompt list whose later prompts cannot be queued: 503, and the ones that were
    queued are aborted, not left generating for nobody (they are never prefilled)."""
    server = start_server("--max-batch-size", "1", "--max-waiting", "3")
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 300}}
    with server.client() as c, concurrent.futures.ThreadPoolExecutor(2) as pool:
        background = [pool.submit(lambda: server.client().post("/generate", json=body)) for _ in range(2)]
        for _ in range(100):  # one running, one waiting: room for two more in the queue
            metrics = c.get("/metrics").text
            if "softprompt_running_requests 1" in metrics and "softprompt_queue_depth 1" in metrics:
                break
            time.sleep(0.05)
        r = c.post("/v1/completions", json={"prompt": ["a long prompt"] * 3, "max_tokens": 50})
        assert r.status_code == 503
        assert all(f.result().status_code == 200 for f in background)
        prefilled = re.search(r"^softprompt_prefill_tokens_total (\S+)$", c.get("/metrics").text, re.M).group(1)
        assert float(prefilled) == 2 * len(tokenizer("Hello").input_ids), "the refused list's prompts ran"
        r = c.post("/v1/completions", json={"prompt": ["a"] * 4, "max_tokens": 2})
        assert assert_error(r, 400, "--max-waiting")["param"] == "prompt"


def test_a_config_declaring_a_huge_encoder_is_refused_at_once(server, client, adapter_srcs):
    """A 1 KB adapter_config.json asking for a 10^9-wide p-tuning encoder: 422 naming the field,
    in well under a second, and the server's resident memory does not move."""
    def rss_kb() -> int:
        status = open(f"/proc/{server.proc.pid}/status").read()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))

    files = adapter_files(adapter_srcs["ptuning-mlp"])
    config = json.loads(files["adapter_config.json"])
    config["encoder_hidden_size"] = 1_000_000_000
    files["adapter_config.json"] = json.dumps(config).encode()
    assert len(files["adapter_config.json"]) < 1024
    before = rss_kb()
    started = time.perf_counter()
    r = upload(client, "huge-encoder", files)
    assert time.perf_counter() - started < 1.0
    assert r.status_code == 422 and "encoder_hidden_size" in r.json()["error"]
    assert rss_kb() - before < 10_000, "resident memory grew by more than 10 MB"
    assert client.get("/adapters/huge-encoder").status_code == 404
