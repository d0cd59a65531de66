"""Request handling the HTTP contract pins down: the final text of a generation cut in the middle
of a character, and a chat template that refuses the messages (422)."""

from __future__ import annotations

import shutil

import pytest

from .conftest import PROMPT, running_server
from .support import generate, generate_body, sse_events, token_ids

# ---- a generation cut in the middle of a multi-byte character ---------------------------------------


@pytest.fixture(scope="module")
def cut(client, tokenizer) -> tuple[int, str]:
    """A max_new_tokens at which the base model's greedy tokens for PROMPT end inside a character
    (the byte-level tokenizer: one token per byte), and what `tokenizer.decode` makes of them."""
    ids = token_ids(generate(client, PROMPT, None, 24))
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return n, text
    pytest.fail(f"no cut inside a character in {ids}: the test would mean nothing")


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def test_generate_text_is_the_full_decode_when_cut_inside_a_character(client, cut):
    n, decoded = cut
    body = generate(client, PROMPT, None, n)
    assert body["details"]["generated_tokens"] == n
    assert body["generated_text"] == decoded
    assert "".join(t["text"] for t in body["details"]["tokens"]) == decoded
    compat = client.post("/", json=generate_body(PROMPT, None, n))
    assert compat.status_code == 200 and compat.json()[0]["generated_text"] == decoded


def test_generate_stream_flushes_the_incomplete_character_in_its_last_message(client, cut):
    n, decoded = cut
    with client.stream("POST", "/generate_stream", json=generate_body(PROMPT, None, n)) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    assert len(events) == n
    assert events[-1]["generated_text"] == decoded
    assert "".join(e["token"]["text"] for e in events) == decoded
    assert events[-1]["token"]["text"].endswith("\ufffd")


def test_completions_text_is_the_full_decode_when_cut_inside_a_character(client, cut):
    n, decoded = cut
    request = {"model": None, "prompt": PROMPT, "max_tokens": n, "temperature": 0}
    r = client.post("/v1/completions", json=request)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == decoded
    with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == decoded
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"][0]["text"].endswith("\ufffd")


# ---- a chat template that refuses the messages ----------------------------------------------------------

_MESSAGES = [{"role": "user", "content": "Hi there"}]


def _message(r) -> str:
    """The error message of an OpenAI route's answer (OpenAI's shape, or the TGI one)."""
    error = r.json()["error"]
    return error["message"] if isinstance(error, dict) else error


STRICT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Conversation roles must be system, user or assistant, not ' + message['role']) }}"
    "{% endif %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_a_chat_template_error_is_422_naming_it(model_dir, tmp_path):
    strict = tmp_path / "strict-model"
    shutil.copytree(model_dir, strict)
    (strict / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    with running_server(strict, tmp_path / "store", tmp_path, name="strict-template") as s, s.client() as c:
        ok = c.post("/v1/chat/completions", json={"messages": _MESSAGES, "max_tokens": 2})
        assert ok.status_code == 200, ok.text
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "tool", "content": "42"}], "max_tokens": 2})
        assert r.status_code == 422, r.text
        message = _message(r)
        assert "chat template" in message and "not tool" in message, message
        assert c.get("/health").status_code == 200
