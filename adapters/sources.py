"""Where an adapter the registry does not know comes from, per request (`parameters.adapter_source`,
LoRAX's field):

- "local": nowhere; only registered adapters are served.
- "s3": the store, when it is an S3 store (another server may have uploaded it there).
- "hub": the Hugging Face hub; the adapter id is a repo id, `repo@revision` to pin a revision.
  It is registered (and stored) under `hub_name(adapter_id)`: 'org/name' -> 'org--name',
  'org/name@v1' -> 'org--name..v1' (repo ids never hold '--' or '..', so no two ids share a name).

A fetched adapter is validated, stored and registered exactly as an upload is
(`AdapterRegistry.add`); concurrent requests for the same unknown adapter share one fetch.

Fetching from the hub stores files for good, so it is not for every client: only a request that
carries the admin key, or one for a repo the operator allowed (`--allow-hub-adapters`, repo ids or
glob patterns), may make the server download; others get FetchForbidden before anything is
fetched. One stored already (by an allowed request, or another replica) is registered for anyone.
The files' sizes are read from the hub first: over `max_bytes` together, nothing is downloaded.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from pathlib import Path

from .adapter import Adapter
from .errors import AdapterExists, AdapterNotFound, AdapterTooLarge, FetchForbidden, InvalidAdapter, SourceUnavailable
from .loading import CONFIG_FILE, PICKLE_FILES, WEIGHTS_FILE
from .registry import AdapterRegistry
from .single_flight import SingleFlight
from .store import NAME_PATTERN, check_name

SOURCES = ("local", "s3", "hub")
_SAFE_REVISION = re.compile(r"[A-Za-z0-9._-]+")


def hub_name(adapter_id: str) -> str:
    """The store name of a hub adapter id: 'org/name[@revision]', checked, mapped deterministically."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo, at, revision = adapter_id.partition("@")
    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise InvalidAdapter(f"invalid Hugging Face hub repo id {adapter_id!r}: {exc}") from None
    if at and not revision:
        raise InvalidAdapter(f"invalid Hugging Face hub adapter id {adapter_id!r}: no revision after '@'")
    name = repo.replace("/", "--")
    if revision:
        safe = _SAFE_REVISION.fullmatch(revision) and len(name) + 2 + len(revision) <= 128
        tail = revision if safe else re.sub(r"[^A-Za-z0-9._-]", "-", revision)[:40] + "-" + _short_hash(revision)
        name = f"{name}..{tail}"
    if not NAME_PATTERN.fullmatch(name):
        name = name[:119] + "-" + _short_hash(adapter_id)
    return check_name(name)


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


