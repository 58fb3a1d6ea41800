"""The datastore seen from outside the coordinator: :class:`DataClient`.

The Python client, the CLI and workers on other machines use it. It talks
only to the coordinator's ``/v1/data`` routes, over HTTPS with the pinned
cluster CA and the bearer token, and verifies every byte it fetches against
the sha256 recorded when the object was put. Keys, :class:`ObjectInfo` and
the errors are the datastore's own (:mod:`herder.datastore`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import secrets
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx

from herder.datastore import (
    ATTEMPTS,
    BACKOFF_CAP_S,
    BACKOFF_S,
    CHUNK,
    RETRY_BUDGET_S,
    ObjectInfo,
    check_key,
    check_prefix,
)
from herder.errors import (
    AuthenticationError,
    BadKey,
    ChecksumMismatch,
    ClientClosed,
    DatastoreError,
    DatastoreFull,
    DatastoreUnavailable,
    ObjectMissing,
)
from herder.security import client_ssl_context

__all__ = ["DataClient"]

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


_STATUS_ERRORS: dict[int, type[DatastoreError]] = {
    400: BadKey,
    404: ObjectMissing,
    503: DatastoreUnavailable,
    507: DatastoreFull,
}
_CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def _key_url(key: str) -> str:
    return "/v1/data/" + urllib.parse.quote(key, safe="/")


class DataClient:
    """The datastore through the coordinator: ``with DataClient(url, bearer, ca) as data: ...``.

    Synchronous (usable from worker processes and threads; async code calls
    it through ``asyncio.to_thread``). Transfers stream in bounded memory;
    every fetch is checked against the recorded sha256 and every put against
    the digest the coordinator computed. A coordinator that cannot be reached
    is retried a few times with capped backoff, then reported as
    :class:`DatastoreUnavailable`.
    """

    def __init__(self, url: str, bearer: str, ca_pem: bytes, *, timeout: float = 60) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url,
            verify=client_ssl_context(ca_pem),
            headers={"Authorization": f"Bearer {bearer}"},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        )
        self._closed = False

    def __enter__(self) -> DataClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._http.close()

    # --- plumbing ----------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        *,
        key: str,
        content: Callable[[], bytes | Iterator[bytes]] | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """One request; connection failures (nothing reached the coordinator) are retried."""
        if self._closed:
            raise ClientClosed("the data client is closed")
        started = time.monotonic()
        for attempt in range(1, ATTEMPTS + 1):
            request = self._http.build_request(
                method,
                path,
                content=content() if content is not None else None,
                headers=dict(headers or {}),
                params=dict(params or {}),
            )
            try:
                response = self._http.send(request, stream=stream)
            except _CONNECT_ERRORS as exc:
                elapsed = time.monotonic() - started
                if attempt == ATTEMPTS or elapsed > RETRY_BUDGET_S:
                    raise DatastoreUnavailable(
                        f"coordinator at {self.url} is unreachable: {attempt} attempts over "
                        f"{elapsed:.1f}s failed ({type(exc).__name__}: {exc})",
                        key=key,
                        url=self.url,
                    ) from exc
                time.sleep(min(BACKOFF_S * 2 ** (attempt - 1), BACKOFF_CAP_S))
                continue
            except httpx.TransportError as exc:
                raise DatastoreUnavailable(
                    f"connection to the coordinator at {self.url} failed during {method} "
                    f"of {key!r}: {type(exc).__name__}: {exc}",
                    key=key,
                    url=self.url,
                ) from exc
            if response.status_code >= 400:
                try:
                    raise self._error(response, key)
                finally:
                    response.close()
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _error(self, response: httpx.Response, key: str) -> Exception:
        with contextlib.suppress(httpx.HTTPError):
            response.read()
        try:
            body = response.json()
            message = str(body.get("error") or body.get("detail") or body)
        except (ValueError, AttributeError, httpx.ResponseNotRead):
            message = response.text.strip() or response.reason_phrase
        status = response.status_code
        if status in (401, 403):
            return AuthenticationError(f"coordinator refused the credentials: {message}")
        cls = _STATUS_ERRORS.get(status, DatastoreError)
        if cls is DatastoreError:
            message = f"coordinator answered {status} for {key!r}: {message}"
        return cls(message, key=key, status=status)

    @staticmethod
    def _info(response: httpx.Response) -> ObjectInfo:
        try:
            data = response.json()
        except ValueError as exc:
            raise DatastoreError(f"coordinator sent malformed JSON: {exc}") from exc
        return ObjectInfo.from_json(data)

    # --- writing ---------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> ObjectInfo:
        """Store ``data`` under ``key``; returns what the coordinator recorded."""
        check_key(key)
        digest = hashlib.sha256(data).hexdigest()
        info = self._info(self._send("PUT", _key_url(key), key=key, content=lambda: data))
        return self._checked_put(key, info, len(data), digest)

    def put_file(self, key: str, path: str | os.PathLike[str]) -> ObjectInfo:
        """Stream the local file at ``path`` to ``key`` (bounded memory)."""
        check_key(key)
        source = Path(path)
        size = source.stat().st_size
        digests: list[Any] = []

        def body() -> Iterator[bytes]:
            digest = hashlib.sha256()
            digests.append(digest)
            with source.open("rb") as file:
                while block := file.read(CHUNK):
                    digest.update(block)
                    yield block

        response = self._send(
            "PUT",
            _key_url(key),
            key=key,
            content=body,
            headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
        )
        info = self._info(response)
        return self._checked_put(key, info, size, digests[-1].hexdigest())

    @staticmethod
    def _checked_put(key: str, info: ObjectInfo, size: int, sha256: str) -> ObjectInfo:
        if info.sha256 != sha256 or info.size != size:
            raise ChecksumMismatch(
                f"put {key!r}: the coordinator stored {info.size} bytes with sha256 "
                f"{info.sha256[:16]}.. but {size} bytes with sha256 {sha256[:16]}.. were sent",
                key=key,
                expected=sha256,
                actual=info.sha256,
            )
        return info

    # --- reading --------------------------------------------------------------------------

    def write_to(self, key: str, out: IO[bytes]) -> ObjectInfo:
        """Stream the object under ``key`` into ``out``, verifying it as it goes.

        The check can only conclude at the end: on ChecksumMismatch the caller
        must discard what was written (:meth:`get_file` does).
        """
        check_key(key)
        response = self._send("GET", _key_url(key), key=key, stream=True)
        try:
            expected = response.headers.get("x-herder-sha256", "")
            length = response.headers.get("content-length")
            modified = float(response.headers.get("x-herder-modified") or 0.0)
            if not expected or length is None:
                raise DatastoreError(f"coordinator sent {key!r} without its size and sha256")
            digest = hashlib.sha256()
            size = 0
            try:
                for block in response.iter_bytes(CHUNK):
                    out.write(block)
                    digest.update(block)
                    size += len(block)
            except httpx.TransportError as exc:
                raise DatastoreUnavailable(
                    f"the transfer of {key!r} from {self.url} broke off after {size} bytes: "
                    f"{type(exc).__name__}: {exc}",
                    key=key,
                ) from exc
        finally:
            response.close()
        actual = digest.hexdigest()
        if actual != expected or size != int(length):
            raise ChecksumMismatch(
                f"object {key!r} is corrupt: got {size} bytes with sha256 {actual[:16]}.., "
                f"expected {length} bytes with sha256 {expected[:16]}..",
                key=key,
                expected=expected,
                actual=actual,
            )
        return ObjectInfo(key, size, actual, modified)

    def get_file(self, key: str, path: str | os.PathLike[str]) -> ObjectInfo:
        """Fetch ``key`` into the local file ``path`` (parents made as needed), all or nothing.

        The bytes go to a temporary file beside ``path``; only once their
        sha256 matches the recorded one is it renamed into place. On any
        failure no file is left behind and an existing ``path`` is untouched.
        A full local disk is reported as :class:`DatastoreFull` naming
        ``path``; other local errors propagate as ``OSError``.
        """
        check_key(key)
        target = Path(path)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.part")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("xb") as file:
                info = self.write_to(key, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                raise DatastoreFull(
                    f"no space left to fetch {key!r} into {target}; nothing was kept",
                    key=key,
                    path=str(target),
                ) from exc
            raise
        finally:
            tmp.unlink(missing_ok=True)
        return info

    def cat(self, key: str) -> bytes:
        """The whole object under ``key`` in memory, verified."""
        buffer = io.BytesIO()
        self.write_to(key, buffer)
        return buffer.getvalue()

    def info(self, key: str) -> ObjectInfo:
        check_key(key)
        path = "/v1/data-info/" + urllib.parse.quote(key, safe="/")
        return self._info(self._send("GET", path, key=key))

    def exists(self, key: str) -> bool:
        try:
            self.info(key)
        except ObjectMissing:
            return False
        return True

    def ls(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix``, sorted by key."""
        check_prefix(prefix)
        response = self._send("GET", "/v1/data", key=prefix, params={"prefix": prefix})
        try:
            rows = response.json()
        except ValueError as exc:
            raise DatastoreError(f"coordinator sent a malformed listing: {exc}") from exc
        return [ObjectInfo.from_json(row) for row in rows]

    def rm(self, key: str) -> None:
        """Remove the object under ``key``; ObjectMissing if there is none."""
        check_key(key)
        self._send("DELETE", _key_url(key), key=key).close()
