"""The ssh provider's pure parts: host strings, placing nodes, the agent's argv, herder's wheel."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from herder.errors import ProviderError
from herder.providers.base import LaunchSpec
from herder.providers.bootstrap import agent_command, herder_wheel
from herder.providers.ssh import SSH, SSHHost, _remote_command, spread


@pytest.mark.parametrize(
    ("text", "host", "user", "port"),
    [
        ("box", "box", "root", 22),
        ("ann@box", "box", "ann", 22),
        ("ann@10.0.0.5:2222", "10.0.0.5", "ann", 2222),
        ("ann@[fe80::1]:2222", "fe80::1", "ann", 2222),
    ],
)
def test_host_strings(text: str, host: str, user: str, port: int) -> None:
    parsed = SSHHost.parse(text)
    assert (parsed.host, parsed.user, parsed.port) == (host, user, port)
    assert SSHHost.parse(parsed.label) == parsed


@pytest.mark.parametrize("text", ["", "ann@", "box:port", "a b"])
def test_bad_host_strings_name_the_text(text: str) -> None:
    with pytest.raises(ProviderError, match="must look like user@host:port"):
        SSHHost.parse(text)


def test_options_are_checked() -> None:
    with pytest.raises(ProviderError, match="at least one host"):
        SSH([])
    with pytest.raises(ProviderError, match="listed twice"):
        SSH(["a", "root@a:22"])
    with pytest.raises(ProviderError, match="per_host"):
        SSH(["a"], per_host=0)
    assert SSH(["a", "b"], per_host=3).capacity() == 6


def test_nodes_spread_to_the_least_loaded_host_first() -> None:
    placed, failed = spread(["n1", "n2", "n3"], {"a": 1, "b": 0}, per_host=2)
    assert placed == {"b": ["n1", "n3"], "a": ["n2"]}
    assert failed == {}


def test_nodes_without_room_fail_with_the_reasons() -> None:
    placed, failed = spread(["n1", "n2"], {"a": 1}, per_host=2, problems=["host b down"])
    assert placed == {"a": ["n1"]}
    assert failed == {"n2": "no free host (host b down)"}
    assert spread(["n1"], {}, per_host=1) == ({}, {"n1": "no free host"})


def test_the_agent_command_carries_no_token() -> None:
    launch = LaunchSpec(join="hd1.s3cret.fp@https://h:1", cluster="c", slots=3, labels={"k": "v"})
    argv = agent_command("/v/bin/python", node_id="ssh-1", provider="ssh", launch=launch)
    assert argv[:4] == ["/v/bin/python", "-m", "herder", "agent"]
    assert argv[argv.index("--node-id") + 1] == "ssh-1"
    assert argv[argv.index("--slots") + 1] == "3"
    assert argv[argv.index("--orphan-after") + 1] == "900"
    assert argv[argv.index("--label") + 1] == "k=v"
    assert not any("s3cret" in a for a in argv)


def test_the_remote_command_quotes_the_python() -> None:
    assert _remote_command("python3", "probe").startswith("python3 -c '")
    assert _remote_command("~/py 3/bin/python", "probe").startswith("\"$HOME\"/'py 3/bin/python'")
    assert _remote_command("/opt/py; rm -rf /", "probe").startswith("'/opt/py; rm -rf /' -c")


def test_herders_wheel_is_packed_once_per_build(tmp_path: Path) -> None:
    wheel = herder_wheel(tmp_path)
    packed_at = wheel.stat().st_mtime_ns
    assert herder_wheel(tmp_path) == wheel
    assert wheel.stat().st_mtime_ns == packed_at
    names = zipfile.ZipFile(wheel).namelist()
    assert "herder/providers/ssh_remote.py" in names
    info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert {f"{info}/RECORD", f"{info}/entry_points.txt"} <= set(names)
    assert not any("__pycache__" in n for n in names)
