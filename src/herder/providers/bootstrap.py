"""Getting herder onto a machine that lacks it: wheels of the running herder, the agent's argv.

Shared by the providers whose nodes are other machines (``ssh``; ``ec2`` user
data can use the same pieces). Everything here is synchronous and can take
seconds the first time (zipping dependencies), so async callers run it in a
thread.

Why the wheels are *packed from what is installed* rather than built from
source: a node must run exactly the code the coordinator runs (uncommitted
edits of an editable install included), and the coordinator's machine may
have neither a build backend nor a package index. So:

* herder's wheel holds its package directory as it is on disk (editable
  install) or the files its installed distribution records (wheel install),
  plus the metadata of the installed distribution (name, version,
  dependencies, the ``herder`` console script);
* each dependency's wheel (``install="offline"``) is repacked from the files
  its installed distribution records inside site-packages, with its own
  ``WHEEL`` tags, so compiled extensions keep their platform tags. The
  programs a wheel installs beside the interpreter go in its ``.data/scripts``
  (uv's binary: the host installs with it, and releases use it), except the
  entry-point wrappers, which the installer writes anew for the host's
  python. Headers and other data outside site-packages are not carried:
  herder needs none of them.

Every wheel is named by a hash of its content (the *build id*) and cached
under the caller's directory, so a second coordinator start packs nothing.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as metadata
import json
import logging
import os
import re
import sysconfig
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath

from herder.errors import ProviderError

from .base import LaunchSpec

log = logging.getLogger(__name__)

DIST = "herder"
# The package directory of the running herder (this file is herder/providers/bootstrap.py).
PACKAGE_DIR = Path(__file__).resolve().parents[1]
# Metadata files that describe one installation, not the distribution: never shipped.
_INSTALL_ONLY = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json", "RECORD.jws", "RECORD.p7s"}

# Where dependency wheels are cached, by the way they are packed: wheels packed
# before scripts were carried (uv's binary) must not be shipped again.
_DEPS_DIR = "deps-2"

# zlib's fastest level: a third of level 6's time for ~10% more bytes, and
# wheels are packed on the coordinator's critical path to a first SSH node
_COMPRESS_LEVEL = 1

# (name inside the wheel, file on this machine)
Entry = tuple[str, Path]


@dataclass(frozen=True)
class Bundle:
    """The wheels that install one exact build of herder on a machine."""

    build_id: str  # a content hash naming this exact set of wheels
    herder: Path  # herder's own wheel
    dependencies: tuple[Path, ...] = ()  # every dependency's wheel (offline installs)

    @property
    def wheels(self) -> tuple[Path, ...]:
        """Every file to copy, dependencies first."""
        return (*self.dependencies, self.herder)


def bundle(cache_dir: Path, *, offline: bool) -> Bundle:
    """herder's wheel, with the wheels of all its dependencies when ``offline``."""
    wheel = herder_wheel(cache_dir)
    if not offline:
        return Bundle(build_id=wheel.parent.name, herder=wheel)
    deps = tuple(dependency_wheels(cache_dir))
    digest = hashlib.sha256(wheel.parent.name.encode())
    for dep in deps:
        digest.update(b"\0" + dep.name.encode())
    return Bundle(build_id=digest.hexdigest()[:16], herder=wheel, dependencies=deps)


def herder_wheel(cache_dir: Path) -> Path:
    """A wheel of the running herder, packed once per content hash under ``cache_dir``."""
    dist = _distribution(DIST)
    info_dir = _info_dir(dist)
    if _is_editable(dist):
        entries = [*_package_dir_entries(PACKAGE_DIR), *_metadata_entries(dist, info_dir)]
    else:
        entries = _recorded_entries(dist)
    build_id = _content_hash(entries)
    dest = cache_dir / "herder" / build_id / _wheel_name(dist, info_dir)
    if not dest.exists():
        log.info("packing %s (build %s)", dest.name, build_id, extra={"action": "bootstrap.pack"})
        _write_wheel(dest, entries, info_dir)
    return dest


