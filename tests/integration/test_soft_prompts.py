"""Inline soft prompts over HTTP: `parameters.soft_prompt` (TGI) / `soft_prompt` (OpenAI) as base64
safetensors, and vLLM's `prompt_embeds` (torch.save) behind --allow-prompt-embeds. Tokens equal
PEFT's for the same embeddings saved as a prompt-tuning adapter; bad payloads are 422 naming the
problem, and leave the server as it was (nothing stored, later requests fine)."""

from __future__ import annotations

import base64
import io
import json
import struct
import time

import pytest
import torch
from safetensors.torch import save

from tests import oracle
from tests.factory import peft_greedy

from .conftest import PROMPT
from .support import adapter_names, assert_error, assert_unharmed, generate, generate_body, token_ids

N_VIRTUAL = 6
MAX_NEW = 10


@pytest.fixture(scope="module")
def hidden(model_dir) -> int:
    return json.loads((model_dir / "config.json").read_text())["hidden_size"]


@pytest.fixture(scope="module")
def embeddings(hidden) -> torch.Tensor:
    """[n, hidden]: as large as a trained prompt's (tests.factory's std), so the tokens change."""
    return torch.randn(N_VIRTUAL, hidden, generator=torch.Generator().manual_seed(7)) * 0.5


def assert_v1_error(r, *mentions: str) -> None:
    """A refused OpenAI-route request: 400 with OpenAI's error object, or (before that shape) 422 with ours."""
    assert r.status_code in (400, 422), r.text
    error = r.json()["error"]
    message = error["message"] if isinstance(error, dict) else error
    for m in mentions:
        assert m in message, f"error message {message!r} does not name {m!r}"


def b64_safetensors(tensors: dict[str, torch.Tensor]) -> str:
    return base64.b64encode(save(tensors)).decode()


def b64_torch_save(obj) -> str:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def b64_header(header: dict, body: bytes = b"") -> str:
    raw = json.dumps(header).encode()
    return base64.b64encode(struct.pack("<Q", len(raw)) + raw + body).decode()


@pytest.fixture(scope="module")
def peft_dir(model_dir, embeddings, tmp_path_factory):
    """The same embeddings as a PEFT prompt-tuning adapter, saved by PEFT itself."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(embeddings)
    out = tmp_path_factory.mktemp("inline-peft")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def peft_tokens(model_dir, peft_dir, tokenizer):
    def tokens(prompt: str) -> list[int]:
        oracle.require_live()
        ids = tokenizer(prompt).input_ids or [tokenizer.bos_token_id]  # the server's rule for an empty prompt
        return peft_greedy(model_dir, peft_dir, ids, MAX_NEW)

    return tokens


@pytest.fixture(scope="module")
def embeds_server(model_dir, tmp_path_factory):
    """A server of its own with vLLM's prompt_embeds allowed."""
    from .conftest import running_server

    root = tmp_path_factory.mktemp("embeds-server")
    with running_server(model_dir, root / "store", root, "--allow-prompt-embeds", name="embeds") as s:
        yield s


@pytest.fixture
def eclient(embeds_server):
    with embeds_server.client() as c:
        yield c


def test_generate_equals_peft_prompt_tuning(client, embeddings, peft_tokens):
    soft = b64_safetensors({"embeddings": embeddings})
    got = generate(client, PROMPT, None, MAX_NEW, soft_prompt=soft)
    assert token_ids(got) == peft_tokens(PROMPT)
    assert token_ids(got) != token_ids(generate(client, PROMPT, None, MAX_NEW)), "the soft prompt changes nothing"
    assert got["details"]["adapter_version"].startswith("inline-")
    assert adapter_names(client) == adapter_names(client)  # listing still works, and nothing new is listed
    assert all(not n.startswith("inline") for n in adapter_names(client))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_served(client, embeddings, dtype):
    got = generate(client, PROMPT, None, 4, soft_prompt=b64_safetensors({"e": embeddings.to(dtype)}))
    assert got["details"]["generated_tokens"] == 4


def test_stream_and_compat_routes(client, embeddings, peft_tokens):
    soft = b64_safetensors({"embeddings": embeddings})
    r = client.post("/", json=generate_body(PROMPT, None, MAX_NEW, soft_prompt=soft))
    assert r.status_code == 200, r.text
    assert token_ids(r.json()[0]) == peft_tokens(PROMPT)
    with client.stream("POST", "/generate_stream", json=generate_body(PROMPT, None, MAX_NEW, soft_prompt=soft)) as r:
        assert r.status_code == 200
        ids = [json.loads(line[5:])["token"]["id"] for line in r.iter_lines() if line.startswith("data:")]
    assert ids == peft_tokens(PROMPT)


def test_completions_equal_peft(client, embeddings, peft_tokens, tokenizer):
    soft = b64_safetensors({"embeddings": embeddings})
    body = {"prompt": PROMPT, "max_tokens": MAX_NEW, "temperature": 0, "soft_prompt": soft}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == tokenizer.decode(peft_tokens(PROMPT), skip_special_tokens=True)
    assert r.json()["adapter_version"].startswith("inline-")


