"""The registry's bounded cache of materialized prefixes: adapters evicted and loaded again give the
same tokens, a cold load reads the saved prefix with no model forward, a prefix saved for another
base model is recomputed, and concurrent requests for one cold adapter make one load."""

from __future__ import annotations

import torch

from adapters import AdapterRegistry, AdapterStore
from adapters.prefix_file import PREFIX_FILE, model_key, save_prefix
from server.engine.request import SamplingParams
from tests.at_once import at_once
from tests.conftest import MAX_NEW, PROMPTS

VARIANTS = ["prompt", "prefix", "ptuning-mlp", "prefix-proj", "ptuning-lstm"]


class _Forwards:
    """Counts the model's forwards other than the engine's packed steps (materialization runs one)."""

    def __init__(self, model):
        self.count = 0

        def count(module, args, kwargs):
            if kwargs.get("ragged") is None:
                self.count += 1

        self.handle = model.register_forward_pre_hook(count, with_kwargs=True)


def _store(llama, root) -> AdapterStore:
    store = AdapterStore(root)
    for v in VARIANTS:
        store.save(v, *llama.files(v))
    return store


def _key(llama, name="tiny-llama") -> str:
    return model_key(name, None, llama.model.config.to_dict(), llama.spec.dtype)


def test_evicted_adapters_come_back_with_the_same_tokens_and_no_forward(llama, tmp_path):
    store = _store(llama, tmp_path / "store")
    one = llama.adapter("prompt").prefix_bytes
    registry = AdapterRegistry(llama.spec, llama.model, store, cache_bytes=2 * one + one // 2, model_key=_key(llama))
    registry.load_store()
    engine = llama.engine()
    ids = llama.ids(PROMPTS[1])
    params = SamplingParams(max_new_tokens=MAX_NEW)
    first = {v: engine.generate(ids, params, registry.get(v)).output_ids for v in VARIANTS}
    assert registry.cache.evictions >= len(VARIANTS) - 2 and registry.cache.bytes <= registry.cache.capacity
    assert all((store.path(v) / PREFIX_FILE).is_file() for v in VARIANTS), "a materialized prefix was not saved"
    forwards = _Forwards(llama.model)
    try:
        for _ in range(2):
            for v in VARIANTS:
                assert engine.generate(ids, params, registry.get(v)).output_ids == first[v], v
                assert registry.cache.bytes <= registry.cache.capacity
    finally:
        forwards.handle.remove()
    assert forwards.count == 0, "a cold load ran the model (its saved prefix unused)"
    assert registry.stats["prefix_reads"] >= len(VARIANTS)
    for v in VARIANTS:
        assert first[v] == llama.reference(v, ids) and first[v] != llama.reference(None, ids), v


def test_a_prefix_saved_for_another_base_model_is_recomputed(llama, tmp_path):
    store = _store(llama, tmp_path / "store")
    other = _key(llama, name="another-model")
    for v in VARIANTS:  # what another model's server left behind: the wrong keys and values for this one
        save_prefix(store.path(v), torch.randn_like(llama.adapter(v).kv), other, llama.adapter(v).version)
    registry = AdapterRegistry(llama.spec, llama.model, store, model_key=_key(llama))
    registry.load_store()
    engine, ids = llama.engine(), llama.ids(PROMPTS[0])
    for v in VARIANTS:  # recomputed (on whichever linears the shared model is packed for now: not bit-exact)
        torch.testing.assert_close(registry.get(v).kv, llama.adapter(v).kv, atol=1e-5, rtol=1e-4)
        assert engine.generate(ids, SamplingParams(max_new_tokens=MAX_NEW), registry.get(v)).output_ids == \
            llama.reference(v, ids)
    assert registry.stats["prefix_reads"] == 0
    again = AdapterRegistry(llama.spec, llama.model, store, model_key=_key(llama))  # the file now is this model's
    again.load_store()
    torch.testing.assert_close(again.get("prompt").kv, registry.get("prompt").kv, atol=0, rtol=0)  # as saved
    assert again.stats["prefix_reads"] == 1


def test_fifty_concurrent_requests_for_one_cold_adapter_make_one_load(llama, tmp_path):
    store = _store(llama, tmp_path / "store")
    registry = AdapterRegistry(llama.spec, llama.model, store, model_key=_key(llama))
    registry.load_store()
    forwards = _Forwards(llama.model)
    try:
        got = at_once(lambda i: registry.get("ptuning-lstm"), 50)
    finally:
        forwards.handle.remove()
    assert len(got) == 50 and all(a is got[0] for a in got)
    assert registry.cache.loads == 1 and forwards.count == 1
    # A thread that asks once the load is done is a hit: how many come that late depends on scheduling.
    assert registry.cache.misses + registry.cache.hits == 50 and registry.cache.misses >= 1


def test_pinned_adapters_are_loaded_at_start_and_never_evicted(llama, tmp_path):
    store = _store(llama, tmp_path / "store")
    one = llama.adapter("prompt").prefix_bytes
    registry = AdapterRegistry(llama.spec, llama.model, store, cache_bytes=2 * one, pinned=frozenset({"prefix"}),
                               model_key=_key(llama))
    assert registry.load_store() == []
    assert registry.resident("prefix") and registry.describe("prefix")["pinned"]
    for v in VARIANTS:
        registry.get(v)
    assert registry.resident("prefix") and registry.cache.bytes <= 2 * one
