"""Certificates for users who bring their own PKI, and the server side of TLS.

By default the coordinator makes its own CA (:func:`herder.security.ensure_tls`)
and nobody has to think about certificates. Some sites want to hold the CA
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
coordinator serves with them, and :func:`server_context` makes the server's
TLS context: client certificates are asked for (``CERT_OPTIONAL``) only with
mutual TLS on, so that REST clients and browsers without one still connect.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from herder import security
from herder.errors import SecurityError

__all__ = [
    "ServedTls",
    "ca_pem",
    "issue_agent",
    "issue_server",
    "served_tls",
    "server_context",
    "write_ca",
]

CA_DAYS = 3650
LEAF_DAYS = 825
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class ServedTls:
    """What the coordinator serves with: its certificate and key, and the CA that
    signed it (the one join tokens pin, and client certificates are checked against)."""

    ca_cert: Path
    cert: Path
    key: Path


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
    cert, key = security.build_ca(f"{name} {secrets.token_hex(4)}", days=CA_DAYS)
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
    cert, key = security.build_leaf(
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


def server_context(tls: ServedTls, *, client_certs: bool) -> ssl.SSLContext:
    """The coordinator's TLS context; with ``client_certs`` it asks each client for a
    certificate signed by the CA (optional at this level: the agent route insists)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert), str(tls.key))
    if client_certs:
        context.verify_mode = ssl.CERT_OPTIONAL
        context.verify_flags |= ssl.VERIFY_X509_STRICT
        context.load_verify_locations(cadata=ca_pem(tls).decode("ascii"))
    return context


def ca_pem(tls: ServedTls) -> bytes:
    """The CA certificate alone, as PEM: what ``/v1/ca`` serves and tokens pin."""
    return _read_certificates(tls.ca_cert)[0].public_bytes(serialization.Encoding.PEM)


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
    if stat.S_IMODE(mode) & 0o077:
        raise SecurityError(
            f"{key_path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {key_path}",
            path=key_path,
        )
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SecurityError(
            f"{key_path} is not an unencrypted PEM private key", path=key_path
        ) from exc
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, public) != cert.public_key().public_bytes(der, public):
        raise SecurityError(f"key {key_path} does not belong to {cert_path}", path=key_path)
    return cert, key


def _write_pair(
    cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    # key first: a crash in between leaves a key with no certificate, never the reverse
    security.write_atomic(key_path, security.private_pem(key), 0o600)
    security.write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
