"""Tests for herder.security: real files, real certificates, a real TLS server; no mocks."""

from __future__ import annotations

import base64
import ipaddress
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509

from herder.certs import TlsFiles, ensure_tls
from herder.errors import PinningError, SecurityError
from herder.security import (
    SECRET_BYTES,
    JoinToken,
    agent_proof,
    bearer_matches,
    ca_fingerprint,
    client_ssl_context,
    coordinator_proof,
    fetch_pinned_ca,
    fingerprint_hex,
    load_or_create_secret,
    load_secret,
    new_nonce,
    proofs_equal,
)

SECRET = bytes(range(32))
FINGERPRINT = bytes(range(100, 132))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_no_secret(message: str, secret: bytes = SECRET) -> None:
    assert b64(secret) not in message
    assert secret.hex() not in message
    assert "\n" not in message


# --------------------------------------------------------------------------- secret


def test_secret_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "herder" / "secret"
    secret = load_or_create_secret(path)
    assert len(secret) == SECRET_BYTES == 32
    assert mode_of(path) == 0o600
    assert mode_of(path.parent) == 0o700
    assert path.read_text().strip() == secret.hex()
    assert load_or_create_secret(path) == secret
    assert load_secret(path) == secret
    assert [p.name for p in path.parent.iterdir()] == ["secret"]  # no temp files left


def test_secret_refused_when_others_can_read(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    load_or_create_secret(path)
    path.chmod(0o644)
    with pytest.raises(SecurityError, match="group or others") as info:
        load_or_create_secret(path)
    assert str(path) in str(info.value)
    with pytest.raises(SecurityError):
        load_secret(path)


@pytest.mark.parametrize("content", ["", "zz" * 32, "ab" * 31, "ab" * 33, "\xff"])
def test_malformed_secret_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "secret"
    path.write_text(content, encoding="latin-1")
    path.chmod(0o600)
    with pytest.raises(SecurityError, match="malformed") as info:
        load_or_create_secret(path)
    assert str(path) in str(info.value)


def test_load_secret_never_creates(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    with pytest.raises(SecurityError, match="does not exist"):
        load_secret(path)
    assert not path.exists()


def test_secret_race_between_threads_yields_one_secret(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    barrier = threading.Barrier(16)

    def create() -> bytes:
        barrier.wait()
        return load_or_create_secret(path)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: create(), range(16)))
    assert len(set(results)) == 1
    assert load_secret(path) == results[0]
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]


