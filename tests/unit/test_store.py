"""AdapterStore (atomic saves, deletes, sweeping, names) and AdapterRegistry over it (start-up
loading, concurrent adds, removal while requests still use an adapter)."""

from __future__ import annotations

import errno
import os
import threading

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
)
from server.engine.request import SamplingParams, Sequence
from tests.conftest import MAX_NEW, PROMPTS


def _entries(store: AdapterStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir())


def _hidden(store: AdapterStore) -> list[str]:
    return [name for name in _entries(store) if name.startswith(".")]


# --- AdapterStore ---------------------------------------------------------------------------------


def test_save_writes_both_files_and_no_temp_dir(tmp_path):
    store = AdapterStore(tmp_path / "store")
    target = store.save("a1", b'{"x": 1}', b"weights")
    assert target == store.root / "a1"
    assert (target / CONFIG_FILE).read_bytes() == b'{"x": 1}'
    assert (target / WEIGHTS_FILE).read_bytes() == b"weights"
    assert sorted(p.name for p in target.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    assert _entries(store) == ["a1"]
    assert store.names() == ["a1"] and store.exists("a1")


@pytest.mark.parametrize("fail_at", ["fsync", "rename", "write"])
def test_failed_save_leaves_nothing(tmp_path, monkeypatch, fail_at):
    store = AdapterStore(tmp_path / "store")
    store.save("keep", b"{}", b"w")

    def boom(*args, **kwargs):
        raise OSError(errno.EIO, f"simulated {fail_at} failure")

    if fail_at == "write":  # the disk fills up while writing the weights
        real_open = open

        class FailingFile:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[:3])
                raise OSError(errno.ENOSPC, "simulated: no space left on device")

            def __getattr__(self, name):
                return getattr(self.f, name)

        def failing_open(path, mode="r", *args, **kwargs):
            f = real_open(path, mode, *args, **kwargs)
            return FailingFile(f) if "w" in mode and str(path).endswith(WEIGHTS_FILE) else f

        monkeypatch.setattr("builtins.open", failing_open)
    else:
        monkeypatch.setattr(os, fail_at, boom)
    with pytest.raises(OSError):
        store.save("new", b"{}", b"weights")
    monkeypatch.undo()
    assert _entries(store) == ["keep"], "a temporary directory or a half-written adapter was left behind"
    assert store.names() == ["keep"]
    assert not store.exists("new")
    # and the store still works
    store.save("new", b"{}", b"weights")
    assert store.names() == ["keep", "new"]


def test_save_existing_name_raises_and_keeps_original(tmp_path):
    store = AdapterStore(tmp_path / "store")
    store.save("a1", b"config-1", b"weights-1")
    with pytest.raises(AdapterExists, match="a1"):
        store.save("a1", b"config-2", b"weights-2")
    assert (store.root / "a1" / CONFIG_FILE).read_bytes() == b"config-1"
    assert (store.root / "a1" / WEIGHTS_FILE).read_bytes() == b"weights-1"
    assert _entries(store) == ["a1"]


def test_save_losing_a_race_raises_adapter_exists(tmp_path, monkeypatch):
    """Another save creates the name between the existence check and the rename."""
    store = AdapterStore(tmp_path / "store")
    real_rename = os.rename

    def rival_wins(src, dst):
        os.mkdir(dst)
        with open(os.path.join(dst, CONFIG_FILE), "wb") as f:
            f.write(b"rival")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rival_wins)
    with pytest.raises(AdapterExists):
        store.save("a1", b"mine", b"mine")
    monkeypatch.undo()
    assert (store.root / "a1" / CONFIG_FILE).read_bytes() == b"rival"
    assert _entries(store) == ["a1"]


def test_delete(tmp_path):
    store = AdapterStore(tmp_path / "store")
    store.save("a1", b"{}", b"w")
    store.save("a2", b"{}", b"w")
    store.delete("a1")
    assert store.names() == ["a2"]
    assert _entries(store) == ["a2"], "delete left its trash behind"
    with pytest.raises(AdapterNotFound):
        store.delete("a1")
    with pytest.raises(InvalidAdapter):
        store.delete("../a2")
    assert store.names() == ["a2"]


