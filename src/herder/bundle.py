"""Build a release bundle on the client, and unpack one on a node.

A release must be the same thing wherever it is built, so the bundle is
made deterministic: members sorted by name, no timestamps or owners, modes
reduced to 0o644 / 0o755, a gzip header without time or name. The release
id hashes what a node will install (each file's name, mode and content, the
requirements as normalised, the Python version, the index options, the
release's own wheel) and nothing about where it was built from, so the same
tree copied elsewhere, or checked out from git, gives the same id.

Input is checked before anything is written, and every refusal is a
``ReleaseError`` naming the option, file or line at fault.
"""

from __future__ import annotations

import filecmp
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Literal

import pathspec

from herder.errors import ReleaseError
from herder.releases.manifest import BUNDLED_WHEELS, Manifest, bundle_key

_SRC = "src"
_SMALL_FILE = 8 * 1024 * 1024  # read whole below this; stream (read twice) above
_CHUNK = 1024 * 1024
_PYTHON_RE = re.compile(r"^3\.\d+$")

# A requirement line (PEP 508, minus the rarely used corners): name, extras,
# then a URL or version clauses, then an environment marker.
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_CLAUSE = r"(?:~=|===|==|!=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+"
_SPEC = rf"{_CLAUSE}(?:\s*,\s*{_CLAUSE})*"
_REQUIREMENT_RE = re.compile(
    rf"""^(?P<name>{_NAME})
    \s*(?:\[(?P<extras>[^\]]*)\])?
    \s*(?:@\s*(?P<url>\S+)|\(\s*(?P<pspec>{_SPEC})\s*\)|(?P<spec>{_SPEC}))?
    \s*(?:;(?P<marker>.*))?$""",
    re.VERBOSE,
)
_NAME_RE = re.compile(rf"^{_NAME}$")
_COMMENT_RE = re.compile(r"(^|\s+)#.*$")
_NESTED_FILE_OPTIONS = ("-r", "--requirement", "-c", "--constraint")
_INDEX_OPTIONS = ("-f", "--find-links", "--no-index", "-i", "--index-url", "--extra-index-url")


@dataclass(frozen=True)
class Source:
    """What to build a release from: exactly one of path / git / wheel."""

    path: Path | None = None  # a project directory
    git: str | None = None  # a git URL (or local repo path) ...
    rev: str | None = None  # ... and the revision (required with git)
    wheel: Path | None = None  # a wheel file
    requirements: tuple[str, ...] = ()  # requirement lines given directly
    requirements_file: Path | None = None  # a requirements.txt (lines merged after `requirements`)
    python: str | None = None  # "3.11"; None: the running interpreter's major.minor
    exclude: tuple[str, ...] = ()  # extra gitignore-style patterns to leave out
    find_links: tuple[str, ...] = ()  # local wheelhouse dirs (bundled) or URLs (kept as given)
    no_index: bool = False


@dataclass(frozen=True)
class Built:
    manifest: Manifest
    bundle: Path  # the .tar.gz written into out_dir

    @property
    def key(self) -> str:
        """Where the bundle goes in the datastore."""
        return bundle_key(self.manifest.id)


@dataclass(frozen=True)
class _Member:
    name: str  # path inside the bundle
    path: Path  # where its content is read from
    mode: int  # 0o644 or 0o755


@dataclass(frozen=True)
class _Options:
    """Everything besides the files that goes into the release id."""

    requirements: list[str]
    python: str
    find_links: list[str]
    no_index: bool
    wheel: str | None