class AdapterSources:
    def __init__(self, registry: AdapterRegistry, max_bytes: int, hub_timeout: float = 10.0,
                 allow_hub: tuple[str, ...] = ()):
        """max_bytes: the most bytes an adapter's two files may hold together (the upload cap);
        hub_timeout: seconds the hub has to answer a metadata request; allow_hub: the hub repos any
        request may fetch (repo ids or glob patterns, matched against the repo id, or against
        'repo@revision'); others need the admin key."""
        self.registry = registry
        self.max_bytes = max_bytes
        self.hub_timeout = hub_timeout
        self.allow_hub = tuple(allow_hub)
        self._flights = SingleFlight()

    def name(self, adapter_id: str, source: str) -> str:
        """The name the adapter is registered under."""
        return hub_name(adapter_id) if source == "hub" else check_name(adapter_id)

    def resolve(self, adapter_id: str, source: str, admin: bool = False) -> Adapter:
        """The registered adapter, fetched from `source` first if it is not registered (blocking).
        admin: the request carries the admin key (it may fetch any hub repo)."""
        if source not in SOURCES:
            raise ValueError(f"unknown adapter source {source!r}; one of {SOURCES}")
        name = self.name(adapter_id, source)
        if name in self.registry or source == "local":
            return self.registry.get(name)
        if source == "hub" and not admin and not self.hub_allowed(adapter_id):
            store = self.registry.store
            if store is None or not store.exists(name):  # checked before the shared fetch: no one waits on it
                repo = adapter_id.partition("@")[0]
                raise FetchForbidden(f"hub adapter {adapter_id!r} is not allowed: fetching from the Hugging Face hub "
                                     f"needs the admin key (Authorization: Bearer <admin key>), or {repo!r} in "
                                     "--allow-hub-adapters (repo ids or glob patterns)")
        return self._flights.run(name, lambda: self._fetch(adapter_id, name, source))

    def hub_allowed(self, adapter_id: str) -> bool:
        """Whether `adapter_id` ('repo' or 'repo@revision') matches --allow-hub-adapters."""
        repo = adapter_id.partition("@")[0]
        return any(fnmatch.fnmatchcase(repo, p) or fnmatch.fnmatchcase(adapter_id, p) for p in self.allow_hub)

    def _fetch(self, adapter_id: str, name: str, source: str) -> Adapter:
        if name in self.registry:  # registered while this request waited for the guard
            return self.registry.get(name)
        store = self.registry.store
        if source == "s3" and (store is None or store.source != "s3"):
            raise InvalidAdapter(f"adapter_source 's3' needs an s3:// adapter store; this server's store is "
                                 f"{store.url if store else 'none'}")
        try:
            if store is not None and store.exists(name):  # stored already, by this server or another
                where = f"adapter {name!r} in the store {store.url}"
                return _naming(where, lambda: self.registry.get_stored(name))
            if source == "s3":
                raise AdapterNotFound(f"adapter {name!r} not found in the adapter store {store.url}")
            files = self._download_hub(adapter_id)
            where = f"hub adapter {adapter_id!r}"
            return _naming(where, lambda: self.registry.add(name, *files, source="hub"))
        except AdapterExists:  # uploaded or fetched by another request meanwhile
            return self.registry.get(name)

    def _download_hub(self, adapter_id: str) -> tuple[bytes, bytes]:
        """PEFT's two files of a hub repo, through the local hub cache (HF_HOME, HF_HUB_OFFLINE apply).
        Their sizes are asked first (a HEAD each), so AdapterTooLarge comes before any byte is
        downloaded; files from the local cache are measured before they are read."""
        from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        repo, _, revision = adapter_id.partition("@")
        hub = _Hub(repo, revision or None)
        sizes, unreachable = {}, None
        if not constants.HF_HUB_OFFLINE:
            # One bounded try first: hf_hub_download itself retries an unreachable hub for minutes.
            for filename in FILES:
                try:
                    url = hf_hub_url(repo, filename, revision=hub.revision)
                    sizes[filename] = get_hf_file_metadata(url, timeout=self.hub_timeout).size or 0
                except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
                    raise hub.error(exc, filename) from None
                except Exception as exc:  # noqa: BLE001 - unreachable, 5xx, a proxy: try the local cache
                    unreachable = exc
                    break
            self._check_size(sizes, hub, "nothing was downloaded")
        paths = {}
        for filename in FILES:
            try:
                paths[filename] = hf_hub_download(repo, filename, revision=hub.revision, etag_timeout=self.hub_timeout,
                                                  local_files_only=unreachable is not None)
            except Exception as exc:  # noqa: BLE001 - mapped, or raised as it is
                raise hub.error(exc, filename, unreachable) from None
        self._check_size({f: os.path.getsize(p) for f, p in paths.items()}, hub, "it was not loaded")
        return Path(paths[CONFIG_FILE]).read_bytes(), Path(paths[WEIGHTS_FILE]).read_bytes()

    def _check_size(self, sizes: dict[str, int], hub: "_Hub", outcome: str) -> None:
        total = sum(sizes.values())
        if total > self.max_bytes:
            listed = ", ".join(f"{f} {n} bytes" for f, n in sizes.items())
            raise AdapterTooLarge(f"{hub.where} on {hub.name} holds {total} bytes ({listed}), more than the "
                                  f"{self.max_bytes} allowed (--max-upload-bytes); {outcome}")


FILES = (CONFIG_FILE, WEIGHTS_FILE)


class _Hub:
    """One hub repo and revision: how messages name them, and the hub library's errors as ours."""

    def __init__(self, repo: str, revision: str | None):
        from huggingface_hub import constants

        self.repo, self.revision = repo, revision
        self.name = f"the Hugging Face hub ({constants.ENDPOINT})"
        self.where = f"{repo!r}" + (f" at revision {revision!r}" if revision else "")

    def error(self, exc: Exception, filename: str, unreachable: Exception | None = None) -> Exception:
        """Ours for `exc`, raised fetching `filename` (after the hub did not answer with `unreachable`)."""
        from huggingface_hub import constants
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        if isinstance(exc, RepositoryNotFoundError):  # gated and private repos too: the hub does not tell them apart
            return AdapterNotFound(f"repo {self.repo!r} not found on {self.name}")
        if isinstance(exc, RevisionNotFoundError):
            return AdapterNotFound(f"revision {self.revision!r} of repo {self.repo!r} not found on {self.name}")
        if isinstance(exc, LocalEntryNotFoundError):
            if unreachable is None and constants.HF_HUB_OFFLINE:
                return AdapterNotFound(f"{filename} of {self.where} not found in the local cache of {self.name} "
                                       f"({constants.HF_HUB_CACHE}; offline mode, HF_HUB_OFFLINE)")
            cause = unreachable or exc.__cause__ or exc
            return SourceUnavailable(f"{self.name} cannot be reached for {self.where}, and its local cache does not "
                                     f"hold {filename}: {type(cause).__name__}: {cause}")
        if isinstance(exc, EntryNotFoundError):
            hint = ""
            if filename == WEIGHTS_FILE:
                hint = f" (only safetensors weights are served; {', '.join(PICKLE_FILES)} are never loaded)"
            return InvalidAdapter(f"{self.where} on {self.name} has no {filename}: not a PEFT adapter{hint}")
        if isinstance(exc, (HfHubHTTPError, OSError, ValueError)):  # 5xx, FileMetadataError, a proxy, the disk, ...
            return SourceUnavailable(f"{self.name}: could not fetch {filename} of {self.where}: {exc}")
        return exc


def _naming(where: str, register):
    """`register()`, its InvalidAdapter saying which adapter and where from."""
    try:
        return register()
    except InvalidAdapter as exc:
        raise InvalidAdapter(f"{where}: {exc}") from None
