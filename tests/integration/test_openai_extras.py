"""What OpenAI's and vLLM's clients use beyond sampling: system_fingerprint, usage in every answer,
token-id prompts, skip_special_tokens, include_stop_str_in_output, /v1/models/{id}, suffix refused."""

from __future__ import annotations

import json

import openai
import pytest

from .conftest import EOS_PROMPT, PROMPT
from .support import generate, token_ids


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


def test_system_fingerprint_is_stable(oai, server):
    a = oai.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=2, temperature=0)
    b = oai.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": "Hi"}],
                                    max_tokens=2, temperature=0)
    chunks = list(oai.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=2, stream=True))
    assert a.system_fingerprint.startswith("fp_")
    assert {a.system_fingerprint, b.system_fingerprint} | {c.system_fingerprint for c in chunks} == {a.system_fingerprint}


def test_streamed_usage_is_null_until_the_last_chunk(client):
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as r:
        chunks = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
    assert all("usage" in c for c in chunks)
    assert [c["usage"] is None for c in chunks] == [True] * (len(chunks) - 1) + [False]
    assert chunks[-1]["usage"]["completion_tokens"] == 3 and chunks[-1]["choices"] == []


def test_prompts_as_token_ids(oai, server, tokenizer):
    ids = tokenizer(PROMPT).input_ids
    text = oai.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=4, temperature=0)
    by_ids = oai.completions.create(model=server.model_name, prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    two = oai.completions.create(model=server.model_name, prompt=[ids, ids[:2]], max_tokens=4, temperature=0)
    assert len(two.choices) == 2 and two.choices[0].text == text.choices[0].text
    assert two.usage.prompt_tokens == len(ids) + 2
    with pytest.raises(openai.BadRequestError) as exc:
        oai.completions.create(model=server.model_name, prompt=[10**9], max_tokens=2)
    assert exc.value.param == "prompt" and "token ids must be in" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        oai.completions.create(model=server.model_name, prompt=[ids, []], max_tokens=2)
    assert exc.value.param == "prompt"


def test_skip_special_tokens_false_keeps_them(oai, client, uploaded, tokenizer):
    name = uploaded["prefix-proj"]
    raw = generate(client, EOS_PROMPT, name, 12, ignore_eos_token=True)
    ids = token_ids(raw)
    assert tokenizer.eos_token_id in ids, "the test would mean nothing"
    kept = oai.completions.create(model=name, prompt=EOS_PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert tokenizer.eos_token in kept.choices[0].text
    assert kept.choices[0].text == tokenizer.decode(ids, skip_special_tokens=False)
    plain = oai.completions.create(model=name, prompt=EOS_PROMPT, max_tokens=12, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert plain.choices[0].text == raw["generated_text"] and tokenizer.eos_token not in plain.choices[0].text


def test_include_stop_str_in_output(oai, server, client):
    full = generate(client, PROMPT, None, 12)
    texts = [t["text"] for t in full["details"]["tokens"]]
    i = next(i for i, t in enumerate(texts) if t)
    stop = texts[i]
    kept = oai.completions.create(prompt=PROMPT, model=server.model_name, max_tokens=12, temperature=0, stop=[stop],
                                  extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == "".join(texts[:i + 1]) and kept.choices[0].finish_reason == "stop"
    chunks = list(oai.completions.create(prompt=PROMPT, model=server.model_name, max_tokens=12, temperature=0,
                                         stop=[stop], stream=True, extra_body={"include_stop_str_in_output": True}))
    assert "".join(c.choices[0].text for c in chunks) == kept.choices[0].text


def test_model_by_id(oai, server, uploaded):
    base = oai.models.retrieve(server.model_name)
    assert base.id == server.model_name and base.object == "model"
    adapter = oai.models.retrieve(uploaded["prompt"])
    assert adapter.id == uploaded["prompt"] and adapter.parent == server.model_name
    listed = {m.id: m for m in oai.models.list()}
    assert listed[uploaded["prompt"]].created == adapter.created
    with pytest.raises(openai.NotFoundError) as exc:
        oai.models.retrieve("no-such-model")
    assert "'no-such-model' not found" in exc.value.message and exc.value.code == "model_not_found"


def test_suffix_is_refused_naming_it(oai, server):
    with pytest.raises(openai.BadRequestError) as exc:
        oai.completions.create(model=server.model_name, prompt=PROMPT, suffix="end.", max_tokens=2)
    assert exc.value.param == "suffix" and "causal" in exc.value.message
    got = oai.completions.create(model=server.model_name, prompt=PROMPT, suffix="", max_tokens=2)
    assert len(got.choices) == 1


def test_top_k_minus_one_means_off_as_vllm_clients_send_it(oai, server):
    """vLLM's clients send top_k -1 (or 0) for no top-k: the same answer as without it; below -1 is refused."""
    plain = oai.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=6, temperature=0)
    for off in (-1, 0):
        got = oai.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=6, temperature=0,
                                     extra_body={"top_k": off})
        assert got.choices[0].text == plain.choices[0].text
    with pytest.raises(openai.BadRequestError) as refused:
        oai.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=6, extra_body={"top_k": -2})
    assert "top_k" in str(refused.value)
