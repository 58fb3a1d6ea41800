"""The release cache with real installers, real files and real processes; no network.

Bundles are made by hand here (a gzipped tar of ``src/`` and ``wheels/``)
with a wheelhouse written by ``tests.wheels``, and installed with
``--no-index``, so nothing is fetched from an index.
"""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from herder.errors import ReleaseError
from herder.releases.cache import Installed, ReleaseCache
from herder.releases.manifest import Manifest
from tests.wheels import make_versioned_package, make_wheel

PROJECT = Path(__file__).resolve().parents[2]
NODE_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"

APP = {"myapp/__init__.py": "import herderdep\n\nDEP = herderdep.VERSION\n"}


def make_release(
    out: Path,
    *,
    files: dict[str, str] | None = None,
    wheels: tuple[Path, ...] = (),
    requirements: tuple[str, ...] = (),
    kind: str = "directory",
    wheel: str | None = None,
    python: str = NODE_PYTHON,
) -> tuple[Manifest, Path]:
    """A bundle (``src/<files>``, ``wheels/<wheels>``) and its manifest, offline."""
    release_id = f"r-{secrets.token_hex(10)}"
    out.mkdir(parents=True, exist_ok=True)
    bundle = out / f"{release_id}.tar.gz"
    members = 0
    with tarfile.open(bundle, "w:gz") as tar:
        for name, text in (files or {}).items():
            data = text.encode()
            info = tarfile.TarInfo(f"src/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            members += 1
        for path in wheels:
            tar.add(path, arcname=f"wheels/{path.name}")
            members += 1
    data = bundle.read_bytes()
    manifest = Manifest(
        id=release_id,
        kind=kind,  # type: ignore[arg-type]
        source="test",
        requirements=list(requirements),
        python=python,
        find_links=["wheels"],
        no_index=True,
        wheel=wheel,
        files=members,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        created_at=time.time(),
    )
    return manifest, bundle


class Fetcher:
    """``fetch`` for ensure(): copies the bundle and counts the calls (thread-safe)."""

    def __init__(self, bundle: Path, *, fail_first: int = 0, delay: float = 0.0) -> None:
        self.bundle = bundle
        self.calls = 0
        self.fail_first = fail_first
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> None:
        with self._lock:
            self.calls += 1
            call = self.calls
        time.sleep(self.delay)
        if call <= self.fail_first:
            raise OSError("datastore hiccup")
        shutil.copyfile(self.bundle, path)


def run_in(installed: Installed, code: str) -> str:
    done = subprocess.run(
        [str(installed.python), "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd="/",
    )
    return done.stdout.strip()


def leftovers(root: Path) -> set[str]:
    """What the cache dir holds besides lock files and uv's cache."""
    return {
        p.name
        for p in root.iterdir()
        if p.suffix not in (".lock", ".use") and p.name != ".uv-cache"
    }


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wheelhouse")
    make_versioned_package(path, "herderdep", "1.0")
    make_versioned_package(path, "herderdep", "2.0")
    return path


def dep(wheelhouse: Path, version: str) -> Path:
    return wheelhouse / f"herderdep-{version}-py3-none-any.whl"


@pytest.fixture
def app(tmp_path: Path, wheelhouse: Path) -> tuple[Manifest, Path]:
    return make_release(
        tmp_path / "bundles",
        files=APP,
        wheels=(dep(wheelhouse, "1.0"),),
        requirements=("herderdep==1.0",),
    )


# -- install once, then cached ---------------------------------------------------------------


def test_install_once_then_cached(tmp_path: Path, app: tuple[Manifest, Path]) -> None:
    manifest, bundle = app
    cache = ReleaseCache(tmp_path / "cache")
    fetch = Fetcher(bundle)

    first = cache.ensure(manifest, fetch)
    second = cache.ensure(manifest, fetch)

    assert fetch.calls == 1
    assert (first.cached, second.cached) == (False, True)
    assert first.root == tmp_path / "cache" / manifest.id
    assert first.python == first.root / "env" / "bin" / "python"
    assert first.source == first.root / "src"
    assert (first.source / "myapp" / "__init__.py").is_file()
    assert (first.root / ".ready").is_file()
    assert cache.installed() == [manifest.id]
    assert leftovers(tmp_path / "cache") == {manifest.id}
    # a new cache object (a restarted agent) finds it too
    assert ReleaseCache(tmp_path / "cache").ensure(manifest, fetch).cached
    assert fetch.calls == 1


def test_env_imports_release_dependency_and_herder(
    tmp_path: Path, app: tuple[Manifest, Path]
) -> None:
    manifest, bundle = app
    installed = ReleaseCache(tmp_path / "cache").ensure(manifest, Fetcher(bundle))

    out = run_in(
        installed,
        "import myapp, herderdep, herder, herder.releases.cache, sys; "
        "print(myapp.DEP, herderdep.__file__, herder.__file__, sys.prefix, sep='\\n')",
    )
    version, dep_file, herder_file, prefix = out.splitlines()
    assert version == "1.0"
    assert dep_file.startswith(str(installed.root / "env"))  # the env's copy, not the node's
    assert Path(herder_file).resolve() == (PROJECT / "src" / "herder" / "__init__.py")
    assert Path(prefix) == installed.root / "env"


def test_src_layout_and_no_requirements(tmp_path: Path) -> None:
    manifest, bundle = make_release(
        tmp_path / "bundles",
        files={"src/inner/__init__.py": "X = 'src-layout'\n", "top.py": "Y = 'top'\n"},
    )
    installed = ReleaseCache(tmp_path / "cache").ensure(manifest, Fetcher(bundle))

    assert installed.python.is_file()
    assert run_in(installed, "import inner, top, herder; print(inner.X, top.Y)") == "src-layout top"


def test_wheel_release(tmp_path: Path, wheelhouse: Path) -> None:
    own = make_wheel(
        tmp_path / "own",
        "wheelapp",
        "0.3",
        {"wheelapp/__init__.py": "import herderdep\nDEP = herderdep.VERSION\n"},
        requires=("herderdep==2.0",),
    )
    manifest, bundle = make_release(
        tmp_path / "bundles",
        wheels=(own, dep(wheelhouse, "2.0")),
        kind="wheel",
        wheel=own.name,
    )
    installed = ReleaseCache(tmp_path / "cache").ensure(manifest, Fetcher(bundle))

    assert run_in(installed, "import wheelapp; print(wheelapp.DEP)") == "2.0"
    assert list(installed.source.iterdir()) == []


def test_conflicting_versions_side_by_side(tmp_path: Path, wheelhouse: Path) -> None:
    cache = ReleaseCache(tmp_path / "cache")
    envs = {}
    for version in ("1.0", "2.0"):
        manifest, bundle = make_release(
            tmp_path / "bundles",
            files=APP,
            wheels=(dep(wheelhouse, version),),
            requirements=(f"herderdep=={version}",),
        )
        envs[version] = cache.ensure(manifest, Fetcher(bundle))

    for version, installed in envs.items():
        assert run_in(installed, "import myapp; print(myapp.DEP)") == version


# -- concurrency ----------------------------------------------------------------------------


def test_concurrent_threads_install_once(tmp_path: Path, app: tuple[Manifest, Path]) -> None:
    manifest, bundle = app
    cache = ReleaseCache(tmp_path / "cache")
    fetch = Fetcher(bundle, delay=0.3)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: cache.ensure(manifest, fetch), range(4)))

    assert fetch.calls == 1
    assert sorted(r.cached for r in results) == [False, True, True, True]
    assert all(r.seconds >= 0.3 for r in results)  # the waiters waited for the installer
    assert run_in(results[0], "import myapp; print(myapp.DEP)") == "1.0"