def dependency_wheels(cache_dir: Path) -> list[Path]:
    """A wheel of every installed distribution herder needs here, packed once each
    (on every core: zlib lets go of the GIL while it compresses)."""
    with ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="herder-pack") as pool:
        return sorted(
            pool.map(
                partial(_dependency_wheel, cache_dir), _dependency_closure(_distribution(DIST))
            )
        )


def _dependency_wheel(cache_dir: Path, dist: metadata.Distribution) -> Path:
    info_dir = _info_dir(dist)
    dest = cache_dir / _DEPS_DIR / _wheel_name(dist, info_dir)
    if not dest.exists():
        log.info("packing %s", dest.name, extra={"action": "bootstrap.pack"})
        _write_wheel(dest, _recorded_entries(dist), info_dir)
    return dest


def agent_command(python: str, *, node_id: str, provider: str, launch: LaunchSpec) -> list[str]:
    """The argv that starts an agent for ``launch``; the join token is *not* in it
    (it travels in the ``HERDER_JOIN`` environment variable)."""
    argv = [python, "-m", "herder", "agent", "--node-id", node_id, "--provider", provider]
    argv += ["--slots", str(launch.slots), "--orphan-after", f"{launch.orphan_after_s:g}"]
    for key, value in sorted(launch.labels.items()):
        argv += ["--label", f"{key}={value}"]
    return argv


# ---------------------------------------------------------------------------
# what goes into a wheel


def _distribution(name: str) -> metadata.Distribution:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError as exc:
        raise ProviderError(
            f"cannot ship {name} to nodes: it is not installed as a distribution here "
            "(pip install it, editable or not)",
            provider="bootstrap",
        ) from exc


def _is_editable(dist: metadata.Distribution) -> bool:
    text = dist.read_text("direct_url.json")
    if not text:
        return False
    info = json.loads(text).get("dir_info", {})
    return bool(info.get("editable"))


def _info_dir(dist: metadata.Distribution) -> str:
    """The ``NAME-VERSION.dist-info`` directory, as installed."""
    for file in dist.files or []:
        if len(file.parts) == 2 and file.parts[0].endswith(".dist-info"):
            return file.parts[0]
    raise ProviderError(
        f"cannot pack {dist.metadata['Name']}: its installation records no files "
        "(installed by something other than pip?)",
        provider="bootstrap",
    )


def _metadata_entries(dist: metadata.Distribution, info_dir: str) -> list[Entry]:
    entries = []
    for file in dist.files or []:
        if file.parts[0] == info_dir and file.name not in _INSTALL_ONLY:
            entries.append((file.as_posix(), Path(str(dist.locate_file(file)))))
    return entries


def _package_dir_entries(package_dir: Path) -> list[Entry]:
    """Every file under the package directory, bytecode caches left out."""
    entries = []
    for path in sorted(package_dir.rglob("*")):
        rel = path.relative_to(package_dir.parent)
        if path.is_file() and "__pycache__" not in rel.parts and path.suffix != ".pyc":
            entries.append((rel.as_posix(), path))
    return entries


def _recorded_entries(dist: metadata.Distribution) -> list[Entry]:
    """The files an installed distribution records inside site-packages, and the
    programs it installed in the scripts directory (as ``NAME-VERSION.data/scripts``)."""
    entries = []
    scripts_dir = Path(sysconfig.get_path("scripts"))
    scripts_arcdir = _info_dir(dist).removesuffix(".dist-info") + ".data/scripts"
    wrappers = {ep.name for ep in dist.entry_points if ep.group.endswith("_scripts")}
    for file in dist.files or []:
        posix = PurePosixPath(file.as_posix())
        if "__pycache__" in posix.parts:
            continue
        path = Path(os.path.normpath(str(dist.locate_file(file))))
        if posix.is_absolute() or ".." in posix.parts:
            if path.parent == scripts_dir and path.name not in wrappers and path.is_file():
                entries.append((f"{scripts_arcdir}/{path.name}", path))
            continue  # other files outside site-packages: headers, data
        if posix.parts[0].endswith(".dist-info") and posix.name in _INSTALL_ONLY:
            continue
        if path.is_file():
            entries.append((posix.as_posix(), path))
        else:
            log.debug("%s records %s, which is gone: not packed", dist.metadata["Name"], posix)
    return entries


