"""What is loaded: adapters by name, materialized for the base model, backed by the store.

A request takes its `Adapter` object when it is submitted and keeps it; removing or replacing the
adapter in the registry therefore never disturbs requests already running with it. Lookups take
no lock: every change to the name -> Adapter dict is one assignment or deletion, so a lookup sees
the old state or the new one. Changes (and the store writes behind them) are serialized by a lock.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections import Counter
from pathlib import Path
from typing import Callable, TypeVar

import torch

from .adapter import Adapter
from .errors import AdapterError, AdapterExists, AdapterNotFound, InvalidAdapter, StoreFull
from .loading import LIMITS, Limits, load_adapter, read_adapter_dir
from .spec import ModelSpec
from .store import Store, check_name

log = logging.getLogger(__name__)
T = TypeVar("T")


class _ForwardsThrough:
    """The model, its forward calls run through `run_model`; everything else reads straight through."""

    def __init__(self, model, run_model):
        self._model, self._run_model = model, run_model

    def __call__(self, *args, **kwargs):
        return self._run_model(lambda: self._model(*args, **kwargs))

    def __getattr__(self, name):
        return getattr(self._model, name)


class AdapterRegistry:
    def __init__(self, spec: ModelSpec, model, store: Store | None = None,
                 run_model: Callable[[Callable[[], T]], T] | None = None, limits: Limits = LIMITS,
                 max_adapters: int | None = None):
        """run_model: where the model's forwards for materialization run (the server passes the
        engine's `run_between_steps`, so they never overlap a step); default: on the caller's thread.
        limits: the largest sizes an adapter's config may declare. max_adapters: the most adapters
        registered; storing a new one past it raises StoreFull (those added with persist=False, which
        are stored already or never, are not refused); None: no limit."""
        self.spec = spec
        self.limits = limits
        self.max_adapters = max_adapters
        self.model = model if run_model is None else _ForwardsThrough(model, run_model)
        self.store = store
        self._adapters: dict[str, Adapter] = {}
        self._lock = threading.Lock()
        self.stats = Counter()  # "loads", "load_failures"

    def __contains__(self, name: str) -> bool:
        return name in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    def get(self, name: str) -> Adapter:
        try:
            return self._adapters[name]
        except KeyError:
            raise AdapterNotFound(f"adapter {name!r} not found") from None

    def list(self) -> list[Adapter]:
        return sorted(self._adapters.values(), key=lambda a: a.name)

    def page(self, limit: int, after: str | None = None) -> tuple[list[Adapter], str | None]:
        """Up to `limit` adapters sorted by name, the first after `after` (any string, registered or
        not); and the `after` of the next page, None if this is the last."""
        names = sorted(self._adapters)
        start = bisect.bisect_right(names, after) if after else 0
        chosen = names[start:start + limit]
        adapters = [a for a in map(self._adapters.get, chosen) if a is not None]  # None: removed meanwhile
        return adapters, chosen[-1] if chosen and start + limit < len(names) else None

    def resident(self, adapter: Adapter) -> bool:
        """Whether the adapter's KV prefix is materialized on the model's device now. Every registered
        adapter's is today (materialized when registered, kept until removed); a bounded cache of
        prefixes would answer from its own state."""
        return adapter.kv.device.type == torch.device(self.spec.device).type

    def describe(self, adapter: Adapter) -> dict:
        return {**adapter.describe(), "resident": self.resident(adapter)}

    def add(self, name: str, config_raw: bytes, weights_raw: bytes, source: str = "upload", persist: bool = True) -> Adapter:
        """Validate, materialize, store (if `persist`) and register. Nothing changes on error.
        StoreFull if `persist` and `max_adapters` are registered already."""
        check_name(name)
        if name in self._adapters:
            raise AdapterExists(f"adapter {name!r} already exists")
        if persist:
            self._check_room()
        adapter = self._load(name, config_raw, weights_raw, source)
        with self._lock:
            if name in self._adapters:
                raise AdapterExists(f"adapter {name!r} already exists")
            if persist:
                self._check_room()  # again, under the lock: concurrent uploads count one by one
                if self.store is not None:
                    self.store.save(name, config_raw, weights_raw)
            self._adapters[name] = adapter
            self.stats["loads"] += 1
        return adapter

    def replace(self, name: str, config_raw: bytes, weights_raw: bytes, source: str = "upload") -> Adapter:
        """A new version of a registered adapter: validated and materialized, stored (the store's
        atomic replace), then swapped in. Requests holding the old version finish with it; lookups
        from then on get the new one. AdapterNotFound if `name` is not registered; nothing changes
        on error."""
        self.get(check_name(name))
        adapter = self._load(name, config_raw, weights_raw, source)
        with self._lock:
            self.get(name)  # removed meanwhile: 404, and nothing is stored
            if self.store is not None:
                if self.store.exists(name):
                    self.store.replace(name, config_raw, weights_raw)
                else:  # registered but never stored (a demo adapter): stored from now on
                    self.store.save(name, config_raw, weights_raw)
            self._adapters[name] = adapter
            self.stats["loads"] += 1
        return adapter

    def _load(self, name: str, config_raw: bytes, weights_raw: bytes, source: str) -> Adapter:
        try:
            return load_adapter(name, config_raw, weights_raw, self.spec, self.model, source, limits=self.limits)
        except InvalidAdapter:
            self.stats["load_failures"] += 1
            raise

    def _check_room(self) -> None:
        if self.max_adapters is not None and len(self._adapters) >= self.max_adapters:
            raise StoreFull(f"{len(self._adapters)} adapters are registered, the most this server stores "
                            f"(--max-adapters {self.max_adapters}); delete one to make room")

    def add_dir(self, name: str, path: Path, source: str) -> Adapter:
        try:
            files = read_adapter_dir(path)
        except InvalidAdapter:
            self.stats["load_failures"] += 1
            raise
        return self.add(name, *files, source=source, persist=False)

    def remove(self, name: str) -> None:
        with self._lock:
            self.get(name)
            if self.store is not None and self.store.exists(name):
                self.store.delete(name)
            del self._adapters[name]

    def load_store(self) -> list[str]:
        """Register every adapter found in the store; a bad one is logged and skipped, not fatal."""
        if self.store is None:
            return []
        failed = []
        for name in self.store.names():
            try:
                self.add_dir(name, self.store.path(name), source=self.store.source)
            except AdapterError as exc:  # counted in load_failures by add / add_dir
                failed.append(name)
                log.error("skipping stored adapter %r: %s", name, exc)
        return failed
