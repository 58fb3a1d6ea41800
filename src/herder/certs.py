"""Certificates: the coordinator's own CA, the sets of ``herder certs``, a user's own checked.

This is the one module that loads the X.509 library (``cryptography``); it
makes and checks certificates, and only ``herder certs`` and a short-lived
child of ``herder up`` (``python -m herder.certs``, see :mod:`herder.tls_setup`
and :func:`main`) import it. The coordinator, its agents and clients only
pin a CA by fingerprint and load files into an ``ssl`` context
(:mod:`herder.security`, standard library only).

By default the coordinator makes its own CA (:func:`ensure_tls`) and nobody
has to think about certificates. Some sites want to hold the CA
themselves: issue the coordinator's certificate from it, and give each node a
client certificate (mutual TLS, ``herder up --agent-mtls``). ``herder certs``
writes such a set with this module:

* a CA (``ca.pem``, ``ca.key``; kept if it is there already, since every join
  token handed out names its fingerprint);
* a server certificate (``server.pem``, ``server.key``) with the given host
  names and addresses as subject alternative names;
* one client certificate per node (``agent-<name>.pem``, ``agent-<name>.key``),
  its common name the node's name.

Keys are written 0600, atomically. :func:`served_tls` checks files a user
gives ``herder up --tls-cert/--tls-key/--tls-ca`` (the key belongs to the
certificate, the CA signed it, nobody else can read the key) before the
coordinator serves with them.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import secrets
import socket
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from herder import security
from herder.errors import SecurityError
from herder.security import ServedTls

__all__ = [
    "TlsFiles",
    "build_ca",
    "build_leaf",
    "ensure_tls",
    "issue_agent",
    "issue_server",
    "main",
    "served_tls",
    "write_ca",
]

CA_DAYS = 3650
LEAF_DAYS = 825
# the coordinator's own CA and its leaf (renewed at start when this close to expiry)
_OWN_LEAF_DAYS = 730
_LEAF_RENEW_BEFORE = datetime.timedelta(days=30)
_CLOCK_SKEW = datetime.timedelta(minutes=5)
_SPKI_DER = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


# --------------------------------------------------------------------------- the coordinator's own


@dataclass(frozen=True)
class TlsFiles:
    """Where a node's TLS material lives: the cluster CA and this node's leaf."""

    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path

    def fingerprint(self) -> bytes:
        """The CA fingerprint that join tokens carry."""
        return security.ca_fingerprint(self.ca_cert.read_bytes())


def ensure_tls(directory: Path, hosts: Sequence[str] = ()) -> TlsFiles:
    """Make sure ``directory`` holds a CA and a leaf certificate valid for ``hosts``.

    The CA is created once and never replaced while ``ca.pem`` exists: every
    join token handed out names its fingerprint. The leaf is cheap and is
    re-issued whenever it does not fit (missing host, other CA, wrong key,
    close to expiry). A lock file serialises processes starting together, and
    every file is replaced atomically, so a crash never leaves a torn file.
    """
    directory = Path(directory)
    security.make_private_dir(directory)
    files = TlsFiles(
        ca_cert=directory / "ca.pem",
        ca_key=directory / "ca.key",
        cert=directory / "cert.pem",
        key=directory / "key.pem",
    )
    names = _leaf_names(hosts)
    with security.locked(directory / ".tls.lock"):
        ca_cert, ca_key = _ensure_ca(files)
        if not _leaf_fits(files, ca_cert, names):
            _write_leaf(files, ca_cert, ca_key, names)
    return files


def build_ca(common_name: str, *, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new self-signed CA (P-256) that may sign leaves but no further CAs.

    Shared by the CA a coordinator makes for itself and by ``herder certs``.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "herder"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def build_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    common_name: str,
    usages: list[x509.ObjectIdentifier],
    names: list[x509.GeneralName],
    days: int,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new key (P-256) and its certificate signed by ``ca_cert``, for ``names``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "herder"),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; a leaf signs its handshakes, nothing else."""
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _ensure_ca(files: TlsFiles) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load the CA, or create it if (and only if) ``ca.pem`` does not exist."""
    if files.ca_cert.exists():
        if not files.ca_key.exists():
            raise SecurityError(
                f"CA key {files.ca_key} is missing but {files.ca_cert} exists; "
                "refusing to replace a CA that join tokens already name",
                path=files.ca_key,
            )
        ca_cert, key = _load_pair(files.ca_cert, files.ca_key)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SecurityError(f"key file {files.ca_key} is not an EC private key")
        return ca_cert, key
    ca_cert, ca_key = build_ca(f"herder CA {secrets.token_hex(4)}", days=CA_DAYS)
    # key first (_write_pair): a crash in between leaves no ca.pem, so the next start retries
    _write_pair(files.ca_cert, files.ca_key, ca_cert, ca_key)
    return ca_cert, ca_key


def _leaf_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """The SANs a leaf must carry: local names plus each requested host."""
    wanted = ["localhost", socket.gethostname(), "127.0.0.1", "::1", *hosts]
    names: list[x509.GeneralName] = []
    for host in (h.strip() for h in wanted):
        name = _general_name(host) if host else None
        if name is not None and name not in names:
            names.append(name)
    return names


def _leaf_fits(files: TlsFiles, ca_cert: x509.Certificate, names: list[x509.GeneralName]) -> bool:
    """Whether the existing leaf can be kept: same CA, own key, all names, not near expiry."""
    if not (files.cert.exists() and files.key.exists()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        key = _load_key(files.key)
        cert.verify_directly_issued_by(ca_cert)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    if _public_der(key) != _public_der(cert.public_key()):
        return False
    if cert.not_valid_after_utc - _now() < _LEAF_RENEW_BEFORE:
        return False
    present = set(sans)
    return all(name in present for name in names)


def _write_leaf(
    files: TlsFiles,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    names: list[x509.GeneralName],
) -> None:
    cert, key = build_leaf(
        ca_cert,
        ca_key,
        common_name="herder node",
        usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        names=names,
        days=_OWN_LEAF_DAYS,
    )
    # key first (_write_pair): a crash in between leaves a key that does not match
    # cert.pem, which _leaf_fits notices, so the next start issues a fresh pair
    _write_pair(files.cert, files.key, cert, key)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    security.check_private_mode(path, path.stat().st_mode)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise SecurityError(f"key file {path} is not a PEM private key", path=path) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SecurityError(f"key file {path} is not an EC private key", path=path)
    return key


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A private key as unencrypted PKCS#8 PEM (the file itself is kept 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public_der(key: ec.EllipticCurvePrivateKey | CertificatePublicKeyTypes) -> bytes:
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(*_SPKI_DER)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# --------------------------------------------------------------------------- issuing


def write_ca(directory: Path, name: str = "herder CA") -> tuple[Path, Path]:
    """Make sure ``directory`` holds a CA (``ca.pem``, ``ca.key``); return both paths.

    An existing CA is kept (and checked: its key must match and be private),
    because replacing it would orphan every certificate and join token made
    from it.
    """
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    if cert_path.exists():
        _load_pair(cert_path, key_path)
        return cert_path, key_path
    cert, key = build_ca(f"{name} {secrets.token_hex(4)}", days=CA_DAYS)
    _write_pair(cert_path, key_path, cert, key)
    return cert_path, key_path


def issue_server(directory: Path, hosts: list[str]) -> tuple[Path, Path]:
    """Write ``server.pem``/``server.key`` signed by the CA in ``directory``, valid for
    ``hosts`` (DNS names or IP addresses; at least one)."""
    if not hosts:
        raise SecurityError("a server certificate needs at least one --host", field="host")
    names = [_general_name(h) for h in dict.fromkeys(h.strip() for h in hosts)]
    first = hosts[0].strip()
    return _issue(
        Path(directory),
        "server",
        common_name=first,
        usages=[ExtendedKeyUsageOID.SERVER_AUTH],
        names=names,
    )


def issue_agent(directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``agent-<name>.pem``/``.key``: a client certificate for the node ``name``."""
    if not _NODE_NAME.fullmatch(name):
        raise SecurityError(
            f"agent name {name!r} must be 1-64 letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit)",
            field="agent",
        )
    return _issue(
        Path(directory),
        f"agent-{name}",
        common_name=name,
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
        names=[x509.DNSName(name.lower())],
    )