ENSURE_SCRIPT = """
import json, shutil, sys, time
from pathlib import Path
sys.path.insert(0, {project!r})
from herder.releases.cache import ReleaseCache
from herder.releases.manifest import Manifest

manifest = Manifest.model_validate_json(Path({manifest!r}).read_text())

def fetch(path):
    with open({counter!r}, "a") as f:
        f.write("fetch\\n")
    time.sleep(0.5)
    shutil.copyfile({bundle!r}, path)

print("start", flush=True)
sys.stdin.readline()
installed = ReleaseCache(Path({root!r})).ensure(manifest, fetch)
print(json.dumps({{"cached": installed.cached}}))
"""


def test_concurrent_processes_install_once(tmp_path: Path, app: tuple[Manifest, Path]) -> None:
    manifest, bundle = app
    (tmp_path / "manifest.json").write_text(manifest.model_dump_json())
    counter = tmp_path / "fetches"
    script = ENSURE_SCRIPT.format(
        project=str(PROJECT),
        manifest=str(tmp_path / "manifest.json"),
        counter=str(counter),
        bundle=str(bundle),
        root=str(tmp_path / "cache"),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in procs:  # both imported and waiting: start them together
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "start"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outputs = [proc.communicate(timeout=60)[0] for proc in procs]

    assert [proc.returncode for proc in procs] == [0, 0]
    assert counter.read_text().splitlines() == ["fetch"]
    cached = sorted(json.loads(out.strip().splitlines()[-1])["cached"] for out in outputs)
    assert cached == [False, True]


# -- failures leave nothing behind ------------------------------------------------------------


def test_unresolvable_requirement_fails_cleanly_and_does_not_poison(
    tmp_path: Path, wheelhouse: Path, app: tuple[Manifest, Path]
) -> None:
    bad, bad_bundle = make_release(
        tmp_path / "bundles",
        files=APP,
        wheels=(dep(wheelhouse, "1.0"),),
        requirements=("herderdep==9.9",),
    )
    root = tmp_path / "cache"
    cache = ReleaseCache(root)
    fetch = Fetcher(bad_bundle)

    with pytest.raises(ReleaseError) as caught:
        cache.ensure(bad, fetch)

    err = caught.value
    assert "No solution found" in str(err) or "not found" in str(err)
    assert "herderdep" in err.output  # type: ignore[attr-defined]
    assert err.release == bad.id  # type: ignore[attr-defined]
    assert leftovers(root) == set()
    assert cache.installed() == []

    with pytest.raises(ReleaseError):  # tried again from scratch, not remembered
        cache.ensure(bad, fetch)
    assert fetch.calls == 2

    good, good_bundle = app
    assert not cache.ensure(good, Fetcher(good_bundle)).cached
    assert cache.installed() == [good.id]


def test_failed_fetch_is_retried(tmp_path: Path, app: tuple[Manifest, Path]) -> None:
    manifest, bundle = app
    root = tmp_path / "cache"
    cache = ReleaseCache(root)
    fetch = Fetcher(bundle, fail_first=1)

    with pytest.raises(ReleaseError, match="datastore hiccup") as caught:
        cache.ensure(manifest, fetch)
    assert isinstance(caught.value.__cause__, OSError)
    assert leftovers(root) == set()

    installed = cache.ensure(manifest, fetch)
    assert (installed.cached, fetch.calls) == (False, 2)


def test_sha256_mismatch_refused(tmp_path: Path, app: tuple[Manifest, Path]) -> None:
    manifest, bundle = app
    forged = manifest.model_copy(update={"sha256": "0" * 64})
    root = tmp_path / "cache"

    with pytest.raises(ReleaseError, match="sha256"):
        ReleaseCache(root).ensure(forged, Fetcher(bundle))
    assert leftovers(root) == set()


def test_python_version_mismatch_refused(tmp_path: Path, app: tuple[Manifest, Path]) -> None:
    manifest, bundle = app
    other = manifest.model_copy(update={"python": "3.99"})
    fetch = Fetcher(bundle)

    with pytest.raises(ReleaseError) as caught:
        ReleaseCache(tmp_path / "cache").ensure(other, fetch)
    assert str(caught.value) == (
        f"release {manifest.id} needs Python 3.99; this node runs Python {NODE_PYTHON}"
    )
    assert fetch.calls == 0


# -- eviction -------------------------------------------------------------------------------

HOLD_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {project!r})
from herder.releases.cache import ReleaseCache

