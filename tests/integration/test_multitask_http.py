"""Multitask prompt tuning over HTTP: upload PEFT's files, generate per task through /generate and
/v1/completions (tokens equal PeftModel.generate(task_ids=...)), the 422s naming adapter_task, and
the description listing its tasks."""

from __future__ import annotations

import pytest

from tests.multitask import NUM_TASKS, NUM_VIRTUAL_TOKENS, make_multitask, peft_task_greedy

from .conftest import PROMPT
from .support import generate, token_ids, upload

MAX_NEW = 8


@pytest.fixture(scope="module")
def multitask(server, model_dir, material) -> str:
    src = make_multitask(model_dir, material / "adapters" / "multitask")
    with server.client() as c:
        r = upload(c, "mt", src)
        assert r.status_code == 201, r.text
        assert r.json()["peft_type"] == "MULTITASK_PROMPT_TUNING" and r.json()["num_tasks"] == NUM_TASKS, r.json()
    return "mt"


def _error_text(r) -> str:
    """The message of either error shape (TGI's, or OpenAI's on /v1)."""
    error = r.json()["error"]
    return error if isinstance(error, str) else f"{error.get('param')}: {error['message']}"


def test_generate_per_task_equals_peft(client, multitask, model_dir, material, tokenizer):
    src = material / "adapters" / "multitask"
    ids = tokenizer(PROMPT).input_ids
    outputs = []
    for task in range(NUM_TASKS):
        body = generate(client, PROMPT, multitask, MAX_NEW, adapter_task=task)
        assert token_ids(body) == peft_task_greedy(model_dir, src, task, ids, MAX_NEW), task
        outputs.append(body["generated_text"])
        r = client.post("/v1/completions", json={"model": multitask, "prompt": PROMPT, "max_tokens": MAX_NEW,
                                                 "temperature": 0, "adapter_task": task})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == body["generated_text"]
    assert len(set(outputs)) == NUM_TASKS, f"the tasks give the same text: {outputs}"


@pytest.mark.parametrize("task, words", [(None, ["adapter_task", "3 tasks"]), (NUM_TASKS, ["adapter_task", "0 to 2"]),
                                         (-1, ["adapter_task", "-1"])])
def test_task_that_does_not_fit(client, multitask, task, words):
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": multitask, "adapter_task": task,
                                                                        "max_new_tokens": 2}})
    assert r.status_code == 422, r.text
    assert all(w in _error_text(r) for w in words), r.text
    r = client.post("/v1/completions", json={"model": multitask, "prompt": PROMPT, "max_tokens": 2,
                                             **({} if task is None else {"adapter_task": task})})
    assert r.status_code in (400, 422), r.text  # OpenAI's routes answer a bad request with 400
    assert all(w in _error_text(r) for w in words), r.text


def test_task_for_an_adapter_without_tasks(client, uploaded, multitask):
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": uploaded["prompt"],
                                                                        "adapter_task": 0}})
    assert r.status_code == 422 and "parameters.adapter_task" in _error_text(r), r.text
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_task": 1}})
    assert r.status_code == 422 and "adapter_task" in _error_text(r), r.text
    assert generate(client, PROMPT, uploaded["prompt"], 2)["details"]["generated_tokens"] == 2  # other kinds unaffected


def test_description_lists_tasks(client, multitask):
    r = client.get(f"/adapters/{multitask}")
    assert r.status_code == 200, r.text
    about = r.json()
    assert about["peft_type"] == "MULTITASK_PROMPT_TUNING"
    assert about["num_tasks"] == NUM_TASKS and about["num_virtual_tokens"] == NUM_VIRTUAL_TOKENS