def test_sweep_removes_leftovers_at_start_up(tmp_path):
    root = tmp_path / "store"
    AdapterStore(root).save("good", b"{}", b"w")
    for leftover in (".tmp-0123abcd", ".trash-4567ef"):
        (root / leftover).mkdir()
        (root / leftover / WEIGHTS_FILE).write_bytes(b"half")
    store = AdapterStore(root)  # start-up
    assert _entries(store) == ["good"]
    assert store.names() == ["good"]


def test_names_ignore_hidden_invalid_and_files(tmp_path):
    store = AdapterStore(tmp_path / "store")
    store.save("zeta", b"{}", b"w")
    store.save("Alpha-1", b"{}", b"w")
    for junk in (".hidden", ".tmp-keep-out", "with space", "-dash", "x" * 129):
        (store.root / junk).mkdir()
    (store.root / "a-file").write_bytes(b"not a dir")
    assert store.names() == ["Alpha-1", "zeta"]


def test_path_checks_names(tmp_path):
    store = AdapterStore(tmp_path / "store")
    for bad in ("../x", ".hidden", "", "a/b"):
        with pytest.raises(InvalidAdapter):
            store.path(bad)
        with pytest.raises(InvalidAdapter):
            store.save(bad, b"{}", b"w")
    assert _entries(store) == []
    assert not (tmp_path / "x").exists()


# --- AdapterRegistry over a store -----------------------------------------------------------------


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


def test_load_store_registers_good_and_skips_corrupted(llama, tmp_path):
    store = _store_with_adapters(llama, tmp_path / "store", {"corrupt": "corrupt"})
    registry = AdapterRegistry(llama.spec, llama.model, store)
    failed = registry.load_store()
    assert failed == ["corrupt"]
    assert [a.name for a in registry.list()] == ["good-prefix", "good-prompt"]
    assert all(a.source == "disk" for a in registry.list())
    assert "corrupt" not in registry
    assert registry.stats["load_failures"] >= 1
    assert registry.stats["loads"] == 2
    assert store.names() == ["corrupt", "good-prefix", "good-prompt"], "start-up must not delete files"
    torch.testing.assert_close(registry.get("good-prompt").kv, llama.adapter("prompt").kv, atol=0, rtol=0)
    torch.testing.assert_close(registry.get("good-prefix").kv, llama.adapter("prefix").kv, atol=0, rtol=0)


def test_load_store_counts_each_failure_once(llama, tmp_path):
    """stats['load_failures'] counts failed adapters: one per adapter that could not be loaded."""
    broken = {"corrupt": "corrupt", "no-weights": "no-weights", "bad-config": "bad-config"}
    store = _store_with_adapters(llama, tmp_path / "store", broken)
    registry = AdapterRegistry(llama.spec, llama.model, store)
    failed = registry.load_store()
    assert sorted(failed) == sorted(broken)
    assert len(registry) == 2
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
    """A name present in the store but not registered (e.g. its load failed) is not overwritten."""
    registry, store = store_registry
    store.save("taken", b"{old", b"old")
    with pytest.raises(AdapterExists):
        registry.add("taken", *llama.files("prompt"))
    assert "taken" not in registry
    assert (store.root / "taken" / CONFIG_FILE).read_bytes() == b"{old"


@pytest.mark.parametrize("round_", range(3))
def test_concurrent_add_of_same_name(llama, store_registry, round_):
    registry, store = store_registry
    variants = ["prompt", "prefix"]
    barrier = threading.Barrier(2)
    results: list = [None, None]

    def add(i):
        barrier.wait()
        try:
            results[i] = registry.add("same", *llama.files(variants[i]))
        except Exception as exc:  # noqa: BLE001 - collected and checked below
            results[i] = exc

    threads = [threading.Thread(target=add, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
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