def test_prompt_embeds_needs_the_flag(client, embeddings):
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2,
                                             "prompt_embeds": b64_torch_save(embeddings)})
    assert_v1_error(r, "prompt_embeds", "--allow-prompt-embeds")


def test_prompt_embeds_equal_peft(eclient, embeddings, peft_tokens, tokenizer):
    """vLLM's field: a dense tensor served as virtual tokens before the (here empty) text prompt."""
    body = {"max_tokens": MAX_NEW, "temperature": 0, "prompt_embeds": b64_torch_save(embeddings)}
    r = eclient.post("/v1/completions", json={**body, "prompt": PROMPT})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == tokenizer.decode(peft_tokens(PROMPT), skip_special_tokens=True)
    r = eclient.post("/v1/completions", json=body)  # no prompt: the embeddings, then BOS
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == tokenizer.decode(peft_tokens(""), skip_special_tokens=True)


def test_prompt_embeds_sparse_and_oversized_refused(eclient, embeddings, hidden):
    sparse = b64_torch_save(embeddings.to_sparse())
    assert_v1_error(eclient.post("/v1/completions", json={"prompt": PROMPT, "prompt_embeds": sparse}),
                 "prompt_embeds", "sparse")
    big = b64_torch_save(torch.zeros(600, hidden))  # past --max-virtual-tokens (512)
    assert_v1_error(eclient.post("/v1/completions", json={"prompt": PROMPT, "prompt_embeds": big}),
                 "prompt_embeds", "600 virtual tokens")
    both = {"prompt": PROMPT, "prompt_embeds": b64_torch_save(embeddings),
            "soft_prompt": b64_safetensors({"e": embeddings})}
    assert_v1_error(eclient.post("/v1/completions", json=both), "prompt_embeds", "soft_prompt")


def test_with_an_adapter_refused(client, embeddings, uploaded, server):
    soft = b64_safetensors({"embeddings": embeddings})
    r = client.post("/generate", json=generate_body(PROMPT, uploaded["prompt"], 2, soft_prompt=soft))
    assert_error(r, 422, "parameters.soft_prompt", "parameters.adapter_id")
    r = client.post("/v1/completions", json={"model": uploaded["prompt"], "prompt": PROMPT, "soft_prompt": soft})
    assert_v1_error(r, "soft_prompt", "model")
    r = client.post("/v1/chat/completions", json={"model": uploaded["prompt"], "soft_prompt": soft,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400, r.text  # no chat template on the tiny model, or the soft prompt's refusal
    # the base model's own name is no adapter: served
    r = client.post("/v1/completions", json={"model": server.model_name, "prompt": PROMPT, "max_tokens": 2,
                                             "soft_prompt": soft})
    assert r.status_code == 200, r.text


def _bad_payloads(embeddings: torch.Tensor, hidden: int) -> dict[str, tuple[str, str]]:
    """name -> (payload, what the message names)."""
    good = save({"e": embeddings})
    return {
        "wrong width": (b64_safetensors({"e": torch.zeros(3, hidden + 8)}), f"hidden size is {hidden}"),
        "NaN": (b64_safetensors({"e": torch.full((3, hidden), float("nan"))}), "NaN"),
        "header declares more than the body": (base64.b64encode(good[:-64]).decode(), "truncated"),
        "1 GB declared": (b64_header({"e": {"dtype": "F32", "shape": [2**30 // (4 * hidden), hidden],
                                            "data_offsets": [0, 2**30]}}, b"\0" * 64), "virtual tokens"),
        "not base64": ("this is not base64!", "base64"),
        "not safetensors": (base64.b64encode(b"PK\x03\x04 a zip file, say, or anything").decode(), "safetensors"),
        "two tensors": (b64_safetensors({"a": embeddings, "b": embeddings.clone()}), "exactly one tensor"),
        "3-D": (b64_safetensors({"e": torch.zeros(1, 3, hidden)}), "2-D"),
        "int dtype": (b64_safetensors({"e": torch.zeros(3, hidden, dtype=torch.int32)}), "dtype"),
    }


@pytest.mark.parametrize("case", ["wrong width", "NaN", "header declares more than the body", "1 GB declared",
                                  "not base64", "not safetensors", "two tensors", "3-D", "int dtype"])
def test_bad_soft_prompt_refused(client, store_dir, embeddings, hidden, case):
    payload, named = _bad_payloads(embeddings, hidden)[case]
    before = adapter_names(client)
    started = time.monotonic()
    r = client.post("/generate", json=generate_body(PROMPT, None, 2, soft_prompt=payload))
    assert time.monotonic() - started < 5
    assert_error(r, 422, "parameters.soft_prompt", named)
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "soft_prompt": payload})
    assert_v1_error(r, "soft_prompt", named)
    assert_unharmed(client, store_dir, before)
