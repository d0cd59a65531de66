"""/generate, the TGI compatibility route POST /, and /generate_stream as Server-Sent Events."""

from __future__ import annotations

import json

from .conftest import EOS_PROMPT, PROMPT
from .support import generate, generate_body, sse_events, token_ids

MAX_NEW = 8


def stream(client, body: dict) -> list[dict]:
    with client.stream("POST", "/generate_stream", json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r.iter_lines())


def test_generate_shape(client):
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"generated_text"}  # details only when asked for
    assert isinstance(body["generated_text"], str)

    body = generate(client, PROMPT, max_new_tokens=4)
    d = body["details"]
    assert d["finish_reason"] == "length"
    assert d["generated_tokens"] == 4 == len(d["tokens"])
    assert d["prompt_tokens"] == len(PROMPT)
    assert d["prefill"] == []
    for t in d["tokens"]:
        assert set(t) >= {"id", "text", "logprob", "special"}
        assert isinstance(t["id"], int) and isinstance(t["logprob"], float) and t["logprob"] <= 0
        assert t["special"] is False


def test_details_seed_is_null_for_greedy(client):
    """API.md's response shape, as TGI sends it: `"seed": null` when not sampling (not left out)."""
    for route in ("/generate", "/"):
        r = client.post(route, json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "details": True}})
        assert r.status_code == 200, r.text
        details = (r.json()[0] if route == "/" else r.json())["details"]
        assert "seed" in details and details["seed"] is None, f"{route}: details = {details}"


def test_defaults_without_parameters(client):
    r = client.post("/generate", json={"inputs": PROMPT})
    assert r.status_code == 200, r.text
    full = generate(client, PROMPT, max_new_tokens=20)
    assert r.json()["generated_text"] == full["generated_text"]


def test_compat_route_returns_a_list(client, uploaded):
    body = generate_body(PROMPT, uploaded["prefix"], MAX_NEW)
    r = client.post("/", json=body)
    assert r.status_code == 200, r.text
    assert r.json() == [generate(client, PROMPT, uploaded["prefix"], MAX_NEW)]


def test_return_full_text(client):
    plain = generate(client, PROMPT, max_new_tokens=4)
    full = generate(client, PROMPT, max_new_tokens=4, return_full_text=True)
    assert full["generated_text"] == PROMPT + plain["generated_text"]
    assert token_ids(full) == token_ids(plain)


def test_eos_finishes_early(client, uploaded, reference):
    """The prefix-projection adapter ends EOS_PROMPT with EOS within a few tokens (PEFT agrees)."""
    expected = reference("prefix-proj", EOS_PROMPT, 12)
    assert expected[-1] == 2 and len(expected) < 12, "the material no longer ends with EOS here"
    body = generate(client, EOS_PROMPT, uploaded["prefix-proj"], 12)
    assert token_ids(body) == expected
    assert body["details"]["finish_reason"] == "eos_token"
    assert body["details"]["tokens"][-1]["special"] is True
    events = stream(client, generate_body(EOS_PROMPT, uploaded["prefix-proj"], 12))
    assert [e["token"]["id"] for e in events] == expected
    assert events[-1]["details"]["finish_reason"] == "eos_token"


def test_seeded_sampling_is_reproducible(client):
    params = {"do_sample": True, "temperature": 1.5, "seed": 1234}
    a = generate(client, PROMPT, max_new_tokens=MAX_NEW, **params)
    b = generate(client, PROMPT, max_new_tokens=MAX_NEW, **params)
    assert token_ids(a) == token_ids(b)
    assert a["details"]["seed"] == 1234
    unseeded = generate(client, PROMPT, max_new_tokens=MAX_NEW, do_sample=True)
    assert isinstance(unseeded["details"]["seed"], int)


def test_generate_stream_sse(client, uploaded, reference):
    for variant in (None, "ptuning-mlp"):
        name = uploaded.get(variant)
        events = stream(client, generate_body(PROMPT, name, MAX_NEW))
        full = generate(client, PROMPT, name, MAX_NEW)
        assert len(events) == MAX_NEW, "one event per token"
        assert [e["token"]["id"] for e in events] == token_ids(full) == reference(variant, PROMPT, MAX_NEW)
        for i, e in enumerate(events):
            assert set(e["token"]) >= {"id", "text", "logprob", "special"}
            if i < len(events) - 1:
                assert e["generated_text"] is None and e["details"] is None, e
        last = events[-1]
        assert last["generated_text"] == full["generated_text"]
        assert "".join(e["token"]["text"] for e in events) == full["generated_text"]
        d = last["details"]
        assert d["finish_reason"] == "length"
        assert d["generated_tokens"] == MAX_NEW
        assert d["prompt_tokens"] == len(PROMPT)
        assert d["seed"] is None


def test_stream_flag_on_generate_and_compat(client):
    """`"stream": true` in the body (what TGI's clients send to POST /) streams too."""
    body = {**generate_body(PROMPT, None, 4), "stream": True}
    for route in ("/", "/generate"):
        with client.stream("POST", route, json=body) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r.iter_lines())
        assert len(events) == 4 and events[-1]["details"]["generated_tokens"] == 4


def test_stream_sends_each_token_as_it_is_generated(client):
    """The first event arrives well before a long generation ends (no buffering of the whole stream)."""
    import time

    with client.stream("POST", "/generate_stream", json=generate_body(PROMPT, None, 200)) as r:
        t0 = time.monotonic()
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        t_first = time.monotonic() - t0
        rest = [line for line in lines if line.startswith("data:")]
        t_all = time.monotonic() - t0
    assert json.loads(first[5:])["details"] is None
    assert len(rest) == 199
    assert t_first < t_all / 2, (t_first, t_all)


def test_stop_sequence(client):
    full = generate(client, PROMPT, max_new_tokens=12)
    texts = [t["text"] for t in full["details"]["tokens"]]
    i = next(i for i, t in enumerate(texts) if t)  # the first token that completes some text
    stop = texts[i]
    body = generate(client, PROMPT, max_new_tokens=12, stop=[stop])
    assert body["details"]["finish_reason"] == "stop_sequence"
    assert token_ids(body) == token_ids(full)[: i + 1]
    assert body["generated_text"] == "".join(texts[: i + 1])  # TGI keeps the stop sequence
    events = stream(client, generate_body(PROMPT, None, 12, stop=[stop]))
    assert [e["token"]["id"] for e in events] == token_ids(body)
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"