def _content_hash(entries: Iterable[Entry]) -> str:
    digest = hashlib.sha256()
    for arcname, path in sorted(entries):
        digest.update(arcname.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _wheel_name(dist: metadata.Distribution, info_dir: str) -> str:
    """``name-version-py-abi-plat.whl`` from the distribution's own ``WHEEL`` tags."""
    text = dist.read_text("WHEEL") or ""
    tag_lines = [
        line.split(":", 1)[1].strip()
        for line in text.splitlines()
        if line.lower().startswith("tag:")
    ]
    if not tag_lines:
        raise ProviderError(
            f"cannot pack {dist.metadata['Name']}: it was not installed from a wheel "
            f"({info_dir}/WHEEL names no tags)",
            provider="bootstrap",
        )
    parts = [sorted({tag.split("-")[i] for tag in tag_lines}) for i in range(3)]
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"]).lower()
    return f"{name}-{dist.version}-" + "-".join(".".join(p) for p in parts) + ".whl"


def _write_wheel(dest: Path, entries: Sequence[Entry], info_dir: str) -> None:
    """Zip ``entries`` and a fresh RECORD into ``dest``, atomically (packers may race)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    ordered = sorted(entries, key=lambda e: (e[0].startswith(info_dir + "/"), e[0]))
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".pack-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as zf:
            record = []
            for arcname, path in ordered:
                data = _portable_script(arcname, path.read_bytes())
                info = zipfile.ZipInfo.from_file(path, arcname, strict_timestamps=False)
                zf.writestr(info, data, zipfile.ZIP_DEFLATED, _COMPRESS_LEVEL)
                record.append(f"{arcname},sha256={_b64_digest(data)},{len(data)}")
            record.append(f"{info_dir}/RECORD,,")
            zf.writestr(f"{info_dir}/RECORD", "\n".join(record) + "\n")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _portable_script(arcname: str, data: bytes) -> bytes:
    """A script's ``#!`` line names this machine's python: ``#!python`` has the
    installer put the host's there instead (a binary program is left as it is)."""
    top, _, inside = arcname.partition("/")
    if not (top.endswith(".data") and inside.startswith("scripts/") and data.startswith(b"#!")):
        return data
    _, newline, rest = data.partition(b"\n")
    return b"#!python" + newline + rest


def _b64_digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


# ---------------------------------------------------------------------------
# which distributions herder needs here


def _dependency_closure(root: metadata.Distribution) -> list[metadata.Distribution]:
    """Every installed distribution ``root`` requires, transitively, with the
    environment markers and extras evaluated for this interpreter."""
    try:
        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name
    except ImportError as exc:
        raise ProviderError(
            "install='offline' needs the 'packaging' distribution to read dependency "
            "markers: pip install packaging",
            provider="bootstrap",
        ) from exc
    found: dict[str, metadata.Distribution] = {}
    extras_done: dict[str, set[str]] = {}
    todo: list[tuple[metadata.Distribution, set[str]]] = [(root, set())]
    while todo:
        dist, extras = todo.pop()
        for text in dist.requires or []:
            req = Requirement(text)
            wanted = extras or {""}
            if req.marker is not None and not any(
                req.marker.evaluate({"extra": e}) for e in wanted
            ):
                continue
            key = canonicalize_name(req.name)
            done = extras_done.setdefault(key, set())
            if key in found and set(req.extras) <= done:
                continue
            try:
                found[key] = found.get(key) or metadata.distribution(req.name)
            except metadata.PackageNotFoundError as exc:
                raise ProviderError(
                    f"{req.name} is required by {dist.metadata['Name']} but is not installed "
                    "here, so it cannot be shipped",
                    provider="bootstrap",
                ) from exc
            done.update(req.extras)
            todo.append((found[key], set(req.extras)))
    return [found[k] for k in sorted(found)]
