"""What is registered: every adapter by name, known without materializing it, and a bounded cache
of the materialized ones, backed by the store.

Registering an adapter records where its files are; its KV prefix is materialized when a request
first needs it (or at upload) and kept in a `PrefixCache` bounded in device bytes, least recently
used evicted. Materializing saves the prefix next to the PEFT files (`prefix_file`), so a later
cold load reads it back with no model forward. Start-up reads the store's names only: 10,000
stored adapters cost a directory listing.

What a listing says of an adapter (its kind, virtual tokens, version) is kept in memory from its
registration, its loads and its descriptions: `summaries()` (`/v1/models`) reads no file, and only
`describe()` of an adapter registered at start-up and not used since reads its config (once).

A request takes its `Adapter` object when it is submitted and keeps it; evicting, removing or
replacing the adapter therefore never disturbs requests already running with it. Lookups take no
lock: every change to the name -> entry dict is one assignment or deletion. Changes (and the store
writes behind them) are serialized by a lock.

Several servers may share one store (replicas on Ray Serve, servers on one s3:// store): what one
adds, replaces or deletes, the others follow on use. Before using a stored adapter, at most every
`recheck_s` seconds per name, the registry asks the store for its current version (a symlink read,
or one small GET): a name it does not know is registered, a version it does not hold replaces the
one it holds (the next request loads the new files), and a name gone is dropped. Listings re-read
the store's names at most as often. So a change made by one server is served by all within about
`recheck_s`, plus a load.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from .adapter import Adapter
from .base import KINDS
from .errors import AdapterError, AdapterExists, AdapterNotFound, InvalidAdapter, InvalidTask, SourceUnavailable, StoreFull
from .loading import (CONFIG_FILE, LIMITS, Limits, check_config, check_task, first_task, load_adapter, parse_config,
                      read_adapter_dir)
from .prefix_cache import PrefixCache
from .prefix_file import load_prefix, save_prefix
from .single_flight import SingleFlight
from .spec import ModelSpec
from .store import VERSIONS_DIR, Store, check_name

log = logging.getLogger(__name__)
T = TypeVar("T")
UNBOUNDED = 1 << 62


_generations = itertools.count()


@dataclass(frozen=True)
class _Entry:
    """A registered adapter, materialized or not: where its files are and where it came from."""

    name: str
    source: str
    directory: Path | None  # its PEFT files, read again on a cold load (None: `files` holds them)
    files: tuple[bytes, bytes] | None = None  # config and weights, for an adapter with no directory
    persist_prefix: bool = True  # save the materialized prefix in `directory` (not in a read-only demo folder)
    key: str = ""  # its cache key: a new one for every version, so a stale load never serves a replacement
    stored: bool = False  # kept in the registry's store, whose changes by other servers it follows
    token: str | None = None  # the store's `version()` of it when last checked (None: not checked yet)

    def read(self) -> tuple[bytes, bytes]:
        return self.files if self.files is not None else read_adapter_dir(self.directory)


class AdapterRegistry:
    def __init__(self, spec: ModelSpec, model, store: Store | None = None,
                 run_model: Callable[[Callable[[], T]], T] | None = None, limits: Limits = LIMITS,
                 max_adapters: int | None = None, cache_bytes: int = UNBOUNDED, pinned: frozenset[str] = frozenset(),
                 model_key: str | None = None, recheck_s: float | None = 1.0):
        """run_model: where a load's tensor work runs (reading a saved prefix, the encoders, the model
        forward). The server passes the engine's `run_between_steps`: it never overlaps a step, and
        torch's threads stay the engine thread's (torch ops on another thread start a second
        OpenMP team, and with more OpenMP threads than cores libgomp stops spinning between parallel
        regions: every step slowed by a third for the rest of the process). Default: on the
        caller's thread.
        limits: the largest sizes an adapter's config may declare. max_adapters: the most adapters
        registered; storing a new one past it raises StoreFull (those added with persist=False, which
        are stored already or never, are not refused); None: no limit. cache_bytes: device bytes of
        materialized prefixes kept; pinned: names never evicted. model_key: the base model's
        `prefix_file.model_key`, under which prefixes are saved and read back (None: never saved).
        recheck_s: how often, at most, a stored adapter's version is checked against the store on use,
        and the store's names re-read for a listing (module docstring); None: never."""
        self.spec = spec
        self.limits = limits
        self.max_adapters = max_adapters
        self.model = model
        self._run = run_model or (lambda fn: fn())
        self.store = store
        self.model_key = model_key
        self.cache: PrefixCache[Adapter] = PrefixCache(cache_bytes, size=lambda a: a.prefix_bytes)
        self.pinned = frozenset(pinned)
        self._entries: dict[str, _Entry] = {}
        self._about: dict[str, dict] = {}  # entry key -> what a description says of it without loading it
        self._lock = threading.Lock()
        self.recheck_s = recheck_s
        self._checked: dict[str, float] = {}  # name -> when its version was last checked (monotonic)
        self._checks = SingleFlight()  # name -> its check under way, which concurrent callers wait for
        self._listed = float("-inf")  # when the store's names were last read
        self.stats = Counter()  # "loads", "load_failures", "prefix_reads" (cold loads with no forward)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise AdapterNotFound(f"adapter {name!r} not found") from None

    def get(self, name: str, task: int | None = None) -> Adapter:
        """The materialized adapter: from the cache, or loaded now (a cold load; concurrent callers
        share it). May run a model forward (through `run_model`) when no saved prefix matches.
        task: which of a multitask adapter's tasks (each materialized and cached on its own); None
        for the other kinds. InvalidTask if it does not fit the adapter."""
        self._follow_store(name)
        entry = self._entry(name)
        self._check_task(entry, task)
        return self.cache.get(_task_key(entry.key, task), lambda: self._materialize(entry, task))

    def get_stored(self, name: str, task: int | None = None) -> Adapter:
        """`get`, after asking the store about `name` now: one another server stored is registered as the
        store's, and followed from then on like those found at start-up."""
        self._follow_store(name, force=True)
        return self.get(name, task)

    def resident(self, name: str) -> bool:
        """Whether its KV prefix is materialized on the model's device now (a request for it needs no load)."""
        entry = self._entries.get(name)
        return entry is not None and entry.key in self.cache

    def get_resident(self, name: str, task: int | None = None) -> Adapter | None:
        """The materialized adapter if it is resident now, else None: never loads (so it may run on
        an event loop; `get` then loads it elsewhere). AdapterNotFound if `name` is not registered.
        None too when the store is due to be asked about it, or being asked (`get` asks, or waits for
        that answer, off the event loop)."""
        if self._check_due(name) and (name not in self._entries or self._entries[name].stored):
            return None
        return self.cache.lookup(_task_key(self._entry(name).key, task))

    def _check_task(self, entry: _Entry, task: int | None) -> None:
        """InvalidTask from memory, where the adapter's kind is known already (else its load checks)."""
        about = self._about.get(entry.key) or {}
        kind = KINDS.get(about.get("peft_type"))
        if kind is not None:
            try:
                kind.tasks(about)
            except InvalidAdapter:
                return  # a config its load refuses, saying why
            check_task(entry.name, kind, about, task)

    def names(self) -> list[str]:
        self.follow_names()
        return sorted(self._entries)

    def page(self, limit: int, after: str | None = None) -> tuple[list[str], str | None]:
        """Up to `limit` names, sorted, the first after `after` (any string, registered or not); and
        the `after` of the next page, None if this is the last. Lists the store (`follow_names`)."""
        self.follow_names()
        names = sorted(self._entries)
        start = bisect.bisect_right(names, after) if after else 0
        chosen = names[start:start + limit]
        return chosen, chosen[-1] if chosen and start + limit < len(names) else None

    def describe(self, name: str) -> dict:
        """Its description, without materializing it: the full one while resident. May read its config
        file (an adapter registered at start-up and never used since): not on an event loop."""
        self._follow_store(name)
        entry = self._entry(name)
        adapter = self.cache.peek(entry.key)
        if adapter is not None:
            return {**adapter.describe(), "resident": True, "pinned": name in self.pinned}
        about = self._about.get(entry.key)
        if about is None:
            about = _peek_config(entry)
            if about and self._entries.get(name) is entry:  # not for a version replaced meanwhile
                self._about[entry.key] = about
        return {**about, "name": name, "source": entry.source, "resident": False, "pinned": name in self.pinned}

    def summaries(self) -> list[dict]:
        """Every registered adapter, sorted by name, from memory alone (no file read, so cheap for
        10,000 on an event loop): its name and source, and what its registration, loads and
        descriptions told (`peft_type`, `created_at`, ...; nothing more for one registered at
        start-up and neither used nor described since). What other servers stored or deleted shows
        once `follow_names` has run (it lists the store: call it off the event loop)."""
        entries = sorted(self._entries.items())
        return [{**self._about.get(entry.key, {}), "name": name, "source": entry.source} for name, entry in entries]

    def add(self, name: str, config_raw: bytes, weights_raw: bytes, source: str = "upload", persist: bool = True) -> Adapter:
        """Validate, materialize, store (if `persist`) and register. Nothing changes on error.
        StoreFull if `persist` and `max_adapters` are registered already."""
        check_name(name)
        self._follow_store(name, force=True)  # stored or deleted by another server meanwhile
        if name in self._entries:
            raise AdapterExists(f"adapter {name!r} already exists")
        if persist:
            self._check_room()
        loaded = self._load(name, config_raw, weights_raw, source, task=first_task(config_raw))
        with self._lock:
            if name in self._entries:
                raise AdapterExists(f"adapter {name!r} already exists")
            directory = None
            if persist:
                self._check_room()  # again, under the lock: concurrent uploads count one by one
                if self.store is not None:
                    directory = self.store.save(name, config_raw, weights_raw)
            return self._register(loaded, source, directory, None if directory else (config_raw, weights_raw),
                                  stored=directory is not None)

    def replace(self, name: str, config_raw: bytes, weights_raw: bytes, source: str = "upload") -> Adapter:
        """A new version of a registered adapter: validated and materialized, stored (the store's
        atomic replace), then swapped in. Requests holding the old version finish with it; lookups
        from then on get the new one. AdapterNotFound if `name` is not registered; nothing changes
        on error."""
        self._follow_store(check_name(name), force=True)
        self._entry(name)
        loaded = self._load(name, config_raw, weights_raw, source, task=first_task(config_raw))
        with self._lock:
            old = self._entry(name)  # removed meanwhile: 404, and nothing is stored
            directory = None
            if self.store is not None:
                if self.store.exists(name):
                    directory = self.store.replace(name, config_raw, weights_raw)
                else:  # registered but never stored (a demo adapter): stored from now on
                    directory = self.store.save(name, config_raw, weights_raw)
            adapter = self._register(loaded, source, directory, None if directory else (config_raw, weights_raw),
                                     stored=directory is not None)
            self._forget(old)
        return adapter

    def add_dir(self, name: str, path: Path, source: str, persist_prefix: bool = True) -> Adapter:
        """Register the adapter in `path` (already stored, or never to be), materializing it now."""
        try:
            files = read_adapter_dir(path)
        except InvalidAdapter:
            self.stats["load_failures"] += 1
            raise
        check_name(name)
        loaded = self._load(name, *files, source, directory=path if persist_prefix else None,
                            task=first_task(files[0]))
        with self._lock:
            if name in self._entries:
                raise AdapterExists(f"adapter {name!r} already exists")
            return self._register(loaded, source, path, None, persist_prefix)

    def remove(self, name: str) -> None:
        self._follow_store(name, force=True)
        with self._lock:
            entry = self._entry(name)
            if self.store is not None and self.store.exists(name):
                self.store.delete(name)
            del self._entries[name]
            self._forget(entry)
            self._checked.pop(name, None)  # stored again elsewhere: seen on the next use, not a second later

    def load_store(self) -> list[str]:
        """Register every adapter in the store by name, without reading or materializing it (a bad
        one fails when first used); the pinned ones are materialized now. Returns the pinned names
        that failed (logged, not fatal)."""
        if self.store is None:
            return []
        for name in self.store.names():
            if name not in self._entries:
                self._add_entry(self._stored_entry(name))
        failed = []
        for name in sorted(self.pinned & set(self._entries)):
            try:
                self._get_every_task(name)
            except AdapterError as exc:
                failed.append(name)
                log.error("pinned adapter %r failed to load: %s", name, exc)
        return failed

    def _stored_entry(self, name: str, token: str | None = None) -> _Entry:
        """The entry of an adapter found in the store, not read yet."""
        return _Entry(name, self.store.source, self.store.path(name) if self.store.source == "disk" else None,
                      key=_new_key(name), stored=True, token=token)

    def _check_due(self, name: str) -> bool:
        return (self.store is not None and self.recheck_s is not None
                and time.monotonic() - self._checked.get(name, float("-inf")) >= self.recheck_s)

    def _follow_store(self, name: str, force: bool = False) -> None:
        """Follow what other servers did to `name` in the store since it was last checked (module
        docstring); at most every `recheck_s` unless `force`. A store that cannot be reached now
        changes nothing: what is registered is served meanwhile.
        Concurrent callers share one check and all return once the registry holds its answer: a name
        is marked checked only then, so no caller reads the registry as it was before the store
        answered (a name stored elsewhere told 'not found' while another request registers it)."""
        entry = self._entries.get(name)
        if self.store is None or (entry is not None and not entry.stored) or not (force or self._check_due(name)):
            return
        if force:
            self._check_store(name)
        else:  # due still (marked checked only at the end of a check): join the check under way, if any
            self._checks.run(name, lambda: self._check_store(name) if self._check_due(name) else None)

    def _check_store(self, name: str) -> None:
        """Ask the store for `name`'s version and follow it; marked checked once the registry holds the answer."""
        try:
            self._follow_version(name)
        finally:
            if len(self._checked) > 100_000:  # names asked for and never found
                self._checked.clear()
            self._checked[name] = time.monotonic()

    def _follow_version(self, name: str) -> None:
        before = self._entries.get(name)
        if before is not None and not before.stored:
            return
        try:
            check_name(name)
            token = self.store.version(name)
        except InvalidAdapter:
            return
        except SourceUnavailable as exc:
            log.warning("could not check adapter %r in the store: %s", name, exc)
            return
        with self._lock:
            entry = self._entries.get(name)
            if entry is not before:  # this registry changed it meanwhile: it knows better than that read
                return
            if token is None:
                if entry is not None:
                    log.info("adapter %r is no longer in the store %s: dropped", name, self.store.url)
                    del self._entries[name]
                    self._forget(entry)
            elif entry is None:
                log.info("adapter %r found in the store %s", name, self.store.url)
                self._add_entry(self._stored_entry(name, token))
            elif entry.token is None:
                self._entries[name] = dataclasses.replace(entry, token=token)
            elif entry.token != token:
                log.info("adapter %r has a new version in the store %s", name, self.store.url)
                self._add_entry(self._stored_entry(name, token))
                self._forget(entry)

    def follow_names(self) -> None:
        """Register the names other servers stored, drop those they deleted (at most every `recheck_s`).
        Lists the store (a directory listing, or S3 requests): not on an event loop."""
        if self.store is None or self.recheck_s is None or time.monotonic() - self._listed < self.recheck_s:
            return
        self._listed = time.monotonic()
        before = dict(self._entries)
        try:
            stored = set(self.store.names())
        except SourceUnavailable as exc:
            log.warning("could not list the store: %s", exc)
            return
        with self._lock:
            for name, entry in list(self._entries.items()):
                if entry.stored and name not in stored and before.get(name) is entry:
                    del self._entries[name]
                    self._forget(entry)
            for name in stored - set(self._entries):
                self._add_entry(self._stored_entry(name))

    def _get_every_task(self, name: str) -> None:
        """`get`, of each task for an adapter with tasks: what a pinned one keeps materialized."""
        try:
            self.get(name)
        except InvalidTask:
            self.get(name, 0)  # and now its tasks are known
            for task in range(1, self._about[self._entry(name).key]["num_tasks"]):
                self.get(name, task)

    def _register(self, loaded: tuple[Adapter, bool], source: str, directory: Path | None, files,
                  persist_prefix: bool = True, stored: bool = False) -> Adapter:
        adapter, computed = loaded
        token = None
        if stored:
            self._checked[adapter.name] = time.monotonic()
            token = self.store.version(adapter.name)
        entry = _Entry(adapter.name, source, directory, files, persist_prefix, key=_new_key(adapter.name),
                       stored=stored, token=token)
        self._save_prefix(entry, adapter, computed)
        self._about[entry.key] = _about(adapter)
        self._add_entry(entry)
        self.cache.put(_task_key(entry.key, adapter.task), adapter)
        self.stats["loads"] += 1
        return adapter

    def _forget(self, entry: _Entry) -> None:
        """Its materialized prefix leaves the cache (a version replaced or removed)."""
        self._about.pop(entry.key, None)
        self.cache.drop(entry.key)
        self.cache.drop_where(lambda key: key.startswith(_task_key(entry.key, "")))  # its tasks' prefixes
        self.cache.pin(entry.key, False)

    def _add_entry(self, entry: _Entry) -> None:
        if entry.name in self.pinned:
            self.cache.pin(entry.key)
        self._entries[entry.name] = entry

    def _materialize(self, entry: _Entry, task: int | None = None) -> Adapter:
        """A cold load: the entry's files read again (a remote store downloads them to its disk
        cache), validated, and its saved prefix (each task's its own) used when it matches, else
        materialized and saved."""
        adapter = self._cold_load(entry, task)
        if self._entries.get(entry.name) is not None and self._entries[entry.name].key == entry.key:
            self._about[entry.key] = _about(adapter)
        return adapter

    def _cold_load(self, entry: _Entry, task: int | None) -> Adapter:
        if entry.directory is None and entry.files is None:
            entry = dataclasses.replace(entry, directory=self.store.path(entry.name))
        adapter = self._from_saved_prefix(entry, task)
        if adapter is not None:
            return adapter
        try:
            files = entry.read()
        except InvalidAdapter:
            self.stats["load_failures"] += 1
            raise
        adapter, computed = self._load(entry.name, *files, entry.source,
                                       directory=entry.directory if entry.persist_prefix else None, task=task)
        self._save_prefix(entry, adapter, computed)
        self.stats["loads"] += 1
        return adapter

    def _from_saved_prefix(self, entry: _Entry, task: int | None = None) -> Adapter | None:
        """The fast cold load: in the local store a version's directory is named by its version
        and its files never change, so a prefix saved there for this model is read with the config
        alone (the weights neither read nor hashed again, no model forward)."""
        version = _store_version(entry.directory)
        if version is None or not self.model_key or not entry.persist_prefix:
            return None
        try:
            config = parse_config((entry.directory / CONFIG_FILE).read_bytes())
            kind = check_config(config, self.spec, self.limits)
            check_task(entry.name, kind, config, task)
        except (OSError, InvalidAdapter, InvalidTask):
            return None  # the full load says what is wrong
        kv = self._run(lambda: load_prefix(entry.directory, self.model_key, version, self.spec,
                                           config["num_virtual_tokens"], task))
        if kv is None:
            return None
        self.stats["prefix_reads"] += 1
        self.stats["loads"] += 1
        return Adapter(entry.name, kind.peft_type, config["num_virtual_tokens"], entry.source, time.time(), config,
                       kv, None, version, task)

    def _save_prefix(self, entry: _Entry, adapter: Adapter, computed: bool) -> None:
        if computed and entry.directory is not None and entry.persist_prefix and self.model_key:
            save_prefix(entry.directory, adapter.kv, self.model_key, adapter.version, adapter.task)

    def _load(self, name: str, config_raw: bytes, weights_raw: bytes, source: str,
              directory: Path | None = None, task: int | None = None) -> tuple[Adapter, bool]:
        """Validated and materialized, from `directory`'s saved prefix when it matches; and whether
        the prefix was computed (a forward or an encoder ran) rather than read."""
        read = []

        def saved_kv(version: str, n: int):
            kv = load_prefix(directory, self.model_key, version, self.spec, n, task)
            read.append(kv is not None)
            return kv

        try:
            adapter = self._run(lambda: load_adapter(
                name, config_raw, weights_raw, self.spec, self.model, source, limits=self.limits,
                saved_kv=saved_kv if directory is not None and self.model_key else None, task=task))
        except InvalidAdapter:
            self.stats["load_failures"] += 1
            raise
        if read and read[0]:
            self.stats["prefix_reads"] += 1
        return adapter, not (read and read[0])

    def _check_room(self) -> None:
        if self.max_adapters is not None and len(self._entries) >= self.max_adapters:
            raise StoreFull(f"{len(self._entries)} adapters are registered, the most this server stores "
                            f"(--max-adapters {self.max_adapters}); delete one to make room")