def test_secret_race_between_processes_yields_one_secret(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    code = (
        "import sys, pathlib; from herder.security import load_or_create_secret; "
        "print(load_or_create_secret(pathlib.Path(sys.argv[1])).hex())"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    outputs = [proc.communicate(timeout=60)[0].strip() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    assert set(outputs) == {load_secret(path).hex()}


# --------------------------------------------------------------------------- join token


def test_token_round_trip_without_url() -> None:
    token = JoinToken(SECRET, FINGERPRINT)
    text = token.encode()
    assert text == f"hd1.{b64(SECRET)}.{b64(FINGERPRINT)}"
    assert "=" not in text
    assert JoinToken.parse(text) == token
    assert JoinToken.parse(f"  {text}\n") == token


def test_token_round_trip_with_url() -> None:
    token = JoinToken(SECRET, FINGERPRINT, "https://127.0.0.1:7420")
    text = token.encode()
    assert text.endswith("@https://127.0.0.1:7420")
    parsed = JoinToken.parse(text)
    assert parsed == token
    assert parsed.url == "https://127.0.0.1:7420"
    assert parsed.without_url() == JoinToken(SECRET, FINGERPRINT)
    assert parsed.without_url().url is None


def test_token_url_is_split_on_first_at() -> None:
    token = JoinToken.parse(f"hd1.{b64(SECRET)}.{b64(FINGERPRINT)}@https://user@host:1")
    assert token.url == "https://user@host:1"


def test_token_equality_and_hash() -> None:
    a = JoinToken(SECRET, FINGERPRINT)
    assert a == JoinToken(bytes(SECRET), bytes(FINGERPRINT))
    assert hash(a) == hash(JoinToken(bytes(SECRET), bytes(FINGERPRINT)))
    assert a != JoinToken(bytes(32), FINGERPRINT)
    assert a != JoinToken(SECRET, FINGERPRINT, "https://h:1")
    assert a != "not a token"


def test_token_repr_and_str_hide_secret() -> None:
    token = JoinToken(SECRET, FINGERPRINT, "https://127.0.0.1:7420")
    for text in (repr(token), str(token), f"{token}", repr([token])):
        assert_no_secret(text)
        assert fingerprint_hex(FINGERPRINT) in text
        assert "https://127.0.0.1:7420" in text


GOOD_BODY = f"hd1.{b64(SECRET)}.{b64(FINGERPRINT)}"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "not a herder join token"),
        (b64(SECRET), "not a herder join token"),
        (f"xx1.{b64(SECRET)}.{b64(FINGERPRINT)}", "not a herder join token"),
        (f"{b64(SECRET)}.{b64(SECRET)}.{b64(FINGERPRINT)}", "not a herder join token"),
        (f"hd2.{b64(SECRET)}.{b64(FINGERPRINT)}", "version 'hd2' is not supported"),
        (f"hd1.{b64(SECRET)}", "2 dot-separated parts"),
        (f"hd1.{b64(SECRET)}.{b64(FINGERPRINT)}.x", "4 dot-separated parts"),
        (f"hd1.{b64(SECRET)}!.{b64(FINGERPRINT)}", "secret is not valid base64url"),
        (f"hd1.{b64(SECRET)}AA.{b64(FINGERPRINT)}", "secret is not valid base64url"),
        (f"hd1.{b64(SECRET)[:-1]}B.{b64(FINGERPRINT)}", "secret is not valid base64url"),
        (f"hd1.{b64(SECRET)}==.{b64(FINGERPRINT)}", "secret is not valid base64url"),
        (f"hd1.{b64(SECRET)}.{b64(FINGERPRINT)}+", "fingerprint is not valid base64url"),
        (f"hd1.{b64(SECRET[:16])}.{b64(FINGERPRINT)}", "secret is 16 bytes, expected 32"),
        (f"hd1.{b64(SECRET + b'x')}.{b64(FINGERPRINT)}", "secret is 33 bytes"),
        (f"hd1.{b64(SECRET)}.{b64(FINGERPRINT[:31])}", "fingerprint is 31 bytes, expected 32"),
        (f"{GOOD_BODY}@", "empty address"),
        (f"{GOOD_BODY}@http://127.0.0.1:7420", "must start with https://"),
        (f"{GOOD_BODY}@127.0.0.1:7420", "must start with https://"),
        (f"{GOOD_BODY}@https://", "must start with https://"),
    ],
)
def test_malformed_token_is_refused_without_leaking_secret(text: str, reason: str) -> None:
    with pytest.raises(SecurityError, match=reason) as info:
        JoinToken.parse(text)
    assert_no_secret(str(info.value))
    assert_no_secret(repr(info.value))


def test_token_constructor_validates() -> None:
    with pytest.raises(SecurityError, match="secret is 31 bytes"):
        JoinToken(SECRET[:31], FINGERPRINT)
    with pytest.raises(SecurityError, match="fingerprint is 0 bytes"):
        JoinToken(SECRET, b"")
    with pytest.raises(SecurityError, match="https://"):
        JoinToken(SECRET, FINGERPRINT, "ftp://x")


# --------------------------------------------------------------------------- handshake


def test_handshake_proofs_verify_both_ways() -> None:
    agent_nonce, coordinator_nonce = new_nonce(), new_nonce()
    assert len(agent_nonce) == 32
    assert agent_nonce != coordinator_nonce
    # The coordinator answers the agent's nonce; the agent recomputes and checks.
    from_coordinator = coordinator_proof(SECRET, agent_nonce, coordinator_nonce)
    assert proofs_equal(from_coordinator, coordinator_proof(SECRET, agent_nonce, coordinator_nonce))
    from_agent = agent_proof(SECRET, coordinator_nonce, agent_nonce)
    assert proofs_equal(from_agent, agent_proof(SECRET, coordinator_nonce, agent_nonce))
    assert len(from_agent) == len(from_coordinator) == 32


