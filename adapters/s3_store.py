"""Adapters in S3-compatible object storage (`--adapter-store s3://bucket/prefix`), read through a
local disk cache. Several servers may share one store.

Layout under `s3://bucket/prefix/`:
    adapters/<name>.json               the pointer: {"version", "created_at", "files": {file: {"size", "sha256"}}}
    versions/<name>/<version>/<file>   PEFT's two files as saved, one immutable copy per save

Atomicity: a save uploads the files under a fresh version key, then writes the pointer last, and
only if no pointer exists (`If-None-Match: *`, so of two servers saving one name, one wins and the
other gets AdapterExists). A replace does the same but overwrites the pointer unconditionally (one
PUT: readers get the old pointer or the new one), then removes the old version's files. An adapter
is visible (`names`, `exists`, `path`) exactly when its pointer is, and the pointer is written only
once its files are complete. (The pointer's `version` names one saved copy; the adapter's
`version`, a hash of its files, is computed from the files themselves.) A delete removes the
pointer first, then the files. Files no pointer refers to (an interrupted save or delete) are
swept at start-up once they are older than `sweep_grace` (another server may be between its two
writes).

The cache: `<cache_dir>/<name>/<version>/` holds the two files of one version, checked against the
pointer's sizes and hashes, written in a temporary directory and renamed into place.

Every failure of the remote (unreachable, no such bucket, denied, timed out) raises
SourceUnavailable naming the store's URL; connect/read timeouts and a small retry budget bound it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from .errors import AdapterExists, AdapterNotFound, InvalidAdapter, SourceUnavailable
from .loading import CONFIG_FILE, WEIGHTS_FILE
from .store import _HIDDEN, NAME_PATTERN, _fsync_dir, check_name

log = logging.getLogger(__name__)
FILES = (CONFIG_FILE, WEIGHTS_FILE)
CHUNK = 1 << 20
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")
_TAKEN = ("412", "PreconditionFailed", "409", "ConditionalRequestConflict")
_DENIED = ("403", "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
           "ExpiredToken", "InvalidToken")


def parse_url(url: str) -> tuple[str, str]:
    """'s3://bucket/some/prefix' -> ('bucket', 'some/prefix/'); the prefix is '' or ends with '/'."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url!r}: use s3://bucket/prefix")
    prefix = prefix.strip("/")
    return bucket, prefix + "/" if prefix else ""


