"""The datastore through a real coordinator: file:// and S3 (moto in server mode).

Every test talks HTTPS to a ``herder up`` process (LocalHerd) with the
Python client, the CLI or raw HTTP, then checks the storage itself (the
directory, or the bucket through boto3) for what must and must not be there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]
import httpx
import psutil
import pytest
from moto.server import ThreadedMotoServer

from herder import security
from herder.client import resolve_target
from herder.dataclient import DataClient
from herder.datastore import CHUNK, S3_PART, Datastore
from herder.errors import (
    AuthenticationError,
    BadKey,
    ChecksumMismatch,
    ConfigError,
    DatastoreFull,
    DatastoreUnavailable,
    ObjectMissing,
)
from herder.local import LocalHerd
from tests.helpers import free_port, tmpfs, wait_for

BUCKET = "herd-data"
S3_PREFIX = "runs"
MiB = 1024 * 1024


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path) -> dict[str, int]:
    """Every file below ``root`` (hidden ones too) → its size."""
    out = {}
    for path in root.rglob("*"):
        with contextlib.suppress(FileNotFoundError):
            if path.is_file():
                out[path.relative_to(root).as_posix()] = path.stat().st_size
    return out


def cli(
    env: dict[str, str], *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "herder", "data", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        timeout=60,
        check=False,
    )


def ok(done: subprocess.CompletedProcess[bytes]) -> str:
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def one_line_error(done: subprocess.CompletedProcess[bytes]) -> str:
    assert done.returncode == 1, (done.stdout, done.stderr)
    err = done.stderr.decode()
    assert err.startswith("error: "), err
    assert err.count("\n") == 1, err
    return err


def credentials(herd: LocalHerd) -> tuple[str, str, bytes]:
    """(url, bearer, CA) of a herd, as any client finds them."""
    url, token = resolve_target(None, None, herd.env())
    ca = security.fetch_pinned_ca(url, token.fingerprint)
    return url, token.without_url().encode(), ca


def raw_http(herd: LocalHerd, *, bearer: str | None = None) -> httpx.Client:
    url, real_bearer, ca = credentials(herd)
    return httpx.Client(
        base_url=url,
        verify=security.client_ssl_context(ca),
        headers={"Authorization": f"Bearer {bearer or real_bearer}"},
        timeout=30,
    )


def aws_env(home: Path) -> dict[str, str]:
    """Dummy credentials for the coordinator's process only; no real AWS config is read."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(home / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def start_herd(
    home: Path,
    *,
    datastore: str | None = None,
    options: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
) -> LocalHerd:
    """A coordinator (no agents) whose datastore is set in its herder.toml."""
    home.mkdir(parents=True, exist_ok=True)
    if datastore is not None:
        lines = ["[coordinator]", f"datastore_url = {json.dumps(datastore)}"]
        if options:
            inline = ", ".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
            lines.append(f"datastore_options = {{ {inline} }}")
        (home / "herder.toml").write_text("\n".join(lines) + "\n")
    herd = LocalHerd(nodes=0, home=home, env={**os.environ, **(env or {})})
    herd.start()
    return herd


def s3_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@dataclass
class Herd:
    """A running coordinator plus a view of its storage that bypasses herder."""

    local: LocalHerd
    backend: str
    stored: Callable[[str], bytes | None]
    in_flight: Callable[[], list[str]]

    @property
    def data(self) -> DataClient:
        assert self.local.client is not None
        return self.local.client.data


def file_herd_of(local: LocalHerd) -> Herd:
    root = local.home / "data"

    def stored(key: str) -> bytes | None:
        path = root / key
        return path.read_bytes() if path.is_file() else None

    def in_flight() -> list[str]:
        return [k for k, size in files_under(root / ".herder-tmp").items() if size > 0]

    return Herd(local, "file", stored, in_flight)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3_client(endpoint).create_bucket(Bucket=BUCKET)
    try:
        yield endpoint
    finally:
        server.stop()


