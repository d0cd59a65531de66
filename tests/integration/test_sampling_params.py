"""Issue 27's sampling parameters over HTTP, through the published clients: OpenAI `logprobs` /
`top_logprobs`, penalties, `logit_bias`, vLLM's `min_tokens`, `stop_token_ids`, `min_p`, and TGI's
`top_n_tokens`, `typical_p`. Log-probabilities are checked against transformers' own logits."""

from __future__ import annotations

import json
import math

import openai
import pytest
import torch

from .conftest import PROMPT
from .support import assert_error, generate, generate_body, sse_events, token_ids

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def hf_logprobs(model_dir, tokenizer):
    """hf_logprobs(prompt_ids, generated_ids): transformers' log_softmax at each generated position [n, vocab]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def logprobs(prompt_ids: list[int], generated: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + generated])).logits[0].float()
        return logits[len(prompt_ids) - 1:len(prompt_ids) - 1 + len(generated)].log_softmax(-1)

    return logprobs


def _prompt_ids(tokenizer) -> list[int]:
    return tokenizer(PROMPT).input_ids


def test_completion_logprobs_equal_transformers(oai, client, tokenizer, hf_logprobs):
    got = oai.completions.create(model=None, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, logprobs=5)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == MAX_TOKENS
    ids = token_ids(generate(client, PROMPT, None, MAX_TOKENS))  # the same greedy tokens
    expected = hf_logprobs(_prompt_ids(tokenizer), ids)  # greedy, no penalty: the model's own distribution
    for i, token_id in enumerate(ids):
        assert lp.token_logprobs[i] == pytest.approx(expected[i, token_id].item(), abs=1e-4)
        values, best = expected[i].topk(5)
        # keyed by text, as OpenAI's: tokens with the same text (byte tokens) share one key, the last one's
        shown = {tokenizer.decode([b]): v for b, v in zip(best.tolist(), values.tolist())}
        assert lp.top_logprobs[i] == pytest.approx(shown, abs=1e-4)
        assert lp.tokens[i] == tokenizer.decode([token_id])
        assert lp.tokens[i] in lp.top_logprobs[i]  # greedy: the chosen token is the best
    assert lp.text_offset[0] == 0  # where each token's text starts in the choice's text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] <= len(got.choices[0].text)


def test_completion_without_logprobs_has_none(oai):
    got = oai.completions.create(model=None, prompt=PROMPT, max_tokens=2, temperature=0)
    assert got.choices[0].logprobs is None


def test_chat_logprobs_and_top_logprobs(oai, server):
    got = oai.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": "Hi"}],
                                      max_tokens=MAX_TOKENS, temperature=0, logprobs=True, top_logprobs=3)
    content = got.choices[0].logprobs.content
    assert len(content) == MAX_TOKENS
    assert "".join(c.token for c in content) == got.choices[0].message.content
    for c in content:
        assert c.bytes == list(c.token.encode())
        assert len(c.top_logprobs) == 3
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob)  # greedy: the chosen token is the best
        assert [t.logprob for t in c.top_logprobs] == sorted((t.logprob for t in c.top_logprobs), reverse=True)
    only = oai.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=2, temperature=0, logprobs=True)
    assert [c.top_logprobs for c in only.choices[0].logprobs.content] == [[], []]


def test_streamed_logprobs_equal_the_whole_answer(oai, server):
    kwargs = dict(model=None, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, logprobs=2)
    whole = oai.completions.create(**kwargs).choices[0].logprobs
    tokens, values, offsets = [], [], []
    for chunk in oai.completions.create(stream=True, **kwargs):
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            values += chunk.choices[0].logprobs.token_logprobs
            offsets += chunk.choices[0].logprobs.text_offset
    assert tokens == whole.tokens
    assert values == pytest.approx(whole.token_logprobs)
    assert offsets == whole.text_offset
    chat = []
    for chunk in oai.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": "Hi"}],
                                             max_tokens=4, temperature=0, logprobs=True, top_logprobs=2, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            chat += chunk.choices[0].logprobs.content
    assert len(chat) == 4 and all(len(c.top_logprobs) == 2 for c in chat)


def test_logit_bias_forces_and_forbids(oai, client, tokenizer):
    plain = generate(client, PROMPT, None, MAX_TOKENS)
    first = token_ids(plain)[0]
    forced = tokenizer.encode("z", add_special_tokens=False)[-1]
    got = oai.completions.create(model=None, prompt=PROMPT, max_tokens=3, temperature=0,
                                 logit_bias={str(forced): 100})
    assert got.choices[0].text == tokenizer.decode([forced] * 3)
    banned = oai.completions.create(model=None, prompt=PROMPT, max_tokens=1, temperature=0, logprobs=1,
                                    logit_bias={str(first): -100})
    assert banned.choices[0].logprobs.tokens[0] != tokenizer.decode([first])


def test_logit_bias_shifts_the_reported_distribution(oai, tokenizer, hf_logprobs):
    """The first token's logprobs (greedy) are log_softmax(model logits + bias), from transformers' logits."""
    raw = hf_logprobs(_prompt_ids(tokenizer), [0])[0]  # the first position alone
    target = int(raw.argsort()[-3])  # the third most likely, pushed to the top
    bias = torch.zeros_like(raw)
    bias[target] = 4.0 + float(raw.max() - raw[target])
    expected = (raw + bias).log_softmax(-1)
    got = oai.completions.create(model=None, prompt=PROMPT, max_tokens=1, temperature=0, logprobs=1,
                                 logit_bias={str(target): bias[target].item()})
    lp = got.choices[0].logprobs
    assert lp.tokens[0] == tokenizer.decode([target])
    assert lp.token_logprobs[0] == pytest.approx(expected[target].item(), abs=1e-4)


def test_penalties_change_greedy_tokens(oai, client):
    plain = oai.completions.create(model=None, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    for kwargs in (dict(frequency_penalty=-2.0), dict(presence_penalty=-2.0)):  # repeating made likelier
        got = oai.completions.create(model=None, prompt=PROMPT, max_tokens=16, temperature=0, **kwargs)
        assert got.choices[0].text != plain, kwargs
        again = oai.completions.create(model=None, prompt=PROMPT, max_tokens=16, temperature=0, **kwargs)
        assert again.choices[0].text == got.choices[0].text  # greedy stays deterministic
    same = oai.completions.create(model=None, prompt=PROMPT, max_tokens=16, temperature=0, frequency_penalty=0,
                                  presence_penalty=0, logit_bias={})
    assert same.choices[0].text == plain


def test_stop_token_ids_and_min_tokens(client, server, tokenizer):
    ids = token_ids(generate(client, PROMPT, None, MAX_TOKENS))
    body = {"model": None, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 0}
    r = client.post("/v1/completions", json={**body, "stop_token_ids": [ids[2]]})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert len(choice["logprobs"]["tokens"]) == ids.index(ids[2]) + 1  # the stop token is the last one
    r = client.post("/v1/completions", json={**body, "stop_token_ids": [ids[0]], "min_tokens": 3})
    assert r.status_code == 200, r.text
    tokens = r.json()["choices"][0]["logprobs"]["tokens"]
    assert len(tokens) >= 3
    assert tokenizer.decode([ids[0]]) != tokens[0]  # masked below min_tokens: another token first


def test_sampled_logprobs_are_of_the_warped_distribution(client):
    """TGI's choice: with top_k=1 the one token left has probability 1."""
    r = client.post("/generate", json=generate_body(PROMPT, None, 4, do_sample=True, top_k=1, seed=3, top_n_tokens=3))
    assert r.status_code == 200, r.text
    details = r.json()["details"]
    assert [t["logprob"] for t in details["tokens"]] == pytest.approx([0.0] * 4, abs=1e-6)
    assert all(len(top) == 1 for top in details["top_tokens"])  # the removed tokens are left out