class S3Store:
    source = "s3"

    def __init__(self, url: str, cache_dir: str | Path, endpoint_url: str | None = None,
                 connect_timeout: float = 3.0, read_timeout: float = 10.0, max_attempts: int = 2,
                 sweep_grace: float = 3600.0):
        """endpoint_url: an S3-compatible server (MinIO, Ceph, moto, ...); None: boto3's own
        resolution (AWS_ENDPOINT_URL, ~/.aws/config), then AWS. Credentials: boto3's standard chain.
        max_attempts: tries per request, the first included. Checks the bucket and sweeps at once."""
        self.bucket, self.prefix = parse_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.cache = Path(cache_dir)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.sweep_grace = sweep_grace
        config = BotoConfig(
            connect_timeout=connect_timeout, read_timeout=read_timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            # S3-compatible servers: path-style addressing, and no checksum trailers (not all parse them;
            # the pointer's sha256 checks the content end to end).
            s3={"addressing_style": "path"} if endpoint_url else None,
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
        )
        try:
            with self._remote("connecting"):
                self.client = boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=config)
        except ValueError as exc:  # botocore's word for a malformed endpoint URL
            raise SourceUnavailable(f"adapter store {self.url}: {exc}") from None
        with self._remote("checking the bucket"):
            self.client.head_bucket(Bucket=self.bucket)
        self.sweep()

    # ---- keys -------------------------------------------------------------------------------------

    def _pointer_key(self, name: str) -> str:
        return f"{self.prefix}adapters/{name}.json"

    def _file_key(self, name: str, version: str, filename: str) -> str:
        return f"{self.prefix}versions/{name}/{version}/{filename}"

    # ---- the interface ------------------------------------------------------------------------------

    def names(self) -> list[str]:
        start, names = f"{self.prefix}adapters/", []
        for obj in self._list(start):
            key = obj["Key"][len(start):]
            if key.endswith(".json") and NAME_PATTERN.fullmatch(key[:-5]):
                names.append(key[:-5])
        return sorted(names)

    def exists(self, name: str) -> bool:
        return self._head(self._pointer_key(check_name(name))) is not None

    def version(self, name: str) -> str | None:
        pointer = self._pointer(name)
        return pointer["version"] if pointer is not None else None

    def path(self, name: str) -> Path:
        """The cached directory of the stored version, downloaded and checked on first use."""
        pointer = self._pointer(name)
        if pointer is None:
            raise AdapterNotFound(f"adapter {name!r} is not in the store {self.url}")
        target = self.cache / name / pointer["version"]
        if not target.is_dir():
            self._cache(name, pointer, lambda filename, out: self._download(name, pointer, filename, out))
        return target

    def save(self, name: str, config_raw: bytes, weights_raw: bytes) -> Path:
        check_name(name)
        if self.exists(name):
            raise AdapterExists(f"adapter {name!r} already exists in the store {self.url}")
        return self._write(name, config_raw, weights_raw, replace=False)

    def replace(self, name: str, config_raw: bytes, weights_raw: bytes) -> Path:
        """The new files under a fresh version key, then the pointer overwritten (unconditionally),
        then the old version's files removed: readers see the old version or the new one, whole."""
        old = self._pointer(name)
        if old is None:
            raise AdapterNotFound(f"adapter {name!r} is not in the store {self.url}")
        path = self._write(name, config_raw, weights_raw, replace=True)
        self._delete_files(name, old["version"])  # best effort; the sweep gets what this misses
        return path

    def _write(self, name: str, config_raw: bytes, weights_raw: bytes, replace: bool) -> Path:
        """Upload the files, then write the pointer (only if there is none, unless `replace`), then cache."""
        data = {CONFIG_FILE: config_raw, WEIGHTS_FILE: weights_raw}
        pointer = {
            "version": uuid.uuid4().hex,
            "created_at": time.time(),
            "files": {f: {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()} for f, raw in data.items()},
        }
        try:
            for filename, raw in data.items():
                with self._remote(f"writing {filename} of {name!r}"):
                    self.client.put_object(Bucket=self.bucket, Key=self._file_key(name, pointer["version"], filename),
                                           Body=raw)
            self._put_pointer(name, pointer, replace)
        except BaseException:
            self._delete_files(name, pointer["version"])  # best effort; the sweep gets what this misses
            raise
        try:
            self._cache(name, pointer, lambda filename, out: out.write(data[filename]))
        except OSError as exc:  # stored all the same: `path` downloads it when it is needed
            log.warning("%s: could not cache %r: %s", self.url, name, exc)
        return self.cache / name / pointer["version"]

    def delete(self, name: str) -> None:
        pointer = self._pointer(name)
        if pointer is None:
            raise AdapterNotFound(f"adapter {name!r} is not in the store {self.url}")
        with self._remote(f"deleting {name!r}"):
            self.client.delete_object(Bucket=self.bucket, Key=self._pointer_key(name))  # gone from here on
        self._delete_files(name, pointer["version"])
        _remove_dir(self.cache, self.cache / name)

    def sweep(self) -> None:
        """Local: leftover temporary directories, and cached adapters no longer stored. Remote: files
        that no pointer refers to, older than `sweep_grace` seconds."""
        stored = set(self.names())
        for p in self.cache.iterdir():
            if p.is_dir() and p.name.startswith(_HIDDEN):
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_dir() and p.name not in stored:
                _remove_dir(self.cache, p)
        start, newest = f"{self.prefix}versions/", {}
        for obj in self._list(start):
            name, _, rest = obj["Key"][len(start):].partition("/")
            version = rest.partition("/")[0]
            stamp = obj["LastModified"].timestamp()
            newest[(name, version)] = max(newest.get((name, version), stamp), stamp)
        pointers: dict[str, str | None] = {}  # name -> its version, "" if none, None if unreadable
        for (name, version), stamp in sorted(newest.items()):
            if time.time() - stamp < self.sweep_grace:
                continue
            if name not in pointers:
                try:
                    pointer = self._pointer(name) if NAME_PATTERN.fullmatch(name) else None
                    pointers[name] = pointer["version"] if pointer else ""
                except InvalidAdapter:  # unreadable: keep its files (start-up reports the adapter as failed)
                    pointers[name] = None
            if pointers[name] is not None and pointers[name] != version:
                log.info("%s: removing %s/%s, which no pointer refers to", self.url, name, version)
                self._delete_files(name, version, strict=True)

    # ---- remote calls ---------------------------------------------------------------------------------

    @contextmanager
    def _remote(self, what: str):
        """Any failure of the remote, as SourceUnavailable naming the store."""
        try:
            yield
        except (ClientError, BotoCoreError) as exc:
            raise self._unavailable(exc, what) from None

    def _unavailable(self, exc: Exception, what: str) -> SourceUnavailable:
        if isinstance(exc, ClientError):
            code, message = _code(exc), exc.response.get("Error", {}).get("Message") or str(exc)
            if code == "NoSuchBucket" or (code in _NOT_FOUND and what == "checking the bucket"):
                problem = f"the bucket {self.bucket!r} does not exist"
            elif code in _DENIED:
                problem = f"access denied ({code}: {message})"
            else:
                problem = f"{code}: {message}"
        elif isinstance(exc, NoCredentialsError):
            problem = f"{exc} (boto3's chain: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, ~/.aws, an instance role)"
        else:  # unreachable endpoint, timeouts, ...
            problem = str(exc)
        return SourceUnavailable(f"adapter store {self.url}: {what}: {problem}")

    def _list(self, start: str):
        with self._remote("listing"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                yield from page.get("Contents", ())

    def _head(self, key: str) -> dict | None:
        return self._read(key, lambda: self.client.head_object(Bucket=self.bucket, Key=key))

    def _get(self, key: str):
        """The object's streaming body, or None if there is no such object."""
        return self._read(key, lambda: self.client.get_object(Bucket=self.bucket, Key=key)["Body"])

    def _read(self, key: str, call):
        """call()'s result, or None if there is no such object; SourceUnavailable for the rest."""
        try:
            return call()
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                return None
            raise self._unavailable(exc, f"reading {key}") from None
        except BotoCoreError as exc:
            raise self._unavailable(exc, f"reading {key}") from None

    def _pointer(self, name: str) -> dict | None:
        key = self._pointer_key(check_name(name))
        with self._remote(f"reading {key}"):
            body = self._get(key)
            raw = body.read(CHUNK + 1) if body is not None else None
        if raw is None:
            return None
        try:
            pointer = json.loads(raw)
            version, files = pointer["version"], pointer["files"]
            ok = (isinstance(version, str) and NAME_PATTERN.fullmatch(version) and set(files) == set(FILES)
                  and all(isinstance(files[f]["size"], int) and isinstance(files[f]["sha256"], str) for f in FILES))
        except (ValueError, TypeError, KeyError):
            ok = False
        if not ok:
            raise InvalidAdapter(f"adapter store {self.url}: {key} is not a valid adapter pointer")
        return pointer

    def _put_pointer(self, name: str, pointer: dict, replace: bool = False) -> None:
        """Only if the name is free (AdapterExists if not), unless `replace`."""
        body = json.dumps(pointer, sort_keys=True).encode()
        condition = {} if replace else {"IfNoneMatch": "*"}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._pointer_key(name), Body=body,
                                   ContentType="application/json", **condition)
        except ClientError as exc:
            if _code(exc) in _TAKEN:
                raise AdapterExists(f"adapter {name!r} already exists in the store {self.url}") from None
            raise self._unavailable(exc, f"writing the pointer of {name!r}") from None
        except BotoCoreError as exc:
            raise self._unavailable(exc, f"writing the pointer of {name!r}") from None

    def _delete_files(self, name: str, version: str, strict: bool = False) -> None:
        """PEFT's two files of one version; strict (the sweep): whatever is under the version, and
        failures raise (else they are logged: the adapter is gone already, the sweep retries)."""
        if strict:
            keys = [obj["Key"] for obj in self._list(f"{self.prefix}versions/{name}/{version}/")]
        else:
            keys = [self._file_key(name, version, f) for f in FILES]
        for key in keys:
            try:
                with self._remote(f"deleting {key}"):
                    self.client.delete_object(Bucket=self.bucket, Key=key)
            except SourceUnavailable as exc:
                if strict:
                    raise
                log.warning("%s (left for the start-up sweep)", exc)

    def _download(self, name: str, pointer: dict, filename: str, out) -> None:
        key = self._file_key(name, pointer["version"], filename)
        with self._remote(f"reading {key}"):
            body = self._get(key)
            if body is None:
                raise AdapterNotFound(f"adapter {name!r} was removed from the store {self.url} while being read")
            size, limit = 0, pointer["files"][filename]["size"]
            for chunk in body.iter_chunks(CHUNK):
                size += len(chunk)
                if size > limit:  # checked in full by `_cache`; this only stops a runaway download early
                    raise InvalidAdapter(f"adapter store {self.url}: {key} is larger than its pointer says ({limit})")
                out.write(chunk)

    # ---- the disk cache ---------------------------------------------------------------------------------

    def _cache(self, name: str, pointer: dict, write) -> None:
        """Fill `<cache>/<name>/<version>/` with `write(filename, file)`, checked against the pointer."""
        version = pointer["version"]
        tmp = self.cache / f"{_HIDDEN}tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for filename in FILES:
                with open(tmp / filename, "wb") as f:
                    write(filename, f)
                    f.flush()
                    os.fsync(f.fileno())
                expected, got = pointer["files"][filename], _digest(tmp / filename)
                if got != (expected["size"], expected["sha256"]):
                    raise InvalidAdapter(f"adapter store {self.url}: {filename} of {name!r} (version {version}) "
                                         f"does not match its pointer: {got[0]} bytes, expected {expected['size']}")
            _fsync_dir(tmp)
            (self.cache / name).mkdir(exist_ok=True)
            try:
                os.rename(tmp, self.cache / name / version)
            except OSError as exc:  # another thread cached the same version first: theirs is as good
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            for old in (self.cache / name).iterdir():
                if old.name != version:
                    _remove_dir(self.cache, old)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _digest(path: Path) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _remove_dir(cache: Path, path: Path) -> None:
    """Rename out of the way (atomic), then remove."""
    trash = cache / f"{_HIDDEN}trash-{uuid.uuid4().hex}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)
