"""Install releases on a worker node: one environment per release, once per node.

Layout under the cache root::

    <id>/            a published release (renamed into place in one step)
        env/         its virtual environment (``env/bin/python``)
        src/         the unpacked project (empty for a wheel release)
        .size        bytes on disk of ``<id>/``, measured before publishing
        .ready       written last: only a directory holding it is installed;
                     its mtime is the release's last use (LRU)
    <id>.lock        flock: held while one process installs (or evicts) <id>
    <id>.use         flock: shared while a task runs in <id>, exclusive to evict
    .tmp-<id>-*      an install in progress (or an evicted release being removed)
    .uv-cache/       uv's download and build cache, shared by all installs

Every step that other processes can observe is atomic: an install is built
aside and renamed into place, an eviction renames the release aside before
deleting it, and the lock files are never removed (removing a lock file that
someone holds would let a second process lock a new file of the same name).

The uv cache is left out of the size accounting: envs are installed with
``--link-mode copy``, so the cache can be deleted at any time without
breaking an environment, and it holds one copy of each wheel, not one per
release.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import Literal

import herder
from herder.bundle import unpack
from herder.errors import ReleaseError
from herder.releases.manifest import BUNDLED_WHEELS, Manifest, is_release_id

INSTALL_TIMEOUT = 1800.0  # seconds for one installer command
_OUTPUT_TAIL = 4096  # bytes of installer output kept in an error
_READY = ".ready"
_SIZE = ".size"
_PTH = "_herder_base.pth"

Installer = Literal["auto", "uv", "pip"]


@dataclass(frozen=True)
class Installed:
    """A release ready to run on this node."""

    release_id: str
    root: Path  # <cache>/<release_id>/
    python: Path  # root/env/bin/python
    source: Path  # root/src (empty for a wheel release)
    cached: bool  # True: it was there already; this call installed nothing
    seconds: float  # how long ensure() took, waiting for another installer included


@dataclass(frozen=True)
class _NodePython:
    """The interpreter envs are made from, and where its own packages live."""

    executable: str
    version: str  # major.minor
    paths: tuple[str, ...]  # purelib, platlib (deduplicated)


class Hold:
    """An installed release marked in use: the evictor, in any process, leaves it alone.

    A shared flock on ``<id>.use`` kept open until ``release()``; the evictor
    needs it exclusively, so it cannot remove the release while this is held.
    """

    def __init__(self, release_id: str, fd: int) -> None:
        self.release_id = release_id
        self._fd: int | None = fd

    @property
    def is_held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Stop marking the release in use (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> Hold:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class ReleaseCache:
    """The releases installed on this node, under ``root``, capped at ``max_bytes``.

    Safe to share between threads and between processes: every decision that
    matters is taken under a file lock in ``root``, not in memory.
    """

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int = 10 * 2**30,
        find_links: Sequence[str] = (),
        no_index: bool = False,
        python: str | None = None,
        installer: Installer = "auto",
    ) -> None:
        self.root = Path(root).absolute()
        self.max_bytes = max_bytes
        self.find_links = tuple(find_links)
        self.no_index = no_index
        self._python = python
        self._installer = installer

    # -- public API -----------------------------------------------------------------------------

    def ensure(self, manifest: Manifest, fetch: Callable[[Path], None]) -> Installed:
        """Return the release's environment, installing it first if this node lacks it.

        Blocking. ``fetch(path)`` must write the release's bundle to ``path``;
        it is called at most once per install, and only by the one caller (of
        all threads and processes) that holds the release's install lock.
        """
        started = time.monotonic()
        release_id = manifest.id
        node = self._node_python
        if manifest.python != node.version:
            raise ReleaseError(
                f"release {release_id} needs Python {manifest.python}; "
                f"this node runs Python {node.version}",
                release=release_id,
                output="",
            )
        if self._touch(release_id):
            return self._installed(release_id, cached=True, started=started)
        self.root.mkdir(parents=True, exist_ok=True)
        with _flock(self.root / f"{release_id}.lock", fcntl.LOCK_EX):
            if self._touch(release_id):  # another installer finished while we waited
                return self._installed(release_id, cached=True, started=started)
            self._remove_leftovers(release_id)
            self._install(manifest, fetch, node)
        self.evict(keep=(release_id,))
        return self._installed(release_id, cached=False, started=started)

    def hold(self, release_id: str) -> Hold:
        """Mark an installed release in use until ``Hold.release()``.

        Raises ReleaseError if it is not installed (for instance evicted between
        ``ensure()`` and this call): ensure it again, then hold it.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / f"{release_id}.use", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # Blocks only while an evictor holds it exclusively, i.e. is removing it.
            fcntl.flock(fd, fcntl.LOCK_SH)
            if not self._touch(release_id):
                raise ReleaseError(f"release {release_id} is not installed", release=release_id)
        except BaseException:
            os.close(fd)
            raise
        return Hold(release_id, fd)

    def installed(self) -> list[str]:
        """Release ids installed here (with a ``.ready`` marker), most recently used first."""
        found: list[tuple[int, str]] = []
        if not self.root.is_dir():
            return []
        for entry in self.root.iterdir():
            if not is_release_id(entry.name):
                continue
            try:
                used = (entry / _READY).stat().st_mtime_ns
            except (FileNotFoundError, NotADirectoryError):
                continue  # not installed (a lock file, or being evicted right now)
            found.append((used, entry.name))
        found.sort(key=lambda item: (-item[0], item[1]))
        return [release_id for _, release_id in found]

    def evict(self, *, keep: Collection[str] = ()) -> list[str]:
        """Remove least recently used releases until the total fits in ``max_bytes``.

        Skips releases in ``keep``, in use (``hold()``, in any process) or being
        installed; so the total may stay above the cap. Returns the removed ids,
        in the order removed.
        """
        order = self.installed()
        sizes = {release_id: self._size(release_id) for release_id in order}
        total = sum(sizes.values())
        removed: list[str] = []
        for release_id in reversed(order):  # least recently used first
            if total <= self.max_bytes:
                break
            if release_id in keep:
                continue
            if self._remove_if_idle(release_id):
                removed.append(release_id)
                total -= sizes[release_id]
        return removed

    # -- install --------------------------------------------------------------------------------

    def _install(
        self, manifest: Manifest, fetch: Callable[[Path], None], node: _NodePython
    ) -> None:
        """Build the release aside, then publish it; leave nothing behind on failure."""
        release_id = manifest.id
        final = self.root / release_id
        work = self.root / f".tmp-{release_id}-{secrets.token_hex(4)}"
        work.mkdir()
        published = False
        try:
            self._build(manifest, fetch, node, work, final)
            os.rename(work, final)
            published = True
            (final / _READY).touch()
            _mark_used(final / _READY)
        except BaseException as exc:
            _remove_tree(final if published else work, exc)
            if isinstance(exc, ReleaseError) or not isinstance(exc, Exception):
                raise
            raise ReleaseError(
                f"release {release_id} could not be installed: {exc!r}",
                release=release_id,
                output="",
            ) from exc

    def _build(
        self,
        manifest: Manifest,
        fetch: Callable[[Path], None],
        node: _NodePython,
        work: Path,
        final: Path,
    ) -> None:
        """Fetch, check, unpack and install the release into ``work`` (to live at ``final``)."""
        release_id = manifest.id
        staging = work / ".bundle"
        staging.mkdir()
        bundle = staging / "bundle.tar.gz"
        fetch(bundle)
        if not bundle.is_file():
            raise ReleaseError(
                f"release {release_id}: fetch wrote no bundle", release=release_id, output=""
            )
        digest = _sha256(bundle)
        if digest != manifest.sha256:
            raise ReleaseError(
                f"release {release_id}: bundle sha256 {digest} does not match the manifest's "
                f"{manifest.sha256}",
                release=release_id,
                output="",
            )
        unpacked = staging / "unpacked"
        unpacked.mkdir()
        try:
            unpack(bundle, unpacked)
        except ReleaseError as exc:
            raise ReleaseError(
                f"release {release_id}: {exc}", release=release_id, output=""
            ) from exc
        bundle.unlink()
        source = work / "src"
        if (unpacked / "src").is_dir():
            os.rename(unpacked / "src", source)
        else:
            source.mkdir()

        env = work / "env"
        installer = self._installer_command(release_id)
        run = _Runner(release_id, self.root)
        if installer is None:
            run([node.executable, "-m", "venv", str(env)])
        else:
            run([installer, "venv", "--quiet", "--python", node.executable, str(env)])

        wheels = unpacked / "wheels"
        args: list[str] = []
        if manifest.no_index or self.no_index:
            args.append("--no-index")
        for link in (*manifest.find_links, *self.find_links):
            args += ["--find-links", str(wheels) if link == BUNDLED_WHEELS else link]
        targets: list[str] = []
        if manifest.requirements:
            requirements = staging / "requirements.txt"
            requirements.write_text("".join(f"{line}\n" for line in manifest.requirements))
            targets += ["-r", str(requirements)]
        if manifest.kind == "wheel":
            if manifest.wheel is None or not (wheels / manifest.wheel).is_file():
                raise ReleaseError(
                    f"release {release_id}: its wheel {manifest.wheel!r} is not in the bundle",
                    release=release_id,
                    output="",
                )
            targets.append(str(wheels / manifest.wheel))
        env_python = env / "bin" / "python"
        if targets:
            if installer is None:
                pip = [str(env_python), "-m", "pip", "install"]
                run([*pip, "--disable-pip-version-check", "--no-input", *args, *targets])
            else:
                uv_pip = [installer, "pip", "install", "--python", str(env_python)]
                run([*uv_pip, "--link-mode", "copy", *args, *targets])

        site_packages = Path(
            run([str(env_python), "-c", _PURELIB], keep_output=True).strip().splitlines()[-1]
        )
        lines: list[str] = []
        if manifest.kind in ("directory", "git"):
            lines.append(str(final / "src"))
            if _holds_packages(source / "src"):
                lines.append(str(final / "src" / "src"))
        lines += [str(Path(herder.__file__).resolve().parent.parent), *node.paths]
        (site_packages / _PTH).write_text("".join(f"{line}\n" for line in dict.fromkeys(lines)))

        shutil.rmtree(staging)
        _relocate(env, work, final)
        (work / _SIZE).write_text(f"{_disk_usage(work)}\n")

    def _installer_command(self, release_id: str) -> str | None:
        """The uv binary to install with, or None to use ``venv`` + pip."""
        if self._installer == "pip":
            return None
        found = _find_uv()
        if found is None and self._installer == "uv":
            raise ReleaseError(
                f"release {release_id}: uv was asked for but is not installed on this node",
                release=release_id,
                output="",
            )
        return found

    @cached_property
    def _node_python(self) -> _NodePython:
        """Facts about the node interpreter, asked once (in-process when it is this one)."""
        if self._python is None or self._python == sys.executable:
            paths = sysconfig.get_paths()
            return _NodePython(
                executable=sys.executable,
                version=f"{sys.version_info.major}.{sys.version_info.minor}",
                paths=tuple(dict.fromkeys([paths["purelib"], paths["platlib"]])),
            )
        probe = (
            "import sys, sysconfig; p = sysconfig.get_paths(); "
            "print(f'{sys.version_info.major}.{sys.version_info.minor}'); "
            "print(p['purelib']); print(p['platlib'])"
        )
        output = _Runner("-", self.root)([self._python, "-c", probe], keep_output=True)
        version, purelib, platlib = output.strip().splitlines()[-3:]
        return _NodePython(self._python, version, tuple(dict.fromkeys([purelib, platlib])))

    # -- bookkeeping ----------------------------------------------------------------------------

    def _installed(self, release_id: str, *, cached: bool, started: float) -> Installed:
        root = self.root / release_id
        return Installed(
            release_id=release_id,
            root=root,
            python=root / "env" / "bin" / "python",
            source=root / "src",
            cached=cached,
            seconds=time.monotonic() - started,
        )

    def _touch(self, release_id: str) -> bool:
        """Record a use of the release (its LRU time); False if it is not installed."""
        try:
            _mark_used(self.root / release_id / _READY)
        except FileNotFoundError:
            return False
        return True

    def _size(self, release_id: str) -> int:
        """Bytes on disk of an installed release, as measured when it was installed."""
        try:
            return int((self.root / release_id / _SIZE).read_text())
        except FileNotFoundError:
            return 0  # evicted meanwhile by another process
        except ValueError:
            return _disk_usage(self.root / release_id)  # damaged: measure again

    def _remove_if_idle(self, release_id: str) -> bool:
        """Remove a release unless it is in use or being installed; True if removed."""
        with (
            _try_flock(self.root / f"{release_id}.lock") as not_installing,
            _try_flock(self.root / f"{release_id}.use") as not_used,
        ):
            if not (not_installing and not_used):
                return False
            final = self.root / release_id
            if not (final / _READY).exists():
                return False  # another evictor got it first
            trash = self.root / f".tmp-{release_id}-{secrets.token_hex(4)}"
            os.rename(final, trash)  # unpublished in one step
            shutil.rmtree(trash)  # under the lock: an installer would clear it too
        return True

    def _remove_leftovers(self, release_id: str) -> None:
        """Clear what a killed installer or evictor left (we hold the install lock)."""
        for entry in self.root.glob(f".tmp-{release_id}-*"):
            shutil.rmtree(entry)
        partial = self.root / release_id
        if partial.exists():  # renamed but killed before .ready was written
            shutil.rmtree(partial)


