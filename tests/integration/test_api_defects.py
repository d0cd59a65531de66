"""Request handling the HTTP contract pins down: the final text of a generation cut in the middle
of a character, known parameters the server cannot honour (422 naming them, their client defaults
accepted), unknown fields (ignored, logged), and a chat template that refuses the messages (422)."""

from __future__ import annotations

import shutil
import uuid

import pytest

from .conftest import EOS_PROMPT, PROMPT, running_server
from .support import adapter_names, assert_error, assert_unharmed, generate, generate_body, sse_events, token_ids

MESSAGES = [{"role": "user", "content": "Hi there"}]


def _message(r) -> str:
    """The error message of an OpenAI route's answer (OpenAI's shape, or the TGI one)."""
    error = r.json()["error"]
    return error["message"] if isinstance(error, dict) else error


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
    assert decoded.endswith("\ufffd")  # cut mid-character: the stream must flush it by its end
    assert "".join(c["choices"][0]["text"] for c in chunks) == decoded
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


# ---- a chat template that refuses the messages ----------------------------------------------------------

STRICT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Conversation roles must be system, user or assistant, not ' + message['role']) }}"
    "{% endif %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_a_chat_template_error_is_400_naming_it(model_dir, tmp_path):
    strict = tmp_path / "strict-model"
    shutil.copytree(model_dir, strict)
    (strict / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    with running_server(strict, tmp_path / "store", tmp_path, name="strict-template") as s, s.client() as c:
        ok = c.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
        assert ok.status_code == 200, ok.text
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "tool", "content": "42"}], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        message = _message(r)
        assert "chat template" in message and "not tool" in message, message
        assert c.get("/health").status_code == 200


# ---- known parameters the server cannot honour ---------------------------------------------------------

TGI_REFUSED = [
    ("best_of", 2), ("watermark", True),
    ("frequency_penalty", 0.5),
    ("return_k_alternatives", 2), ("api_token", "hf_x"), ("merged_adapters", {"ids": ["a", "b"]}),
    ("min_p", 0.1), ("min_tokens", 3), ("stop_token_ids", [5]), ("skip_special_tokens", False), ("n", 2),
    ("presence_penalty", 0.5), ("logit_bias", {"5": 10}), ("logprobs", 2),
]
OPENAI_REFUSED = [
    ("suffix", "!"),
    ("grammar", {"type": "regex", "value": "a+"}), ("top_n_tokens", 2), ("decoder_input_details", True),
    ("typical_p", 0.5), ("use_beam_search", True), ("length_penalty", 0.5), ("prompt_logprobs", 1),
    ("guided_json", {"type": "object"}), ("guided_regex", "a+"), ("guided_choice", ["a"]),
    ("allowed_token_ids", [5]), ("bad_words", ["x"]), ("spaces_between_special_tokens", False),
    ("truncate_prompt_tokens", 3), ("add_special_tokens", False), ("top_logprobs", 2),
]
CHAT_REFUSED = [("tools", [{"type": "function", "function": {
    "name": "f", "parameters": {}}}]), ("tool_choice", "required"), ("echo", True),
    ("add_generation_prompt", False), ("continue_final_message", True), ("chat_template", "{{ x }}")]


@pytest.mark.parametrize("param,value", TGI_REFUSED)
def test_tgi_parameter_the_server_cannot_honour_is_422(param, value, client, store_dir):
    before = adapter_names(client)
    for route in ("/generate", "/generate_stream", "/"):
        assert_error(client.post(route, json=generate_body(PROMPT, None, 3, **{param: value})), 422,
                     f"parameters.{param}")
    assert_unharmed(client, store_dir, before)


@pytest.mark.parametrize("param,value", OPENAI_REFUSED)
def test_completions_parameter_the_server_cannot_honour_is_400(param, value, client):
    for stream in (False, True):
        r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "stream": stream, param: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert _message(r).startswith(f"{param}:"), r.text


@pytest.mark.parametrize("param,value", CHAT_REFUSED)
def test_chat_parameter_the_server_cannot_honour_is_400(param, value, client):
    r = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3, param: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert _message(r).startswith(f"{param}:"), r.text


def test_the_defaults_clients_send_are_accepted(client):
    """vLLM's and OpenAI's parameters at their defaults change nothing (TGI's and LoRAX's:
    test_errors.test_client_defaults_are_accepted and test_tgi_clients)."""
    plain = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0}).json()
    defaults = {
        "n": 1, "best_of": 1, "echo": False, "suffix": None, "logprobs": None, "frequency_penalty": 0.0,
        "presence_penalty": 0.0, "logit_bias": {}, "response_format": {"type": "text"}, "min_p": 0.0,
        "min_tokens": 0, "stop_token_ids": [], "skip_special_tokens": True, "use_beam_search": False,
        "length_penalty": 1.0, "prompt_logprobs": None, "guided_json": None, "allowed_token_ids": None,
        "bad_words": [], "spaces_between_special_tokens": True, "truncate_prompt_tokens": None,
        "add_special_tokens": True, "include_stop_str_in_output": False, "user": "someone", "top_logprobs": 0,
    }
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0, **defaults})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == plain["choices"][0]["text"]
    chat = {"messages": MESSAGES, "max_tokens": 4, "temperature": 0}
    plain = client.post("/v1/chat/completions", json=chat).json()
    r = client.post("/v1/chat/completions", json={**chat, "logprobs": False, "top_logprobs": None, "n": 1,
                                                  "tools": None, "tool_choice": "none", "add_generation_prompt": True,
                                                  "continue_final_message": False, "chat_template": None,
                                                  "echo": False, "min_tokens": 0, "stream_options": None})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == plain["choices"][0]["message"]


def _ending_with_eos(client, uploaded) -> tuple[str, str | None, dict]:
    """A prompt and adapter whose greedy generation ends with EOS within 24 tokens, and that generation."""
    for prompt in (EOS_PROMPT, PROMPT, "Hi", "a", "the end", "ok."):
        for name in (*uploaded.values(), None):
            ended = generate(client, prompt, name, 24)
            if ended["details"]["finish_reason"] == "eos_token":
                return prompt, name, ended
    pytest.fail("no generation ends with EOS: the test would mean nothing")


def test_ignore_eos_token_of_lorax_runs_to_max_new_tokens(client, uploaded):
    prompt, name, ended = _ending_with_eos(client, uploaded)
    full = generate(client, prompt, name, 24, ignore_eos_token=True)
    assert full["details"]["finish_reason"] == "length" and full["details"]["generated_tokens"] == 24
    assert token_ids(full)[:len(token_ids(ended))] == token_ids(ended)


# ---- fields not known at all -----------------------------------------------------------------------------

def test_unknown_fields_are_ignored_and_logged_once(server, client):
    """As vLLM: served as if absent, and named in one log line per request."""
    first, second, third = (f"unheard_of_{uuid.uuid4().hex[:8]}" for _ in range(3))
    body = generate_body(PROMPT, None, 3, **{first: 1})
    body[second] = "x"
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, third: [1]})
    assert r.status_code == 200, r.text
    fourth = f"unheard_of_{uuid.uuid4().hex[:8]}"
    r = client.post("/v1/chat/completions", json={"messages": [{**MESSAGES[0], fourth: 1}], "max_tokens": 2})
    assert r.status_code == 200, r.text
    log = server.log_tail(20000).splitlines()
    lines = [line for line in log if first in line or second in line]
    assert len(lines) == 1 and f"parameters.{first}" in lines[0] and second in lines[0], lines
    assert len([line for line in log if third in line]) == 1
    assert len([line for line in log if f"messages[].{fourth}" in line]) == 1