def _issue(
    directory: Path,
    stem: str,
    *,
    common_name: str,
    usages: list[x509.ObjectIdentifier],
    names: list[x509.GeneralName],
) -> tuple[Path, Path]:
    ca_cert, ca_key = _load_pair(directory / "ca.pem", directory / "ca.key")
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise SecurityError(f"{directory / 'ca.key'} is not an EC key (herder certs makes one)")
    cert, key = build_leaf(
        ca_cert, ca_key, common_name=common_name, usages=usages, names=names, days=LEAF_DAYS
    )
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    _write_pair(cert_path, key_path, cert, key)
    return cert_path, key_path


def _general_name(host: str) -> x509.GeneralName:
    if not host:
        raise SecurityError("an empty --host was given", field="host")
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    try:
        return x509.DNSName(host.lower().encode("idna").decode("ascii"))
    except UnicodeError as exc:
        raise SecurityError(f"host {host!r} is not a valid DNS name", field="host") from exc


# --------------------------------------------------------------------------- serving


def served_tls(cert: Path, key: Path, ca: Path) -> ServedTls:
    """Check the files a user gave the coordinator to serve with, and name them.

    Refused with the file named: a key others can read, a key that is not the
    certificate's, a CA that is not a CA, a certificate the CA did not sign
    (agents would then refuse the coordinator), or a CA file with several
    certificates (a join token pins exactly one).
    """
    cert, key, ca = Path(cert), Path(key), Path(ca)
    ca_certs = _read_certificates(ca)
    if len(ca_certs) != 1:
        raise SecurityError(
            f"{ca} holds {len(ca_certs)} certificates; give the one CA that signed "
            "the server certificate (join tokens pin exactly one)",
            path=ca,
        )
    ca_cert = ca_certs[0]
    try:
        is_ca = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise SecurityError(f"{ca} is not a CA certificate (basicConstraints CA:TRUE)", path=ca)
    leaf, _ = _load_pair(cert, key)
    try:
        leaf.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise SecurityError(f"{cert} is not signed by the CA in {ca}", path=cert) from exc
    return ServedTls(ca_cert=ca, cert=cert, key=key)


