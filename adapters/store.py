"""Where adapter files live. `Store` is the interface the registry uses; `AdapterStore` keeps them
in a local directory, `S3Store` (s3_store.py) in object storage. `open_store` picks one from
`--adapter-store`.

Every store makes an adapter visible only once it is complete, and replaces one atomically: after
a crash at any point an adapter is there as it was or as it was to become, complete, never
missing and never a mix of two versions.

The local layout, under the root:

    <name> -> .versions/<name>/<version>    a symlink: the adapter's current version
    .versions/<name>/<version>/             PEFT's two files; written once, never changed
    <name>/                                 a plain directory: the layout before versions, or a folder
                                            dropped in by hand; read the same (a replace turns it
                                            into a symlink)

Each change becomes visible with one atomic step, taken only once what it points to is complete
and fsynced. A save writes the version directory in a hidden temporary directory, fsyncs it and
renames it into `.versions`, then creates the symlink `<name>` (which fails if the name is taken).
A replace writes the new version directory the same way, then renames a new symlink over `<name>`
(rename replaces a symlink atomically) and removes the old version directory. A plain directory
cannot be renamed over; its replace first makes `.pending-<name>`, a symlink to the new version,
renames `<name>` to the trash, then `.pending-<name>` to `<name>`; a crash between those two
renames leaves no `<name>`, and the start-up sweep finishes the second. A delete renames `<name>`
to the trash (the adapter disappears at once), then removes its files. The start-up sweep also
removes temporary and trashed entries and version directories that no symlink refers to.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Protocol

from .errors import AdapterExists, AdapterNotFound, InvalidAdapter
from .loading import CONFIG_FILE, WEIGHTS_FILE, content_version

log = logging.getLogger(__name__)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HIDDEN = "."  # temporary and trashed entries, and the versions, start with a dot; valid names never do
VERSIONS_DIR = _VERSIONS = ".versions"  # every version of every adapter, under the root
UNVERSIONED = "unversioned"  # `version()` of a plain directory, which has none
_PENDING = ".pending-"  # + name: the new version's symlink, while a plain directory is being replaced


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

    def version(self, name: str) -> str | None:
        """The version stored as `name` now (a token that changes with every replace), None if none
        is. One cheap read: the registry asks on use to follow changes made by other servers."""

    def save(self, name: str, config_raw: bytes, weights_raw: bytes) -> Path:
        """Store PEFT's two files atomically; AdapterExists if the name is taken. Returns `path(name)`."""

    def replace(self, name: str, config_raw: bytes, weights_raw: bytes) -> Path:
        """Make PEFT's two files the stored version of `name` atomically: readers see the old files or
        the new, complete. AdapterNotFound if it is not stored. Returns `path(name)`."""

    def delete(self, name: str) -> None:
        """The adapter disappears at once, its files after; AdapterNotFound if it is not stored."""

    def sweep(self) -> None:
        """Remove what an interrupted save, replace or delete left behind (or finish it)."""


def open_store(location: str | Path, cache_dir: str | Path | None = None, endpoint_url: str | None = None) -> Store:
    """`s3://bucket/prefix` (read through a disk cache in `cache_dir`), or a local directory.
    A remote store is checked at once: SourceUnavailable if it cannot be used."""
    if str(location).startswith("s3://"):
        from .s3_store import S3Store

        return S3Store(str(location), cache_dir or "adapter-cache", endpoint_url=endpoint_url)
    return AdapterStore(Path(location))


