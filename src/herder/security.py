"""Secrets, join tokens, the mutual pairing handshake and TLS for one herder cluster.

Everything that decides who may talk to whom lives here, apart from any I/O
loop, so that it can be read and tested on its own:

* **The secret.** One 32-byte random value per cluster, in a file only its
  owner can read. Whoever knows it may run code on the herd, so it is created
  with mode 0600 and refused when the file is readable by anyone else.
* **The join token** (``hd1.<secret>.<ca fingerprint>[@https://host:port]``)
  carries the secret and the fingerprint of the cluster's CA: an agent given
  only the token can find the coordinator, verify it, and prove itself.
* **The pairing handshake.** Coordinator and agent each send a nonce and each
  answer with an HMAC over both nonces; the two roles use different labels so
  that a proof can never be reflected back at the side that asked for it.
* **TLS.** The coordinator has its own CA and a leaf certificate made by a
  child process (:mod:`herder.certs`, the one module that loads the X.509
  library; :mod:`herder.tls_setup`) and serves them with ``ssl`` alone
  (:func:`server_context`). Clients and agents trust only that CA, fetched
  once over an unverified channel and accepted only if its SHA-256
  fingerprint is the one the token names; they need nothing but the standard
  library for it (:func:`pem_certificates`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import http.client
import os
import re
import secrets
import ssl
import stat
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from herder.errors import PinningError, SecurityError

__all__ = [
    "NONCE_BYTES",
    "SECRET_BYTES",
    "JoinToken",
    "ServedTls",
    "agent_proof",
    "agent_token_secret",
    "bearer_matches",
    "ca_fingerprint",
    "client_ssl_context",
    "coordinator_proof",
    "fetch_pinned_ca",
    "fingerprint_hex",
    "load_or_create_secret",
    "load_secret",
    "new_nonce",
    "pairing_key",
    "pinned_ca_at",
    "proofs_equal",
    "served_ca_pem",
    "server_context",
]

SECRET_BYTES = 32
"""Length of the cluster secret: 256 bits, the HMAC-SHA256 key size."""

NONCE_BYTES = 32
"""Length of a handshake nonce; fixed so that nonce concatenations are unambiguous."""

FINGERPRINT_BYTES = 32
"""Length of a CA fingerprint (SHA-256 of the certificate's DER)."""

TOKEN_VERSION = "hd1"
"""Prefix of join tokens; a new token format gets a new prefix, never a silent change."""

_COORDINATOR_LABEL = b"herder-v1-coordinator\0"
_AGENT_LABEL = b"herder-v1-agent\0"
_AGENT_TOKEN_LABEL = b"herder-v1-agent-token\0"
_PAIRING_LABEL = b"herder-v1-agent-token-pairing\0"

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_VERSION_LIKE = re.compile(r"hd[0-9]{1,4}")
_TOKEN_SHAPE = "hd1.<secret>.<fingerprint>[@https://host:port]"

_MAX_CA_BODY = 64 * 1024
_PEM_CERTIFICATE = re.compile(
    r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.DOTALL
)


# --------------------------------------------------------------------------- secret


def load_or_create_secret(path: Path) -> bytes:
    """Return the cluster secret stored at ``path``, creating it on first use.

    The file holds the secret as hex text. It is first written in full to a
    private temporary file (``O_CREAT | O_EXCL``, mode 0600) and then
    hard-linked into place, so the secret file never exists half-written and
    two processes starting together agree: the link fails for the loser, which
    then reads the winner's secret.
    """
    path = Path(path)
    if path.exists():
        return load_secret(path)
    make_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(secrets.token_bytes(SECRET_BYTES).hex() + "\n")
            file.flush()
            os.fsync(file.fileno())
        # Someone else won the race: their secret is the cluster's secret.
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return load_secret(path)


def load_secret(path: Path) -> bytes:
    """Read the cluster secret from ``path`` without ever creating it.

    Used by clients and agents, which must not invent a secret of their own.
    The file is refused if its mode lets group or others in, because a secret
    that others could have read is no longer a secret.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii")
    except FileNotFoundError as exc:
        raise SecurityError(f"secret file {path} does not exist", path=path) from exc
    except UnicodeDecodeError as exc:
        raise SecurityError(
            f"secret file {path} is malformed: expected {SECRET_BYTES * 2} hex characters",
            path=path,
        ) from exc
    check_private_mode(path, mode)
    try:
        secret = bytes.fromhex(text.strip())
    except ValueError as exc:
        raise SecurityError(
            f"secret file {path} is malformed: expected {SECRET_BYTES * 2} hex characters",
            path=path,
        ) from exc
    if len(secret) != SECRET_BYTES:
        raise SecurityError(
            f"secret file {path} is malformed: expected {SECRET_BYTES * 2} hex characters, "
            f"found {len(secret) * 2}",
            path=path,
        )
    return secret


# --------------------------------------------------------------------------- join token


@dataclass(frozen=True, repr=False)
class JoinToken:
    """What an agent or client needs to join a cluster: secret, CA fingerprint, address.

    The secret never appears in ``repr``/``str`` or in parse errors, since
    those end up in logs and tracebacks; only :meth:`encode` reveals it.
    """

    secret: bytes
    fingerprint: bytes
    url: str | None = None

    def __post_init__(self) -> None:
        """Refuse tokens that could never authenticate, at construction rather than at use."""
        if len(self.secret) != SECRET_BYTES:
            raise SecurityError(
                f"join token secret is {len(self.secret)} bytes, expected {SECRET_BYTES}"
            )
        if len(self.fingerprint) != FINGERPRINT_BYTES:
            raise SecurityError(
                f"join token fingerprint is {len(self.fingerprint)} bytes, "
                f"expected {FINGERPRINT_BYTES}"
            )
        if self.url is not None:
            _check_url(self.url)

    def encode(self) -> str:
        """Return the text form, ``hd1.<secret>.<fingerprint>`` plus ``@<url>`` if known."""
        text = f"{TOKEN_VERSION}.{_b64encode(self.secret)}.{_b64encode(self.fingerprint)}"
        return f"{text}@{self.url}" if self.url is not None else text

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        """Parse the text form; raise SecurityError with a one-line reason if it is not one.

        Messages name what is wrong but never echo the token's parts, since a
        mistyped token still holds a secret.
        """
        body, at, url = text.strip().partition("@")
        parts = body.split(".")
        if parts[0] != TOKEN_VERSION:
            if _VERSION_LIKE.fullmatch(parts[0]):
                raise SecurityError(
                    f"join token version {parts[0]!r} is not supported "
                    f"(this herder reads {TOKEN_VERSION!r})"
                )
            raise SecurityError(f"not a herder join token: expected {_TOKEN_SHAPE}")
        if len(parts) != 3:
            raise SecurityError(
                f"join token has {len(parts)} dot-separated parts, expected 3 ({_TOKEN_SHAPE})"
            )
        secret = _b64decode(parts[1], "secret")
        fingerprint = _b64decode(parts[2], "fingerprint")
        return cls(secret=secret, fingerprint=fingerprint, url=url if at else None)

    def without_url(self) -> JoinToken:
        """Return the same token with no address, for clusters found by discovery instead."""
        return JoinToken(secret=self.secret, fingerprint=self.fingerprint)

    def __eq__(self, other: object) -> bool:
        """Compare in constant time, so equality checks cannot leak the secret by timing."""
        if not isinstance(other, JoinToken):
            return NotImplemented
        same_secret = hmac.compare_digest(self.secret, other.secret)
        return same_secret and self.fingerprint == other.fingerprint and self.url == other.url

    def __hash__(self) -> int:
        """Hash by the public parts only; equal tokens still hash equal."""
        return hash((self.fingerprint, self.url))

    def __repr__(self) -> str:
        """Show what identifies the cluster, never the secret."""
        return f"JoinToken(fingerprint={fingerprint_hex(self.fingerprint)!r}, url={self.url!r})"

    def __str__(self) -> str:
        """Describe the token for humans, never showing the secret."""
        where = f" at {self.url}" if self.url is not None else ""
        return f"join token for CA {fingerprint_hex(self.fingerprint)}{where}"


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str, part: str) -> bytes:
    """Decode unpadded base64url strictly: one text per value, nothing silently skipped."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise SecurityError(f"join token {part} is not valid base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise SecurityError(f"join token {part} is not valid base64url") from exc
    if _b64encode(data) != text:
        raise SecurityError(f"join token {part} is not valid base64url")
    expected = SECRET_BYTES if part == "secret" else FINGERPRINT_BYTES
    if len(data) != expected:
        raise SecurityError(f"join token {part} is {len(data)} bytes, expected {expected}")
    return data


def _check_url(url: str) -> None:
    if not url:
        raise SecurityError("join token has an empty address after '@'")
    if not url.startswith("https://") or len(url) == len("https://"):
        raise SecurityError(f"join token address {url!r} must start with https://")


# --------------------------------------------------------------------------- handshake


def new_nonce() -> bytes:
    """Return a fresh random nonce; each side sends one so that no proof can be replayed."""
    return secrets.token_bytes(NONCE_BYTES)


def coordinator_proof(secret: bytes, agent_nonce: bytes, coordinator_nonce: bytes) -> bytes:
    """The coordinator's answer to the agent's nonce: proof that it knows the secret.

    The role label makes this differ from :func:`agent_proof` over the same
    nonces, so an attacker cannot bounce an agent's challenge back to it.
    """
    _check_nonces(agent_nonce, coordinator_nonce)
    return _hmac(secret, _COORDINATOR_LABEL + agent_nonce + coordinator_nonce)


def agent_proof(secret: bytes, coordinator_nonce: bytes, agent_nonce: bytes) -> bytes:
    """The agent's answer to the coordinator's nonce: proof that it knows the secret."""
    _check_nonces(coordinator_nonce, agent_nonce)
    return _hmac(secret, _AGENT_LABEL + coordinator_nonce + agent_nonce)


def proofs_equal(a: bytes, b: bytes) -> bool:
    """Compare two proofs in constant time, so a forger learns nothing from timing."""
    return hmac.compare_digest(a, b)


def bearer_matches(presented: str, secret: bytes) -> bool:
    """Tell whether a presented bearer token (a join token's text) carries ``secret``.

    Returns False rather than raising on anything malformed, because the
    input comes straight from an unauthenticated request header.
    """
    if not isinstance(presented, str):
        return False
    try:
        token = JoinToken.parse(presented)
    except SecurityError:
        return False
    return hmac.compare_digest(token.secret, secret)


# --------------------------------------------------------------------------- API tokens

API_TOKEN_VERSION = "hk1"
"""Prefix of API tokens (a role, an expiry, revocable; see herder.coordinator.auth)."""
_API_TOKEN_SHAPE = "hk1.<id>.<secret>.<fingerprint>[@https://host:port]"
_TOKEN_ID = re.compile(r"k-[0-9a-f]{16}")


@dataclass(frozen=True, eq=False)
class ApiToken:
    """A token for the API that is not the cluster secret: ``id`` names its record in the
    store (role, expiry, revocation); ``secret`` is random, stored only as a digest.

    Like a join token it carries the CA fingerprint (a client pins the
    coordinator with it) and may carry the address; :meth:`encode` is the
    only way to see the secret.
    """

    id: str
    secret: bytes
    fingerprint: bytes
    url: str | None = None

    def __post_init__(self) -> None:
        if not _TOKEN_ID.fullmatch(self.id):
            raise SecurityError("API token id is not k- and 16 hex digits")
        if len(self.secret) != SECRET_BYTES or len(self.fingerprint) != FINGERPRINT_BYTES:
            raise SecurityError(f"not a herder API token: expected {_API_TOKEN_SHAPE}")
        if self.url is not None:
            _check_url(self.url)

    @classmethod
    def new(cls, fingerprint: bytes, url: str | None = None) -> ApiToken:
        token_id = "k-" + secrets.token_hex(8)
        return cls(token_id, secrets.token_bytes(SECRET_BYTES), fingerprint, url)

    def encode(self) -> str:
        text = (
            f"{API_TOKEN_VERSION}.{self.id}.{_b64encode(self.secret)}."
            f"{_b64encode(self.fingerprint)}"
        )
        return f"{text}@{self.url}" if self.url is not None else text

    @classmethod
    def parse(cls, text: str) -> ApiToken:
        body, at, url = text.strip().partition("@")
        parts = body.split(".")
        if len(parts) != 4 or parts[0] != API_TOKEN_VERSION:
            raise SecurityError(f"not a herder API token: expected {_API_TOKEN_SHAPE}")
        return cls(
            parts[1],
            _b64decode(parts[2], "secret"),
            _b64decode(parts[3], "fingerprint"),
            url if at else None,
        )

    @property
    def digest(self) -> str:
        """What the store keeps of the secret."""
        return token_digest(self.secret)

    def without_url(self) -> ApiToken:
        return ApiToken(self.id, self.secret, self.fingerprint)

    def __repr__(self) -> str:
        return f"ApiToken(id={self.id!r}, url={self.url!r})"

    __str__ = __repr__


def agent_token_secret(cluster_secret: bytes, token_id: str) -> bytes:
    """The secret of the ``agent`` token ``token_id``: HMAC(cluster secret, label + id).

    An agent token pairs nodes, and pairing is mutual: the coordinator must
    prove it knows something only the token's holder knows, without either
    side sending it. The store keeps only a digest of each token's secret,
    and that digest cannot be the shared key: whoever read the store (a
    backup, a replica) could then pair as a node, take tasks and forge
    results. So an agent token's secret is not random but derived from the
    cluster secret and the token's id. It is as unpredictable as a random one
    to anyone without the cluster secret (HMAC-SHA256 is a PRF), the store
    still holds only its digest, and the coordinator derives it again at each
    pairing. Revocation and expiry stay in the token's record, checked at
    each pairing and closing the node's session when revoked.
    """
    return _hmac(cluster_secret, _AGENT_TOKEN_LABEL + token_id.encode("ascii"))


def pairing_key(token_secret: bytes, token_id: str) -> bytes:
    """The key an agent token's holder and the coordinator prove themselves with.

    Derived (not the token's secret itself, which is also a bearer for the
    datastore routes) and bound to the token's id, so a proof made for one
    token means nothing for another, nor for the cluster secret's handshake.
    The proofs are :func:`coordinator_proof` and :func:`agent_proof` under
    this key: HMACs over both sides' fresh nonces, so a recorded handshake
    cannot be replayed and the secret never crosses the wire.
    """
    return _hmac(token_secret, _PAIRING_LABEL + token_id.encode("ascii"))


def token_digest(secret: bytes) -> str:
    """The SHA-256 of a token's random secret (256 bits: no salt or slow hash needed)."""
    return hashlib.sha256(secret).hexdigest()


def parse_token(text: str) -> JoinToken | ApiToken:
    """A join token (the cluster secret: every right) or an API token (a role)."""
    if text.strip().startswith(API_TOKEN_VERSION + "."):
        return ApiToken.parse(text)
    return JoinToken.parse(text)


# --------------------------------------------------------------------------- sealed values

_SEALED = "sealed:v1:"


def seal(secret: bytes, text: str) -> str:
    """``text`` encrypted with a key derived from the cluster secret (AES-GCM), so a
    secret variable is not at rest in the store in the clear; agents unseal it."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = secrets.token_bytes(12)
    sealed = AESGCM(_sealing_key(secret)).encrypt(nonce, text.encode(), None)
    return _SEALED + _b64encode(nonce + sealed)


def unseal(secret: bytes, value: str) -> str:
    """The text of a :func:`seal` ed value (a value that is not sealed is returned as is)."""
    if not value.startswith(_SEALED):
        return value
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    body = value[len(_SEALED) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        return AESGCM(_sealing_key(secret)).decrypt(raw[:12], raw[12:], None).decode()
    except (InvalidTag, binascii.Error, ValueError) as exc:
        raise SecurityError("a sealed value does not open with this cluster's secret") from exc


def _sealing_key(secret: bytes) -> bytes:
    return _hmac(secret, b"herder sealed values v1")


def _check_nonces(first: bytes, second: bytes) -> None:
    """Fixed-length nonces keep ``first + second`` unambiguous."""
    if len(first) != NONCE_BYTES or len(second) != NONCE_BYTES:
        raise SecurityError(f"handshake nonces must be {NONCE_BYTES} bytes")


def _hmac(secret: bytes, message: bytes) -> bytes:
    return hmac.new(secret, message, hashlib.sha256).digest()


# --------------------------------------------------------------------------- TLS


def ca_fingerprint(ca_pem: bytes) -> bytes:
    """SHA-256 of the DER of the first certificate in ``ca_pem``."""
    return hashlib.sha256(first_certificate_der(ca_pem)).digest()


def pem_certificates(pem: bytes) -> list[bytes]:
    """The DER of each PEM certificate block in ``pem``, in order (text around them ignored).

    Only the blocks are found and base64-decoded here; the ``ssl`` module parses
    a certificate when a context loads it, and a pinned fingerprint covers its
    exact bytes. Reading PEM this way keeps agents and clients from loading
    the X.509 library (``cryptography``, some 10 MB and a tenth of a second):
    they only compare fingerprints and load a CA.
    """
    text = pem.decode("ascii", errors="replace")
    out = []
    for body in _PEM_CERTIFICATE.findall(text):
        try:
            out.append(base64.b64decode("".join(body.split()), validate=True))
        except (binascii.Error, ValueError):
            continue
    return out


def first_certificate_der(pem: bytes, path: Path | None = None) -> bytes:
    """The DER of the first certificate in ``pem``; SecurityError naming ``path`` if none."""
    found = pem_certificates(pem)
    if not found:
        where = f" in {path}" if path is not None else ""
        raise SecurityError(f"no PEM certificate found{where}", path=path)
    return found[0]


def fingerprint_hex(fp: bytes) -> str:
    """Short human form of a fingerprint (16 hex characters), for messages and logs."""
    return fp.hex()[:16]


def client_ssl_context(
    ca_pem: bytes, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """A TLS client context that trusts the cluster CA and nothing else.

    With ``cert`` and ``key`` it also presents that client certificate (an
    agent of a coordinator that asks for mutual TLS).

    Host names are not checked: the CA is private to one cluster, created by
    its coordinator and pinned by fingerprint through the join token, so any
    certificate it signed is the coordinator (or one of its agents), whatever
    address it was reached at. Only the first certificate of ``ca_pem`` is
    trusted, the one :func:`ca_fingerprint` covers.
    """
    ca = ssl.DER_cert_to_PEM_cert(first_certificate_der(ca_pem))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        context.load_verify_locations(cadata=ca)
    except ssl.SSLError as exc:
        raise SecurityError(f"the cluster CA is not a valid certificate: {exc}") from exc
    if cert is not None:
        try:
            if key is not None:
                check_private_mode(key, key.stat().st_mode)
            context.load_cert_chain(str(cert), str(key) if key is not None else None)
        except (OSError, ssl.SSLError) as exc:
            raise SecurityError(
                f"cannot use client certificate {cert} with key {key}: {exc}", path=cert
            ) from exc
    return context


@dataclass(frozen=True)
class ServedTls:
    """What the coordinator serves with: its certificate and key, and the CA that
    signed it (the one join tokens pin, and client certificates are checked against).

    Made or checked by :mod:`herder.certs` in a process of its own
    (:mod:`herder.tls_setup`); serving needs only these files and ``ssl``.
    """

    ca_cert: Path
    cert: Path
    key: Path


def server_context(tls: ServedTls, *, client_certs: bool) -> ssl.SSLContext:
    """The coordinator's TLS context; with ``client_certs`` it asks each client for a
    certificate signed by the CA (optional at this level: the agent route insists)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert), str(tls.key))
    if client_certs:
        context.verify_mode = ssl.CERT_OPTIONAL
        context.verify_flags |= ssl.VERIFY_X509_STRICT
        context.load_verify_locations(cadata=served_ca_pem(tls).decode("ascii"))
    return context


