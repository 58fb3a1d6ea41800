"""Release bundles: deterministic, content-addressed, honouring ignores, safe to unpack."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from herder.bundle import Built, Source, build, unpack
from herder.errors import ReleaseError
from herder.model import is_release_id
from tests.wheels import make_versioned_package, make_wheel

NOW = 1_700_000_000.0


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def names(built: Built) -> list[str]:
    with tarfile.open(built.bundle) as tar:
        return tar.getnames()


def git(repo: Path, *args: str) -> str:
    command = [
        "git",
        "-c",
        "user.name=Test",
        "-c",
        "user.email=test@example.invalid",
        "-c",
        "commit.gpgsign=false",
        "-c",
        "init.defaultBranch=main",
        "-C",
        str(repo),
        *args,
    ]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return write(
        tmp_path / "project",
        {"app/__init__.py": "X = 1\n", "app/main.py": "print('hi')\n", "README": "r\n"},
    )


def test_same_input_gives_same_id_and_identical_bytes(project: Path, tmp_path: Path) -> None:
    first = build(Source(path=project, requirements=("foo",)), tmp_path / "a", now=NOW)
    second = build(Source(path=project, requirements=("foo",)), tmp_path / "b", now=NOW + 5)
    copy = shutil.copytree(project, tmp_path / "elsewhere" / "copy")
    third = build(Source(path=copy, requirements=("foo",)), tmp_path / "c")

    assert is_release_id(first.manifest.id)
    assert first.manifest.id == second.manifest.id == third.manifest.id
    assert first.bundle.read_bytes() == second.bundle.read_bytes() == third.bundle.read_bytes()
    assert first.bundle == tmp_path / "a" / f"{first.manifest.id}.tar.gz"
    assert third.manifest.source == str(copy)
    assert first.manifest.created_at == NOW
    assert first.manifest.files == 3
    assert first.manifest.size == first.bundle.stat().st_size
    assert list((tmp_path / "a").iterdir()) == [first.bundle]  # no temporary left


def test_bundle_members_are_normalised(project: Path, tmp_path: Path) -> None:
    built = build(Source(path=project), tmp_path / "out")
    with tarfile.open(built.bundle) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["src/README", "src/app/__init__.py", "src/app/main.py"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
        (0, 0, 0, "", "", 0o644)
    }


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda p: (p / "README").write_text("R\n"), id="changed-byte"),
        pytest.param(lambda p: (p / "app" / "new.py").write_text(""), id="added-file"),
        pytest.param(lambda p: (p / "README").chmod(0o755), id="exec-bit"),
    ],
)
def test_a_changed_file_gives_a_new_id(
    project: Path, tmp_path: Path, change: Callable[[Path], object]
) -> None:
    before = build(Source(path=project), tmp_path / "out").manifest.id
    change(project)
    assert build(Source(path=project), tmp_path / "out").manifest.id != before


def test_changed_options_give_a_new_id(project: Path, tmp_path: Path) -> None:
    def release_id(**options: Any) -> str:
        return build(Source(path=project, **options), tmp_path / "out").manifest.id

    ids = {
        release_id(requirements=("foo>=1.0",)),
        release_id(requirements=("foo>=1.1",)),
        release_id(requirements=("foo>=1.0", "bar")),
        release_id(requirements=("foo>=1.0",), python="3.10"),
        release_id(requirements=("foo>=1.0",), no_index=True),
        release_id(requirements=("foo>=1.0",), find_links=("https://example.invalid/w",)),
    }
    assert len(ids) == 6
    assert release_id(requirements=("foo >= 1.0",)) == release_id(requirements=("foo>=1.0",))


def test_gitignore_files_are_honoured_at_every_level(tmp_path: Path) -> None:
    root = write(
        tmp_path / "p",
        {
            ".gitignore": "*.log\n!keep.log\nbuild/\n/top.txt\n",
            "a.log": "",
            "keep.log": "",
            "top.txt": "",
            "build/out.bin": "",
            "build.txt": "",  # "build/" matches directories only
            "sub/top.txt": "",  # "/top.txt" is anchored to the root
            "sub/build": "",  # a file, not a directory
            "sub/.gitignore": "*.tmp\n!again.log\n",
            "sub/x.tmp": "",
            "sub/again.log": "",  # re-included by the nested file
            "sub/other.log": "",
            "x.tmp": "",  # the nested .gitignore does not reach up
            ".git/HEAD": "ref: refs/heads/main\n",
            "sub/.git": "gitdir: elsewhere\n",
        },
    )
    assert names(build(Source(path=root), tmp_path / "out")) == [
        "src/.gitignore",
        "src/build.txt",
        "src/keep.log",
        "src/sub/.gitignore",
        "src/sub/again.log",
        "src/sub/build",
        "src/sub/top.txt",
        "src/x.tmp",
    ]


def test_exclude_acts_as_a_root_gitignore(project: Path, tmp_path: Path) -> None:
    write(project, {"data/big.csv": "", "notes.md": "", "app/notes.md": ""})
    built = build(Source(path=project, exclude=("data/", "*.md", "!app/notes.md")), tmp_path / "o")
    assert names(built) == [
        "src/README",
        "src/app/__init__.py",
        "src/app/main.py",
        "src/app/notes.md",
    ]


def test_exec_bit_survives_unpack(project: Path, tmp_path: Path) -> None:
    script = write(project, {"run.sh": "#!/bin/sh\n"}) / "run.sh"
    script.chmod(0o755)
    built = build(Source(path=project), tmp_path / "out")
    unpack(built.bundle, tmp_path / "dest")
    assert os.access(tmp_path / "dest" / "src" / "run.sh", os.X_OK)
    assert not os.access(tmp_path / "dest" / "src" / "README", os.X_OK)
    assert (tmp_path / "dest" / "src" / "app" / "main.py").read_text() == "print('hi')\n"


def test_symlinks_inside_are_bundled_by_content_others_skipped(
    project: Path, tmp_path: Path
) -> None:
    outside = write(tmp_path, {"outside.txt": "secret\n"}) / "outside.txt"
    (project / "inside-link").symlink_to("README")
    (project / "outside-link").symlink_to(outside)
    (project / "dir-link").symlink_to("app")
    (project / "broken-link").symlink_to("missing")
    built = build(Source(path=project), tmp_path / "out")
    assert "src/inside-link" in names(built)
    assert not {"src/outside-link", "src/dir-link", "src/broken-link"} & set(names(built))
    unpack(built.bundle, tmp_path / "dest")
    link = tmp_path / "dest" / "src" / "inside-link"
    assert not link.is_symlink()
    assert link.read_text() == "r\n"


def test_empty_tree_needs_requirements(tmp_path: Path) -> None:
    root = write(tmp_path / "p", {".gitignore": "*\n"})
    with pytest.raises(ReleaseError, match="nothing to release"):
        build(Source(path=root), tmp_path / "out")
    built = build(Source(path=root, requirements=("foo",)), tmp_path / "out")
    assert built.manifest.files == 0
    assert built.manifest.requirements == ["foo"]


def test_git_branch_resolves_to_sha_and_matches_the_directory(tmp_path: Path) -> None:
    repo = write(
        tmp_path / "repo",
        {".gitignore": "*.log\n", "pkg/mod.py": "A = 1\n", "run.sh": "#!/bin/sh\n"},
    )
    (repo / "run.sh").chmod(0o755)
    git(repo, "init", "--quiet")
    git(repo, "add", ".")
    git(repo, "commit", "--quiet", "-m", "one")
    git(repo, "checkout", "--quiet", "-b", "feature")
    write(repo, {"pkg/mod.py": "A = 2\n"})
    git(repo, "commit", "--quiet", "-am", "two")
    sha = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "--quiet", "main")
    write(repo, {"debug.log": "untracked and ignored\n"})

    from_git = build(Source(git=str(repo), rev="feature"), tmp_path / "out")
    git(repo, "checkout", "--quiet", "feature")
    from_dir = build(Source(path=repo), tmp_path / "out")

    assert from_git.manifest.kind == "git"
    assert from_git.manifest.source == f"{repo}@{sha}"
    assert from_git.manifest.id == from_dir.manifest.id
    assert names(from_git) == [
        "src/.gitignore",
        "src/pkg/mod.py",
        "src/run.sh",
    ]


def test_git_failures_carry_git_stderr(tmp_path: Path) -> None:
    repo = write(tmp_path / "repo", {"a.py": ""})
    git(repo, "init", "--quiet")
    git(repo, "add", ".")
    git(repo, "commit", "--quiet", "-m", "one")
    with pytest.raises(ReleaseError, match="find revision 'nope'") as info:
        build(Source(git=str(repo), rev="nope"), tmp_path / "out")
    assert info.value.context == {"field": "git"}
    with pytest.raises(ReleaseError, match=r"clone .*missing"):
        build(Source(git=str(tmp_path / "missing"), rev="main"), tmp_path / "out")


def test_wheel_source(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path / "dist", "demo", "1.0", {"demo/__init__.py": ""})
    built = build(Source(wheel=wheel, requirements=("extra",)), tmp_path / "out")
    assert built.manifest.kind == "wheel"
    assert built.manifest.wheel == wheel.name == built.manifest.source
    assert names(built) == [f"wheels/{wheel.name}"]
    unpack(built.bundle, tmp_path / "dest")
    assert (tmp_path / "dest" / "wheels" / wheel.name).read_bytes() == wheel.read_bytes()


def test_local_find_links_are_bundled(project: Path, tmp_path: Path) -> None:
    house = tmp_path / "house"
    one = make_versioned_package(house, "dep", "1.0")
    two = make_wheel(house, "other", "2.0", {"other.py": ""})
    (house / "ignored.txt").write_text("")
    url = "https://example.invalid/wheels"
    built = build(
        Source(path=project, requirements=("dep",), find_links=(str(house), url, str(house))),
        tmp_path / "out",
    )
    assert built.manifest.find_links == ["wheels", url]
    assert {f"wheels/{one.name}", f"wheels/{two.name}"} <= set(names(built))
    assert "wheels/ignored.txt" not in names(built)
    with pytest.raises(ReleaseError, match="missing-house") as info:
        build(Source(path=project, find_links=(str(tmp_path / "missing-house"),)), tmp_path / "o")
    assert info.value.context["field"] == "find_links"


def test_requirements_are_normalised_in_order(project: Path, tmp_path: Path) -> None:
    req = tmp_path / "requirements.txt"
    req.write_text(
        "# pinned\n\nfoo >= 1.0   # comment\nbar[x, y] ( >=2 , <3 )\n"
        'baz ;  python_version <  "3.13"\nqux @ https://h.invalid/q.whl#sha256=ab\nfoo>=1.0\n'
    )
    built = build(
        Source(path=project, requirements=("zed==1", "foo  >=1.0"), requirements_file=req),
        tmp_path / "out",
    )
    assert built.manifest.requirements == [
        "zed==1",
        "foo>=1.0",
        "bar[x,y]>=2,<3",
        'baz; python_version < "3.13"',
        "qux @ https://h.invalid/q.whl#sha256=ab",
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not a requirement!", "is not a requirement"),
        ("-r other.txt", "-r .*not supported"),
        ("--find-links ./w", "--find-links belongs in the build options"),
        ("--no-index", "--no-index belongs in the build options"),
        ("--index-url=https://x.invalid", "--index-url belongs in the build options"),
    ],
)
def test_bad_requirement_lines_name_file_and_line(
    project: Path, tmp_path: Path, line: str, message: str
) -> None:
    req = tmp_path / "reqs.txt"
    req.write_text(f"foo\n# fine\n{line}\n")
    with pytest.raises(ReleaseError, match=message) as info:
        build(Source(path=project, requirements_file=req), tmp_path / "out")
    assert str(info.value).startswith(f"{req}:3: ")
    assert info.value.context == {"field": "requirements_file", "path": str(req)}


def test_missing_requirements_file_is_named(project: Path, tmp_path: Path) -> None:
    req = tmp_path / "nope.txt"
    with pytest.raises(ReleaseError, match=re.escape(f"requirements file {req}")):
        build(Source(path=project, requirements_file=req), tmp_path / "out")


@pytest.mark.parametrize(
    ("source", "field", "message"),
    [
        (Source(), "source", r"exactly one of path, git or wheel \(got none\)"),
        (Source(path=Path("."), git="x", rev="main"), "source", "got path, git"),
        (Source(git="https://h.invalid/r.git"), "rev", "needs a rev"),
        (Source(path=Path("."), rev="main"), "rev", "only used with git"),
        (Source(path=Path("/nonexistent/dir")), "path", "is not a directory"),
        (Source(wheel=Path("/nonexistent/x.whl")), "wheel", "is not a"),
        (Source(path=Path("."), python="3"), "python", "major.minor"),
    ],
)
def test_bad_sources_are_refused(tmp_path: Path, source: Source, field: str, message: str) -> None:
    with pytest.raises(ReleaseError, match=message) as info:
        build(source, tmp_path / "out")
    assert info.value.context["field"] == field
    assert not (tmp_path / "out").exists()


def test_a_file_not_named_whl_is_refused(tmp_path: Path) -> None:
    fake = write(tmp_path, {"demo.zip": ""}) / "demo.zip"
    with pytest.raises(ReleaseError, match=r"demo\.zip is not a \*\.whl file"):
        build(Source(wheel=fake), tmp_path / "out")


@pytest.mark.parametrize("name", ["../evil.txt", "/tmp/evil-absolute.txt", "src/../../evil.txt"])
def test_unpack_refuses_members_outside_dest(tmp_path: Path, name: str) -> None:
    bundle = tmp_path / "bad.tar.gz"
    with tarfile.open(bundle, "w:gz") as tar:
        ok = tarfile.TarInfo("src/ok.txt")
        tar.addfile(ok, io.BytesIO(b""))
        info = tarfile.TarInfo(name)
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    dest = tmp_path / "a" / "dest"
    with pytest.raises(ReleaseError, match="unsafe to unpack"):
        unpack(bundle, dest)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "a" / "evil.txt").exists()


def test_unpack_refuses_links(tmp_path: Path) -> None:
    bundle = tmp_path / "bad.tar.gz"
    with tarfile.open(bundle, "w:gz") as tar:
        link = tarfile.TarInfo("src/link")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(ReleaseError, match="unsafe to unpack"):
        unpack(bundle, tmp_path / "dest")


def test_the_release_id_pattern_is_the_same_in_model_and_manifest() -> None:
    """herder.model keeps its own copy (it imports nothing of herder)."""
    from herder import model
    from herder.releases import manifest

    assert model.RELEASE_ID_PATTERN == manifest.RELEASE_ID_PATTERN