@pytest.fixture(scope="module", params=["file", "s3"])
def herd(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Herd]:
    """One coordinator per backend, shared by the module's round-trip tests."""
    home = tmp_path_factory.mktemp(f"herd-{request.param}")
    if request.param == "file":
        local = start_herd(home)
        view = file_herd_of(local)
    else:
        endpoint: str = request.getfixturevalue("moto_endpoint")
        local = start_herd(
            home,
            datastore=f"s3://{BUCKET}/{S3_PREFIX}",
            options={"endpoint_url": endpoint},
            env=aws_env(home),
        )
        s3 = s3_client(endpoint)

        def stored(key: str) -> bytes | None:
            try:
                body: bytes = s3.get_object(Bucket=BUCKET, Key=f"{S3_PREFIX}/{key}")["Body"].read()
            except s3.exceptions.NoSuchKey:
                return None
            return body

        def in_flight() -> list[str]:
            uploads = s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
            return [u["Key"] for u in uploads]

        view = Herd(local, "s3", stored, in_flight)
    try:
        yield view
    finally:
        local.stop()


@pytest.fixture(scope="module")
def file_herd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Herd]:
    """A coordinator on the default datastore (<home>/data), for tests that poke the disk."""
    local = start_herd(tmp_path_factory.mktemp("herd-file-only"))
    try:
        yield file_herd_of(local)
    finally:
        local.stop()


# --------------------------------------------------------------------------- round trips


def test_round_trip_with_the_python_client(herd: Herd, tmp_path: Path) -> None:
    data = herd.data
    payload = os.urandom(3 * MiB + 17)
    info = data.put("py/one.bin", payload)
    assert (info.key, info.size, info.sha256) == ("py/one.bin", len(payload), sha256(payload))
    assert herd.stored("py/one.bin") == payload  # the bytes as put, under the key

    source = tmp_path / "two.txt"
    source.write_bytes(b"hello\n")
    assert data.put_file("py/sub/two.txt", source).sha256 == sha256(b"hello\n")
    assert data.cat("py/one.bin") == payload
    target = tmp_path / "back.bin"
    assert data.get_file("py/one.bin", target).sha256 == info.sha256
    assert target.read_bytes() == payload
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.bin", "two.txt"]  # no temp left
    data.get_file("py/sub/two.txt", tmp_path / "made" / "on" / "the-way.txt")  # parents made
    assert (tmp_path / "made" / "on" / "the-way.txt").read_bytes() == b"hello\n"

    fetched = data.info("py/one.bin")
    assert fetched == info
    assert [i.key for i in data.ls("py/")] == ["py/one.bin", "py/sub/two.txt"]
    assert [i.key for i in data.ls("py/s")] == ["py/sub/two.txt"]
    assert data.ls("py/sub/two.txt")[0].sha256 == sha256(b"hello\n")
    assert data.ls("nothing/here") == []
    assert not [i.key for i in data.ls() if i.key.startswith(".herder-")]

    odd = "py/with space/ü?#%&=+.txt"
    data.put(odd, b"odd")
    assert data.cat(odd) == b"odd"
    assert odd in [i.key for i in data.ls("py/with")]
    data.put("py/empty", b"")
    assert data.cat("py/empty") == b""
    assert data.info("py/empty").size == 0

    data.put("py/one.bin", b"version two")  # overwrite
    assert data.cat("py/one.bin") == b"version two"
    assert data.exists("py/one.bin")
    data.rm("py/one.bin")
    assert not data.exists("py/one.bin")
    assert herd.stored("py/one.bin") is None
    with pytest.raises(ObjectMissing, match=r"'py/one\.bin'"):
        data.cat("py/one.bin")
    with pytest.raises(ObjectMissing, match=r"'py/one\.bin'"):
        data.rm("py/one.bin")
    with pytest.raises(ObjectMissing, match=r"'py/one\.bin'"):
        data.get_file("py/one.bin", tmp_path / "gone.bin")
    assert not (tmp_path / "gone.bin").exists()