def served_ca_pem(tls: ServedTls) -> bytes:
    """The CA certificate alone, as PEM: what ``/v1/ca`` serves and tokens pin."""
    try:
        pem = tls.ca_cert.read_bytes()
    except OSError as exc:
        raise SecurityError(f"cannot read the CA certificate {tls.ca_cert}: {exc}") from exc
    return ssl.DER_cert_to_PEM_cert(first_certificate_der(pem, tls.ca_cert)).encode("ascii")


def pinned_ca_at(path: Path, fingerprint: bytes) -> bytes | None:
    """The CA certificate in ``path`` if it is the pinned one (one certificate whose
    fingerprint is ``fingerprint``), else None: then it is fetched instead.

    A client or agent on its coordinator's machine finds the CA in the herder
    home and so skips :func:`fetch_pinned_ca`: a TLS connection and a request
    less for each, at the moment the coordinator is busiest (a cold start, where
    the fetch took 60 ms). The pin decides, as it does for a fetched one.
    """
    try:
        pem = path.read_bytes()
    except OSError:
        return None  # another machine than the coordinator's, or its CA is elsewhere
    found = pem_certificates(pem)
    if len(found) != 1 or not hmac.compare_digest(hashlib.sha256(found[0]).digest(), fingerprint):
        return None
    return pem