def test_text_generation_client_top_n_tokens(server, client, tokenizer, hf_logprobs):
    from text_generation import Client

    tgi = Client(server.url, timeout=60)
    got = tgi.generate(PROMPT, max_new_tokens=MAX_TOKENS, top_n_tokens=4)
    ids = [t.id for t in got.details.tokens]
    expected = hf_logprobs(_prompt_ids(tokenizer), ids)
    assert len(got.details.top_tokens) == MAX_TOKENS
    for i, top in enumerate(got.details.top_tokens):
        values, best = expected[i].topk(4)
        assert [t.id for t in top][0] == ids[i]
        assert [t.logprob for t in top] == pytest.approx(values.tolist(), abs=1e-4)
        assert [t.text for t in top] == [tokenizer.decode([b]) for b in [t.id for t in top]]
    streamed = list(tgi.generate_stream(PROMPT, max_new_tokens=MAX_TOKENS, top_n_tokens=4))
    assert [[t.id for t in r.top_tokens] for r in streamed] == [[t.id for t in top] for top in got.details.top_tokens]
    plain = tgi.generate(PROMPT, max_new_tokens=2)
    assert plain.details.top_tokens is None
    lines = client.post("/generate_stream", json=generate_body(PROMPT, None, 2)).text.splitlines()
    assert all(e["top_tokens"] is None for e in sse_events(lines))


