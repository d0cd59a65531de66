"""Prompt log-probabilities over HTTP, through the published clients: TGI's decoder_input_details
(`details.prefill`) and OpenAI completions' echo with logprobs (as lm-evaluation-harness asks for
them), checked against PEFT's teacher-forced logprobs, on a server that prefills in chunks of 4."""

from __future__ import annotations

import openai
import pytest

from tests.factory import teacher_forced_logprobs

from .support import upload

LONG = "the quick brown fox jumps over"  # byte tokens: prefilled in several chunks of 4


@pytest.fixture(scope="module")
def chunked(model_dir, adapter_srcs, tmp_path_factory):
    from .conftest import running_server

    root = tmp_path_factory.mktemp("chunked")
    with running_server(model_dir, root / "store", root, "--max-prefill-tokens", "4", name="chunked") as s:
        with s.client() as c:
            for variant in ("prompt", "prefix"):
                assert upload(c, f"ad-{variant}", adapter_srcs[variant]).status_code == 201
        yield s


@pytest.fixture(scope="module")
def oai(chunked):
    with openai.OpenAI(base_url=f"{chunked.url}/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


def _expected(model_dir, adapter_srcs, variant, ids) -> list[float]:
    return teacher_forced_logprobs(model_dir, adapter_srcs[variant] if variant else None, ids[:1], ids[1:])


@pytest.mark.parametrize("variant", [None, "prompt", "prefix"])
def test_decoder_input_details(chunked, model_dir, adapter_srcs, tokenizer, variant):
    from text_generation import Client

    ids = tokenizer(LONG).input_ids
    if variant is None:  # text_generation's client names no adapter
        got = Client(chunked.url, timeout=60).generate(LONG, max_new_tokens=2, decoder_input_details=True)
        prefill = [t.model_dump() for t in got.details.prefill]
        assert Client(chunked.url, timeout=60).generate(LONG, max_new_tokens=2).details.prefill == []  # only when asked
    else:
        with chunked.client() as c:
            r = c.post("/generate", json={"inputs": LONG, "parameters": {
                "max_new_tokens": 2, "details": True, "decoder_input_details": True, "adapter_id": f"ad-{variant}"}})
        assert r.status_code == 200, r.text
        prefill = r.json()["details"]["prefill"]
    assert [t["id"] for t in prefill] == ids  # the virtual tokens are not part of it
    assert prefill[0]["logprob"] is None
    expected = _expected(model_dir, adapter_srcs, variant, ids)
    assert [t["logprob"] for t in prefill[1:]] == pytest.approx(expected, abs=2e-4)
    assert [t["text"] for t in prefill] == [tokenizer.decode([i]) for i in ids]


def test_decoder_input_details_refused_with_stream(chunked):
    with chunked.client() as c:
        r = c.post("/generate_stream", json={"inputs": LONG, "parameters": {"decoder_input_details": True}})
    assert r.status_code == 422 and "decoder_input_details" in r.text


@pytest.mark.parametrize("variant", [None, "prefix"])
def test_echo_with_logprobs_as_lm_eval_asks(oai, chunked, model_dir, adapter_srcs, tokenizer, variant):
    ids = tokenizer(LONG).input_ids
    model = f"ad-{variant}" if variant else chunked.model_name
    got = oai.completions.create(model=model, prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0)
    lp = got.choices[0].logprobs
    n = len(ids)
    assert len(lp.token_logprobs) == n + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:n] == pytest.approx(_expected(model_dir, adapter_srcs, variant, ids), abs=2e-4)
    assert lp.tokens[:n] == [tokenizer.decode([i]) for i in ids]
    for token, logprob, top in zip(lp.tokens[1:n], lp.token_logprobs[1:n], lp.top_logprobs[1:n]):
        assert len(top) == 1 and max(top.values()) >= logprob  # lm-eval's is_greedy reads them
    assert got.choices[0].text.startswith(tokenizer.decode(ids))
    alone = oai.completions.create(model=model, prompt=LONG, echo=True, logprobs=0, max_tokens=0)
    assert alone.choices[0].text == LONG and alone.usage.completion_tokens == 0
    assert alone.choices[0].logprobs.token_logprobs[0] is None and len(alone.choices[0].logprobs.tokens) == n
    assert alone.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:n], abs=1e-6)
    echoed = oai.completions.create(model=model, prompt=LONG, echo=True, max_tokens=3, temperature=0)
    plain = oai.completions.create(model=model, prompt=LONG, max_tokens=3, temperature=0)
    assert echoed.choices[0].text == LONG + plain.choices[0].text and echoed.choices[0].logprobs is None


@pytest.mark.parametrize("max_tokens", [0, 4])
def test_echo_streamed_equals_echo_answered_whole(oai, max_tokens):
    """echo with stream (as vLLM): each choice's first chunk starts with its prompt, its logprobs with
    the prompt's tokens; joined, the chunks give the answer not streamed, offsets and all."""
    asked = dict(model="ad-prefix", prompt=[LONG, "over the"], echo=True, logprobs=2, max_tokens=max_tokens,
                 temperature=0, n=2)
    whole = oai.completions.create(**asked)
    texts, logprobs = {}, {}
    for chunk in oai.completions.create(stream=True, **asked):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            got = logprobs.setdefault(choice.index, {"tokens": [], "token_logprobs": [], "text_offset": []})
            for key in got:
                got[key] += getattr(choice.logprobs, key) if choice.logprobs else []
    assert len(whole.choices) == 4
    for choice in whole.choices:
        assert texts[choice.index] == choice.text
        assert logprobs[choice.index]["tokens"] == choice.logprobs.tokens
        assert logprobs[choice.index]["text_offset"] == choice.logprobs.text_offset
        assert logprobs[choice.index]["token_logprobs"] == pytest.approx(choice.logprobs.token_logprobs, abs=1e-6)
    assert whole.choices[0].text.startswith(LONG) and whole.choices[2].text.startswith("over the")