def test_proof_cannot_be_reflected_to_the_other_role() -> None:
    a, b = new_nonce(), new_nonce()
    # Same key, same nonces in every order: the role label keeps them apart.
    coordinator_side = {coordinator_proof(SECRET, a, b), coordinator_proof(SECRET, b, a)}
    agent_side = {agent_proof(SECRET, b, a), agent_proof(SECRET, a, b)}
    assert not coordinator_side & agent_side
    # An impostor coordinator replaying the agent's own proof is refused.
    reflected = agent_proof(SECRET, b, a)
    assert not proofs_equal(reflected, coordinator_proof(SECRET, a, b))


def test_wrong_secret_fails() -> None:
    a, b = new_nonce(), new_nonce()
    other = bytes(32)
    assert not proofs_equal(coordinator_proof(other, a, b), coordinator_proof(SECRET, a, b))
    assert not proofs_equal(agent_proof(other, b, a), agent_proof(SECRET, b, a))
    assert not proofs_equal(agent_proof(SECRET, b, a), agent_proof(SECRET, b, new_nonce()))


def test_nonces_of_wrong_length_are_refused() -> None:
    with pytest.raises(SecurityError, match="32 bytes"):
        coordinator_proof(SECRET, b"short", new_nonce())
    with pytest.raises(SecurityError, match="32 bytes"):
        agent_proof(SECRET, new_nonce(), new_nonce() + b"x")


def test_bearer_matches() -> None:
    token = JoinToken(SECRET, FINGERPRINT, "https://127.0.0.1:7420")
    assert bearer_matches(token.encode(), SECRET)
    assert bearer_matches(token.without_url().encode(), SECRET)
    assert bearer_matches(f" {token.encode()} ", SECRET)
    assert not bearer_matches(token.encode(), bytes(32))
    assert not bearer_matches(JoinToken(bytes(32), FINGERPRINT).encode(), SECRET)
    for garbage in ["", "Bearer x", "hd1..", "hd1.!!.!!", "\x00" * 1000, "@" * 50, SECRET.hex()]:
        assert not bearer_matches(garbage, SECRET)
    assert not bearer_matches(None, SECRET)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- TLS files


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    return ensure_tls(tmp_path / "tls")


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def sans(path: Path) -> list[x509.GeneralName]:
    cert = load_cert(path)
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