def test_typical_p_and_min_p_sample_reproducibly(client, oai):
    body = generate_body(PROMPT, None, MAX_TOKENS, do_sample=True, typical_p=0.9, seed=11)
    a, b = (client.post("/generate", json=body).json() for _ in range(2))
    assert token_ids(a) == token_ids(b)
    kwargs = dict(model=None, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0.9, seed=5, extra_body={"min_p": 0.1})
    assert oai.completions.create(**kwargs).choices[0].text == oai.completions.create(**kwargs).choices[0].text


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"frequency_penalty": 2.5}, "frequency_penalty"),
    ("/v1/completions", {"presence_penalty": -3}, "presence_penalty"),
    ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"99999999": 1}}, "logit_bias"),
    ("/v1/completions", {"stop_token_ids": [99999999]}, "stop_token_ids"),
    ("/v1/completions", {"min_p": 1.5}, "min_p"),
    ("/v1/completions", {"min_tokens": 50, "max_tokens": 5}, "min_tokens"),
    ("/v1/completions", {"typical_p": 0.5}, "typical_p"),  # TGI's name: not on the OpenAI routes
    ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 25}, "top_logprobs"),
])
def test_openai_out_of_range_refused(client, path, body, param):
    base = {"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path else {"prompt": PROMPT}
    assert_error(client.post(path, json={**base, "max_tokens": 4, **body}), 400, param)  # OpenAI's status


@pytest.mark.parametrize("params, param", [
    ({"top_n_tokens": 21}, "top_n_tokens"),
    ({"typical_p": 1.5}, "typical_p"),
    ({"typical_p": 0.0}, "typical_p"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),  # TGI's own (normalized) penalty is not served
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
])
def test_tgi_out_of_range_refused(client, params, param):
    assert_error(client.post("/generate", json=generate_body(PROMPT, None, 4, **params)), 422, param)


def test_openai_client_refusal_names_the_parameter(oai):
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=None, prompt=PROMPT, max_tokens=2, frequency_penalty=5)
    assert "frequency_penalty" in str(info.value)


def test_logprobs_are_finite_json(client):
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0.7, "top_p": 0.5,
                                             "seed": 1, "logprobs": 20})
    assert r.status_code == 200, r.text
    body = json.loads(r.text)  # strict: no -Infinity
    for alternatives in body["choices"][0]["logprobs"]["top_logprobs"]:
        assert all(math.isfinite(v) for v in alternatives.values())
