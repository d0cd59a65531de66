"""Structured output over HTTP: TGI's `grammar` and OpenAI's `response_format` constrain every adapter
kind to an answer that parses and validates (or matches the regex), through the raw routes and the
published clients; a bad schema or regex is a 422 naming the parameter."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tests.conftest import PEFT_TYPES

from .conftest import PROMPT

# Short enough that a random tiny model completes it well within the token budget.
SCHEMA = {"type": "object", "properties": {"label": {"enum": ["yes", "no", "maybe"]},
                                           "score": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["label", "score"], "additionalProperties": False}
REGEX = r"[A-C]{2}-[0-9]{3}"
VARIANTS = [None, *PEFT_TYPES]


def _adapter(uploaded, variant):
    return None if variant is None else uploaded[variant]


@pytest.mark.parametrize("variant", VARIANTS)
def test_tgi_json_grammar_every_adapter_kind(client, uploaded, variant):
    for seed in (None, 7):  # greedy, then sampled
        r = client.post("/generate", json={"inputs": PROMPT, "parameters": {
            "adapter_id": _adapter(uploaded, variant), "max_new_tokens": 80, "details": True,
            "do_sample": seed is not None, "seed": seed, "grammar": {"type": "json", "value": SCHEMA}}})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["details"]["finish_reason"] == "eos_token", body
        jsonschema.validate(json.loads(body["generated_text"]), SCHEMA)


@pytest.mark.parametrize("variant", VARIANTS)
def test_tgi_regex_grammar_every_adapter_kind(client, uploaded, variant):
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": {
        "adapter_id": _adapter(uploaded, variant), "max_new_tokens": 20, "details": True,
        "grammar": {"type": "regex", "value": REGEX}}})
    assert r.status_code == 200, r.text
    assert re.fullmatch(REGEX, r.json()["generated_text"]), r.json()
    assert r.json()["details"]["finish_reason"] == "eos_token"


@pytest.mark.parametrize("variant", VARIANTS)
def test_openai_json_schema_every_adapter_kind(server, client, uploaded, variant):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    r = client.post("/v1/completions", json={"model": _adapter(uploaded, variant) or server.model_name,
                                             "prompt": [PROMPT, "Hi"], "max_tokens": 80, "temperature": 0,
                                             "response_format": fmt})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["text"]), SCHEMA)


def test_openai_json_object_streamed(server, client):
    with client.stream("POST", "/v1/completions", json={
            "model": server.model_name, "prompt": PROMPT, "max_tokens": 120, "stream": True, "temperature": 0,
            "response_format": {"type": "json_object"}}) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    finish = chunks[-1]["choices"][0]["finish_reason"]
    if finish == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # the tiny model may run out of tokens mid-object: reported as such
        assert finish == "length" and text.lstrip().startswith("{")


def test_truncated_answer_reports_length(client):
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": 3, "details": True, "grammar": {"type": "json", "value": SCHEMA}}})
    assert r.status_code == 200
    assert r.json()["details"]["finish_reason"] == "length"
    assert r.json()["generated_text"].startswith("{")


def test_openai_client_response_format(server, uploaded):
    import openai

    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60) as c:
        fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
        for model in (server.model_name, uploaded["prefix"]):
            got = c.completions.create(model=model, prompt=PROMPT, max_tokens=80, temperature=0,
                                       extra_body={"response_format": fmt})
            assert got.choices[0].finish_reason == "stop"
            jsonschema.validate(json.loads(got.choices[0].text), SCHEMA)
        with pytest.raises(openai.APIStatusError) as err:  # OpenAI's routes answer bad input 400 or 422
            c.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=8,
                                 extra_body={"response_format": {"type": "json_schema",
                                                                 "json_schema": {"name": "x", "schema": {"type": 5}}}})
        assert err.value.status_code in (400, 422) and "response_format.json_schema.schema" in str(err.value)


def test_openai_chat_response_format(server):
    import openai

    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60) as c:
        try:
            got = c.chat.completions.create(
                model=server.model_name, messages=[{"role": "user", "content": PROMPT}], max_tokens=80, temperature=0,
                response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}})
        except openai.APIStatusError as exc:  # the test model may have no chat template
            pytest.skip(f"chat not served here: {exc}")
        assert got.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(got.choices[0].message.content), SCHEMA)


def test_text_generation_client_grammar(server):
    from text_generation import Client
    from text_generation.types import Grammar, GrammarType

    tgi = Client(server.url, timeout=60)
    got = tgi.generate(PROMPT, max_new_tokens=80, grammar=Grammar(type=GrammarType.Json, value=SCHEMA))
    assert got.details.finish_reason.value == "eos_token"
    jsonschema.validate(json.loads(got.generated_text), SCHEMA)
    got = tgi.generate(PROMPT, max_new_tokens=20, grammar=Grammar(type=GrammarType.Regex, value=REGEX))
    assert re.fullmatch(REGEX, got.generated_text)
    streamed = list(tgi.generate_stream(PROMPT, max_new_tokens=20, grammar=Grammar(type=GrammarType.Regex,
                                                                                   value=REGEX)))
    assert streamed[-1].generated_text == got.generated_text  # greedy: the same answer streamed


@pytest.mark.parametrize("grammar, param, words", [
    ({"type": "json", "value": {"type": "strange"}}, "parameters.grammar.value", "strange"),
    ({"type": "json", "value": "{not json"}, "parameters.grammar.value", "not valid JSON"),
    ({"type": "regex", "value": "([a-z"}, "parameters.grammar.value", "unclosed"),
    ({"type": "lark", "value": "start: /a/"}, "parameters.grammar.type", "lark"),
])
def test_invalid_grammar_is_422_naming_the_parameter(client, grammar, param, words):
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4, "grammar": grammar}})
    assert r.status_code == 422, r.text
    assert param in r.json()["error"] and words in r.json()["error"]
    assert client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_invalid_response_format_is_422(server, client):
    r = client.post("/v1/completions", json={"model": server.model_name, "prompt": PROMPT, "max_tokens": 4,
                                             "response_format": {"type": "yaml"}})
    assert r.status_code in (400, 422) and "response_format.type" in r.text
