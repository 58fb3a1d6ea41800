"""herder certs' files, the checks on files a user serves with, agent token keys, the
bound on refused-pairing events, and the TLS settings."""

from __future__ import annotations

import os
import shutil
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from herder import certs, security
from herder.config import load_settings
from herder.coordinator.pairing import RefusalLog
from herder.errors import ConfigError, SecurityError
from herder.tls_setup import TlsSetup


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    certs.write_ca(tmp_path)
    certs.issue_server(tmp_path, ["127.0.0.1", "coordinator.example"])
    certs.issue_agent(tmp_path, "node-1")
    return tmp_path


def test_keys_are_private_and_certificates_are_signed_by_the_ca(pki: Path) -> None:
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    for stem in ("ca", "server", "agent-node-1"):
        assert (pki / f"{stem}.key").stat().st_mode & 0o777 == 0o600
    server = x509.load_pem_x509_certificate((pki / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert x509.DNSName("coordinator.example") in names
    agent = x509.load_pem_x509_certificate((pki / "agent-node-1.pem").read_bytes())
    agent.verify_directly_issued_by(ca)
    assert "CN=node-1" in agent.subject.rfc4514_string()


def test_the_ca_is_kept_when_run_again(pki: Path) -> None:
    before = (pki / "ca.pem").read_bytes()
    certs.write_ca(pki)
    certs.issue_agent(pki, "node-2")
    assert (pki / "ca.pem").read_bytes() == before


def test_bad_names_are_refused_naming_the_field(tmp_path: Path) -> None:
    certs.write_ca(tmp_path)
    with pytest.raises(SecurityError, match="agent name") as caught:
        certs.issue_agent(tmp_path, "../etc")
    assert caught.value.context["field"] == "agent"
    with pytest.raises(SecurityError, match="--host"):
        certs.issue_server(tmp_path, [])


def test_served_files_are_checked(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    served = certs.served_tls(pki / "server.pem", pki / "server.key", pki / "ca.pem")
    context = security.server_context(served, client_certs=True)
    assert context.verify_mode == ssl.CERT_OPTIONAL
    assert security.server_context(served, client_certs=False).verify_mode == ssl.CERT_NONE
    other = tmp_path_factory.mktemp("other")
    certs.write_ca(other)
    with pytest.raises(SecurityError, match="not signed by the CA"):
        certs.served_tls(pki / "server.pem", pki / "server.key", other / "ca.pem")
    with pytest.raises(SecurityError, match="does not belong"):
        certs.served_tls(pki / "server.pem", pki / "agent-node-1.key", pki / "ca.pem")
    with pytest.raises(SecurityError, match="not a CA"):
        certs.served_tls(pki / "server.pem", pki / "server.key", pki / "agent-node-1.pem")
    bundle = other / "bundle.pem"
    bundle.write_bytes((pki / "ca.pem").read_bytes() + (other / "ca.pem").read_bytes())
    with pytest.raises(SecurityError, match="2 certificates"):
        certs.served_tls(pki / "server.pem", pki / "server.key", bundle)
    loose = other / "loose.key"
    shutil.copy(pki / "server.key", loose)
    loose.chmod(0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        certs.served_tls(pki / "server.pem", loose, pki / "ca.pem")


def test_the_coordinators_files_are_settled_by_a_child_process(pki: Path, tmp_path: Path) -> None:
    """herder.tls_setup runs ``python -m herder.certs``: its own CA (made once, then
    kept), a user's files checked, and a refusal's reason carried back word for word."""
    own = TlsSetup.own(tmp_path / "tls", ["127.0.0.1"]).result()
    assert own.ca_cert == tmp_path / "tls" / "ca.pem"
    assert own.key.stat().st_mode & 0o777 == 0o600
    pem = security.served_ca_pem(own)
    assert security.ca_fingerprint(pem) == security.ca_fingerprint(own.ca_cert.read_bytes())
    assert security.server_context(own, client_certs=False).verify_mode == ssl.CERT_NONE
    again = TlsSetup.own(tmp_path / "tls", ["127.0.0.1"]).result()
    assert security.served_ca_pem(again) == pem  # the CA join tokens pin is kept

    given = TlsSetup.given(pki / "server.pem", pki / "server.key", pki / "ca.pem").result()
    assert given.cert == pki / "server.pem"
    with pytest.raises(SecurityError, match=r"agent-node-1.key does not belong to .*server.pem"):
        TlsSetup.given(pki / "server.pem", pki / "agent-node-1.key", pki / "ca.pem").result()
    (tmp_path / "tls" / "ca.key").unlink()
    with pytest.raises(SecurityError, match="refusing to replace a CA"):
        TlsSetup.own(tmp_path / "tls", ["127.0.0.1"]).result()


def test_agent_token_keys_differ_by_token_and_from_the_cluster_secret() -> None:
    cluster = os.urandom(32)
    a = security.agent_token_secret(cluster, "k-0000000000000001")
    b = security.agent_token_secret(cluster, "k-0000000000000002")
    assert a != b
    assert len(a) == 32
    assert a == security.agent_token_secret(cluster, "k-0000000000000001")
    key = security.pairing_key(a, "k-0000000000000001")
    assert key not in (a, cluster)
    nonce_a, nonce_c = security.new_nonce(), security.new_nonce()
    assert security.agent_proof(key, nonce_c, nonce_a) != security.agent_proof(
        cluster, nonce_c, nonce_a
    )


@pytest.mark.parametrize("length", range(0, 24))
def test_sealed_values_of_any_length_open(length: int) -> None:
    secret = os.urandom(32)
    text = "x" * length
    assert security.unseal(secret, security.seal(secret, text)) == text
    with pytest.raises(SecurityError):
        security.unseal(os.urandom(32), security.seal(secret, text))


def test_refusals_write_one_event_per_source_per_interval() -> None:
    log = RefusalLog(interval_s=60, max_sources=3)
    assert log.note("10.0.0.1", 0.0) == 0  # the first is written
    assert [log.note("10.0.0.1", t) for t in (1.0, 2.0, 59.0)] == [None, None, None]
    assert log.note("10.0.0.2", 3.0) == 0  # another source has its own allowance
    assert log.note("10.0.0.1", 61.0) == 3  # the next one says how many were left out
    for i in range(10):  # a flood of sources is forgotten, oldest first
        log.note(f"10.1.0.{i}", 70.0)
    assert len(log._sources) == 3


def test_tls_settings_need_all_three_files(tmp_path: Path) -> None:
    env = {"HERDER_HOME": str(tmp_path), "HERDER_TLS_CERT": "server.pem"}
    with pytest.raises(ConfigError, match="tls_key") as caught:
        load_settings(env)
    assert caught.value.context["field"] == "tls_ca"
    settings = load_settings(
        {**env, "HERDER_TLS_KEY": "server.key", "HERDER_TLS_CA": "/pki/ca.pem"},
        agent_mtls=True,
        tls_handshake_s=2,
    )
    assert settings.tls_cert == tmp_path / "server.pem"
    assert settings.tls_ca == Path("/pki/ca.pem")
    assert settings.agent_mtls is True
    assert settings.timeouts.tls_handshake_s == 2.0
    with pytest.raises(ConfigError, match="agent_mtls"):
        load_settings({"HERDER_HOME": str(tmp_path), "HERDER_AGENT_MTLS": "maybe"})
