"""Materialized adapters held on the model's device, bounded in bytes, least recently used evicted.

`get(name, load)` returns the resident value or runs `load()` once, however many threads ask for
the same name at the same time: the others wait for that load and share its result (or its
error). Pinned names are never evicted, nor the parts of one: a name `K@part` (a task's prefix
of the adapter version K) is pinned with K. A value evicted while a request still holds it stays
alive with that request (the cache only drops its own reference), so eviction is always safe;
the bound is on what the cache keeps.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable, Generic, TypeVar

from .single_flight import SingleFlight

T = TypeVar("T")


class PrefixCache(Generic[T]):
    def __init__(self, capacity_bytes: int, size: Callable[[T], int], pinned: frozenset[str] = frozenset()):
        """size: a value's device bytes. capacity_bytes: what the values may hold together; pinned ones
        count, and are never evicted. A value larger than the whole capacity is served but not kept."""
        self.capacity = capacity_bytes
        self._size = size
        self.pinned = set(pinned)
        self._values: OrderedDict[str, T] = OrderedDict()  # least recently used first
        self._flights = SingleFlight()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = self.loads = self.load_failures = 0
        self.observe_load: Callable[[float], None] = lambda seconds: None  # each load's latency (the metrics set it)

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def __len__(self) -> int:
        return len(self._values)

    def peek(self, name: str) -> T | None:
        """The resident value, without counting a use."""
        return self._values.get(name)

    def lookup(self, name: str) -> T | None:
        """The resident value (a hit, as `get` counts one), or None: never loads."""
        with self._lock:
            value = self._values.get(name)
            if value is not None:
                self._values.move_to_end(name)
                self.hits += 1
            return value

    def get(self, name: str, load: Callable[[], T]) -> T:
        """The value of `name`: resident (a hit), or loaded by this call or one already under way."""
        value = self.lookup(name)
        if value is not None:
            return value
        with self._lock:
            self.misses += 1
        return self._flights.run(name, lambda: self._load(name, load))

    def _load(self, name: str, load: Callable[[], T]) -> T:
        """Load and keep; a load that finished just before this one began is used instead."""
        with self._lock:
            value = self._values.get(name)
        if value is not None:
            return value
        started = time.perf_counter()
        try:
            value = load()
        except BaseException:
            with self._lock:
                self.load_failures += 1
            raise
        with self._lock:
            self.loads += 1
            self._insert(name, value)
        self.observe_load(time.perf_counter() - started)
        return value

    def put(self, name: str, value: T) -> None:
        """Make `value` the resident value of `name` (a new upload, a replacement)."""
        with self._lock:
            self._insert(name, value)

    def drop(self, name: str) -> None:
        """Forget `name` (deleted, or replaced by a version not loaded yet)."""
        with self._lock:
            value = self._values.pop(name, None)
            if value is not None:
                self.bytes -= self._size(value)

    def drop_where(self, matches: Callable[[str], bool]) -> None:
        """Forget every name that `matches` (a multitask adapter's tasks, when it is replaced or removed)."""
        with self._lock:
            for name in [n for n in self._values if matches(n)]:
                self.bytes -= self._size(self._values.pop(name))

    def pin(self, name: str, pinned: bool = True) -> None:
        with self._lock:
            (self.pinned.add if pinned else self.pinned.discard)(name)
            self._evict()

    def _pinned(self, name: str) -> bool:
        return name in self.pinned or name.partition("@")[0] in self.pinned

    def _insert(self, name: str, value: T) -> None:
        old = self._values.pop(name, None)
        if old is not None:
            self.bytes -= self._size(old)
        if self._size(value) > self.capacity and not self._pinned(name):
            return  # served to whoever asked, never kept: it would push everything else out
        self._values[name] = value
        self.bytes += self._size(value)
        self._evict(keep=name)

    def _evict(self, keep: str | None = None) -> None:
        """Drop least recently used unpinned values until within capacity (`keep`, just inserted, last)."""
        for name in [n for n in self._values if n != keep] + ([keep] if keep in self._values else []):
            if self.bytes <= self.capacity:
                return
            if self._pinned(name):
                continue
            self.bytes -= self._size(self._values.pop(name))
            self.evictions += 1