def build(source: Source, out_dir: Path, *, now: float | None = None) -> Built:
    """Bundle ``source`` into ``out_dir/<release id>.tar.gz`` and describe it."""
    kind = _check_source(source)
    requirements = _requirements(source)
    python = _python(source.python)
    wheels, find_links = _find_links(source.find_links)
    with tempfile.TemporaryDirectory(prefix="herder-release-") as scratch:
        if source.path is not None:
            label = str(source.path)
            members = _tree_members(source.path, source.exclude)
        elif source.git is not None and source.rev is not None:
            label, tree = _git_tree(source.git, source.rev, Path(scratch))
            members = _tree_members(tree, source.exclude)
        else:
            assert source.wheel is not None  # _check_source: exactly one of three
            label = source.wheel.name
            members = []
            wheels = _add_wheel(wheels, source.wheel)
        if kind != "wheel" and not members and not requirements:
            raise ReleaseError(
                f"nothing to release: no files in {label} after ignores, and no requirements",
                path=label,
            )
        members += [
            _Member(f"{BUNDLED_WHEELS}/{name}", path, 0o644) for name, path in wheels.items()
        ]
        options = _Options(
            requirements=requirements,
            python=python,
            find_links=find_links,
            no_index=source.no_index,
            wheel=source.wheel.name if source.wheel is not None else None,
        )
        return _write(members, options, kind, label, out_dir, now)


def unpack(bundle: Path, dest: Path) -> None:
    """Extract ``bundle`` into ``dest``, refusing any member that would land outside it."""
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        with tarfile.open(bundle, mode="r:gz") as tar:
            for member in tar.getmembers():
                _check_member(member, root, bundle)
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise ReleaseError(f"cannot unpack bundle {bundle}: {exc}", path=str(bundle)) from exc


# -- checking the input ------------------------------------------------------------------------


def _check_source(source: Source) -> Literal["directory", "git", "wheel"]:
    given = [name for name in ("path", "git", "wheel") if getattr(source, name) is not None]
    if len(given) != 1:
        raise ReleaseError(
            f"give exactly one of path, git or wheel (got {', '.join(given) or 'none'})",
            field="source",
        )
    if source.rev is not None and source.git is None:
        raise ReleaseError("rev is only used with git", field="rev")
    if source.path is not None:
        if not source.path.is_dir():
            raise ReleaseError(f"path {source.path} is not a directory", field="path")
        return "directory"
    if source.git is not None:
        if not source.rev:
            raise ReleaseError(f"git source {source.git} needs a rev", field="rev")
        if source.rev.startswith("-"):
            raise ReleaseError(f"rev {source.rev!r} is not a revision", field="rev")
        return "git"
    assert source.wheel is not None
    if source.wheel.suffix != ".whl" or not source.wheel.is_file():
        raise ReleaseError(f"wheel {source.wheel} is not a *.whl file", field="wheel")
    if source.exclude:
        raise ReleaseError(
            "exclude applies to path and git sources, not to a wheel", field="exclude"
        )
    return "wheel"


def _python(python: str | None) -> str:
    if python is None:
        return f"{sys.version_info.major}.{sys.version_info.minor}"
    if not _PYTHON_RE.match(python):
        raise ReleaseError(
            f"python {python!r} is not a major.minor version like 3.11", field="python"
        )
    return python


def _requirements(source: Source) -> list[str]:
    """The requirement lines, given ones first, normalised, in order, without duplicates."""
    found = [
        _requirement_line(line, "requirements option", field="requirements")
        for line in source.requirements
    ]
    if source.requirements_file is not None:
        found += _requirements_file(source.requirements_file)
    return list(dict.fromkeys(line for line in found if line is not None))


def _requirements_file(path: Path) -> list[str | None]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ReleaseError(
            f"cannot read requirements file {path}: {exc.strerror}",
            field="requirements_file",
            path=str(path),
        ) from exc
    return [
        _requirement_line(line, f"{path}:{number}", field="requirements_file", path=str(path))
        for number, line in enumerate(text.splitlines(), start=1)
    ]


def _requirement_line(line: str, where: str, **context: str) -> str | None:
    """One line normalised (whitespace dropped around operators), or None if blank."""
    text = _COMMENT_RE.sub("", line).strip()
    if not text:
        return None
    if text.startswith("-"):
        option = re.split(r"[\s=]", text, maxsplit=1)[0]
        if option in _NESTED_FILE_OPTIONS:
            raise ReleaseError(f"{where}: {option} (nested files) is not supported", **context)
        if option in _INDEX_OPTIONS:
            raise ReleaseError(
                f"{where}: {option} belongs in the build options (find_links, no_index), "
                "not in the requirements",
                **context,
            )
    match = _REQUIREMENT_RE.match(text)
    if match is None:
        raise ReleaseError(f"{where}: {text!r} is not a requirement", **context)
    return _normalise(match, text, where, context)


