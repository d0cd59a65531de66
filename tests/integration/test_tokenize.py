"""POST /tokenize in TGI's shape and vLLM's (one route, told apart by their fields), POST /detokenize."""

from __future__ import annotations

from .conftest import PROMPT
from .support import assert_error

MESSAGES = [{"role": "user", "content": "Hi there"}]


def test_tgi_shape(client, tokenizer, uploaded):
    r = client.post("/tokenize", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 5, "details": True}})
    assert r.status_code == 200, r.text
    tokens = r.json()
    enc = tokenizer(PROMPT, return_offsets_mapping=True)
    assert [t["id"] for t in tokens] == enc.input_ids
    for t in tokens:
        assert set(t) == {"id", "text", "start", "stop"} and t["text"] == PROMPT[t["start"]:t["stop"]]
    with_adapter = client.post("/tokenize", json={"inputs": PROMPT, "parameters": {"adapter_id": uploaded["prompt"]}})
    assert with_adapter.json() == tokens
    assert_error(client.post("/tokenize", json={"inputs": PROMPT, "parameters": {"adapter_id": "nope"}}), 404, "nope")
    assert_error(client.post("/tokenize", json={"inputs": 3}), 422, "inputs")


def test_vllm_shape_prompt_and_messages(client, tokenizer, server):
    r = client.post("/tokenize", json={"model": server.model_name, "prompt": PROMPT})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["tokens"] == tokenizer(PROMPT).input_ids and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == client.get("/info").json()["max_total_tokens"]
    bare = client.post("/tokenize", json={"prompt": PROMPT, "add_special_tokens": False,
                                          "return_token_strs": True}).json()
    assert bare["tokens"] == tokenizer(PROMPT, add_special_tokens=False).input_ids
    assert bare["token_strs"] == tokenizer.convert_ids_to_tokens(bare["tokens"])
    chat = client.post("/tokenize", json={"messages": MESSAGES}).json()
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tokenizer(rendered, add_special_tokens=False).input_ids
    assert_error(client.post("/tokenize", json={"model": "nope", "prompt": PROMPT}), 404, "nope")
    assert_error(client.post("/tokenize", json={"text": PROMPT}), 422, "inputs")


def test_detokenize(client, tokenizer):
    ids = tokenizer(PROMPT).input_ids
    r = client.post("/detokenize", json={"tokens": ids})
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt": tokenizer.decode(ids)}
    assert_error(client.post("/detokenize", json={"tokens": [10**9]}), 422, "tokens")
