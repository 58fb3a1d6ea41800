"""Network namespaces joined to this one by veth pairs, and real sshd servers in them.

Each namespace stands for a host: its own network stack, the address
``10.231.N.2`` on its end of a veth pair, ``10.231.N.1`` (its ``gateway``)
on the end left in the root namespace, and a route to ``10.231.0.0/16``
through that gateway, so it reaches every root-side address made here (a
coordinator listening on 0.0.0.0 is at any ``gateway``) and nothing else: no
default route, no package index. The namespaces share this machine's
filesystem, users and process table.

::

    with host_namespaces(2) as hosts, sshd(hosts[0], tmp_path / "h0") as server:
        hosts[0].run(["ip", "-4", "addr"])
        # ssh -i server.client_key -o UserKnownHostsFile=server.known_hosts root@server.address

Needs root (``ip netns``). Without it the test is skipped, or failed when
``HERDER_REQUIRE_ROOT=1`` (CI). Everything made is removed on exit, also when
the test fails: every process left in a namespace is killed, then the
namespace and its veth pair are deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.helpers import kill_tree, wait_for

PREFIX = "10.231"  # one 10.231.N.0/24 per namespace
SSHD = "/usr/sbin/sshd"
# Allocating subnets is serialised across test processes (pytest-xdist, other suites).
_ALLOCATION_LOCK = Path(tempfile.gettempdir()) / "herder-netns.lock"
# Changes to the root namespace's interfaces (a veth or bridge made, deleted, set up or
# down) take this lock exclusively; a browser test holds it shared (``network_quiet``):
# chromium aborts its requests, loopback ones too, with ERR_NETWORK_CHANGED whenever
# an interface changes (CI of 2026-12-07: the dashboard test's first page load).
_CHANGE_LOCK = Path(tempfile.gettempdir()) / "herder-netchange.lock"


@dataclass(frozen=True)
class Namespace:
    """One network namespace standing for a host."""

    name: str
    address: str  # the namespace's own address
    gateway: str  # the root namespace's address on the same veth pair
    veth: str  # the root-side interface

    def command(self, argv: Sequence[str] | str) -> list[str]:
        """``argv`` (or a ``sh -c`` string) prefixed to run inside the namespace."""
        inner = ["sh", "-c", argv] if isinstance(argv, str) else list(argv)
        return ["ip", "netns", "exec", self.name, *inner]

    def run(
        self, argv: Sequence[str] | str, *, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run to completion inside the namespace; output captured as text."""
        return subprocess.run(
            self.command(argv), capture_output=True, text=True, check=check, timeout=timeout
        )

    def popen(self, argv: Sequence[str] | str, **options: Any) -> subprocess.Popen[bytes]:
        """Start inside the namespace (``subprocess.Popen`` options pass through)."""
        return subprocess.Popen(self.command(argv), **options)

    def pids(self) -> list[int]:
        """Every process whose network namespace this is."""
        done = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, text=True, check=False
        )
        return [int(p) for p in done.stdout.split()]


@contextlib.contextmanager
def host_namespaces(n: int) -> Iterator[list[Namespace]]:
    """``n`` fresh namespaces, removed on exit with everything running in them."""
    if os.geteuid() != 0:
        _cannot("network namespaces need root")
    made: list[Namespace] = []
    try:
        with _allocation_lock(), _flock(_CHANGE_LOCK, fcntl.LOCK_EX):
            for _ in range(n):
                made.append(_make(_free_subnet()))
        yield made
    finally:
        with _flock(_CHANGE_LOCK, fcntl.LOCK_EX):
            for ns in made:
                _destroy(ns)


@dataclass(frozen=True)
class SSHServer:
    """A running sshd in a namespace, and the files a client needs to log in."""

    namespace: Namespace
    port: int
    pid: int
    client_key: Path  # private key whose public half is authorized (root login)
    host_key: Path  # the server's private host key (its .pub beside it)
    known_hosts: Path  # an OpenSSH known_hosts file naming the server's key
    log: Path

    @property
    def address(self) -> str:
        return self.namespace.address