class _Runner:
    """Runs installer commands with their output captured, failing as ReleaseError."""

    def __init__(self, release_id: str, cache_root: Path) -> None:
        self.release_id = release_id
        self.env = {
            **os.environ,
            "UV_CACHE_DIR": str(cache_root / ".uv-cache"),
            "UV_NO_PROGRESS": "1",
            "UV_PYTHON_DOWNLOADS": "never",  # use the node's interpreter, never fetch one
            "PIP_NO_INPUT": "1",
        }
        self.env.pop("VIRTUAL_ENV", None)

    def __call__(self, command: list[str], *, keep_output: bool = False) -> str:
        try:
            done = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self.env,
                timeout=INSTALL_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            output = _tail(exc.output if isinstance(exc.output, bytes) else b"")
            raise self._error(f"timed out after {INSTALL_TIMEOUT:.0f} s", command, output) from exc
        except OSError as exc:
            raise self._error(f"could not start: {exc}", command, "") from exc
        output = _tail(done.stdout)
        if done.returncode != 0:
            raise self._error(f"failed (exit {done.returncode})", command, output)
        return output if keep_output else ""

    def _error(self, what: str, command: list[str], output: str) -> ReleaseError:
        shown = " ".join(command[:3])
        return ReleaseError(
            f"release {self.release_id}: `{shown} ...` {what}:\n{output}",
            release=self.release_id,
            output=output,
        )