def _normalise(match: re.Match[str], text: str, where: str, context: dict[str, str]) -> str:
    parts = [match["name"]]
    if match["extras"] is not None:
        extras = [extra.strip() for extra in match["extras"].split(",")]
        if not all(_NAME_RE.match(extra) for extra in extras):
            raise ReleaseError(f"{where}: {text!r} has bad extras", **context)
        parts.append(f"[{','.join(extras)}]")
    if match["url"] is not None:
        parts.append(f" @ {match['url']}")
    spec = match["pspec"] or match["spec"]
    if spec is not None:
        parts.append("".join(spec.split()))
    if match["marker"] is not None:
        marker = " ".join(match["marker"].split())
        if not marker:
            raise ReleaseError(f"{where}: {text!r} has an empty marker", **context)
        parts.append(f" ; {marker}" if match["url"] is not None else f"; {marker}")
    return "".join(parts)


def _find_links(entries: Sequence[str]) -> tuple[dict[str, Path], list[str]]:
    """Wheels to bundle (name -> file) and the find_links the manifest records."""
    wheels: dict[str, Path] = {}
    kept: list[str] = []
    for entry in entries:
        if "://" in entry:
            kept.append(entry)
            continue
        directory = Path(entry)
        if not directory.is_dir():
            raise ReleaseError(
                f"find_links {entry} is not a directory (nor a URL)", field="find_links", path=entry
            )
        for path in sorted([*directory.glob("*.whl"), *directory.glob("*.tar.gz")]):
            if path.is_file():
                wheels = _add_wheel(wheels, path)
        if BUNDLED_WHEELS not in kept:
            kept.append(BUNDLED_WHEELS)
    return wheels, kept


def _add_wheel(wheels: dict[str, Path], path: Path) -> dict[str, Path]:
    """``wheels`` plus ``path``; one name must not stand for two different files."""
    other = wheels.get(path.name)
    if other is not None and not filecmp.cmp(other, path, shallow=False):
        raise ReleaseError(
            f"two different files named {path.name}: {other} and {path}", path=str(path)
        )
    return {**wheels, path.name: path}


# -- collecting files ----------------------------------------------------------------------------


def _tree_members(root: Path, exclude: Sequence[str]) -> list[_Member]:
    resolved = root.resolve()
    return [
        _Member(f"{_SRC}/{name}", path, _mode(path))
        for name, path in _walk(root, resolved, PurePosixPath(), [], list(exclude))
    ]


def _walk(
    directory: Path,
    root: Path,
    rel: PurePosixPath,
    specs: list[tuple[PurePosixPath, pathspec.GitIgnoreSpec]],
    extra: list[str],
) -> Iterator[tuple[str, Path]]:
    """Files under ``directory`` (relative name, path), honouring every .gitignore met.

    ``specs`` holds (base, spec) of the .gitignore files above, outermost first;
    ``extra`` are patterns read as part of the root .gitignore.
    """
    lines = _read_gitignore(directory / ".gitignore") + extra
    if lines:
        specs = [*specs, (rel, pathspec.GitIgnoreSpec.from_lines(lines))]
    with os.scandir(directory) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    for entry in entries:
        if entry.name == ".git":
            continue
        name = rel / entry.name
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            if not _ignored(name, True, specs):
                yield from _walk(path, root, name, specs, [])
        elif not _ignored(name, False, specs) and _is_file_inside(entry, path, root):
            yield str(name), path


