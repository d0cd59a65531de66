"""AdapterRegistry over a store: start-up registration, failed loads, concurrent adds, replacing and
removing while requests still use an adapter, pagination, --max-adapters."""

from __future__ import annotations

import errno
import threading
import time

import pytest
import torch

from adapters import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterExists,
    AdapterNotFound,
    AdapterRegistry,
    AdapterStore,
    InvalidAdapter,
    StoreFull,
    content_version,
)
from server.engine.request import SamplingParams, Sequence
from tests.at_once import at_once
from tests.conftest import MAX_NEW, PROMPTS
from tests.unit.test_store import _entries, _files, _hidden, _versions


def _store_with_adapters(llama, root, broken: dict[str, str]) -> AdapterStore:
    store = AdapterStore(root)
    store.save("good-prompt", *llama.files("prompt"))
    store.save("good-prefix", *llama.files("prefix"))
    for name, how in broken.items():
        config, weights = llama.files("ptuning-mlp")
        if how == "corrupt":
            store.save(name, config, weights[: len(weights) // 3])
        elif how == "no-weights":
            store.save(name, config, weights)
            (store.root / name / WEIGHTS_FILE).unlink()
        elif how == "bad-config":
            store.save(name, b"{oops", weights)
    return store


def test_load_store_registers_every_name_and_a_corrupted_one_fails_when_used(llama, tmp_path):
    """Start-up lists the store, reading and materializing nothing; an adapter is read when first
    used, and a corrupted one then fails with InvalidAdapter, harming nothing else."""
    store = _store_with_adapters(llama, tmp_path / "store", {"corrupt": "corrupt"})
    registry = AdapterRegistry(llama.spec, llama.model, store)
    assert registry.load_store() == []
    assert registry.names() == ["corrupt", "good-prefix", "good-prompt"]
    assert not any(registry.resident(n) for n in registry.names()) and registry.stats["loads"] == 0
    described = registry.describe("good-prompt")  # from its config file and its version's directory
    assert {k: described[k] for k in ("name", "source", "resident", "peft_type", "num_virtual_tokens", "version")} \
        == {"name": "good-prompt", "source": "disk", "resident": False, "peft_type": "PROMPT_TUNING",
            "num_virtual_tokens": 5, "version": content_version(*llama.files("prompt"))}
    with pytest.raises(InvalidAdapter):
        registry.get("corrupt")
    assert registry.stats["load_failures"] >= 1 and not registry.resident("corrupt")
    assert store.names() == ["corrupt", "good-prefix", "good-prompt"], "a failed load must not delete files"
    torch.testing.assert_close(registry.get("good-prompt").kv, llama.adapter("prompt").kv, atol=1e-5, rtol=1e-4)  # the shared model may be packed for another backend now
    torch.testing.assert_close(registry.get("good-prefix").kv, llama.adapter("prefix").kv, atol=0, rtol=0)
    assert registry.resident("good-prompt") and registry.describe("good-prompt")["source"] == "disk"


def test_each_failed_load_is_counted_once(llama, tmp_path):
    """stats['load_failures'] counts failed loads: one per attempt to load a broken adapter."""
    broken = {"corrupt": "corrupt", "no-weights": "no-weights", "bad-config": "bad-config"}
    store = _store_with_adapters(llama, tmp_path / "store", broken)
    registry = AdapterRegistry(llama.spec, llama.model, store)
    assert registry.load_store() == [] and len(registry) == 5
    for name in broken:
        with pytest.raises(InvalidAdapter):
            registry.get(name)
    assert registry.stats["load_failures"] == len(broken), dict(registry.stats)


def test_upload_failure_counted_once(llama, store_registry):
    registry, _ = store_registry
    with pytest.raises(InvalidAdapter):
        registry.add("x", llama.files("prompt")[0], b"garbage")
    assert registry.stats["load_failures"] == 1


def test_persisted_adapter_is_found_at_next_start_up(llama, tmp_path):
    store = AdapterStore(tmp_path / "store")
    first = AdapterRegistry(llama.spec, llama.model, store)
    added = first.add("persisted", *llama.files("ptuning-lstm"))
    assert added.source == "upload"
    assert store.names() == ["persisted"]
    second = AdapterRegistry(llama.spec, llama.model, AdapterStore(tmp_path / "store"))
    assert second.load_store() == []
    torch.testing.assert_close(second.get("persisted").kv, added.kv, atol=0, rtol=0)
    with pytest.raises(AdapterExists):
        second.add("persisted", *llama.files("prompt"))
    # registry.remove deletes the files too
    second.remove("persisted")
    assert store.names() == [] and _entries(store) == []
    with pytest.raises(AdapterNotFound):
        second.get("persisted")
    with pytest.raises(AdapterNotFound):
        second.remove("persisted")


def test_existing_stored_name_not_registered(llama, store_registry):
    """A name present in the store but not registered (stored by another server, or its load failed)
    is not overwritten: it is registered from the store, and fails when used."""
    registry, store = store_registry
    store.save("taken", b"{old", b"old")
    with pytest.raises(AdapterExists):
        registry.add("taken", *llama.files("prompt"))
    with pytest.raises(InvalidAdapter):
        registry.get("taken")
    assert (store.root / "taken" / CONFIG_FILE).read_bytes() == b"{old"


@pytest.mark.parametrize("round_", range(3))
def test_concurrent_add_of_same_name(llama, store_registry, round_):
    registry, store = store_registry
    variants = ["prompt", "prefix"]
    results = at_once(lambda i: registry.add("same", *llama.files(variants[i])), 2)
    winners = [r for r in results if not isinstance(r, Exception)]
    losers = [r for r in results if isinstance(r, Exception)]
    assert len(winners) == 1 and len(losers) == 1, results
    assert isinstance(losers[0], AdapterExists), repr(losers[0])
    assert registry.get("same") is winners[0]
    assert len(registry) == 1
    assert store.names() == ["same"] and _hidden(store) == []
    # the stored files are the winner's
    winner_variant = variants[results.index(winners[0])]
    assert (store.root / "same" / WEIGHTS_FILE).read_bytes() == llama.files(winner_variant)[1]


def test_remove_while_a_sequence_holds_the_adapter(llama, store_registry):
    registry, store = store_registry
    registry.add("temp", *llama.files("prefix"))
    engine = llama.engine()
    ids = llama.ids(PROMPTS[1])
    other_ids = llama.ids(PROMPTS[0])
    seq = engine.submit(Sequence(ids, SamplingParams(max_new_tokens=MAX_NEW), registry.get("temp")))
    other = engine.submit(Sequence(other_ids, SamplingParams(max_new_tokens=MAX_NEW), llama.adapter("prompt")))
    for _ in range(3):
        engine.step()
    assert len(seq.output_ids) == 3
    registry.remove("temp")
    assert "temp" not in registry and store.names() == []
    with pytest.raises(AdapterNotFound):
        registry.get("temp")
    while engine.has_work():
        engine.step()
    assert seq.output_ids == llama.reference("prefix", ids)
    assert other.output_ids == llama.reference("prompt", other_ids)
    assert len(engine.runner.seqs) == 0


def test_replace_swaps_the_registered_and_the_stored_version(llama, store_registry):
    registry, store = store_registry
    old = registry.add("r", *llama.files("prompt"))
    assert old.version == content_version(*llama.files("prompt"))
    new = registry.replace("r", *llama.files("prefix"))
    assert registry.get("r") is new and new.version == content_version(*llama.files("prefix")) != old.version
    assert new.peft_type == "PREFIX_TUNING" and len(registry) == 1
    assert _files(store, "r") == llama.files("prefix") and list(_versions(store)) == ["r"]
    description = registry.describe("r")
    assert description["version"] == new.version and description["resident"] is True
    assert registry.stats["loads"] == 2

    # nothing changes on error: an invalid adapter, a name not registered, the store failing
    with pytest.raises(InvalidAdapter):
        registry.replace("r", llama.files("prompt")[0], b"garbage")
    with pytest.raises(AdapterNotFound):
        registry.replace("absent", *llama.files("prompt"))
    assert registry.get("r") is new and _files(store, "r") == llama.files("prefix")
    assert store.names() == ["r"] and registry.stats["load_failures"] == 1


def test_a_store_failure_keeps_the_registered_version(llama, store_registry, monkeypatch):
    registry, store = store_registry
    old = registry.add("r", *llama.files("prompt"))

    def fails(*args):
        raise OSError(errno.ENOSPC, "simulated: no space left on device")

    monkeypatch.setattr(store, "replace", fails)
    with pytest.raises(OSError, match="no space"):
        registry.replace("r", *llama.files("prefix"))
    assert registry.get("r") is old and _files(store, "r") == llama.files("prompt")


def test_a_demo_adapter_never_stored_is_stored_when_replaced(llama, store_registry, tmp_path):
    registry, store = store_registry
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / CONFIG_FILE).write_bytes(llama.files("prompt")[0])
    (demo / WEIGHTS_FILE).write_bytes(llama.files("prompt")[1])
    registry.add_dir("demo", demo, source="demo")
    assert store.names() == []
    registry.replace("demo", *llama.files("prefix"))
    assert store.names() == ["demo"] and _files(store, "demo") == llama.files("prefix")


def test_replace_while_a_sequence_holds_the_old_version(llama, store_registry):
    """The running request finishes on the version it started with; the next one gets the new one."""
    registry, _ = store_registry
    registry.add("live", *llama.files("prefix"))
    engine = llama.engine()
    ids = llama.ids(PROMPTS[1])
    running = engine.submit(Sequence(ids, SamplingParams(max_new_tokens=MAX_NEW), registry.get("live")))
    for _ in range(3):
        engine.step()
    registry.replace("live", *llama.files("prompt"))
    after = engine.submit(Sequence(ids, SamplingParams(max_new_tokens=MAX_NEW), registry.get("live")))
    while engine.has_work():
        engine.step()
    assert running.output_ids == llama.reference("prefix", ids)
    assert after.output_ids == llama.reference("prompt", ids)
    assert running.adapter.version != after.adapter.version


def test_lookups_during_replaces_get_one_version_or_the_other(llama, store_registry):
    registry, _ = store_registry
    versions = {content_version(*llama.files(v)) for v in ("prompt", "prefix")}
    registry.add("hot", *llama.files("prompt"))
    seen, errors, done = set(), [], threading.Event()

    def look():
        while not done.is_set():
            try:
                seen.add(registry.get("hot").version)
                registry.page(10)
            except Exception as exc:  # noqa: BLE001 - collected and checked below
                errors.append(exc)

    reader = threading.Thread(target=look)
    reader.start()
    try:
        for i in range(6):
            registry.replace("hot", *llama.files(("prefix", "prompt")[i % 2]))
            time.sleep(0.005)
    finally:
        done.set()
        reader.join(timeout=60)
    assert errors == [] and seen == versions


def test_page_by_name(llama, store_registry):
    registry, _ = store_registry
    names = ["b", "a", "e", "d", "c"]
    for name in names:
        registry.add(name, *llama.files("prompt"), persist=False)
    assert _page(registry, 2) == (["a", "b"], "b")
    assert _page(registry, 2, "b") == (["c", "d"], "d")
    assert _page(registry, 2, "d") == (["e"], None)
    assert _page(registry, 5) == (sorted(names), None)
    assert _page(registry, 100, "b0") == (["c", "d", "e"], None)  # `after` need not be registered
    assert _page(registry, 3, "e") == ([], None)
    assert _page(registry, 3, "") == (["a", "b", "c"], "c")


def _page(registry, limit, after=None):
    return registry.page(limit, after)


def test_max_adapters_counts_concurrent_adds(llama, tmp_path):
    store = AdapterStore(tmp_path / "store")
    registry = AdapterRegistry(llama.spec, llama.model, store, max_adapters=3)
    results = at_once(lambda i: registry.add(f"n{i}", *llama.files("prompt")), 6)
    full = [r for r in results if isinstance(r, Exception)]
    assert len(full) == 3 and all(isinstance(r, StoreFull) for r in full), results
    assert "--max-adapters 3" in str(full[0])
    assert len(registry) == 3 and len(store.names()) == 3
    kept = store.names()
    registry.replace(kept[0], *llama.files("prefix"))  # a replace takes no room
    with pytest.raises(StoreFull):
        registry.add("more", *llama.files("prompt"))
    registry.remove(kept[0])
    registry.add("more", *llama.files("prompt"))
    assert len(registry) == 3
    # what the store holds already is registered at start-up, whatever the limit
    restarted = AdapterRegistry(llama.spec, llama.model, AdapterStore(tmp_path / "store"), max_adapters=1)
    assert restarted.load_store() == [] and len(restarted) == 3