def test_round_trip_with_the_cli(herd: Herd, tmp_path: Path) -> None:
    env = herd.local.env()
    source = tmp_path / "in.csv"
    source.write_bytes(b"a,b\n1,2\n")
    assert "put cli/in.csv" in ok(cli(env, "put", str(source), "cli/in.csv"))
    assert herd.stored("cli/in.csv") == b"a,b\n1,2\n"

    listed = json.loads(ok(cli(env, "ls", "cli/", "--json")))
    assert [(i["key"], i["size"], i["sha256"]) for i in listed] == [
        ("cli/in.csv", 8, sha256(b"a,b\n1,2\n"))
    ]
    assert "cli/in.csv" in ok(cli(env, "ls"))

    ok(cli(env, "get", "cli/in.csv", str(tmp_path / "back.csv")))
    assert (tmp_path / "back.csv").read_bytes() == b"a,b\n1,2\n"
    workdir = tmp_path / "work"
    workdir.mkdir()
    ok(cli(env, "get", "cli/in.csv", cwd=workdir))  # default: the key's last part
    assert (workdir / "in.csv").read_bytes() == b"a,b\n1,2\n"
    assert cli(env, "get", "cli/in.csv", "-").stdout == b"a,b\n1,2\n"
    assert cli(env, "cat", "cli/in.csv").stdout == b"a,b\n1,2\n"

    assert "removed cli/in.csv" in ok(cli(env, "rm", "cli/in.csv"))
    assert herd.stored("cli/in.csv") is None
    assert "cli/in.csv" in one_line_error(cli(env, "rm", "cli/in.csv"))
    assert "no object" in one_line_error(cli(env, "cat", "cli/in.csv"))
    assert "bad datastore key '../x'" in one_line_error(cli(env, "put", str(source), "../x"))
    assert "No such file" in one_line_error(cli(env, "put", str(tmp_path / "absent"), "k"))


def test_a_killed_upload_leaves_nothing_visible(herd: Herd, tmp_path: Path) -> None:
    """kill -9 a client mid-PUT: readers saw the old object whole, and then still do."""
    data = herd.data
    data.put("atomic/obj", b"version one")
    url, bearer, ca = credentials(herd.local)
    (tmp_path / "ca.pem").write_bytes(ca)
    script = tmp_path / "slow_put.py"
    script.write_text(SLOW_PUT)
    block = str(MiB if herd.backend == "s3" else 64 * 1024)  # S3 shows an upload from 16 MiB on
    writers = [
        subprocess.Popen(
            [sys.executable, str(script), url, bearer, str(tmp_path / "ca.pem"), key, block]
        )
        for key in ("atomic/obj", "atomic/new")
    ]
    try:
        wait_for(lambda: len(herd.in_flight()) == 2, 30, "both uploads to be under way")
        for _ in range(5):  # readers during the uploads
            assert data.cat("atomic/obj") == b"version one"
            assert not data.exists("atomic/new")
            assert [i.key for i in data.ls("atomic/")] == ["atomic/obj"]
            time.sleep(0.1)
    finally:
        for proc in writers:
            proc.kill()
            proc.wait(10)
    wait_for(lambda: not herd.in_flight(), 20, "the abandoned uploads to be dropped")
    assert data.cat("atomic/obj") == b"version one"
    assert herd.stored("atomic/obj") == b"version one"
    assert not data.exists("atomic/new")
    assert herd.stored("atomic/new") is None
    assert [i.key for i in data.ls("atomic/")] == ["atomic/obj"]
    assert not [i.key for i in data.ls() if i.key.startswith(".herder")]


