"""How the ``ssh`` provider installs herder on a host (the host's half run here, on a
directory of this machine): offline, with the uv program the dependency wheels
carry, and with pip when uv cannot run there; the wheels carry programs such as
uv's, never the entry-point wrappers that name this machine's python."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sysconfig
import zipfile
from pathlib import Path
from typing import Any

from herder.providers import bootstrap, ssh_remote


def _packed(tmp_path: Path, name: str) -> Path:
    return bootstrap._dependency_wheel(tmp_path / "cache", importlib.metadata.distribution(name))


def test_dependency_wheels_carry_programs_but_not_entry_point_wrappers(tmp_path: Path) -> None:
    uv = zipfile.ZipFile(_packed(tmp_path, "uv"))
    (program,) = [n for n in uv.namelist() if n.endswith(".data/scripts/uv")]
    local = Path(sysconfig.get_path("scripts")) / "uv"
    assert uv.read(program) == local.read_bytes()  # the binary, as it is
    uvicorn = zipfile.ZipFile(_packed(tmp_path, "uvicorn")).namelist()
    assert not [n for n in uvicorn if ".data/" in n]  # its `uvicorn` wrapper is rewritten there
    jmespath = zipfile.ZipFile(_packed(tmp_path, "jmespath"))
    (script,) = [n for n in jmespath.namelist() if n.endswith(".data/scripts/jp.py")]
    assert jmespath.read(script).startswith(b"#!python\n")  # the host's python goes there


def _host(tmp_path: Path, name: str) -> tuple[Path, dict[str, Any]]:
    """A host directory holding herder's wheel and uv's, as the provider copies them."""
    root = tmp_path / name
    herder = bootstrap.herder_wheel(tmp_path / "cache")
    uv = _packed(tmp_path, "uv")
    (root / "wheels" / herder.parent.name).mkdir(parents=True)
    shutil.copy(herder, root / "wheels" / herder.parent.name / herder.name)
    shutil.copy(uv, root / "wheels" / uv.name)
    request = {
        "dir": str(root),
        "build": "b1",
        "offline": True,
        "herder_wheel": f"{herder.parent.name}/{herder.name}",
        "dependencies": [uv.name],
    }
    return root, request


def _installer_of_herder(root: Path) -> str:
    python = root / "venv" / "bin" / "python"
    code = "import importlib.metadata as m; print(m.distribution('herder').read_text('INSTALLER'))"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_a_host_installs_with_the_uv_the_wheels_carry(tmp_path: Path) -> None:
    root, request = _host(tmp_path, "host")
    answer = ssh_remote.install(request)
    assert (answer["installed"], answer["installer"]) == (True, "uv"), answer
    assert "uv_failed" not in answer
    assert _installer_of_herder(root) == "uv"
    # uv's program is in the venv: the node's releases install with it too
    python = root / "venv" / "bin" / "python"
    found = subprocess.run(
        [python, "-c", "import uv, subprocess; subprocess.run([uv.find_uv_bin(), '--version'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert found.stdout.startswith("uv ")
    # the same build again: nothing to do; another build: herder is put in anew
    assert ssh_remote.install(request)["installed"] is False
    answer = ssh_remote.install({**request, "build": "b2"})
    assert (answer["installed"], answer["installer"]) == (True, "uv"), answer


def test_pip_installs_when_uv_cannot_run_on_the_host_and_says_why(tmp_path: Path) -> None:
    root, request = _host(tmp_path, "host")
    uv = root / "tools" / request["dependencies"][0] / "uv"  # where the unpacked one goes
    uv.parent.mkdir(parents=True)
    uv.write_text("#!/bin/sh\necho 'uv: not on this libc' >&2\nexit 3\n")
    uv.chmod(0o755)
    answer = ssh_remote.install(request)
    assert (answer["installed"], answer["installer"]) == (True, "pip"), answer
    assert "not on this libc" in answer["uv_failed"]
    assert _installer_of_herder(root) == "pip"
    assert (root / "venv" / "bin" / "pip").exists()  # made by `python -m venv`