def make_key(path: Path) -> Path:
    """A new passphrase-less ed25519 key pair at ``path`` and ``path.pub``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "herder-test", "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return path


@contextlib.contextmanager
def sshd(
    ns: Namespace, directory: Path, *, port: int = 22, client_key: Path | None = None
) -> Iterator[SSHServer]:
    """A real sshd in ``ns`` with a host key made here; root logs in with
    ``client_key`` (made here when None) and nothing else. Stopped on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    host_key = make_key(directory / "ssh_host_ed25519_key")
    client_key = client_key or make_key(directory / "client_key")
    authorized = directory / "authorized_keys"
    authorized.write_text(client_key.with_suffix(".pub").read_text())
    known_hosts = directory / "known_hosts"
    where = ns.address if port == 22 else f"[{ns.address}]:{port}"
    known_hosts.write_text(f"{where} {host_key.with_suffix('.pub').read_text()}")
    config = directory / "sshd_config"
    config.write_text(_sshd_config(ns, directory, port, host_key, authorized))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    log = directory / "sshd.log"
    with log.open("ab") as out:
        proc = ns.popen([SSHD, "-D", "-e", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_listening(proc, ns.address, port, log)
        yield SSHServer(ns, port, proc.pid, client_key, host_key, known_hosts, log)
    finally:
        kill_tree(proc.pid)
        proc.wait(timeout=10)


def _sshd_config(ns: Namespace, directory: Path, port: int, host_key: Path, keys: Path) -> str:
    return "\n".join(
        [
            f"Port {port}",
            f"ListenAddress {ns.address}",
            f"HostKey {host_key}",
            f"PidFile {directory / 'sshd.pid'}",
            f"AuthorizedKeysFile {keys}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "MaxSessions 64",
            "MaxStartups 64",
            "Subsystem sftp internal-sftp",
            "LogLevel VERBOSE",
            "",
        ]
    )


def _wait_listening(proc: subprocess.Popen[bytes], address: str, port: int, log: Path) -> None:
    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"sshd exited with {proc.returncode}: {log.read_text()}")
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex((address, port)) == 0

    wait_for(listening, 15, f"sshd on {address}:{port}")


# ---------------------------------------------------------------------------
# making and removing namespaces


def _ip(*args: str, ns: str | None = None) -> None:
    argv = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


def _make(n: int) -> Namespace:
    tag = secrets.token_hex(3)
    ns = Namespace(
        name=f"herder-{tag}",
        address=f"{PREFIX}.{n}.2",
        gateway=f"{PREFIX}.{n}.1",
        veth=f"hr{tag}",
    )
    _require_root(ns.name)
    inside = f"hn{tag}"
    try:
        _ip("link", "add", ns.veth, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", ns.name)
        _ip("addr", "add", f"{ns.gateway}/24", "dev", ns.veth)
        _ip("link", "set", ns.veth, "up")
        _ip("link", "set", "lo", "up", ns=ns.name)
        _ip("addr", "add", f"{ns.address}/24", "dev", inside, ns=ns.name)
        _ip("link", "set", inside, "up", ns=ns.name)
        _ip("route", "add", f"{PREFIX}.0.0/16", "via", ns.gateway, ns=ns.name)
    except BaseException:
        _destroy(ns)
        raise
    return ns


def _require_root(name: str) -> None:
    """Make the namespace; skip (or fail, with HERDER_REQUIRE_ROOT=1) where we cannot."""
    done = subprocess.run(
        ["ip", "netns", "add", name], capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode == 0:
        return
    _cannot(f"cannot make a network namespace: {done.stderr.strip()}")


def _cannot(reason: str) -> NoReturn:
    """Skip the test, or fail it where root is required (HERDER_REQUIRE_ROOT=1, CI)."""
    if os.environ.get("HERDER_REQUIRE_ROOT") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def _destroy(ns: Namespace) -> None:
    """Kill what runs in the namespace, then delete it and its veth pair."""
    for _ in range(3):  # processes may fork while we kill
        pids = ns.pids()
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, check=False, timeout=30)
    subprocess.run(["ip", "link", "del", ns.veth], capture_output=True, check=False, timeout=30)


def _free_subnet() -> int:
    """An N whose 10.231.N.0/24 no interface here uses yet."""
    done = subprocess.run(
        ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True, timeout=30
    )
    used = {
        int(word.split(".")[2])
        for word in done.stdout.split()
        if word.startswith(f"{PREFIX}.") and word.count(".") == 3
    }
    free = [n for n in range(1, 255) if n not in used]
    if not free:
        raise RuntimeError(f"every {PREFIX}.N.0/24 is in use")
    return free[0]


def _allocation_lock() -> contextlib.AbstractContextManager[None]:
    return _flock(_ALLOCATION_LOCK, fcntl.LOCK_EX)


@contextlib.contextmanager
def network_quiet() -> Iterator[None]:
    """While held, no test here changes an interface of the root namespace (it waits).

    For a browser: chromium fails whatever request is in flight when the
    interfaces change, loopback included.
    """
    with _flock(_CHANGE_LOCK, fcntl.LOCK_SH):
        yield


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    with path.open("a") as lock:
        fcntl.flock(lock.fileno(), mode)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------------------
# subnets: a Linux bridge per subnet, namespaces as hosts on it, the root
# namespace routing between subnets (never forwarding broadcasts)

BRIDGE_PREFIX = "10.240"  # one 10.240.N.0/24 per subnet


@dataclass(frozen=True)
class Subnet:
    """One broadcast domain: a bridge in the root namespace and the hosts on it.

    The root namespace holds ``gateway`` (``10.240.N.1``) on the bridge and
    routes between subnets (``ip_forward``), so unicast crosses subnets and
    broadcast does not: what a UDP beacon needs to be tested honestly. Each
    host's ``veth`` is its root-side interface, a port of the bridge;
    ``link_cut(host)`` cuts that host off.
    """

    bridge: str
    prefix: str  # "10.240.N"
    gateway: str
    hosts: list[Namespace]

    @property
    def broadcast(self) -> str:
        return f"{self.prefix}.255"


@contextlib.contextmanager
def link_cut(ns: Namespace) -> Iterator[None]:
    """A host's cable unplugged (its root-side veth down) until the block ends.

    Holds the interface-change lock throughout, so that no browser test
    starts in between and sees the cable come back.
    """
    with _flock(_CHANGE_LOCK, fcntl.LOCK_EX):
        _ip("link", "set", ns.veth, "down")
        try:
            yield
        finally:
            _ip("link", "set", ns.veth, "up")


@contextlib.contextmanager
def bridged_subnets(sizes: Sequence[int]) -> Iterator[list[Subnet]]:
    """One subnet per entry of ``sizes``, each with that many host namespaces.

    Removed on exit with everything running in them. ``ip_forward`` is
    switched on for routing and left on: other tests running at the same
    time may route through it too, and turning it off under them would cut
    them off (it is on in most container hosts anyway).
    """
    if os.geteuid() != 0:
        _cannot("network namespaces need root")
    made: list[Subnet] = []
    try:
        with _allocation_lock(), _flock(_CHANGE_LOCK, fcntl.LOCK_EX):
            for size in sizes:
                made.append(_make_subnet(_free_bridge_subnet(), size))
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        yield made
    finally:
        with _flock(_CHANGE_LOCK, fcntl.LOCK_EX):
            for subnet in made:
                _destroy_subnet(subnet)


def _make_subnet(n: int, size: int) -> Subnet:
    tag = secrets.token_hex(3)
    prefix = f"{BRIDGE_PREFIX}.{n}"
    subnet = Subnet(bridge=f"hb{tag}", prefix=prefix, gateway=f"{prefix}.1", hosts=[])
    try:
        _ip("link", "add", subnet.bridge, "type", "bridge")
        _ip("addr", "add", f"{subnet.gateway}/24", "dev", subnet.bridge)
        _ip("link", "set", subnet.bridge, "up")
        for i in range(size):
            subnet.hosts.append(_make_bridged(subnet, i + 2))
    except BaseException:
        _destroy_subnet(subnet)
        raise
    return subnet


def _make_bridged(subnet: Subnet, host: int) -> Namespace:
    tag = secrets.token_hex(3)
    ns = Namespace(
        name=f"herder-{tag}",
        address=f"{subnet.prefix}.{host}",
        gateway=subnet.gateway,
        veth=f"hr{tag}",
    )
    _require_root(ns.name)
    subnet.hosts.append(ns)  # so that a failure below still removes it
    inside = f"hn{tag}"
    _ip("link", "add", ns.veth, "type", "veth", "peer", "name", inside)
    _ip("link", "set", inside, "netns", ns.name)
    _ip("link", "set", ns.veth, "master", subnet.bridge)
    _ip("link", "set", ns.veth, "up")
    _ip("link", "set", "lo", "up", ns=ns.name)
    _ip("addr", "add", f"{ns.address}/24", "broadcast", subnet.broadcast, "dev", inside, ns=ns.name)
    _ip("link", "set", inside, "up", ns=ns.name)
    _ip("route", "add", "default", "via", subnet.gateway, ns=ns.name)
    subnet.hosts.pop()
    return ns


def _destroy_subnet(subnet: Subnet) -> None:
    for ns in subnet.hosts:
        _destroy(ns)
    subprocess.run(
        ["ip", "link", "del", subnet.bridge], capture_output=True, check=False, timeout=30
    )


def _free_bridge_subnet() -> int:
    """An N whose 10.240.N.0/24 no interface here uses yet."""
    done = subprocess.run(
        ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True, timeout=30
    )
    used = {
        int(word.split(".")[2])
        for word in done.stdout.split()
        if word.startswith(f"{BRIDGE_PREFIX}.") and word.count(".") == 3
    }
    free = [n for n in range(1, 255) if n not in used]
    if not free:
        raise RuntimeError(f"every {BRIDGE_PREFIX}.N.0/24 is in use")
    return free[0]