def _store_version(directory: Path | None) -> str | None:
    """The version a local store's directory holds (`.versions/NAME/VERSION`), None for another layout."""
    if directory is None:
        return None
    try:
        resolved = directory.resolve()
    except OSError:
        return None
    return resolved.name if resolved.parent.parent.name == VERSIONS_DIR else None


def _about(adapter: Adapter) -> dict:
    """What a description of a registered adapter says while it is not resident."""
    about = adapter.describe()
    return {key: about[key] for key in ("peft_type", "num_virtual_tokens", "task_type", "base_model_name_or_path",
                                        "version", "created_at", "num_tasks") if key in about}


def _peek_config(entry: _Entry) -> dict:
    """What a description can say of an adapter not materialized, from its config file alone (a
    local directory; nothing for a remote store's adapter not downloaded yet)."""
    if entry.directory is None:
        return {}
    try:
        config = json.loads((entry.directory / CONFIG_FILE).read_bytes())
        about = {key: config.get(key) for key in ("peft_type", "num_virtual_tokens", "task_type",
                                                   "base_model_name_or_path")}
        kind = KINDS.get(about["peft_type"])
        tasks = kind.tasks(config) if kind is not None else None
        about |= {} if tasks is None else {"num_tasks": tasks}
    except (OSError, ValueError, AttributeError, TypeError, InvalidAdapter):
        return {}
    version = _store_version(entry.directory)
    return {**about, "version": version} if version else about


def _task_key(key: str, task: int | str | None) -> str:
    """The cache key of one task's prefix of the adapter version `key` (the key itself for no task)."""
    return key if task is None else f"{key}@task{task}"


def _new_key(name: str) -> str:
    return f"{name}#{next(_generations)}"
