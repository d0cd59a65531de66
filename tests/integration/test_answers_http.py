"""Several answers to one prompt over HTTP, through the published clients: OpenAI's `n` and
`best_of` (completions and chat, streamed and not), TGI's `best_of` with `best_of_sequences`
(text-generation and lorax-client). The prompt is prefilled once; answer i is the answer a request
with seed + i gets alone."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from .conftest import PROMPT
from .support import assert_error, generate_body, metric, scrape, sse_events

SAMPLE = dict(temperature=1.0, max_tokens=8)
MESSAGES = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


def _prefilled(client) -> float:
    return metric(scrape(client), "softprompt_prefill_tokens_total")


@pytest.mark.parametrize("variant", [None, "prompt", "prefix"])
def test_n_answers_are_the_seeded_answers_with_one_prefill(oai, client, uploaded, tokenizer, variant):
    model = uploaded[variant] if variant else None
    before = _prefilled(client)
    got = oai.completions.create(model=model, prompt=PROMPT, n=3, seed=40, **SAMPLE)
    assert _prefilled(client) - before == len(tokenizer(PROMPT).input_ids)  # the prompt once, not three times
    assert [c.index for c in got.choices] == [0, 1, 2]
    texts = [c.text for c in got.choices]
    alone = [oai.completions.create(model=model, prompt=PROMPT, seed=40 + i, **SAMPLE).choices[0].text for i in range(3)]
    assert texts == alone
    assert len(set(texts)) > 1, "the answers are all the same: the test shows nothing"
    assert got.usage.prompt_tokens == len(tokenizer(PROMPT).input_ids)  # the prompt counted once
    assert got.usage.completion_tokens == 3 * 8


def test_n_with_several_prompts_orders_choices_by_prompt(oai, uploaded):
    prompts = [PROMPT, "the quick brown fox"]
    got = oai.completions.create(model=uploaded["ptuning-mlp"], prompt=prompts, n=2, seed=7, **SAMPLE)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(prompts):
        alone = oai.completions.create(model=uploaded["ptuning-mlp"], prompt=prompt, n=2, seed=7, **SAMPLE)
        assert [c.text for c in got.choices[2 * i:2 * i + 2]] == [c.text for c in alone.choices]


def test_best_of_returns_the_most_likely_answers_per_token(oai, uploaded):
    model = uploaded["prefix"]
    every = oai.completions.create(model=model, prompt=PROMPT, n=4, seed=3, logprobs=0, **SAMPLE)
    mean = {c.text: sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in every.choices}
    best = oai.completions.create(model=model, prompt=PROMPT, n=2, best_of=4, seed=3, logprobs=0, **SAMPLE)
    assert [c.index for c in best.choices] == [0, 1]
    assert [c.text for c in best.choices] == sorted(mean, key=mean.get, reverse=True)[:2]
    assert best.usage.completion_tokens == 4 * 8  # every answer generated is counted, as OpenAI bills them


def test_chat_n_streamed_equals_not_streamed(oai, uploaded):
    model = uploaded["prompt"]
    whole = oai.chat.completions.create(model=model, messages=MESSAGES, n=2, seed=11, **SAMPLE)
    parts = ["", ""]
    finished = set()
    for chunk in oai.chat.completions.create(model=model, messages=MESSAGES, n=2, seed=11, stream=True, **SAMPLE):
        for choice in chunk.choices:
            parts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1}
    assert parts == [c.message.content for c in whole.choices]
    assert parts[0] != parts[1]


def test_n_with_a_schema_gives_every_answer_its_own_grammar(oai, uploaded):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}
    got = oai.completions.create(model=uploaded["prefix"], prompt=PROMPT, n=3, seed=2, temperature=1.0, max_tokens=40,
                                 extra_body={"response_format": {"type": "json_schema",
                                                                 "json_schema": {"name": "x", "schema": schema}}})
    for choice in got.choices:
        value = json.loads(choice.text)
        assert set(value) == {"a"} and isinstance(value["a"], int), choice.text


@pytest.mark.parametrize("body,param,says", [
    ({"n": 0}, "n", "positive integer"),
    ({"n": 3, "best_of": 2}, "best_of", "at least n"),
    ({"n": 1, "best_of": 2, "stream": True}, "best_of", "cannot be streamed"),
    ({"n": 1000}, "n", "--max-batch-size"),
])
def test_bad_answer_counts_are_400_naming_them(client, body, param, says):
    for route, extra in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": MESSAGES})):
        r = client.post(route, json={"max_tokens": 4, **extra, **body})
        error = assert_error(r, 400, says)
        assert error["param"] == param, r.text


def test_tgi_best_of_returns_the_best_and_the_others(server, uploaded):
    from text_generation import Client

    got = Client(server.url, timeout=60).generate(PROMPT, max_new_tokens=8, best_of=3, do_sample=True)
    others = got.details.best_of_sequences
    assert len(others) == 2

    def mean(tokens):
        return sum(t.logprob for t in tokens) / len(tokens)

    assert all(mean(got.details.tokens) >= mean(o.tokens) for o in others)
    seeds = {got.details.seed, *(o.seed for o in others)}
    assert len(seeds) == 3 and max(seeds) - min(seeds) == 2  # seed, seed + 1, seed + 2
    texts = {got.generated_text, *(o.generated_text for o in others)}
    assert len(texts) > 1


def test_lorax_best_of_with_an_adapter(server, uploaded):
    from lorax import Client

    got = Client(server.url, timeout=60).generate(PROMPT, adapter_id=uploaded["ptuning-lstm"], max_new_tokens=6,
                                                  best_of=2, do_sample=True, details=True)
    assert len(got.details.best_of_sequences) == 1
    assert got.details.best_of_sequences[0].generated_tokens == 6


def test_tgi_best_of_is_refused_greedy_and_streamed(client):
    r = client.post("/generate", json=generate_body(PROMPT, None, 4, best_of=2))
    assert_error(r, 422, "parameters.best_of", "sampling")
    r = client.post("/generate_stream", json=generate_body(PROMPT, None, 4, best_of=2, do_sample=True))
    assert_error(r, 422, "parameters.best_of", "streaming")
    r = client.post("/generate", json=generate_body(PROMPT, None, 4, best_of=2, do_sample=True))
    assert r.status_code == 200 and "best_of_sequences" in r.json()["details"]
    r = client.post("/generate", json=generate_body(PROMPT, None, 4, do_sample=True))
    assert "best_of_sequences" not in r.json()["details"]  # left out when there are none, as TGI


def test_n_answers_streamed_as_raw_chunks_carry_their_index(server):
    body = {"prompt": PROMPT, "n": 3, "seed": 5, "stream": True, **SAMPLE}
    with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
        events = sse_events(r.iter_lines())
    indices = {choice["index"] for e in events if isinstance(e, dict) for choice in e["choices"]}
    assert indices == {0, 1, 2}
