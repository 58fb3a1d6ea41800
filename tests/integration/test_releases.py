"""Releases end to end on a real herd: build, store, install once per node, run tasks
that import the release, conflicting releases side by side, roll out under load,
removal refused while in use, the CLI and tasks files. No network: the release's
dependency comes from a wheelhouse made here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from herder.client import Client
from herder.errors import ReleaseError, SubmissionError, TaskError
from herder.local import LocalHerd
from tests.helpers import herder as run_cli
from tests.helpers import kill_tree, wait_for
from tests.wheels import make_versioned_package

PACKAGE = "relpkg"  # the release's own package: imported by the tasks on the node


def write_project(root: Path, version: str) -> Path:
    """A tiny project whose function reports where it runs and what it imports."""
    pkg = root / PACKAGE
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            f"""
            import sys
            import time

            VERSION = {version!r}


            def info(pause=0.0):
                import herderdep  # on the node only: the client need not have it

                time.sleep(pause)
                return {{
                    "version": VERSION,
                    "dep": herderdep.VERSION,
                    "file": __file__,
                    "python": sys.executable,
                }}
            """
        )
    )
    (root / ".gitignore").write_text("*.log\n")
    (root / "debug.log").write_text("not shipped\n")
    return root


class Site:
    """A herd with two agents of its own, each with its own release cache."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.wheelhouse = tmp / "wheelhouse"
        make_versioned_package(self.wheelhouse, "herderdep", "1.0")
        make_versioned_package(self.wheelhouse, "herderdep", "2.0")
        self.v1 = write_project(tmp / "v1", "v1")
        self.v2 = write_project(tmp / "v2", "v2")
        self.herd = LocalHerd(nodes=0, home=tmp / "home")
        self.client: Client = self.herd.start()
        self.join = run_cli(self.herd.env(), "token").stdout.strip()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def agent(self, node_id: str, slots: int = 2) -> Path:
        cache = self.tmp / f"cache-{node_id}"
        env = {**self.herd.env(), "HERDER_JOIN": self.join}
        log = open(self.tmp / f"agent-{node_id}.log", "ab")  # noqa: SIM115 - kept by the child
        self.procs[node_id] = subprocess.Popen(
            [sys.executable, "-m", "herder", "agent", "--node-id", node_id,
             "--slots", str(slots), "--release-dir", str(cache)],
            env=env, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        log.close()
        return cache

    def release(self, project: Path, dep: str = "1.0", **options: Any) -> str:
        return self.client.release(
            project,
            requirements=[f"herderdep=={dep}"],
            find_links=[str(self.wheelhouse)],
            no_index=True,
            **options,
        )

    def events(self, action: str) -> list[dict[str, Any]]:
        found, after = [], 0
        while True:
            page = self.client.event_log(after=after, limit=1000)
            if not page:
                return found
            found += [e for e in page if e["action"] == action]
            after = page[-1]["id"]

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                kill_tree(proc.pid)
            proc.wait(timeout=30)
        self.herd.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    s = Site(tmp_path_factory.mktemp("releases"))
    sys.path.insert(0, str(s.v1))  # the client pickles relpkg.info by reference
    try:
        s.agent("node-a")
        s.agent("node-b")
        s.herd.wait_nodes(2)
        yield s
    finally:
        sys.path.remove(str(s.v1))
        sys.modules.pop(PACKAGE, None)
        s.stop()


def _info() -> Any:
    import relpkg  # type: ignore[import-not-found]

    return relpkg.info


def test_tasks_import_the_release_installed_once_per_node(site: Site) -> None:
    rid = site.release(site.v1)
    info = _info()
    futures = [
        (node, site.client.run_on(node, info, release=rid))
        for node in ("node-a", "node-b")
        for _ in range(12)
    ]
    for node, fut in futures:
        r = fut.result(timeout=120)
        assert (r["version"], r["dep"]) == ("v1", "1.0")
        # imported on the node from its own cache, not pickled by value
        assert f"cache-{node}/{rid}/src/relpkg/__init__.py" in r["file"], r
        assert f"cache-{node}/{rid}/env/bin/python" in r["python"], r
    installs = [e for e in site.events("release_ready") if e["data"]["release"] == rid]
    fresh = sorted(e["node_id"] for e in installs if not e["data"]["cached"])
    assert fresh == ["node-a", "node-b"]  # 24 tasks, 2 slots each: one install per node
    assert all(e["data"]["seconds"] > 0 for e in installs)


def test_same_input_same_id_and_one_changed_byte_a_new_one(site: Site, tmp_path: Path) -> None:
    first = site.release(site.v1)
    copy = shutil.copytree(site.v1, tmp_path / "elsewhere")
    assert site.release(copy) == first  # where it was built from does not matter
    (copy / "debug.log").write_text("ignored by .gitignore\n")
    assert site.release(copy) == first
    source = copy / PACKAGE / "__init__.py"
    source.write_bytes(source.read_bytes().replace(b"v1", b"v9"))
    changed = site.release(copy)
    assert changed != first
    listed = {r["id"]: r for r in site.client.releases()}
    assert {first, changed} <= listed.keys()
    assert listed[first]["requirements"] == ["herderdep==1.0"]


def test_an_unresolvable_requirement_fails_the_task_with_the_resolver_message(
    site: Site,
) -> None:
    rid = site.client.release(
        site.v1,
        requirements=["herderdep==7.0"],
        find_links=[str(site.wheelhouse)],
        no_index=True,
    )
    fut = site.client.run_on("node-a", _info(), release=rid, retries=0)
    with pytest.raises(TaskError) as caught:
        fut.result(timeout=120)
    message = str(caught.value)
    assert "herderdep" in message
    assert "No solution found" in message or "not found" in message
    task = site.client.task(fut.task_id)["task"]
    assert task["reason"] == "release failed"
    assert task["release"] == rid
    failed = [e for e in site.events("release_failed") if e["data"]["release"] == rid]
    assert failed
    assert not (site.tmp / "cache-node-a" / rid).exists()  # nothing half-made is kept
    # the node is fine: a good release still runs there
    good = site.release(site.v1)
    assert site.client.run_on("node-a", _info(), release=good).result(timeout=60)["dep"] == "1.0"


def test_conflicting_releases_run_side_by_side_on_one_node(site: Site) -> None:
    old = site.release(site.v1, dep="1.0")
    new = site.release(site.v1, dep="2.0")
    assert old != new
    info = _info()
    futures = [
        (rid, site.client.run_on("node-b", info, release=rid))
        for _ in range(6)
        for rid in (old, new)
    ]
    for rid, fut in futures:
        assert fut.result(timeout=120)["dep"] == ("1.0" if rid == old else "2.0")


def test_roll_out_under_load_fails_no_task(site: Site) -> None:
    v1 = site.release(site.v1)
    v2 = site.release(site.v2)
    info = _info()
    site.client.roll(v1)
    wait_for(
        lambda: all(n["fleet_release_ready"] for n in site.client.release_status()["nodes"]),
        60,
        "every node loads v1",
    )
    before = [site.client.submit(info, 0.02) for _ in range(60)]
    site.client.roll(v2)
    after = [site.client.submit(info, 0.02) for _ in range(60)]
    assert {f.result(timeout=120)["version"] for f in before} == {"v1"}
    assert {f.result(timeout=120)["version"] for f in after} == {"v2"}
    wait_for(
        lambda: all(v2 in n["installed"] for n in site.client.release_status()["nodes"]),
        60,
        "every node has v2",
    )
    status = run_cli(site.herd.env(), "release", "status").stdout
    assert f"fleet release: {v2}" in status
    assert "node-a" in status
    assert "node-b" in status


def test_a_node_that_joins_loads_the_fleet_release_before_it_is_ready(site: Site) -> None:
    rid = site.release(site.v2)
    site.client.roll(rid)
    site.agent("node-c", slots=1)
    site.herd.wait_nodes(3, timeout=60)
    loaded = [
        e
        for e in site.events("release_ready")
        if e["node_id"] == "node-c" and e["data"]["release"] == rid
    ]
    ready = [e for e in site.events("node_ready") if e["node_id"] == "node-c"]
    assert loaded
    assert ready
    assert loaded[0]["id"] < ready[0]["id"]
    assert site.client.run_on("node-c", _info()).result(timeout=60)["version"] == "v2"
    proc = site.procs.pop("node-c")
    kill_tree(proc.pid)
    proc.wait(timeout=30)


def test_removal_is_refused_while_in_use_and_changes_nothing(site: Site) -> None:
    fleet = site.release(site.v2)
    site.client.roll(fleet)
    with pytest.raises(ReleaseError, match="fleet"):
        site.client.remove_release(fleet)
    assert fleet in {r["id"] for r in site.client.releases()}
    spare = site.release(site.v2, dep="2.0")
    site.client.remove_release(spare)
    assert spare not in {r["id"] for r in site.client.releases()}
    with pytest.raises(ReleaseError, match="does not exist"):
        site.client.release_info(spare)
    with pytest.raises(SubmissionError, match=r"task t-.*release.*does not exist"):
        site.client.submit(_info(), release=spare).result(timeout=30)


def test_cli_and_tasks_file(site: Site, tmp_path: Path) -> None:
    env = site.herd.env()
    (tmp_path / "requirements.txt").write_text("herderdep==2.0  # the newer one\n")
    created = run_cli(
        env, "release", "create", str(site.v1),
        "--requirements", str(tmp_path / "requirements.txt"),
        "--find-links", str(site.wheelhouse), "--no-index",
    ).stdout.strip()  # fmt: skip
    assert created.startswith("r-")
    assert created in run_cli(env, "release", "ls").stdout
    shown = json.loads(run_cli(env, "release", "show", created, "--json").stdout)
    assert shown["requirements"] == ["herderdep==2.0"]
    assert shown["kind"] == "directory"
    tasks = tmp_path / "tasks.toml"
    tasks.write_text(
        textwrap.dedent(
            f"""
            [[tasks]]
            name = "which-dep"
            run = "python -c 'import herderdep as d, relpkg as r; print(d.VERSION, r.VERSION)'"
            release = "{created}"
            """
        )
    )
    job = json.loads(run_cli(env, "push", str(tasks), "--json").stdout)["job_id"]
    run_cli(env, "wait", job)
    [task] = site.client.tasks(job=job)
    assert site.client.task(task["id"])["task"]["output"]["stdout_tail"].split() == ["2.0", "v1"]
    bad = run_cli(env, "release", "rm", "r-00000000000000000000", check=False)
    assert bad.returncode == 1
    assert "does not exist" in bad.stderr


def test_herder_up_release_is_loaded_by_every_node_before_it_is_ready(
    site: Site, tmp_path: Path
) -> None:
    """``herder up --release RID`` (as ``[fleet] release``): the herd's own local nodes
    load it before they take work, and tasks that name no release run in it."""
    rid = site.release(site.v2)
    home = tmp_path / "home"
    home.mkdir()
    # the same datastore as the site's, so the release is there
    (home / "herder.toml").write_text(
        f'[coordinator]\ndatastore_url = "{(site.herd.home / "data").as_uri()}"\n'
    )
    herd = LocalHerd(nodes=2, home=home, extra_args=["--release", rid])
    client = herd.start()
    try:
        herd.wait_nodes(2, timeout=120)
        status = client.release_status()
        assert status["fleet_release"] == rid
        assert all(n["fleet_release_ready"] for n in status["nodes"])
        # relpkg.info is pickled by reference: the node imports the release's (v2)
        assert client.submit(_info()).result(timeout=60)["version"] == "v2"
        events = {e["action"]: e for e in client.event_log(limit=1000)}
        assert events["release_ready"]["data"]["release"] == rid
    finally:
        herd.stop()
