"""OpenAI-compatible routes through the official `openai` client: completions, chat, streaming, models."""

from __future__ import annotations

import openai
import pytest

from .conftest import EOS_PROMPT, PROMPT
from .support import generate, token_ids

MAX_TOKENS = 8
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


def test_completion_equals_greedy_generate(oai, client, uploaded, reference, tokenizer):
    for variant in ("prompt", "prefix"):
        name = uploaded[variant]
        got = oai.completions.create(model=name, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
        raw = generate(client, PROMPT, name, MAX_TOKENS)
        assert token_ids(raw) == reference(variant, PROMPT, MAX_TOKENS)
        assert got.object == "text_completion"
        assert got.model == name
        assert len(got.choices) == 1
        assert got.choices[0].text == raw["generated_text"]
        assert got.choices[0].finish_reason == "length"
        assert got.usage.prompt_tokens == len(tokenizer(PROMPT).input_ids)
        assert got.usage.completion_tokens == MAX_TOKENS
        assert got.usage.total_tokens == got.usage.prompt_tokens + MAX_TOKENS
        # our `adapter_version`: the client keeps it as an extra field
        assert got.adapter_version == client.get(f"/adapters/{name}").json()["version"]


def test_completion_base_model_by_name(oai, server, client):
    raw = generate(client, PROMPT, None, MAX_TOKENS)
    got = oai.completions.create(model=server.model_name, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert got.choices[0].text == raw["generated_text"]


def test_completion_eos_finish_reason_is_stop(oai, client, uploaded):
    name = uploaded["prefix-proj"]
    raw = generate(client, EOS_PROMPT, name, 12)
    assert raw["details"]["finish_reason"] == "eos_token"
    got = oai.completions.create(model=name, prompt=EOS_PROMPT, max_tokens=12, temperature=0)
    assert got.choices[0].finish_reason == "stop"
    assert got.choices[0].text == raw["generated_text"]
    assert got.usage.completion_tokens == raw["details"]["generated_tokens"]


def test_completion_prompt_list(oai, client, uploaded):
    name = uploaded["ptuning-mlp"]
    prompts = [PROMPT, "the quick brown fox"]
    got = oai.completions.create(model=name, prompt=prompts, max_tokens=MAX_TOKENS, temperature=0)
    assert [c.index for c in got.choices] == [0, 1]
    for choice, prompt in zip(got.choices, prompts):
        assert choice.text == generate(client, prompt, name, MAX_TOKENS)["generated_text"]


def test_completion_stream_concatenates_to_the_same_text(oai, uploaded):
    name = uploaded["ptuning-lstm"]
    whole = oai.completions.create(model=name, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    chunks = list(oai.completions.create(model=name, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                         stream=True))
    assert chunks, "no chunks"
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_completion_stream_of_a_prompt_list_interleaves_the_choices(oai, uploaded):
    """Several prompts in one streamed request: each choice's chunks carry its index, concatenate to
    its non-streamed text and end with its own finish reason; the usage chunk counts them all."""
    name = uploaded["prefix"]
    prompts = [PROMPT, "the quick brown fox", "zz"]
    whole = oai.completions.create(model=name, prompt=prompts, max_tokens=MAX_TOKENS, temperature=0)
    chunks = list(oai.completions.create(model=name, prompt=prompts, max_tokens=MAX_TOKENS, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(prompts) * MAX_TOKENS
    by_index = {i: [c.choices[0] for c in chunks[:-1] if c.choices[0].index == i] for i in range(len(prompts))}
    assert sum(map(len, by_index.values())) == len(chunks) - 1
    for i, choices in by_index.items():
        assert "".join(c.text for c in choices) == whole.choices[i].text
        assert [c.finish_reason for c in choices][-1] == "length"
        assert all(c.finish_reason is None for c in choices[:-1])


def test_chat_completion(oai, client, uploaded, reference, tokenizer):
    name = uploaded["prompt"]
    got = oai.chat.completions.create(model=name, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    assert got.object == "chat.completion"
    message = got.choices[0].message
    assert message.role == "assistant"
    # the same as /generate on the prompt the tiny tokenizer's chat template renders
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    raw = generate(client, rendered, name, MAX_TOKENS)
    assert token_ids(raw) == reference("prompt", rendered, MAX_TOKENS)
    assert message.content == raw["generated_text"]
    assert got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False).input_ids)
    assert got.usage.completion_tokens == MAX_TOKENS


def test_chat_completion_stream(oai, uploaded):
    name = uploaded["prefix"]
    whole = oai.chat.completions.create(model=name, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    chunks = list(oai.chat.completions.create(model=name, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                              stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert {c.adapter_version for c in chunks} == {whole.adapter_version} != {None}


def test_chat_completion_base_model(oai, server, client, tokenizer):
    got = oai.chat.completions.create(model=server.model_name, messages=MESSAGES, max_tokens=4, temperature=0)
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert got.choices[0].message.content == generate(client, rendered, None, 4)["generated_text"]
    assert got.adapter_version is None


def test_models_list(oai, server, uploaded):
    ids = [m.id for m in oai.models.list()]
    assert ids[0] == server.model_name
    assert set(uploaded.values()) <= set(ids)


def test_unknown_model_is_404(oai):
    with pytest.raises(openai.NotFoundError) as exc:
        oai.completions.create(model="unknown", prompt=PROMPT, max_tokens=2, temperature=0)
    assert exc.value.status_code == 404
    assert "'unknown' not found" in exc.value.message  # OpenAI's error shape: the client shows the message
    assert (exc.value.code, exc.value.param) == ("model_not_found", "model")
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="unknown", messages=MESSAGES, max_tokens=2, temperature=0)


def test_unsupported_parameter_is_400(oai, uploaded):
    with pytest.raises(openai.BadRequestError) as exc:
        oai.completions.create(model=uploaded["prompt"], prompt=PROMPT, max_tokens=2, temperature=0,
                               extra_body={"use_beam_search": True})
    assert "use_beam_search: True is not supported" in exc.value.message
    assert (exc.value.param, exc.value.type) == ("use_beam_search", "invalid_request_error")
    # the off values of such parameters are accepted
    got = oai.completions.create(model=uploaded["prompt"], prompt=PROMPT, max_tokens=2, temperature=0, n=1,
                                 presence_penalty=0.0, frequency_penalty=0.0, echo=False)
    assert len(got.choices) == 1


def test_completion_stop_sequence_is_left_out(oai, server, client):
    full = generate(client, PROMPT, None, 12)
    texts = [t["text"] for t in full["details"]["tokens"]]
    i = next(i for i, t in enumerate(texts) if t)
    stop = texts[i]
    got = oai.completions.create(prompt=PROMPT, model=server.model_name, max_tokens=12, temperature=0, stop=[stop])
    assert got.choices[0].finish_reason == "stop"
    assert got.choices[0].text == "".join(texts[:i])
    chunks = list(oai.completions.create(prompt=PROMPT, model=server.model_name, max_tokens=12, temperature=0, stop=[stop],
                                         stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "".join(texts[:i])
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_ignore_eos_and_streamed_usage(oai, client, uploaded):
    """vLLM's `ignore_eos` runs past EOS to max_tokens; `stream_options.include_usage` ends the
    stream with a usage chunk (no choices), as OpenAI's API does."""
    name = uploaded["prefix-proj"]
    ended = oai.completions.create(model=name, prompt=EOS_PROMPT, max_tokens=12, temperature=0)
    assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens < 12
    full = oai.completions.create(model=name, prompt=EOS_PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 12
    chunks = list(oai.completions.create(model=name, prompt=EOS_PROMPT, max_tokens=12, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert "".join(c.choices[0].text for c in chunks[:-1]) == full.choices[0].text
    plain = list(oai.completions.create(model=name, prompt=EOS_PROMPT, max_tokens=4, temperature=0, stream=True))
    assert all(c.usage is None for c in plain)