class AdapterStore:
    """A local directory: one entry per adapter, a symlink to its current version (module docstring)."""

    source = "disk"

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = str(self.root)
        self.versions = self.root / _VERSIONS
        self.root.mkdir(parents=True, exist_ok=True)
        self.sweep()

    def names(self) -> list[str]:
        return sorted(
            p.name for p in self.root.iterdir()
            if not p.name.startswith(_HIDDEN) and NAME_PATTERN.fullmatch(p.name) and p.is_dir()
        )

    def path(self, name: str) -> Path:
        return self.root / check_name(name)

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def version(self, name: str) -> str | None:
        target = self.path(name)
        try:
            return self._version_of(name, os.readlink(target)) or UNVERSIONED
        except FileNotFoundError:
            return None
        except OSError:  # a plain directory (never replaced): no version to follow
            return UNVERSIONED if target.is_dir() else None

    def save(self, name: str, config_raw: bytes, weights_raw: bytes) -> Path:
        """Write PEFT's two files for `name` atomically; AdapterExists if the name is taken."""
        target = self.path(name)
        if os.path.lexists(target):
            raise AdapterExists(f"adapter {name!r} already exists")
        version_dir, created = self._write_version(name, config_raw, weights_raw)
        try:
            os.symlink(self._link(version_dir), target)  # atomic; fails if another save won the race
        except BaseException as exc:
            if created and not self._points_to(target, version_dir):
                self._remove_version(version_dir)
            if isinstance(exc, FileExistsError):
                raise AdapterExists(f"adapter {name!r} already exists") from None
            raise
        _fsync_dir(self.root)
        return target

    def replace(self, name: str, config_raw: bytes, weights_raw: bytes) -> Path:
        """Make PEFT's two files the current version of `name`, atomically; AdapterNotFound if it is
        not stored. The same files as the current version change nothing."""
        target = self.path(name)
        if not os.path.lexists(target):
            raise AdapterNotFound(f"adapter {name!r} is not stored")
        version_dir, created = self._write_version(name, config_raw, weights_raw)
        link = self._link(version_dir)
        old = os.readlink(target) if target.is_symlink() else None
        if old == link:
            return target
        pending = self.root / f"{_PENDING}{name}"
        try:
            if old is not None:
                self._rename_link(link, target)
            else:
                self._replace_directory(target, link, pending)
        except BaseException:
            if os.path.lexists(target):  # else the old version is in the trash, and the sweep needs `pending`
                _remove(pending)
            if created and not (self._points_to(target, version_dir) or self._points_to(pending, version_dir)):
                self._remove_version(version_dir)
            raise
        if old is not None and self._version_of(name, old) is not None:
            _remove(self.root / old)
        return target

    def delete(self, name: str) -> None:
        target = self.path(name)
        if not os.path.lexists(target):
            raise AdapterNotFound(f"adapter {name!r} is not stored")
        trash = self.root / f"{_HIDDEN}trash-{uuid.uuid4().hex}"
        os.rename(target, trash)  # the adapter disappears atomically; the files go after
        _fsync_dir(self.root)
        _remove(trash)
        _remove(self.versions / name)

    def sweep(self) -> None:
        """Finish interrupted replaces; remove what an interrupted save, replace or delete left behind."""
        for p in self.root.iterdir():
            if p.name.startswith(_PENDING):
                self._finish_replace(p)
        for p in self.root.iterdir():
            if p.name.startswith((f"{_HIDDEN}tmp-", f"{_HIDDEN}trash-")):
                _remove(p)
        if self.versions.is_dir():
            for versions in self.versions.iterdir():
                current = self._current(versions.name)
                if current is None or not versions.is_dir():
                    _remove(versions)  # no adapter refers to it
                    continue
                for version in versions.iterdir():
                    if version.name != current:
                        _remove(version)

    # ---- the versioned layout -----------------------------------------------------------------------

    def _write_version(self, name: str, config_raw: bytes, weights_raw: bytes) -> tuple[Path, bool]:
        """`.versions/<name>/<version>/`, complete and fsynced. created: False if it was there already
        (the same files: a version directory is only ever renamed into place whole)."""
        version_dir = self.versions / name / content_version(config_raw, weights_raw)
        if version_dir.is_dir():
            return version_dir, False
        tmp = self.root / f"{_HIDDEN}tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for filename, data in ((CONFIG_FILE, config_raw), (WEIGHTS_FILE, weights_raw)):
                with open(tmp / filename, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            _fsync_dir(tmp)
            for d in (self.versions, version_dir.parent):
                if not d.is_dir():
                    d.mkdir(exist_ok=True)
                    _fsync_dir(d.parent)
            try:
                os.rename(tmp, version_dir)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):  # the same version, written meanwhile
                    return version_dir, False
                raise
            _fsync_dir(version_dir.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return version_dir, True

    def _rename_link(self, link: str, at: Path) -> None:
        """A symlink to `link` at `at`, over whatever symlink is there, atomically."""
        tmp = self.root / f"{_HIDDEN}tmp-{uuid.uuid4().hex}"
        os.symlink(link, tmp)
        try:
            os.rename(tmp, at)
        except BaseException:
            _remove(tmp)
            raise
        _fsync_dir(self.root)

    def _replace_directory(self, target: Path, link: str, pending: Path) -> None:
        """A plain directory `target` replaced by a symlink to `link`, through `pending` (module docstring)."""
        self._rename_link(link, pending)
        trash = self.root / f"{_HIDDEN}trash-{uuid.uuid4().hex}"
        os.rename(target, trash)
        _fsync_dir(self.root)
        try:
            os.rename(pending, target)  # a crash before this: the start-up sweep does it
        except BaseException:
            os.rename(trash, target)
            raise
        _fsync_dir(self.root)
        _remove(trash)

    def _finish_replace(self, pending: Path) -> None:
        name = pending.name[len(_PENDING):]
        target = self.root / name
        if NAME_PATTERN.fullmatch(name) and not os.path.lexists(target) and pending.is_dir():
            log.warning("%s: finishing the interrupted replace of adapter %r", self.url, name)
            os.rename(pending, target)
            _fsync_dir(self.root)
        else:  # the replace did not get as far as moving the old version away: it stays
            _remove(pending)

    def _link(self, version_dir: Path) -> str:
        """What a symlink in the root holds: the version directory, relative (the store can move)."""
        return os.path.relpath(version_dir, self.root)

    def _points_to(self, at: Path, version_dir: Path) -> bool:
        return at.is_symlink() and os.readlink(at) == self._link(version_dir)

    def _version_of(self, name: str, link: str) -> str | None:
        """The version a symlink's target names, if it is one of `name`'s version directories."""
        parts = Path(link).parts
        return parts[2] if len(parts) == 3 and parts[:2] == (_VERSIONS, name) else None

    def _current(self, name: str) -> str | None:
        """The version `<name>` points to, or None (no such adapter, or a plain directory)."""
        target = self.root / name
        if not NAME_PATTERN.fullmatch(name) or not target.is_symlink():
            return None
        return self._version_of(name, os.readlink(target))

    def _remove_version(self, version_dir: Path) -> None:
        _remove(version_dir)
        try:
            version_dir.parent.rmdir()  # the adapter's last version
        except OSError:
            pass


def _remove(path: Path) -> None:
    """A symlink or file unlinked (never what it points to), a directory removed; absent is fine."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
