"""Two registries over one store (two servers, or two Ray Serve replicas): what one adds, replaces or
deletes, the other follows on use within `recheck_s`, and serves no deleted or old version after."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from adapters import AdapterNotFound, AdapterRegistry, AdapterStore

RECHECK = 0.2


@pytest.fixture
def pair(llama, tmp_path):
    store = AdapterStore(tmp_path / "store")
    return [AdapterRegistry(llama.spec, llama.model, AdapterStore(store.root), recheck_s=RECHECK) for _ in range(2)]


def test_an_upload_elsewhere_is_served_at_once(llama, pair):
    one, two = pair
    two.load_store()
    one.add("shared", *llama.files("prefix"))
    torch.testing.assert_close(two.get("shared").kv, one.get("shared").kv, atol=0, rtol=0)
    assert two.names() == ["shared"]


def test_a_replace_elsewhere_is_followed(llama, pair):
    one, two = pair
    one.add("shared", *llama.files("prompt"))
    old = two.get("shared")
    new = one.replace("shared", *llama.files("prefix"))
    assert two.get("shared") is old  # within recheck_s: what it holds
    time.sleep(RECHECK * 1.5)
    assert two.get("shared").version == new.version
    torch.testing.assert_close(two.get("shared").kv, new.kv, atol=0, rtol=0)


def test_a_delete_elsewhere_is_followed(llama, pair):
    one, two = pair
    one.add("shared", *llama.files("prompt"))
    two.get("shared")
    one.remove("shared")
    time.sleep(RECHECK * 1.5)
    assert two.get_resident("shared") is None  # due: the caller goes to `get`, which asks the store
    with pytest.raises(AdapterNotFound):
        two.get("shared")
    assert "shared" not in two and two.names() == []
    with pytest.raises(AdapterNotFound):
        two.remove("shared")


class _SlowVersions(AdapterStore):
    """A store whose version reads take a while (an S3 GET), so that concurrent checks overlap."""

    def __init__(self, root):
        super().__init__(root)
        self.reading = threading.Event()

    def version(self, name):
        self.reading.set()
        time.sleep(0.3)
        return super().version(name)


def test_concurrent_first_uses_wait_for_the_check(llama, tmp_path):
    """Requests for a name stored elsewhere, arriving while the store is asked about it, wait for
    that answer (one load for them all): none is told 'not found' meanwhile."""
    store = AdapterStore(tmp_path / "store")
    two = AdapterRegistry(llama.spec, llama.model, _SlowVersions(store.root), recheck_s=RECHECK)
    AdapterRegistry(llama.spec, llama.model, store, recheck_s=RECHECK).add("late", *llama.files("prefix"))
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(two.get, "late")
        assert two.store.reading.wait(5)
        others = [pool.submit(two.get, "late") for _ in range(3)]
        assert two.get_resident("late") is None  # being checked: the caller goes to `get`
        got = [future.result() for future in (first, *others)]
    assert all(adapter is got[0] for adapter in got)
    assert two.stats["loads"] == 1


def test_recheck_off_keeps_the_old_behaviour(llama, tmp_path):
    store = AdapterStore(tmp_path / "store")
    one = AdapterRegistry(llama.spec, llama.model, store, recheck_s=None)
    AdapterRegistry(llama.spec, llama.model, AdapterStore(store.root)).add("elsewhere", *llama.files("prompt"))
    with pytest.raises(AdapterNotFound):
        one.get("elsewhere")