SLOW_PUT = """
import sys, time, httpx
from herder.security import client_ssl_context

url, bearer, ca, key, block = sys.argv[1:6]

def body():
    chunk = b"x" * int(block)
    for _ in range(100_000):  # killed long before the end
        yield chunk
        time.sleep(0.02)

httpx.put(
    url + "/v1/data/" + key,
    content=body(),
    headers={"Authorization": "Bearer " + bearer},
    verify=client_ssl_context(open(ca, "rb").read()),
    timeout=120,
)
"""


# --------------------------------------------------------------------------- file:// specifics


def test_a_local_datastore_is_plain_files_and_takes_no_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """file:// is served by os calls (fsspec is S3's alone): a bare relative path is
    made absolute, objects and listings land where they should, options are refused."""
    monkeypatch.chdir(tmp_path)
    store = Datastore("rel/data")
    store.put_stream("a/b.txt", [b"o", b"ne"])
    store.put_stream("a.txt", [b"two"])
    assert (tmp_path / "rel" / "data" / "a" / "b.txt").read_bytes() == b"one"
    assert [o.key for o in store.ls("")] == ["a.txt", "a/b.txt"]
    info, chunks = store.open_read("a/b.txt")
    assert (info.size, b"".join(chunks)) == (3, b"one")
    assert store.exists("a.txt")
    assert not store.exists("a")
    store.rm("a.txt")
    assert [o.key for o in store.ls("")] == ["a/b.txt"]
    with pytest.raises(ConfigError, match=r"file:// takes no options \(given: key\)") as info:
        Datastore(f"file://{tmp_path}/other", {"key": "x"})
    assert info.value.field == "datastore_options"
    assert not (tmp_path / "other").exists()


RAW_BAD_KEYS = [
    ("%2E%2E/x", "'..' segment"),
    ("a/%2E%2E/b", "'..' segment"),
    ("a/%2E/b", "'.' segment"),
    ("a//b", "empty segment"),
    ("a/", "empty segment"),
    ("/abs", "absolute"),
    ("a%5Cb", "backslash"),
    ("a%00b", "NUL character"),
    ("a%0Ab", "U+000A"),
    ("a%7F", "U+007F"),
    (".herder-tmp/x", "reserved prefix"),
    (".herder-meta/x", "reserved prefix"),
    ("x" * 1025, "the limit is 1024"),
    ("a/" + "s" * 256, "longer than 255 bytes"),
    ("", "is empty"),
]


def test_bad_keys_are_refused_over_http_before_anything_is_written(file_herd: Herd) -> None:
    root = file_herd.local.home / "data"
    file_herd.data.put("keep/me", b"kept")
    before = files_under(root)
    with raw_http(file_herd.local) as http:
        for raw, rule in RAW_BAD_KEYS:
            response = http.put("/v1/data/" + raw, content=b"z" * 300_000)
            assert response.status_code == 400, (raw, response.text)
            assert rule in response.json()["error"], (raw, response.text)
            assert http.get("/v1/data/" + raw).status_code == 400, raw
            assert http.get("/v1/data-info/" + raw).status_code == 400, raw
            assert http.delete("/v1/data/" + raw).status_code == 400, raw
        refused = http.get("/v1/data", params={"prefix": "../"})
        assert refused.status_code == 400
        assert "'..' segment" in refused.json()["error"]
    with raw_http(file_herd.local, bearer="not-a-token") as http:
        assert http.put("/v1/data/sneaky", content=b"x").status_code == 401
        assert http.get("/v1/data/keep/me").status_code == 401
        assert http.get("/v1/data").status_code == 401
    assert files_under(root) == before  # nothing written, not even a temporary file


def test_the_client_refuses_bad_keys_without_a_request(file_herd: Herd) -> None:
    ca = (file_herd.local.home / "tls" / "ca.pem").read_bytes()
    with DataClient(f"https://127.0.0.1:{free_port()}", "token", ca) as data:  # nobody there
        for key in ("../x", "a//b", "/abs", ".herder-meta/x", "a\x00"):
            with pytest.raises(BadKey, match="bad datastore key"):
                data.put(key, b"x")
            with pytest.raises(BadKey):
                data.get_file(key, "/nonexistent/never")
        with pytest.raises(BadKey, match="bad datastore prefix"):
            data.ls("/")