with ReleaseCache(Path({root!r})).hold({release_id!r}):
    print("held", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def hold_elsewhere(tmp_path: Path) -> Iterator[Callable[[Path, str], subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []

    def start(root: Path, release_id: str) -> subprocess.Popen[str]:
        script = HOLD_SCRIPT.format(project=str(PROJECT), root=str(root), release_id=release_id)
        proc = subprocess.Popen(
            [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        if proc.returncode is None:  # the test did not let it go itself
            proc.communicate("\n", timeout=30)


def test_eviction_lru_and_holds(
    tmp_path: Path,
    wheelhouse: Path,
    hold_elsewhere: Callable[[Path, str], subprocess.Popen[str]],
) -> None:
    root = tmp_path / "cache"
    roomy = ReleaseCache(root)

    def release() -> tuple[Manifest, Fetcher]:
        manifest, bundle = make_release(
            tmp_path / "bundles",
            files=APP,
            wheels=(dep(wheelhouse, "1.0"),),
            requirements=("herderdep==1.0",),
        )
        return manifest, Fetcher(bundle)

    (a, fetch_a), (b, fetch_b), (c, fetch_c), (d, fetch_d) = (release() for _ in range(4))
    for manifest, fetch in ((a, fetch_a), (b, fetch_b), (c, fetch_c)):
        roomy.ensure(manifest, fetch)
    assert roomy.ensure(a, fetch_a).cached  # used again: now b is the least recently used
    assert roomy.installed() == [a.id, c.id, b.id]

    # Just over the cap: only the least recently used one goes.
    total = sum(int((root / i / ".size").read_text()) for i in (a.id, b.id, c.id))
    assert total > 0
    assert ReleaseCache(root, max_bytes=total - 1).evict() == [b.id]
    assert roomy.installed() == [a.id, c.id]

    # Nothing fits: a fresh install evicts all it may, but not what is held here or elsewhere.
    tiny = ReleaseCache(root, max_bytes=1)
    other = hold_elsewhere(root, c.id)
    with tiny.hold(a.id) as held:
        assert held.is_held
        assert not tiny.ensure(d, fetch_d).cached
        assert set(tiny.installed()) == {a.id, c.id, d.id}  # d kept: just installed
    assert not held.is_held
    assert tiny.installed()[0] == d.id
    assert tiny.evict() == [a.id, d.id]  # least recently used first; c is still held
    assert tiny.installed() == [c.id]

    other.communicate("\n", timeout=30)
    assert tiny.evict() == [c.id]
    assert tiny.installed() == []
    assert leftovers(root) == set()

    with pytest.raises(ReleaseError, match="not installed"):
        tiny.hold(c.id)
    assert not tiny.ensure(c, fetch_c).cached  # evicted: installed again


# -- pip fallback ---------------------------------------------------------------------------


def test_pip_fallback_offline(tmp_path: Path, app: tuple[Manifest, Path]) -> None:
    manifest, bundle = app
    cache = ReleaseCache(tmp_path / "cache", installer="pip")
    fetch = Fetcher(bundle)

    installed = cache.ensure(manifest, fetch)

    assert not installed.cached
    assert run_in(installed, "import myapp, herder; print(myapp.DEP)") == "1.0"
    assert not (tmp_path / "cache" / ".uv-cache").exists()
    assert cache.ensure(manifest, fetch).cached
    # scripts pip wrote point at the published env, not the build directory
    pip_script = installed.python.parent / "pip"
    # "#!PATH/python", or for a long path pip's "#!/bin/sh" trampoline that execs PATH/python
    head = pip_script.read_text().splitlines()[:2]
    assert any(f"{installed.python.parent}/python" in line for line in head), head
    assert not any(".tmp-" in line for line in head), head
    assert subprocess.run([str(pip_script), "--version"], capture_output=True).returncode == 0
