"""The bounded cache of materialized prefixes, and the prefix file that makes a cold load cheap."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from adapters.prefix_cache import PrefixCache
from adapters.prefix_file import PREFIX_FILE, load_prefix, model_key, save_prefix
from adapters.spec import ModelSpec


def _cache(capacity: int, pinned=frozenset()) -> PrefixCache:
    return PrefixCache(capacity, size=len, pinned=frozenset(pinned))  # values: bytes objects, sized by length


def test_least_recently_used_is_evicted_within_the_capacity():
    cache = _cache(10)
    for name in "abc":
        cache.get(name, lambda: b"xxxx")
    assert list(cache._values) == ["b", "c"] and cache.bytes == 8 and cache.evictions == 1
    cache.get("b", lambda: pytest.fail("b is resident"))  # a hit makes b the most recent
    cache.get("d", lambda: b"yyyy")
    assert list(cache._values) == ["b", "d"] and cache.bytes <= 10
    assert (cache.hits, cache.misses, cache.loads) == (1, 4, 4)


def test_pinned_values_stay_and_oversized_ones_are_served_not_kept():
    cache = _cache(10, pinned={"p"})
    cache.get("p", lambda: b"pppppp")
    for name in "abcdef":
        assert cache.get(name, lambda: b"xxxx") == b"xxxx"
        assert "p" in cache and cache.bytes <= 10
    assert cache.get("huge", lambda: b"h" * 11) == b"h" * 11
    assert "huge" not in cache and cache.bytes <= 10
    cache.pin("p", False)
    cache.get("g", lambda: b"gggggggg")
    assert "p" not in cache and cache.bytes <= 10


def test_concurrent_misses_share_one_load_and_its_error():
    cache = _cache(100)
    calls, release = [], threading.Event()

    def slow(value):
        def load():
            calls.append(value)
            release.wait(5)
            if value is None:
                raise RuntimeError("load failed")
            return value
        return load

    def together(n, target):
        """n threads run `target`, released together once they all wait on the load."""
        threads = [threading.Thread(target=target) for _ in range(n)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        release.set()
        for t in threads:
            t.join()

    results = []
    together(50, lambda: results.append(cache.get("a", slow(b"a"))))
    assert calls == [b"a"] and results == [b"a"] * 50 and cache.loads == 1

    release.clear()
    errors = []

    def failing():
        try:
            cache.get("bad", slow(None))
        except RuntimeError as exc:
            errors.append(str(exc))

    together(5, failing)
    assert errors == ["load failed"] * 5 and "bad" not in cache and cache.load_failures == 1


SPEC = ModelSpec(hidden_size=32, num_layers=2, num_kv_heads=2, head_dim=8, device=torch.device("cpu"),
                 dtype=torch.float32)


def test_prefix_file_round_trips_and_refuses_another_model_or_version(tmp_path):
    kv = torch.randn(2, 2, 2, 5, 8)
    key = model_key("tiny", None, {"hidden_size": 32}, torch.float32)
    save_prefix(tmp_path, kv, key, "v1")
    assert [p.name for p in tmp_path.iterdir()] == [PREFIX_FILE]
    torch.testing.assert_close(load_prefix(tmp_path, key, "v1", SPEC, 5), kv, atol=0, rtol=0)
    other_model = model_key("tiny", None, {"hidden_size": 32, "num_hidden_layers": 3}, torch.float32)
    assert other_model != key and load_prefix(tmp_path, other_model, "v1", SPEC, 5) is None
    assert model_key("tiny", None, {"hidden_size": 32}, torch.bfloat16) != key
    assert load_prefix(tmp_path, key, "v2", SPEC, 5) is None  # the adapter's files changed
    assert load_prefix(tmp_path, key, "v1", SPEC, 6) is None  # not the shape its config gives
    (tmp_path / PREFIX_FILE).write_bytes(b"not safetensors")
    assert load_prefix(tmp_path, key, "v1", SPEC, 5) is None
    assert load_prefix(tmp_path / "missing", key, "v1", SPEC, 5) is None
