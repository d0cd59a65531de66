"""Where an adapter the registry does not know comes from, per request (`parameters.adapter_source`,
LoRAX's field):

- "local": nowhere; only registered adapters are served.
- "s3": the store, when it is an S3 store (another server may have uploaded it there).
- "hub": the Hugging Face hub; the adapter id is a repo id, `repo@revision` to pin a revision.
  It is registered (and stored) under `hub_name(adapter_id)`: 'org/name' -> 'org--name',
  'org/name@v1' -> 'org--name..v1' (repo ids never hold '--' or '..', so no two ids share a name).

A fetched adapter is validated, stored and registered exactly as an upload is
(`AdapterRegistry.add`); concurrent requests for the same unknown adapter share one fetch.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .adapter import Adapter
from .errors import AdapterExists, AdapterNotFound, InvalidAdapter, SourceUnavailable
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
    def __init__(self, registry: AdapterRegistry, max_bytes: int, hub_timeout: float = 10.0):
        """max_bytes: the largest adapter file fetched (the upload cap); hub_timeout: seconds the hub
        has to answer a metadata request."""
        self.registry = registry
        self.max_bytes = max_bytes
        self.hub_timeout = hub_timeout
        self._flights = SingleFlight()

    def name(self, adapter_id: str, source: str) -> str:
        """The name the adapter is registered under."""
        return hub_name(adapter_id) if source == "hub" else check_name(adapter_id)

    def resolve(self, adapter_id: str, source: str) -> Adapter:
        """The registered adapter, fetched from `source` first if it is not registered (blocking)."""
        if source not in SOURCES:
            raise ValueError(f"unknown adapter source {source!r}; one of {SOURCES}")
        name = self.name(adapter_id, source)
        if name in self.registry or source == "local":
            return self.registry.get(name)
        return self._flights.run(name, lambda: self._fetch(adapter_id, name, source))

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
                return _naming(where, lambda: self.registry.add_dir(name, store.path(name), source=source))
            if source == "s3":
                raise AdapterNotFound(f"adapter {name!r} not found in the adapter store {store.url}")
            files = self._download_hub(adapter_id)
            where = f"hub adapter {adapter_id!r}"
            return _naming(where, lambda: self.registry.add(name, *files, source="hub"))
        except AdapterExists:  # uploaded or fetched by another request meanwhile
            return self.registry.get(name)

    def _download_hub(self, adapter_id: str) -> tuple[bytes, bytes]:
        """PEFT's two files of a hub repo, through the local hub cache (HF_HOME, HF_HUB_OFFLINE apply)."""
        from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        repo, _, revision = adapter_id.partition("@")
        revision = revision or None
        hub = f"the Hugging Face hub ({constants.ENDPOINT})"
        where = f"{repo!r}" + (f" at revision {revision!r}" if revision else "")
        files = []
        for filename in (CONFIG_FILE, WEIGHTS_FILE):
            unreachable = None
            try:
                if not constants.HF_HUB_OFFLINE:
                    # One bounded try first: hf_hub_download itself retries an unreachable hub for minutes.
                    try:
                        get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision), timeout=self.hub_timeout)
                    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError):
                        raise
                    except Exception as exc:  # noqa: BLE001 - unreachable, 5xx, proxy: try the local cache
                        unreachable = exc
                path = hf_hub_download(repo, filename, revision=revision, etag_timeout=self.hub_timeout,
                                       local_files_only=unreachable is not None)
            except RepositoryNotFoundError:  # gated and private repos too: the hub does not tell them apart
                raise AdapterNotFound(f"repo {repo!r} not found on {hub}") from None
            except RevisionNotFoundError:
                raise AdapterNotFound(f"revision {revision!r} of repo {repo!r} not found on {hub}") from None
            except LocalEntryNotFoundError as exc:
                if unreachable is None and constants.HF_HUB_OFFLINE:
                    raise AdapterNotFound(f"{filename} of {where} not found in the local cache of {hub} "
                                          f"({constants.HF_HUB_CACHE}; offline mode, HF_HUB_OFFLINE)") from None
                cause = unreachable or exc.__cause__ or exc
                raise SourceUnavailable(f"{hub} cannot be reached for {where}, and its local cache does not hold "
                                        f"{filename}: {type(cause).__name__}: {cause}") from None
            except EntryNotFoundError:
                hint = ""
                if filename == WEIGHTS_FILE:
                    hint = f" (only safetensors weights are served; {', '.join(PICKLE_FILES)} are never loaded)"
                raise InvalidAdapter(f"{where} on {hub} has no {filename}: not a PEFT adapter{hint}") from None
            except (HfHubHTTPError, OSError, ValueError) as exc:  # 5xx, FileMetadataError, a proxy, the disk, ...
                raise SourceUnavailable(f"{hub}: could not fetch {filename} of {where}: {exc}") from None
            size = os.path.getsize(path)
            if size > self.max_bytes:
                raise InvalidAdapter(f"{filename} of {where} on {hub} is {size} bytes, more than the "
                                     f"{self.max_bytes} allowed (--max-upload-bytes)")
            files.append(Path(path).read_bytes())
        return files[0], files[1]


def _naming(where: str, register):
    """`register()`, its InvalidAdapter saying which adapter and where from."""
    try:
        return register()
    except InvalidAdapter as exc:
        raise InvalidAdapter(f"{where}: {exc}") from None