def test_ensure_tls_creates_private_files(tmp_path: Path, tls: TlsFiles) -> None:
    directory = tmp_path / "tls"
    assert mode_of(directory) == 0o700
    assert tls == TlsFiles(
        directory / "ca.pem", directory / "ca.key", directory / "cert.pem", directory / "key.pem"
    )
    assert mode_of(tls.ca_key) == 0o600
    assert mode_of(tls.key) == 0o600
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]

    ca, leaf = load_cert(tls.ca_cert), load_cert(tls.cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= 3650
    leaf.verify_directly_issued_by(ca)
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {
        x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
        x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    names = sans(tls.cert)
    assert x509.DNSName("localhost") in names
    assert x509.DNSName(socket.gethostname().lower()) in names
    assert x509.IPAddress(ipaddress.ip_address("127.0.0.1")) in names
    assert x509.IPAddress(ipaddress.ip_address("::1")) in names
    assert tls.fingerprint() == ca_fingerprint(tls.ca_cert.read_bytes())
    assert len(tls.fingerprint()) == 32
    assert fingerprint_hex(tls.fingerprint()) == tls.fingerprint().hex()[:16]


def test_ensure_tls_reuses_everything(tmp_path: Path, tls: TlsFiles) -> None:
    before = {p: p.read_bytes() for p in (tls.ca_cert, tls.ca_key, tls.cert, tls.key)}
    again = ensure_tls(tmp_path / "tls")
    assert again.fingerprint() == tls.fingerprint()
    assert {p: p.read_bytes() for p in before} == before


def test_new_host_reissues_leaf_but_keeps_ca(tmp_path: Path, tls: TlsFiles) -> None:
    ca_before, leaf_before = tls.ca_cert.read_bytes(), tls.cert.read_bytes()
    again = ensure_tls(tmp_path / "tls", hosts=["10.1.2.3", "Coordinator.Example", "fe80::1"])
    assert again.ca_cert.read_bytes() == ca_before
    assert again.cert.read_bytes() != leaf_before
    names = sans(again.cert)
    assert x509.IPAddress(ipaddress.ip_address("10.1.2.3")) in names
    assert x509.IPAddress(ipaddress.ip_address("fe80::1")) in names
    assert x509.DNSName("coordinator.example") in names
    load_cert(again.cert).verify_directly_issued_by(load_cert(again.ca_cert))
    # Asking for a subset does not reissue.
    leaf = again.cert.read_bytes()
    ensure_tls(tmp_path / "tls", hosts=["10.1.2.3"])
    assert again.cert.read_bytes() == leaf


def test_leaf_with_foreign_key_is_reissued(tmp_path: Path, tls: TlsFiles) -> None:
    other = ensure_tls(tmp_path / "other")
    tls.key.write_bytes(other.key.read_bytes())
    leaf_before = tls.cert.read_bytes()
    ensure_tls(tmp_path / "tls")
    assert tls.cert.read_bytes() != leaf_before
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls.cert, tls.key)  # raises if key and cert do not match


def test_ca_is_never_regenerated(tmp_path: Path, tls: TlsFiles) -> None:
    tls.ca_key.unlink()
    with pytest.raises(SecurityError, match="refusing to replace"):
        ensure_tls(tmp_path / "tls")
    assert not tls.ca_key.exists()


def test_world_readable_key_is_refused(tmp_path: Path, tls: TlsFiles) -> None:
    tls.ca_key.chmod(0o644)
    with pytest.raises(SecurityError, match="group or others"):
        ensure_tls(tmp_path / "tls")


def test_ensure_tls_race_between_processes(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    code = (
        "import sys, pathlib; from herder.certs import ensure_tls; "
        "print(ensure_tls(pathlib.Path(sys.argv[1])).fingerprint().hex())"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    outputs = [proc.communicate(timeout=60)[0].strip() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    assert set(outputs) == {ca_fingerprint((directory / "ca.pem").read_bytes()).hex()}


def test_ca_fingerprint_uses_first_certificate(tmp_path: Path, tls: TlsFiles) -> None:
    other = ensure_tls(tmp_path / "other")
    both = tls.ca_cert.read_bytes() + other.ca_cert.read_bytes()
    assert ca_fingerprint(both) == tls.fingerprint()
    with pytest.raises(SecurityError):
        ca_fingerprint(b"not a certificate")


# --------------------------------------------------------------------------- TLS round trip


class CaServer:
    """A minimal HTTPS server on 127.0.0.1 serving ``body`` at ``/v1/ca``, 404 elsewhere."""

    def __init__(self, files: TlsFiles, body: bytes) -> None:
        self.body = body
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(files.cert, files.key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port: int = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="ca-server")

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def __enter__(self) -> CaServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)
        self.listener.close()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    with self.context.wrap_socket(conn, server_side=True) as tls:
                        self._answer(tls)
                except (ssl.SSLError, OSError):
                    continue  # e.g. a client that refused our certificate

    def _answer(self, tls: ssl.SSLSocket) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = tls.recv(4096)
            if not chunk:
                return
            request += chunk
        path = request.split(b" ", 2)[1]
        status, body = (b"200 OK", self.body) if path == b"/v1/ca" else (b"404 Not Found", b"")
        tls.sendall(
            b"HTTP/1.1 " + status + b"\r\nContent-Type: application/x-pem-file\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
        )


@pytest.fixture
def server(tls: TlsFiles) -> Iterator[CaServer]:
    with CaServer(tls, tls.ca_cert.read_bytes()) as srv:
        yield srv


def handshake(context: ssl.SSLContext, port: int) -> None:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        assert tls.version() in {"TLSv1.2", "TLSv1.3"}


def test_fetch_pinned_ca_returns_pem(tls: TlsFiles, server: CaServer) -> None:
    pem = fetch_pinned_ca(server.url, tls.fingerprint(), timeout=5)
    assert pem == tls.ca_cert.read_bytes()
    assert ca_fingerprint(pem) == tls.fingerprint()
    assert fetch_pinned_ca(server.url + "/", tls.fingerprint(), timeout=5) == pem


def test_fetch_pinned_ca_refuses_other_fingerprint(tls: TlsFiles, server: CaServer) -> None:
    wrong = bytes(32)
    with pytest.raises(PinningError) as info:
        fetch_pinned_ca(server.url, wrong, timeout=5)
    message = str(info.value)
    assert server.url in message
    assert fingerprint_hex(tls.fingerprint()) in message
    assert fingerprint_hex(wrong) in message
    assert "\n" not in message


def test_fetch_pinned_ca_refuses_extra_certificates(tmp_path: Path, tls: TlsFiles) -> None:
    other = ensure_tls(tmp_path / "other")
    body = tls.ca_cert.read_bytes() + other.ca_cert.read_bytes()
    with CaServer(tls, body) as srv, pytest.raises(PinningError, match="2 certificates"):
        fetch_pinned_ca(srv.url, tls.fingerprint(), timeout=5)


def test_fetch_pinned_ca_http_errors(tls: TlsFiles, server: CaServer) -> None:
    with pytest.raises(SecurityError, match="HTTP 404") as info:
        fetch_pinned_ca(server.url + "/elsewhere", tls.fingerprint(), timeout=5)
    assert not isinstance(info.value, PinningError)
    assert server.url in str(info.value)
    with pytest.raises(SecurityError, match="https://"):
        fetch_pinned_ca(f"http://127.0.0.1:{server.port}", tls.fingerprint())


def test_fetch_pinned_ca_garbage_body(tls: TlsFiles) -> None:
    with CaServer(tls, b"hello") as srv, pytest.raises(SecurityError, match="PEM"):
        fetch_pinned_ca(srv.url, tls.fingerprint(), timeout=5)


def test_fetch_pinned_ca_lets_network_errors_through() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    # Any OSError will do: callers retry those with backoff.
    with pytest.raises(OSError):  # noqa: PT011
        fetch_pinned_ca(f"https://127.0.0.1:{port}", bytes(32), timeout=5)


def test_client_context_verifies_coordinator(tls: TlsFiles, server: CaServer) -> None:
    context = client_ssl_context(tls.ca_cert.read_bytes())
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert not context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    handshake(context, server.port)


def test_client_context_refuses_other_ca(tmp_path: Path, tls: TlsFiles, server: CaServer) -> None:
    other = ensure_tls(tmp_path / "other")
    assert other.fingerprint() != tls.fingerprint()
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(client_ssl_context(other.ca_cert.read_bytes()), server.port)
    # Only the first certificate of the PEM is trusted: appending ours does not help.
    both = other.ca_cert.read_bytes() + tls.ca_cert.read_bytes()
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(client_ssl_context(both), server.port)


def test_the_protocol_asks_for_nonces_of_the_length_the_handshake_uses() -> None:
    from herder import protocol, security

    assert protocol.HELLO_NONCE_BYTES == security.NONCE_BYTES


def test_sealed_values_open_only_with_the_same_secret() -> None:
    from herder import security
    from herder.errors import SecurityError

    key, other = bytes(range(32)), bytes(32)
    sealed = security.seal(key, "hunter2")
    assert sealed.startswith("sealed:v1:")
    assert "hunter2" not in sealed
    assert security.seal(key, "hunter2") != sealed  # a fresh nonce each time
    assert security.unseal(key, sealed) == "hunter2"
    assert security.unseal(key, "plain") == "plain"
    with pytest.raises(SecurityError, match="does not open"):
        security.unseal(other, sealed)