def _tail(output: bytes) -> str:
    return output[-_OUTPUT_TAIL:].decode(errors="replace")


_PURELIB = "import sysconfig; print(sysconfig.get_paths()['purelib'])"


def _find_uv() -> str | None:
    """The uv binary: the one herder depends on (a known version), else one on PATH."""
    try:
        import uv
    except ImportError:
        return shutil.which("uv")
    try:
        return str(uv.find_uv_bin())
    except FileNotFoundError:
        return shutil.which("uv")


def _mark_used(ready: Path) -> None:
    """Set the LRU time: the clock read here, not the kernel's coarse file timestamp.

    File times taken by the kernel (``touch``, ``utime(None)``) advance in
    ticks of a few milliseconds, so two uses close together would tie.
    """
    now = time.time_ns()
    os.utime(ready, ns=(now, now))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _holds_packages(directory: Path) -> bool:
    """A src-layout directory: it holds modules or regular packages."""
    if not directory.is_dir():
        return False
    return any(
        (entry.is_file() and entry.suffix == ".py") or (entry / "__init__.py").is_file()
        for entry in directory.iterdir()
    )


def _relocate(env: Path, built_at: Path, lives_at: Path) -> None:
    """Point the env's scripts at where it will live: venvs record their own path.

    Console-script shebangs, activate scripts and ``pyvenv.cfg`` name the
    build directory; the interpreter itself finds its env relative to itself.
    """
    old, new = str(built_at).encode(), str(lives_at).encode()
    for path in [*(env / "bin").iterdir(), env / "pyvenv.cfg"]:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1 << 20:
            continue
        data = path.read_bytes()
        if old in data:
            path.write_bytes(data.replace(old, new))


def _disk_usage(root: Path) -> int:
    """Bytes allocated under ``root`` (like ``du``: each inode once, symlinks not followed)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for directory, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            st = os.lstat(os.path.join(directory, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def _remove_tree(path: Path, failure: BaseException) -> None:
    """Remove a failed install; if that fails too, say so on the original error."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        failure.add_note(f"and {path} could not be removed: {exc}")


@contextlib.contextmanager
def _flock(path: Path, operation: int) -> Iterator[None]:
    """Hold a flock on ``path`` (its own open file description: works between threads too)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _try_flock(path: Path) -> Iterator[bool]:
    """Try to lock ``path`` exclusively without waiting; yields whether it was taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)