def _read_gitignore(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []


def _ignored(
    name: PurePosixPath, is_dir: bool, specs: list[tuple[PurePosixPath, pathspec.GitIgnoreSpec]]
) -> bool:
    """Whether the deepest .gitignore with a pattern matching ``name`` ignores it."""
    for base, spec in reversed(specs):
        relative = str(name.relative_to(base)) + ("/" if is_dir else "")
        result = spec.check_file(relative)
        if result.include is not None:
            return result.include
    return False


def _is_file_inside(entry: os.DirEntry[str], path: Path, root: Path) -> bool:
    """A regular file, or a symlink to a file inside the tree (bundled by content)."""
    if not entry.is_symlink():
        return entry.is_file()
    target = path.resolve()
    return target.is_file() and target.is_relative_to(root)


def _mode(path: Path) -> int:
    return 0o755 if path.stat().st_mode & 0o111 else 0o644


def _git_tree(url: str, rev: str, scratch: Path) -> tuple[str, Path]:
    """Export ``rev`` of ``url`` into a directory; returns (``url@sha``, directory)."""
    repo = scratch / "repo.git"
    _git(["clone", "--quiet", "--bare", "--", url, str(repo)], f"clone {url}")
    sha = _git(
        ["--git-dir", str(repo), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        f"find revision {rev!r} in {url}",
    )
    archive = scratch / "tree.tar"
    _git(
        ["--git-dir", str(repo), "archive", "--format=tar", "-o", str(archive), sha],
        f"export {sha} of {url}",
    )
    tree = scratch / "tree"
    tree.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return f"{url}@{sha}", tree


def _git(args: list[str], what: str) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    try:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, env=env, check=False)
    except FileNotFoundError as exc:
        raise ReleaseError(f"git could not {what}: git is not installed", field="git") from exc
    if proc.returncode != 0:
        raise ReleaseError(f"git could not {what}: {proc.stderr.strip()}", field="git")
    return proc.stdout.strip()


# -- writing the bundle -----------------------------------------------------------------------


def _write(
    members: list[_Member],
    options: _Options,
    kind: Literal["directory", "git", "wheel"],
    label: str,
    out_dir: Path,
    now: float | None,
) -> Built:
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=".bundle-", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            digests = _write_tar(sorted(members, key=lambda m: m.name), raw)
        release_id = _release_id(digests, options)
        bundle = out_dir / f"{release_id}.tar.gz"
        sha256, size = _file_digest(tmp)
        os.replace(tmp, bundle)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    manifest = Manifest(
        id=release_id,
        kind=kind,
        source=label,
        requirements=options.requirements,
        python=options.python,
        find_links=options.find_links,
        no_index=options.no_index,
        wheel=options.wheel,
        files=len(members),
        size=size,
        sha256=sha256,
        created_at=time.time() if now is None else now,
    )
    return Built(manifest=manifest, bundle=bundle)


def _write_tar(members: list[_Member], raw: BinaryIO) -> list[tuple[str, int, str]]:
    """Write the members as a deterministic .tar.gz; returns (name, mode, sha256) of each."""
    digests = []
    with (
        gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0, compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for member in members:
            try:
                digest = _add_member(tar, member)
            except OSError as exc:
                raise ReleaseError(
                    f"cannot read {member.path}: {exc}", path=str(member.path)
                ) from exc
            digests.append((member.name, member.mode, digest))
    return digests


def _add_member(tar: tarfile.TarFile, member: _Member) -> str:
    info = tarfile.TarInfo(member.name)
    info.mode = member.mode
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if member.path.stat().st_size < _SMALL_FILE:
        data = member.path.read_bytes()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        return hashlib.sha256(data).hexdigest()
    digest, info.size = _file_digest(member.path)
    with member.path.open("rb") as stream:
        tar.addfile(info, stream)
    return digest


def _file_digest(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _release_id(digests: list[tuple[str, int, str]], options: _Options) -> str:
    canonical = json.dumps(
        {
            "files": [[name, f"{mode:o}", digest] for name, mode, digest in digests],
            "requirements": options.requirements,
            "python": options.python,
            "find_links": options.find_links,
            "no_index": options.no_index,
            "wheel": options.wheel,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return "r-" + hashlib.sha256(canonical.encode()).hexdigest()[:20]


def _check_member(member: tarfile.TarInfo, root: Path, bundle: Path) -> None:
    """Refuse anything but files and directories that stay inside ``root``."""
    target = (root / member.name).resolve()
    if not (member.isfile() or member.isdir()) or not target.is_relative_to(root):
        raise ReleaseError(
            f"bundle {bundle} holds a member that is unsafe to unpack: {member.name!r}",
            path=str(bundle),
        )