def test_wrong_credentials_are_an_authentication_error(file_herd: Herd) -> None:
    url, _, ca = credentials(file_herd.local)
    with DataClient(url, "hd1.bogus", ca) as data, pytest.raises(AuthenticationError):
        data.ls()


def test_checksum_is_verified_on_fetch(file_herd: Herd, tmp_path: Path) -> None:
    data = file_herd.data
    payload = os.urandom(2 * MiB)
    data.put("corrupt/x.bin", payload)
    stored = file_herd.local.home / "data" / "corrupt" / "x.bin"
    with stored.open("r+b") as file:  # one flipped byte, same size: bit rot
        file.seek(MiB + 3)
        byte = file.read(1)
        file.seek(MiB + 3)
        file.write(bytes([byte[0] ^ 0xFF]))

    target = tmp_path / "x.bin"
    with pytest.raises(ChecksumMismatch, match=r"'corrupt/x.bin' is corrupt") as caught:
        data.get_file("corrupt/x.bin", target)
    assert caught.value.context["expected"] == sha256(payload)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # and no temporary file beside it
    with pytest.raises(ChecksumMismatch):
        data.cat("corrupt/x.bin")

    target.write_bytes(b"an older copy")  # an existing file is left untouched
    with pytest.raises(ChecksumMismatch):
        data.get_file("corrupt/x.bin", target)
    assert target.read_bytes() == b"an older copy"

    env = file_herd.local.env()
    out = tmp_path / "cli.bin"
    assert "corrupt" in one_line_error(cli(env, "get", "corrupt/x.bin", str(out)))
    assert not out.exists()
    assert cli(env, "cat", "corrupt/x.bin").stdout == b""  # nothing printed unverified

    stored.write_bytes(payload[:1000])  # truncated
    with pytest.raises(ChecksumMismatch, match="got 1000 bytes"):
        data.cat("corrupt/x.bin")

    data.put("corrupt/x.bin", payload)  # a fresh put heals it
    assert data.cat("corrupt/x.bin") == payload


def test_readers_never_see_a_partial_object(file_herd: Herd) -> None:
    """Overwrites race reads: every read is one whole version (the checksum would tell)."""
    data = file_herd.data
    versions = [bytes([65 + i]) * (4 * MiB) for i in range(2)]
    data.put("race/obj", versions[0])
    failures: list[BaseException] = []

    def overwrite() -> None:
        try:
            for i in range(20):
                data.put("race/obj", versions[i % 2])
        except BaseException as exc:
            failures.append(exc)

    writer = threading.Thread(target=overwrite)
    writer.start()
    reads = 0
    deadline = time.monotonic() + 60
    while writer.is_alive() and time.monotonic() < deadline:
        assert data.cat("race/obj") in versions
        reads += 1
    writer.join(60)
    assert not failures
    assert reads > 0


def test_an_object_put_by_hand_is_adopted(file_herd: Herd) -> None:
    """Bytes dropped straight into the directory are hashed on first use, then served."""
    root = file_herd.local.home / "data"
    (root / "byhand").mkdir()
    (root / "byhand" / "f.txt").write_bytes(b"dropped in")
    assert file_herd.data.info("byhand/f.txt").sha256 == sha256(b"dropped in")
    assert file_herd.data.cat("byhand/f.txt") == b"dropped in"
    assert (root / ".herder-meta" / "byhand" / "f.txt").exists()


def test_a_key_cannot_be_an_object_and_a_prefix_on_file(file_herd: Herd) -> None:
    data = file_herd.data
    data.put("clash/a", b"object")
    with pytest.raises(BadKey, match="collides"):
        data.put("clash/a/b", b"under it")
    data.put("clash2/a/b", b"object")
    with pytest.raises(BadKey, match="collides"):
        data.put("clash2/a", b"over it")
    assert data.cat("clash/a") == b"object"
    assert [i.key for i in data.ls("clash")] == ["clash/a", "clash2/a/b"]
    assert not file_herd.in_flight()


