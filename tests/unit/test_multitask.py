"""Multitask prompt tuning (PEFT's MULTITASK_PROMPT_TUNING): each task's prompt and greedy tokens
equal PEFT's, each (adapter, task) cached on its own, and a task that does not fit is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from adapters import AdapterRegistry, AdapterStore, InvalidAdapter
from adapters.errors import InvalidTask
from server.engine.request import SamplingParams, Sequence
from tests.conftest import MAX_NEW, PROMPTS
from tests.multitask import NUM_TASKS, make_multitask, peft_task_greedy, peft_task_prompt


@pytest.fixture(scope="module")
def multitask_dir(llama, tmp_path_factory):
    return make_multitask(llama.model_dir, tmp_path_factory.mktemp("multitask") / "mt")


@pytest.fixture
def registry(llama, multitask_dir):
    registry = AdapterRegistry(llama.spec, llama.model)
    registry.add_dir("mt", multitask_dir, source="test")
    registry.add_dir("prompt", llama.adapter_dirs["prompt"], source="test")
    return registry


def test_task_prompts_equal_peft(llama, multitask_dir, registry):
    for task in range(NUM_TASKS):
        adapter = registry.get("mt", task)
        assert adapter.task == task and adapter.peft_type == "MULTITASK_PROMPT_TUNING"
        expected = peft_task_prompt(llama.model_dir, multitask_dir, task)
        torch.testing.assert_close(adapter.embeddings, expected, rtol=1e-6, atol=1e-6)


def test_each_task_cached_on_its_own(registry):
    first = [registry.get("mt", task) for task in range(NUM_TASKS)]
    assert [registry.get("mt", task) for task in range(NUM_TASKS)] == first  # the same objects: cached
    assert all(registry.get_resident("mt", task) is first[task] for task in range(NUM_TASKS))
    assert not torch.equal(first[0].kv, first[1].kv)
    assert registry.get("prompt") is registry.get_resident("prompt")  # other kinds: no task, unaffected
    description = registry.describe("mt")
    assert description["num_tasks"] == NUM_TASKS and description["peft_type"] == "MULTITASK_PROMPT_TUNING"
    assert "num_tasks" not in registry.describe("prompt")


@pytest.mark.parametrize("task, words", [(None, ["3 tasks", "0 to 2"]), (3, ["3 is not a task"]),
                                         (-1, ["-1 is not a task"])])
def test_task_that_does_not_fit(registry, task, words):
    for _ in range(2):  # the cold check (files read) and the one from memory
        with pytest.raises(InvalidTask) as err:
            registry.get("mt", task)
        assert all(w in str(err.value) for w in words), err.value


def test_task_for_an_adapter_without_tasks(registry):
    with pytest.raises(InvalidTask, match="has no tasks"):
        registry.get("prompt", 0)


def test_cold_load_of_each_task_from_the_store(llama, multitask_dir, tmp_path):
    """Registered from the store at start-up (nothing read), then each task loaded on first use and
    its prefix saved in a file of its own; another server's cold load of each task reads its file
    (no encoder, no forward) and gets that task's prefix, none mixed up."""
    store = AdapterStore(tmp_path / "store")
    store.save("mt", (multitask_dir / "adapter_config.json").read_bytes(),
               (multitask_dir / "adapter_model.safetensors").read_bytes())
    registry = AdapterRegistry(llama.spec, llama.model, store, model_key="k")
    registry.load_store()
    with pytest.raises(InvalidTask):
        registry.get("mt")
    kvs = [registry.get("mt", task).kv for task in (2, 0, 1)]
    saved = sorted(p.name for p in store.path("mt").iterdir() if p.name.startswith("prefix"))
    assert saved == [f"prefix.task{t}.safetensors" for t in range(NUM_TASKS)]
    other = AdapterRegistry(llama.spec, llama.model, store, model_key="k")
    other.load_store()
    for kv, task in zip(kvs, (2, 0, 1)):
        again = other.get("mt", task)
        assert again.task == task and again.embeddings is None  # read, not computed
        torch.testing.assert_close(again.kv, kv, rtol=0, atol=0)
    assert other.stats["prefix_reads"] == NUM_TASKS


def test_a_pinned_multitask_adapter_keeps_every_task_resident(llama, multitask_dir, tmp_path):
    store = AdapterStore(tmp_path / "store")
    for name, src in (("mt", multitask_dir), ("a", llama.adapter_dirs["prompt"]), ("b", llama.adapter_dirs["prefix"])):
        store.save(name, (src / "adapter_config.json").read_bytes(), (src / "adapter_model.safetensors").read_bytes())
    registry = AdapterRegistry(llama.spec, llama.model, store, model_key="k", pinned=frozenset({"mt"}), cache_bytes=1)
    assert registry.load_store() == []
    assert all(registry.get_resident("mt", task) is not None for task in range(NUM_TASKS))
    registry.get("a"), registry.get("b")  # more than the cache holds: the unpinned are not kept
    assert registry.get_resident("a") is None
    assert all(registry.get_resident("mt", task) is not None for task in range(NUM_TASKS))


def test_replace_drops_every_task(registry, llama, multitask_dir, tmp_path):
    for task in range(NUM_TASKS):
        registry.get("mt", task)
    registry.replace("mt", *llama.files("prompt"))
    assert all(key.split("#")[0] != "mt" or "@" not in key for key in registry.cache._values)
    assert registry.get("mt").peft_type == "PROMPT_TUNING"


@pytest.mark.parametrize("change, words", [
    ({"num_tasks": 4}, ["prefix_task_cols", "num_tasks=4"]),
    ({"num_ranks": 3}, ["num_ranks=3"]),
    ({"num_virtual_tokens": 6}, ["num_virtual_tokens=6"]),
    ({"token_dim": 32}, ["token_dim=32"]),
    ({"num_tasks": 0}, ["num_tasks must be an integer >= 1"]),
])
def test_config_that_does_not_fit_the_weights(registry, multitask_dir, tmp_path, change, words):
    config = json.loads((multitask_dir / "adapter_config.json").read_text())
    bad = tmp_path / "bad"
    shutil.copytree(multitask_dir, bad)
    (bad / "adapter_config.json").write_text(json.dumps(config | change))
    with pytest.raises(InvalidAdapter) as err:
        registry.add_dir("bad", bad, source="test")
    assert all(w in str(err.value) for w in words), err.value
    assert "bad" not in registry


def test_greedy_tokens_equal_peft_per_task(llama, multitask_dir, registry):
    """Every task in one batch, with a plain prompt-tuning request beside them; each equals PEFT's
    generate(task_ids=[task]), and the tasks' tokens differ."""
    engine = llama.engine(max_batch_size=16)
    seqs = []
    for prompt in PROMPTS:
        ids = llama.ids(prompt)
        for task in range(NUM_TASKS):
            seqs.append((engine.submit(Sequence(ids, SamplingParams(max_new_tokens=MAX_NEW),
                                                registry.get("mt", task))), task, ids))
        engine.submit(Sequence(ids, SamplingParams(max_new_tokens=MAX_NEW), registry.get("prompt")))
    while engine.has_work():
        engine.step()
    for prompt in PROMPTS:
        outputs = [seq.output_ids for seq, _, ids in seqs if ids == llama.ids(prompt)]
        assert len({tuple(o) for o in outputs}) == NUM_TASKS, f"tasks give the same tokens for {prompt!r}: {outputs}"
    for seq, task, ids in seqs:
        assert seq.output_ids == peft_task_greedy(llama.model_dir, multitask_dir, task, ids, MAX_NEW), task