# --------------------------------------------------------------------------- files


def _read_certificates(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except FileNotFoundError as exc:
        raise SecurityError(f"certificate file {path} does not exist", path=path) from exc
    except ValueError as exc:
        raise SecurityError(f"no PEM certificate in {path}", path=path) from exc


def _load_pair(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, PrivateKeyTypes]:
    cert = _read_certificates(cert_path)[0]
    try:
        mode = key_path.stat().st_mode
    except FileNotFoundError as exc:
        raise SecurityError(f"key file {key_path} does not exist", path=key_path) from exc
    security.check_private_mode(key_path, mode)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SecurityError(
            f"{key_path} is not an unencrypted PEM private key", path=key_path
        ) from exc
    if key.public_key().public_bytes(*_SPKI_DER) != cert.public_key().public_bytes(*_SPKI_DER):
        raise SecurityError(f"key {key_path} does not belong to {cert_path}", path=key_path)
    return cert, key


def _write_pair(
    cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    # key first: a crash in between leaves a key with no certificate, never the reverse
    security.write_atomic(key_path, _private_pem(key), 0o600)
    security.write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


# --------------------------------------------------------------------------- the child of herder up


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m herder.certs own DIR HOST...`` or ``... given CERT KEY CA``: settle
    what the coordinator serves with (:func:`ensure_tls`, :func:`served_tls`) and
    print its three paths as JSON; a refusal goes to stderr, exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if len(args) >= 2 and args[0] == "own":
            own = ensure_tls(Path(args[1]), args[2:])
            served = ServedTls(ca_cert=own.ca_cert, cert=own.cert, key=own.key)
        elif len(args) == 4 and args[0] == "given":
            served = served_tls(Path(args[1]), Path(args[2]), Path(args[3]))
        else:
            print(
                "usage: python -m herder.certs own DIR [HOST...] | given CERT KEY CA",
                file=sys.stderr,
            )
            return 2
    except (SecurityError, OSError) as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(json.dumps({k: str(v) for k, v in asdict(served).items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
