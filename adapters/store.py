"""Where adapter files live. `Store` is the interface the registry uses; `AdapterStore` keeps one
directory per adapter under a local root, `S3Store` (s3_store.py) keeps them in object storage.
`open_store` picks one from `--adapter-store`.

Every store makes an adapter visible only once it is complete. Here: a save writes both files
into a hidden temporary directory, fsyncs them, then renames the directory into place, so a
crash or a failed upload never leaves a half-written adapter that the next start-up would read.
Leftover temporary directories are swept at start-up.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Protocol

from .errors import AdapterExists, AdapterNotFound, InvalidAdapter
from .loading import CONFIG_FILE, WEIGHTS_FILE

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HIDDEN = "."  # temporary and trashed directories start with a dot; valid names never do


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidAdapter(
            f"invalid adapter name {name!r}: use 1-128 letters, digits, '-', '_' or '.', starting with a letter or digit"
        )
    return name


class Store(Protocol):
    """Where adapters are kept, by name. Names are checked with `check_name`."""

    url: str  # where the store is, for messages: a directory, or s3://bucket/prefix
    source: str  # the `source` of adapters registered from it at start-up

    def names(self) -> list[str]:
        """The complete adapters stored, sorted."""

    def path(self, name: str) -> Path:
        """A local directory holding PEFT's two files of `name` (for a remote store: its disk cache)."""

    def exists(self, name: str) -> bool: ...

    def save(self, name: str, config_raw: bytes, weights_raw: bytes) -> Path:
        """Store PEFT's two files atomically; AdapterExists if the name is taken. Returns `path(name)`."""

    def delete(self, name: str) -> None:
        """The adapter disappears at once, its files after; AdapterNotFound if it is not stored."""

    def sweep(self) -> None:
        """Remove what an interrupted save or delete left behind."""


def open_store(location: str | Path, cache_dir: str | Path | None = None, endpoint_url: str | None = None) -> Store:
    """`s3://bucket/prefix` (read through a disk cache in `cache_dir`), or a local directory.
    A remote store is checked at once: SourceUnavailable if it cannot be used."""
    if str(location).startswith("s3://"):
        from .s3_store import S3Store

        return S3Store(str(location), cache_dir or "adapter-cache", endpoint_url=endpoint_url)
    return AdapterStore(Path(location))


class AdapterStore:
    """A local directory, one subdirectory per adapter."""

    source = "disk"

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = str(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.sweep()

    def names(self) -> list[str]:
        return sorted(
            p.name for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(_HIDDEN) and NAME_PATTERN.fullmatch(p.name)
        )

    def path(self, name: str) -> Path:
        return self.root / check_name(name)

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def save(self, name: str, config_raw: bytes, weights_raw: bytes) -> Path:
        """Write PEFT's two files for `name` atomically; AdapterExists if the name is taken."""
        target = self.path(name)
        tmp = self.root / f"{_HIDDEN}tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for filename, data in ((CONFIG_FILE, config_raw), (WEIGHTS_FILE, weights_raw)):
                with open(tmp / filename, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            _fsync_dir(tmp)
            if target.exists():
                raise AdapterExists(f"adapter {name!r} already exists")
            try:
                os.rename(tmp, target)  # atomic; fails if another save won the race
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise AdapterExists(f"adapter {name!r} already exists") from None
                raise
            _fsync_dir(self.root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return target

    def delete(self, name: str) -> None:
        target = self.path(name)
        if not target.exists():
            raise AdapterNotFound(f"adapter {name!r} is not stored")
        trash = self.root / f"{_HIDDEN}trash-{uuid.uuid4().hex}"
        os.rename(target, trash)  # the adapter disappears atomically; the files go after
        _fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def sweep(self) -> None:
        """Remove what an interrupted save or delete left behind."""
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith((f"{_HIDDEN}tmp-", f"{_HIDDEN}trash-")):
                shutil.rmtree(p, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