@pytest.mark.slow
def test_two_gigabytes_stream_in_bounded_memory(file_herd: Herd, tmp_path: Path) -> None:
    """A 2 GiB sparse file goes up and comes back; neither side's RSS grows by 150 MB."""
    size = 2 * 1024**3
    source = tmp_path / "zeros.bin"
    with source.open("wb") as file:
        file.truncate(size)
    expected = hashlib.sha256()
    zeros = bytes(CHUNK)
    for _ in range(size // CHUNK):
        expected.update(zeros)

    assert file_herd.local.process is not None
    coordinator = psutil.Process(file_herd.local.process.pid)
    me = psutil.Process()
    base = {"coordinator": coordinator.memory_info().rss, "client": me.memory_info().rss}
    peak = dict(base)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak["coordinator"] = max(peak["coordinator"], coordinator.memory_info().rss)
            peak["client"] = max(peak["client"], me.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    target = tmp_path / "back.bin"
    try:
        started = time.monotonic()
        put = file_herd.data.put_file("big/zeros.bin", source)
        put_s = time.monotonic() - started
        got = file_herd.data.get_file("big/zeros.bin", target)
        get_s = time.monotonic() - started - put_s
    finally:
        done.set()
        sampler.join()
    try:
        assert put.sha256 == got.sha256 == expected.hexdigest()
        assert target.stat().st_size == size
        growth = {side: (peak[side] - base[side]) / 1e6 for side in base}
        print(f"2 GiB: put {put_s:.1f}s, get {get_s:.1f}s, RSS growth (MB) {growth}")
        assert growth["coordinator"] < 150, growth
        assert growth["client"] < 150, growth
        assert put_s + get_s < 120
    finally:
        target.unlink(missing_ok=True)
        source.unlink()
        file_herd.data.rm("big/zeros.bin")


# --------------------------------------------------------------------------- failures


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (root only; HERDER_REQUIRE_ROOT=1 makes a failed mount a failure)."""
    with tmpfs(tmp_path / "tiny", "4m") as mount_point:
        yield mount_point


def test_a_full_disk_is_reported_and_leaves_nothing(tiny_fs: Path, tmp_path: Path) -> None:
    url = tiny_fs.as_uri()
    store = Datastore(url)  # the datastore itself first
    with pytest.raises(DatastoreFull) as caught:
        store.put_stream("big/too-big.bin", (b"\xff" * CHUNK for _ in range(8)))
    assert "'big/too-big.bin'" in str(caught.value)
    assert caught.value.context["path"] == f"{url}/big/too-big.bin"
    assert str(tiny_fs) in str(caught.value)
    assert files_under(tiny_fs) == {}
    assert not store.exists("big/too-big.bin")

    local = start_herd(tmp_path / "home", env={"HERDER_DATASTORE": url})
    try:
        assert local.client is not None
        data = local.client.data
        data.put("small.txt", b"fits")
        source = tmp_path / "eight.bin"
        source.write_bytes(os.urandom(8 * MiB))
        with pytest.raises(DatastoreFull, match=r"no space left for 'too-big.bin' at file://"):
            data.put_file("too-big.bin", source)
        assert [i.key for i in data.ls()] == ["small.txt"]
        assert not data.exists("too-big.bin")
        assert set(files_under(tiny_fs)) == {"small.txt", ".herder-meta/small.txt"}
        err = one_line_error(cli(local.env(), "put", str(source), "again.bin"))
        assert "datastore full" in err
        assert "'again.bin'" in err
        assert set(files_under(tiny_fs)) == {"small.txt", ".herder-meta/small.txt"}
        data.put("after.txt", b"space is back")  # nothing leaked: small puts still fit
        assert data.cat("after.txt") == b"space is back"
    finally:
        local.stop()


def test_a_full_local_disk_on_fetch_is_reported_and_leaves_nothing(
    file_herd: Herd, tiny_fs: Path
) -> None:
    file_herd.data.put("fetch/eight.bin", os.urandom(8 * MiB))
    target = tiny_fs / "eight.bin"
    with pytest.raises(
        DatastoreFull, match=r"no space left to fetch 'fetch/eight\.bin' into"
    ) as caught:
        file_herd.data.get_file("fetch/eight.bin", target)
    assert caught.value.context["path"] == str(target)
    assert files_under(tiny_fs) == {}


def test_an_unreachable_s3_endpoint_is_reported_within_seconds(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    store = Datastore(f"s3://{BUCKET}/{S3_PREFIX}", options)
    started = time.monotonic()
    with pytest.raises(DatastoreUnavailable, match=r"unreachable .*4 attempts over") as caught:
        store.put_stream("a/b", iter([b"never sent"]))
    assert time.monotonic() - started < 10
    assert endpoint in str(caught.value)

    local = start_herd(
        tmp_path / "home",
        datastore=f"s3://{BUCKET}/{S3_PREFIX}",
        options=options,
        env=aws_env(tmp_path),
    )
    try:
        assert local.client is not None
        data = local.client.data
        for attempt in (lambda: data.put("a/b", b"x"), data.ls):
            started = time.monotonic()
            with pytest.raises(DatastoreUnavailable, match=f"unreachable.*{endpoint}"):
                attempt()
            assert time.monotonic() - started < 10
        assert "unreachable" in one_line_error(cli(local.env(), "ls"))
    finally:
        local.stop()


def test_an_unreachable_coordinator_is_reported_after_bounded_retries(file_herd: Herd) -> None:
    ca = (file_herd.local.home / "tls" / "ca.pem").read_bytes()
    url = f"https://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with (
        DataClient(url, "token", ca) as data,
        pytest.raises(DatastoreUnavailable, match=r"unreachable: 4 attempts"),
    ):
        data.ls()
    assert time.monotonic() - started < 10


class _RequestLog(logging.Handler):
    """The requests a moto server answered, as ``METHOD /path?query`` lines."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())  # werkzeug's colours
        if '"' in text:
            self.lines.append(text.split('"')[1].rsplit(" ", 1)[0])

    def taken(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


def test_s3_requests_per_operation_stay_few(tmp_path: Path) -> None:
    """S3 bills and waits per request: a small put is one PUT of the object (no
    multipart upload), a sidecar is read with one GET (no HEAD, no LIST for a
    missing one), and only an object beyond one part goes up in parts."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=True)
    log = _RequestLog()
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.addHandler(log)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3_client(endpoint).create_bucket(Bucket=BUCKET)
        options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        store = Datastore(f"s3://{BUCKET}/{S3_PREFIX}", options)
        log.taken()
        store.put_stream("k/small", iter([b"hello"]))
        put = log.taken()
        assert [r for r in put if r.startswith("PUT") and ".herder-meta" not in r] == [
            f"PUT /{BUCKET}/{S3_PREFIX}/k/small"
        ], put
        sidecar = [r for r in put if ".herder-meta" in r]
        assert [r.split()[0] for r in sidecar] == ["GET", "GET", "PUT"], put
        assert len(put) == 4, put
        _, chunks = store.open_read("k/small")
        assert b"".join(chunks) == b"hello"
        read = log.taken()
        assert [r.split()[0] for r in read if ".herder-meta" in r] == ["GET"], read
        assert len(read) <= 3, read  # the sidecar, then the object's size and bytes
        big = os.urandom(S3_PART + 1)
        store.put_stream("k/big", iter([big[:MiB], big[MiB:]]))
        multipart = log.taken()
        assert any("?uploads" in r for r in multipart), multipart
        assert store.info("k/big").size == S3_PART + 1
    finally:
        werkzeug.removeHandler(log)
        server.stop()
