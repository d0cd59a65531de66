"""What is loaded: adapters by name, materialized for the base model, backed by the store.

A request takes its `Adapter` object when it is submitted and keeps it; removing the adapter
from the registry therefore never disturbs requests already running with it.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from pathlib import Path
from typing import Callable, TypeVar

from .adapter import Adapter
from .errors import AdapterError, AdapterExists, AdapterNotFound, InvalidAdapter
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
                 run_model: Callable[[Callable[[], T]], T] | None = None, limits: Limits = LIMITS):
        """run_model: where the model's forwards for materialization run (the server passes the
        engine's `run_between_steps`, so they never overlap a step); default: on the caller's thread.
        limits: the largest sizes an adapter's config may declare."""
        self.spec = spec
        self.limits = limits
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

    def add(self, name: str, config_raw: bytes, weights_raw: bytes, source: str = "upload", persist: bool = True) -> Adapter:
        """Validate, materialize, store (if `persist`) and register. Nothing changes on error."""
        check_name(name)
        if name in self._adapters:
            raise AdapterExists(f"adapter {name!r} already exists")
        try:
            adapter = load_adapter(name, config_raw, weights_raw, self.spec, self.model, source, limits=self.limits)
        except InvalidAdapter:
            self.stats["load_failures"] += 1
            raise
        with self._lock:
            if name in self._adapters:
                raise AdapterExists(f"adapter {name!r} already exists")
            if persist and self.store is not None:
                self.store.save(name, config_raw, weights_raw)
            self._adapters[name] = adapter
            self.stats["loads"] += 1
        return adapter

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
