"""The datastore: objects (inputs, outputs, large results) under keys.

Two halves, one vocabulary (keys, :class:`ObjectInfo`, the errors under
:class:`~herder.errors.DatastoreError`):

* :class:`Datastore` lives inside the coordinator and talks to storage:
  ``file://`` (the default, ``<home>/data``) through ``os``, or
  ``s3://bucket/prefix`` through fsspec and s3fs. It is synchronous; the
  coordinator runs it in worker threads.
* :class:`~herder.dataclient.DataClient` is what everyone else uses (the
  Python client, the CLI, workers on other machines). It talks only to the
  coordinator, over HTTPS, and verifies every byte it fetches against the
  sha256 recorded when the object was put.

Layout under the datastore's root::

    <root>/<key>                  the object's bytes, exactly as put
    <root>/.herder-meta/<key>     sidecar: {"v": 1, "sha256", "size", "modified"}
    <root>/.herder-tmp/<random>   uploads in flight (file:// only)

Keys whose first segment starts with ``.herder-`` are reserved for these.

Writing order. A put streams the bytes where no reader looks (a temporary
file, or an S3 multipart upload, which S3 shows only once completed; an
object up to one part waits in memory for its single PUT), then writes the
sidecar, then makes the bytes visible (rename, completing the upload, or
that PUT). So a reader never sees a partial object, and a crash between the
last two steps leaves the old bytes under a new sidecar: a reader is then told
``ChecksumMismatch`` (detected, never silently wrong) until the key is put
again. The sidecar step and the visibility step of a key, and a reader's
"read sidecar, open the bytes" step, hold one in-process lock for that key,
so readers of one coordinator always get a matching pair; across several
coordinators sharing an S3 datastore an overwrite racing a read is caught by
the checksum (and s3fs's ETag match on ranged reads) rather than prevented.

An object found without a sidecar (put there by hand) is hashed on first use
and its sidecar recorded.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import fsspec  # type: ignore[import-untyped]

from herder.errors import (
    BadKey,
    ConfigError,
    DatastoreError,
    DatastoreFull,
    DatastoreUnavailable,
    ObjectMissing,
)

__all__ = [
    "MAX_KEY_LENGTH",
    "MAX_SEGMENT_LENGTH",
    "RESERVED_PREFIX",
    "Datastore",
    "ObjectInfo",
    "check_key",
    "check_prefix",
]

log = logging.getLogger("herder.datastore")
T = TypeVar("T")

MAX_KEY_LENGTH = 1024
"""Longest key, in UTF-8 bytes (S3's own limit)."""

MAX_SEGMENT_LENGTH = 255
"""Longest ``/``-separated segment, in UTF-8 bytes (a file name's limit on common filesystems)."""

RESERVED_PREFIX = ".herder-"
"""A first key segment starting with this is herder's own (sidecars, uploads in flight)."""

META_DIR = ".herder-meta"
TMP_DIR = ".herder-tmp"

CHUNK = 1 << 20
"""Read and write granularity (1 MiB): memory per transfer stays near this."""

S3_PART = 16 << 20
"""S3 multipart part size: memory per S3 upload; objects up to 10,000 parts (160 GiB)."""

ATTEMPTS = 4
"""Tries of one operation that failed to connect before giving up."""

BACKOFF_S = 0.2
"""First wait between tries; doubles each time, capped by BACKOFF_CAP_S."""

BACKOFF_CAP_S = 1.0
RETRY_BUDGET_S = 5.0
"""No new try starts after this long: a dead endpoint is reported within seconds."""

STALE_UPLOAD_S = 3600.0
"""A temporary upload untouched this long belongs to a dead process and is removed."""

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_LOCK_STRIPES = 64


# --------------------------------------------------------------------------- keys


def _key_problem(text: object, *, prefix: bool) -> str | None:
    """The rule ``text`` breaks as a key (or a listing prefix), or None."""
    if not isinstance(text, str):
        return f"must be a string, not {type(text).__name__}"
    if not text:
        return None if prefix else "is empty"
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode text (it holds a lone surrogate)"
    if len(encoded) > MAX_KEY_LENGTH:
        return f"is {len(encoded)} bytes long; the limit is {MAX_KEY_LENGTH} (UTF-8)"
    for position, char in enumerate(text):
        code = ord(char)
        if code == 0:
            return f"contains a NUL character at position {position}"
        if code < 0x20 or code == 0x7F:
            return f"contains the control character U+{code:04X} at position {position}"
        if char == "\\":
            return f"contains a backslash at position {position}"
    if text.startswith("/"):
        return "is absolute (starts with '/'); keys are relative"
    segments = text.split("/")
    if prefix and segments[-1] == "":
        segments.pop()  # "runs/" lists everything under runs/
    for index, segment in enumerate(segments):
        if segment == "":
            return f"has an empty segment (segment {index + 1}: '//' or a trailing '/')"
        if segment in (".", ".."):
            return f"has a {segment!r} segment (segment {index + 1}); keys cannot walk paths"
        if len(segment.encode("utf-8")) > MAX_SEGMENT_LENGTH:
            return f"has a segment longer than {MAX_SEGMENT_LENGTH} bytes (segment {index + 1})"
    if segments and segments[0].startswith(RESERVED_PREFIX):
        return f"is under the reserved prefix {RESERVED_PREFIX!r} (herder's internal data)"
    return None


def _shown(text: object) -> str:
    shown = repr(text)
    return shown if len(shown) <= 120 else shown[:100] + "...'"


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid datastore key, else raise :class:`BadKey`.

    A key is 1 to 1024 UTF-8 bytes of ``/``-separated segments, relative,
    with no empty, ``.`` or ``..`` segment, no segment over 255 bytes, no
    backslash, NUL or other control character, and not under ``.herder-``.
    """
    problem = _key_problem(key, prefix=False)
    if problem is not None:
        raise BadKey(f"bad datastore key {_shown(key)}: it {problem}", key=key, rule=problem)
    return key


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if it may be listed (empty is fine, a trailing ``/`` too), else BadKey."""
    problem = _key_problem(prefix, prefix=True)
    if problem is not None:
        raise BadKey(
            f"bad datastore prefix {_shown(prefix)}: it {problem}", key=prefix, rule=problem
        )
    return prefix


# --------------------------------------------------------------------------- object info


@dataclass(frozen=True)
class ObjectInfo:
    """What is known of one stored object."""

    key: str
    size: int
    sha256: str
    modified: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ObjectInfo:
        try:
            info = cls(
                key=str(data["key"]),
                size=int(data["size"]),
                sha256=str(data["sha256"]),
                modified=float(data["modified"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DatastoreError(f"malformed object info {dict(data)!r}: {exc}") from exc
        return info


def _meta_bytes(info: ObjectInfo) -> bytes:
    return json.dumps(
        {"v": 1, "sha256": info.sha256, "size": info.size, "modified": info.modified}
    ).encode()


def _parse_meta(key: str, raw: bytes | None) -> ObjectInfo | None:
    """A sidecar's content, or None when absent or unreadable (then the bytes are re-hashed)."""
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        return ObjectInfo(key, int(data["size"]), str(data["sha256"]), float(data["modified"]))
    except (ValueError, KeyError, TypeError):
        log.warning("datastore sidecar of %r is malformed; re-hashing the object", key)
        return None


# --------------------------------------------------------------------------- backends


class _Upload:
    """Bytes being written where no reader sees them, until :meth:`commit`."""

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def seal(self) -> None:
        """Every written byte is stored, or held for :meth:`commit`; none is visible."""
        raise NotImplementedError

    def commit(self) -> None:
        """Make the object visible under its key, all at once."""
        raise NotImplementedError

    def discard(self) -> None:
        """Drop everything written; never raises."""
        raise NotImplementedError


class _Backend:
    """The few storage operations the datastore needs; paths are full paths under ``root``."""

    transient: tuple[type[BaseException], ...] = ()
    failures: tuple[type[BaseException], ...] = (OSError,)
    chunk = CHUNK

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def size(self, path: str) -> int | None:
        """The size of the object at ``path``, or None if there is none."""
        raise NotImplementedError

    def read_small(self, path: str) -> bytes | None:
        raise NotImplementedError

    def read_many(self, paths: list[str]) -> dict[str, bytes | None]:
        return {path: self.read_small(path) for path in paths}

    def write_small(self, path: str, data: bytes) -> None:
        raise NotImplementedError

    def begin(self, path: str) -> _Upload:
        raise NotImplementedError

    def open_read(self, path: str) -> tuple[int, IO[bytes]]:
        raise NotImplementedError

    def files(self, directory: str) -> list[str]:
        """Every object path under ``directory`` (recursively, sorted); empty if it does
        not exist."""
        raise NotImplementedError

    def remove(self, path: str) -> None:
        raise NotImplementedError


class _LocalUpload(_Upload):
    def __init__(self, backend: _LocalBackend, final: str) -> None:
        self.backend = backend
        self.final = final
        tmp_dir = backend.path(TMP_DIR)
        os.makedirs(tmp_dir, exist_ok=True)
        self.tmp = f"{tmp_dir}/{secrets.token_hex(16)}"
        self.file: IO[bytes] = open(self.tmp, "xb")  # noqa: SIM115 - closed in seal/discard

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def seal(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def commit(self) -> None:
        self.backend.place(self.tmp, self.final)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


class _LocalBackend(_Backend):
    """``file://``: temporary file in ``.herder-tmp``, fsync, then ``os.replace``.

    Plain ``os`` calls, not fsspec's local filesystem: its ``mv`` is
    ``shutil.move``, which moves *into* a directory that happens to have the
    key's name (``os.replace`` is atomic and refuses), and importing fsspec is
    4 MB of every coordinator's memory that only S3 needs.
    """

    def __init__(self, root: str) -> None:
        super().__init__(root)
        os.makedirs(self.root, exist_ok=True)
        self._sweep()

    def _sweep(self) -> None:
        """Remove uploads left behind by a process that died mid-put."""
        tmp_dir = Path(self.path(TMP_DIR))
        cutoff = time.time() - STALE_UPLOAD_S
        with contextlib.suppress(FileNotFoundError):
            for entry in tmp_dir.iterdir():
                with contextlib.suppress(OSError):
                    if entry.stat().st_mtime < cutoff:
                        entry.unlink()
                        log.info("datastore removed a stale upload %s", entry)

    def place(self, tmp: str, final: str) -> None:
        parent = os.path.dirname(final)
        os.makedirs(parent, exist_ok=True)
        os.replace(tmp, final)
        fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_small(self, path: str, data: bytes) -> None:
        upload = _LocalUpload(self, path)
        try:
            upload.write(data)
            upload.seal()
            upload.commit()
        except BaseException:
            upload.discard()
            raise

    def begin(self, path: str) -> _Upload:
        return _LocalUpload(self, path)

    def open_read(self, path: str) -> tuple[int, IO[bytes]]:
        file = open(path, "rb")  # noqa: SIM115 - handed to the caller
        try:
            size = os.fstat(file.fileno()).st_size
        except BaseException:
            file.close()
            raise
        return size, file

    def size(self, path: str) -> int | None:
        try:
            info = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return info.st_size if stat.S_ISREG(info.st_mode) else None

    def read_small(self, path: str) -> bytes | None:
        try:
            with open(path, "rb") as file:
                return file.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def files(self, directory: str) -> list[str]:
        found: list[str] = []
        for parent, _dirs, names in os.walk(directory):
            found.extend(f"{parent}/{name}" for name in names)
        return sorted(found)

    def remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.unlink(path)


class _S3Upload(_Upload):
    """An object on its way to S3, invisible until :meth:`commit`.

    Up to one part it is held here and put in one request at commit (S3
    shows a PUT only once complete); beyond that it becomes an s3fs file
    opened with ``autocommit=False``, a multipart upload that :meth:`commit`
    completes and :meth:`discard` aborts. A task's small output so costs one
    request instead of three (initiate, part, complete).
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs = fs
        self.path = path
        self.held: bytearray | None = bytearray()
        self.file: Any = None

    def write(self, data: bytes) -> None:
        if self.held is not None and len(self.held) + len(data) <= S3_PART:
            self.held += data
            return
        if self.file is None:
            self.file = self.fs.open(self.path, "wb", block_size=S3_PART, autocommit=False)
            self.file.write(self.held)
            self.held = None
        self.file.write(data)

    def seal(self) -> None:
        if self.file is not None:
            self.file.close()  # uploads the last part; does not complete the upload

    def commit(self) -> None:
        if self.file is None:
            self.fs.pipe_file(self.path, bytes(self.held or b""))
        else:
            self.file.commit()

    def discard(self) -> None:
        self.held = None
        if self.file is not None:
            with contextlib.suppress(Exception):
                self.file.discard()


class _S3Backend(_Backend):
    """``s3://bucket/prefix`` through s3fs.

    Uploads go straight to the final key (one PUT up to a part, a multipart
    upload beyond) rather than to a temporary key and a copy: S3 shows an
    object only once its upload is
    completed, so that is already atomic, and it spares a server-side copy of
    every object (a multipart copy beyond 5 GB). A coordinator killed
    mid-upload leaves an incomplete upload that S3 never shows; a bucket
    lifecycle rule (AbortIncompleteMultipartUpload) reclaims its parts.
    """

    chunk = 8 << 20

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        import botocore.exceptions
        from fsspec.exceptions import FSTimeoutError  # type: ignore[import-untyped]

        super().__init__(root)
        self.fs = fs
        self.transient = (
            botocore.exceptions.ConnectionError,
            botocore.exceptions.HTTPClientError,
            FSTimeoutError,
            ConnectionError,
            TimeoutError,
        )
        self.failures = (OSError, botocore.exceptions.BotoCoreError)

    def size(self, path: str) -> int | None:
        try:
            info = self.fs.info(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if info.get("type") != "file":
            return None
        return int(info["size"])

    def read_small(self, path: str) -> bytes | None:
        # max_concurrency=1: one GET. Otherwise s3fs asks the size first (HEAD), and
        # for a missing key also whether it is a directory (LIST): three requests.
        try:
            data: bytes = self.fs.cat_file(path, max_concurrency=1)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        return data

    def read_many(self, paths: list[str]) -> dict[str, bytes | None]:
        if not paths:
            return {}
        # concurrent GETs, one per path (see read_small)
        found = self.fs.cat(paths, on_error="return", max_concurrency=1)
        out: dict[str, bytes | None] = {}
        for path in paths:
            value = found.get(path) if isinstance(found, dict) else None
            if isinstance(value, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
                value = None
            elif isinstance(value, BaseException):
                raise value
            out[path] = value
        return out

    def files(self, directory: str) -> list[str]:
        try:
            found = self.fs.find(directory, withdirs=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [str(p) for p in found]

    def remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            self.fs.rm_file(path)

    def write_small(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path, data)  # one PUT: atomic

    def begin(self, path: str) -> _Upload:
        return _S3Upload(self.fs, path)

    def open_read(self, path: str) -> tuple[int, IO[bytes]]:
        # Ranged reads carry If-Match with the ETag seen at open: an object
        # replaced mid-read fails the read instead of splicing two versions.
        file: Any = self.fs.open(path, "rb", block_size=self.chunk, cache_type="none")
        return int(file.size), file


def _local_root(url: str) -> str:
    """The directory of a ``file://`` URL (or a bare path), made absolute."""
    return os.path.abspath(url.removeprefix("file://"))


def _s3_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Datastore options → s3fs arguments, with bounded timeouts and no hidden retries.

    ``endpoint_url``, ``key``, ``secret``, ``token``, ``anon`` ... go to s3fs
    as they are; ``region_name`` goes to the botocore client. Retries of
    connection failures are the datastore's (ATTEMPTS, capped backoff), so
    botocore's own are turned off.
    """
    opts = dict(options)
    client_kwargs = dict(opts.pop("client_kwargs", {}) or {})
    if "region_name" in opts:
        client_kwargs["region_name"] = opts.pop("region_name")
    config_kwargs = {
        "retries": {"max_attempts": 1, "mode": "standard"},
        "connect_timeout": 3,
        "read_timeout": 60,
        **dict(opts.pop("config_kwargs", {}) or {}),
    }
    return {
        **opts,
        "client_kwargs": client_kwargs,
        "config_kwargs": config_kwargs,
        "use_listings_cache": False,
        "skip_instance_cache": True,
    }


# --------------------------------------------------------------------------- datastore


class Datastore:
    """Objects under keys in one location; used inside the coordinator.

    ``Datastore("file:///srv/herder/data")`` or
    ``Datastore("s3://bucket/prefix", {"endpoint_url": "http://...", "key": ..., "secret": ...})``.
    Every method is synchronous and thread-safe.
    """

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        scheme = urllib.parse.urlsplit(url).scheme or "file"
        opts = dict(options or {})
        try:
            if scheme == "file":
                if opts:
                    raise ConfigError(
                        f"datastore URL {url!r}: file:// takes no options "
                        f"(given: {', '.join(sorted(opts))})",
                        field="datastore_options",
                    )
                self._backend: _Backend = _LocalBackend(_local_root(url))
            elif scheme in ("s3", "s3a"):
                import fsspec  # only S3 needs it

                fs, root = fsspec.core.url_to_fs(url, **_s3_options(opts))
                fs.retries = 3  # s3fs's own, for read timeouts mid-transfer
                if not root.strip("/"):
                    raise ConfigError(f"datastore URL {url!r} names no bucket", field="datastore")
                self._backend = _S3Backend(fs, root)
            else:
                raise ConfigError(
                    f"datastore URL {url!r}: only file:// and s3:// are supported",
                    field="datastore",
                )
        except (TypeError, ValueError, ImportError, OSError) as exc:
            raise ConfigError(f"datastore URL {url!r}: {exc}", field="datastore") from exc
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]

    def __repr__(self) -> str:
        return f"<Datastore {self.url}>"

    # --- paths, locks, errors -------------------------------------------------------------

    def _data_path(self, key: str) -> str:
        return self._backend.path(key)

    def _meta_path(self, key: str) -> str:
        return self._backend.path(META_DIR, key)

    def _lock(self, key: str) -> threading.Lock:
        return self._locks[hash(key) % _LOCK_STRIPES]

    def _where(self, key: str) -> str:
        return f"{self.url}/{key}"

    def _retrying(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``; a connection failure is retried with capped backoff, then reported."""
        started = time.monotonic()
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return fn()
            except self._backend.transient as exc:
                elapsed = time.monotonic() - started
                if attempt == ATTEMPTS or elapsed > RETRY_BUDGET_S:
                    raise DatastoreUnavailable(
                        f"datastore {self.url} is unreachable ({what}): {attempt} attempts "
                        f"over {elapsed:.1f}s failed; last error: {exc}",
                        url=self.url,
                        attempts=attempt,
                    ) from exc
                delay = min(BACKOFF_S * 2 ** (attempt - 1), BACKOFF_CAP_S)
                log.warning(
                    "datastore %s: %s failed (%s); retry %d in %.1fs",
                    self.url,
                    what,
                    exc,
                    attempt,
                    delay,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    @contextlib.contextmanager
    def _translated(self, key: str, what: str) -> Iterator[None]:
        """Turn storage errors into the DatastoreError tree, naming the key and its path."""
        where = self._where(key)
        try:
            yield
        except DatastoreError:
            raise
        except self._backend.transient as exc:
            raise DatastoreUnavailable(
                f"datastore {self.url} failed during {what} of {key!r}: {exc}",
                key=key,
                path=where,
            ) from exc
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                raise DatastoreFull(
                    f"datastore full: no space left for {key!r} at {where} "
                    f"({os.strerror(exc.errno or errno.ENOSPC)}); nothing of it was kept",
                    key=key,
                    path=where,
                ) from exc
            if isinstance(exc, PermissionError):
                raise DatastoreError(
                    f"datastore refused {what} of {key!r} at {where}: permission denied",
                    key=key,
                    path=where,
                ) from exc
            raise DatastoreError(
                f"datastore {what} of {key!r} at {where} failed: {exc}", key=key, path=where
            ) from exc
        except self._backend.failures as exc:
            raise DatastoreError(
                f"datastore {what} of {key!r} at {where} failed: {exc}", key=key, path=where
            ) from exc

    def _conflict(self, key: str, exc: OSError) -> BadKey:
        return BadKey(
            f"bad datastore key {_shown(key)}: it collides with an existing object or prefix "
            f"at {self._where(key)} (on file:// a key cannot be both an object and a prefix "
            f"of other keys)",
            key=key,
            rule="collides",
        )

    # --- writing --------------------------------------------------------------------------

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> ObjectInfo:
        """Store the bytes of ``chunks`` under ``key``, replacing any object there.

        Memory stays bounded (one chunk, or one S3 part); the sha256 is
        computed while writing and recorded in the sidecar. Nothing is
        visible under ``key`` until every byte is stored; on any failure
        (no space, a dead connection, the source raising) the upload is
        dropped and the previous object, if any, is left as it was.
        """
        check_key(key)
        backend = self._backend
        data_path, meta_path = self._data_path(key), self._meta_path(key)
        with self._translated(key, "put"):
            # A cheap read first: a dead endpoint is reported before the body is consumed.
            self._retrying(f"put {key!r}", lambda: backend.read_small(meta_path))
            upload = backend.begin(data_path)
            try:
                digest = hashlib.sha256()
                size = 0
                for chunk in chunks:
                    if not chunk:
                        continue
                    upload.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                upload.seal()
                info = ObjectInfo(key, size, digest.hexdigest(), time.time())
                with self._lock(key):
                    self._commit(key, upload, info)
            except BaseException:
                upload.discard()
                raise
        log.info(
            "datastore put %s (%d bytes, sha256 %s)",
            key,
            info.size,
            info.sha256[:16],
            extra={"action": "data.put", "key": key},
        )
        return info

    def _commit(self, key: str, upload: _Upload, info: ObjectInfo) -> None:
        """Sidecar first, then the bytes; if the bytes cannot be placed, restore the sidecar."""
        backend = self._backend
        meta_path = self._meta_path(key)
        previous = backend.read_small(meta_path)
        try:
            backend.write_small(meta_path, _meta_bytes(info))
        except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
            raise self._conflict(key, exc) from exc
        try:
            upload.commit()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                if previous is None:
                    backend.remove(meta_path)
                else:
                    backend.write_small(meta_path, previous)
            if isinstance(exc, (NotADirectoryError, IsADirectoryError, FileExistsError)):
                raise self._conflict(key, exc) from exc
            raise

    # --- reading --------------------------------------------------------------------------

    def _recorded(self, key: str, raw: bytes | None) -> ObjectInfo:
        """The sidecar's info; an object without one (put by hand) is hashed and recorded.

        Called without the key's lock held. The sidecar is written only if
        still absent under the lock: a put that committed meanwhile wins.
        """
        info = _parse_meta(key, raw)
        if info is not None:
            return info
        backend = self._backend
        size, file = backend.open_read(self._data_path(key))
        digest = hashlib.sha256()
        with file:
            while block := file.read(backend.chunk):
                digest.update(block)
        info = ObjectInfo(key, size, digest.hexdigest(), time.time())
        with self._lock(key):
            if backend.read_small(self._meta_path(key)) is None:
                backend.write_small(self._meta_path(key), _meta_bytes(info))
                log.info("datastore recorded the sha256 of %s, found without a sidecar", key)
        return info

    def open_read(self, key: str) -> tuple[ObjectInfo, Iterator[bytes]]:
        """The object's info and an iterator over its bytes (close the iterator when done).

        ``info.size`` is the size of the bytes that will be read and
        ``info.sha256`` the recorded digest: the reader checks one against
        the other, end to end.
        """
        check_key(key)
        backend = self._backend
        data_path = self._data_path(key)

        def open_pair() -> tuple[ObjectInfo, int, IO[bytes]]:
            with self._lock(key):
                raw = backend.read_small(self._meta_path(key))
                try:
                    size, file = backend.open_read(data_path)
                except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
                    raise self._missing(key) from exc
            try:
                info = self._recorded(key, raw)
            except BaseException:
                file.close()
                raise
            return info, size, file

        with self._translated(key, "get"):
            info, size, file = self._retrying(f"get {key!r}", open_pair)
        return ObjectInfo(key, size, info.sha256, info.modified), self._chunks(key, file)

    def _chunks(self, key: str, file: IO[bytes]) -> Iterator[bytes]:
        try:
            while True:
                with self._translated(key, "read"):
                    block = file.read(self._backend.chunk)
                if not block:
                    return
                yield block
        finally:
            file.close()

    def info(self, key: str) -> ObjectInfo:
        """Size, sha256 and time of the object under ``key``; ObjectMissing if none."""
        check_key(key)
        backend = self._backend

        def look() -> ObjectInfo:
            with self._lock(key):
                size = backend.size(self._data_path(key))
                if size is None:
                    raise self._missing(key)
                raw = backend.read_small(self._meta_path(key))
            recorded = self._recorded(key, raw)
            return ObjectInfo(key, size, recorded.sha256, recorded.modified)

        with self._translated(key, "info"):
            return self._retrying(f"info {key!r}", look)

    def exists(self, key: str) -> bool:
        check_key(key)
        with self._translated(key, "exists"):
            return self._retrying(
                f"exists {key!r}", lambda: self._backend.size(self._data_path(key)) is not None
            )

    def ls(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (a plain string prefix), sorted.

        Internal entries (sidecars, uploads in flight) are never listed. The
        listing is not a snapshot: objects put or removed meanwhile may or
        may not appear.
        """
        check_prefix(prefix)
        backend = self._backend
        directory = prefix.rpartition("/")[0]
        start = backend.path(directory) if directory else backend.root
        root_len = len(backend.root) + 1

        def listing() -> list[ObjectInfo]:
            keys = []
            for path in backend.files(start):
                key = path[root_len:]
                if key.startswith(RESERVED_PREFIX) or not key.startswith(prefix):
                    continue
                if _key_problem(key, prefix=False) is None:
                    keys.append(key)
            metas = backend.read_many([self._meta_path(k) for k in keys])
            out = []
            for key in sorted(keys):
                try:
                    out.append(self._recorded(key, metas[self._meta_path(key)]))
                except (FileNotFoundError, NotADirectoryError):
                    continue  # removed while we listed
            return out

        with self._translated(prefix, "list"):
            return self._retrying(f"list {prefix!r}", listing)

    # --- removing -------------------------------------------------------------------------

    def rm(self, key: str) -> None:
        """Remove the object under ``key`` (bytes, then sidecar); ObjectMissing if none."""
        check_key(key)
        backend = self._backend

        def remove() -> None:
            with self._lock(key):
                if backend.size(self._data_path(key)) is None:
                    raise self._missing(key)
                backend.remove(self._data_path(key))
                backend.remove(self._meta_path(key))

        with self._translated(key, "rm"):
            self._retrying(f"rm {key!r}", remove)
        log.info("datastore removed %s", key, extra={"action": "data.rm", "key": key})

    def _missing(self, key: str) -> ObjectMissing:
        return ObjectMissing(f"no object under key {key!r} in the datastore", key=key)