def fetch_pinned_ca(url: str, fingerprint: bytes, timeout: float = 10.0) -> bytes:
    """Fetch the coordinator's CA from ``<url>/v1/ca`` and accept it only if pinned.

    This is the bootstrap step, so the channel is not verified: there is no
    trusted CA yet. That is safe because the answer is checked against the
    fingerprint from the join token, and the CA certificate is public anyway;
    an impostor may relay it but cannot present a leaf signed by it afterwards.
    Network failures (``OSError``, including TLS errors) propagate so that the
    caller can retry with backoff; HTTP-level failures raise SecurityError.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise SecurityError(f"coordinator address {url!r} must be https://host[:port]", url=url)
    try:
        port = parts.port
    except ValueError as exc:
        raise SecurityError(f"coordinator address {url!r} has a bad port", url=url) from exc
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    connection = http.client.HTTPSConnection(parts.hostname, port, timeout=timeout, context=context)
    try:
        connection.request("GET", parts.path.rstrip("/") + "/v1/ca")
        response = connection.getresponse()
        body = response.read(_MAX_CA_BODY + 1)
        status = response.status
    except http.client.HTTPException as exc:
        raise SecurityError(
            f"coordinator at {url} sent a bad HTTP response to /v1/ca: {exc!r}", url=url
        ) from exc
    finally:
        connection.close()
    if status != 200:
        raise SecurityError(
            f"coordinator at {url} answered /v1/ca with HTTP {status}", url=url, status=status
        )
    if len(body) > _MAX_CA_BODY:
        raise SecurityError(f"coordinator at {url} sent an oversized CA", url=url)
    certificates = pem_certificates(body)
    if not certificates:
        raise SecurityError(
            f"coordinator at {url} did not send a PEM certificate for /v1/ca", url=url
        )
    presented = hashlib.sha256(certificates[0]).digest()
    if not hmac.compare_digest(presented, fingerprint):
        raise PinningError(
            f"coordinator at {url} presented CA fingerprint {fingerprint_hex(presented)}.. "
            f"but the token names {fingerprint_hex(fingerprint)}..",
            url=url,
        )
    if len(certificates) != 1:
        raise PinningError(
            f"coordinator at {url} sent {len(certificates)} certificates for /v1/ca, expected 1",
            url=url,
        )
    return body


# --------------------------------------------------------------------------- files


def make_private_dir(directory: Path) -> None:
    """Create ``directory`` (0700) if needed; an existing directory is left as it is."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)


def check_private_mode(path: Path, mode: int) -> None:
    if stat.S_IMODE(mode) & 0o077:
        raise SecurityError(
            f"{path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {path}",
            path=path,
        )


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write a private temporary file, then rename it over ``path``: never a torn
    file, and never a key readable by others for a moment."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``, serialising first starts across processes."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
