"""The half of the ``ssh`` provider that runs on the host, under the host's own python.

herder never imports this module: :mod:`herder.providers.ssh` sends its
source with every command, so host and coordinator always agree on it and
nothing has to be installed on the host first. It uses the standard library
only and runs on any python 3.8+, so an old python gets a clear answer
instead of a syntax error.

One operation per run: the command is a one-line loader
(:data:`herder.providers.ssh.LOADER`) given the operation's name as its
argument; stdin carries one JSON object, ``{"source": <this file>,
"request": {...}}``; the answer is one JSON object on stdout. The request
may hold the join token, which so never appears in any argv on the host.

Exit status 0: the answer; 2: ``{"error": "..."}`` for a failure this
module understands (a failed pip, a missing python module); anything else
is a crash whose traceback is on stderr.

Layout of the host's ``dir`` (every file in it is herder's own)::

    venv/                  the agents' environment; venv/herder-build names its build
    tools/<uv wheel>/uv    uv's program, unpacked from its wheel to install with
    wheels/                dependency wheels copied here; wheels/<build>/ holds herder's
    logs/<node>.log        each agent's output (kept after it stops)
    run/<node>.json        one per started agent: pid, node id, cluster (no secret)
    install.lock           flock'ed while installing: two spawns never install at once
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MARKER = "herder-build"


class HostError(Exception):
    """A failure to report to the provider as ``{"error": ...}``."""


def main(op: str, request: dict[str, Any]) -> None:
    """Run ``op`` and print its answer (the loader calls this)."""
    try:
        answer = OPS[op](request)
    except HostError as exc:
        json.dump({"error": str(exc)}, sys.stdout)
        sys.exit(2)
    json.dump(answer, sys.stdout)


# ---------------------------------------------------------------------------
# operations


def probe(request: dict[str, Any]) -> dict[str, Any]:
    """What the provider must know before it installs or starts anything here."""
    root = _root(request)
    try:
        herder: str | None = importlib.metadata.version("herder")
    except importlib.metadata.PackageNotFoundError:
        herder = None
    return {
        "dir": str(root),
        "python": list(sys.version_info[:3]),
        "executable": sys.executable,
        "platform": sysconfig.get_platform(),
        "herder": herder,
        "installed": _installed(root),
        "running": _running(root, request["cluster"]),
    }


def install(request: dict[str, Any]) -> dict[str, Any]:
    """Install the build into ``venv`` unless it is there already; the file
    lock makes a second installer wait, then find the work done."""
    root = _made(_root(request))
    want = {"build": request["build"], "python": sys.executable}
    started = time.monotonic()
    with open(root / "install.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if _installed(root) == want:
            return {"installed": False, "seconds": time.monotonic() - started}
        how = _install_locked(root, request)
        _write_json(root / "venv" / MARKER, want)
    return {"installed": True, "seconds": time.monotonic() - started, **how}


def launch(request: dict[str, Any]) -> dict[str, Any]:
    """Start one detached agent per node (none twice) and return at once."""
    root = _made(_root(request))
    for sub in ("logs", "run"):
        (root / sub).mkdir(exist_ok=True)
    env = dict(os.environ)
    env["HERDER_JOIN"] = request["join"]
    env.pop("HERDER_IDLE_EXIT", None)  # only the coordinator's policy retires agents
    started = []
    for node in request["nodes"]:
        node_id = _node_id(node["node_id"])
        record = _record(root, node_id)
        if record is not None and _is_agent(record["pid"], node_id):
            started.append({"node_id": node_id, "pid": record["pid"], "existed": True})
            continue
        pid = _start(root, node_id, node["argv"], env)
        _write_json(
            root / "run" / f"{node_id}.json",
            {
                "pid": pid,
                "node_id": node_id,
                "cluster": request["cluster"],
                "build": request.get("build"),
                "started_at": time.time(),
            },
        )
        started.append({"node_id": node_id, "pid": pid, "existed": False})
    return {"started": started}


def terminate(request: dict[str, Any]) -> dict[str, Any]:
    """SIGTERM the agent's process group, SIGKILL it (and what it started)
    after ``grace``; forget the node. The venv and the log stay."""
    root = _root(request)
    node_id = _node_id(request["node_id"])
    path = root / "run" / f"{node_id}.json"
    record = _record(root, node_id)
    if record is None:
        return {"found": False, "forced": False}
    pid = int(record["pid"])
    if not _is_agent(pid, node_id):  # gone already, or the pid now names someone else
        path.unlink(missing_ok=True)
        return {"found": False, "forced": False}
    _signal_group(pid, signal.SIGTERM)
    forced = not _wait(lambda: not _group_alive(pid), float(request["grace"]))
    if forced:
        for group in {pid, *(_pgid(p) for p in _descendants(pid))}:
            _signal_group(group, signal.SIGKILL)
        _wait(lambda: not _group_alive(pid), 5.0)
    path.unlink(missing_ok=True)
    return {"found": True, "forced": forced}


OPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "probe": probe,
    "install": install,
    "launch": launch,
    "terminate": terminate,
}


# ---------------------------------------------------------------------------
# installing


def _install_locked(root: Path, request: dict[str, Any]) -> dict[str, Any]:
    """Install the copied wheels into ``venv``; says which installer did it.

    Offline, with uv's wheel among them (it is a dependency of herder), its
    program installs everything in a few seconds; pip takes over if uv cannot
    run here, and the answer says why.
    """
    venv = root / "venv"
    old = _installed(root)
    fresh = (
        old is None or old.get("python") != sys.executable or not (venv / "bin" / "python").exists()
    )
    if not fresh:
        (venv / MARKER).unlink()  # a half-done install must not look done
    wheels = root / "wheels"
    herder = str(wheels / request["herder_wheel"])
    env = dict(os.environ)
    if not request["offline"]:
        _pip_install(venv, fresh, [], herder, env)  # dependencies from the host's own index
        return {"installer": "pip"}
    # Exactly the copied wheels, whatever pip or uv configuration the host has.
    env.update(PIP_CONFIG_FILE=os.devnull, UV_NO_CONFIG="1")
    deps = [str(wheels / name) for name in request["dependencies"]]
    uv_wheel = next((name for name in request["dependencies"] if name.startswith("uv-")), None)
    answer: dict[str, Any] = {"installer": "pip"}
    if uv_wheel is not None:
        try:
            _uv_install(_unpacked_uv(root, wheels / uv_wheel), venv, fresh, [*deps, herder], env)
            return {"installer": "uv"}
        except HostError as exc:
            answer["uv_failed"] = str(exc)
            fresh = True  # what uv left half made is made again
    _pip_install(venv, fresh, ["--no-index", "--no-deps", *deps], herder, env)
    return answer


def _pip_install(
    venv: Path, fresh: bool, args: list[str], herder: str, env: dict[str, str]
) -> None:
    """``python -m venv`` (when ``fresh``), then pip with ``args`` and herder's wheel:
    the way that needs nothing but python."""
    if fresh:
        _run([sys.executable, "-m", "venv", "--clear", str(venv)], dict(os.environ))
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-q"]
    _run([*pip, *args, herder], env)
    if not fresh:  # the same version number may hold other code: replace it
        _run([*pip, "--no-deps", "--force-reinstall", herder], env)


def _uv_install(uv: Path, venv: Path, fresh: bool, wheels: list[str], env: dict[str, str]) -> None:
    """uv makes the venv (when ``fresh``) and installs the wheels, herder's last and anew.

    No bytecode is compiled ahead (pip's default): an agent compiles what it
    imports, a small part of what is installed, on its first start.
    """
    if fresh:
        _run([str(uv), "venv", "--quiet", "--clear", "--python", sys.executable, str(venv)], env)
    _run(
        [str(uv), "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"),
         "--offline", "--no-index", "--no-deps", "--no-cache", "--link-mode", "copy",
         "--reinstall-package", "herder", *wheels],
        env,
    )  # fmt: skip


def _unpacked_uv(root: Path, wheel: Path) -> Path:
    """uv's program, taken out of its wheel once (``tools/<wheel>/uv``)."""
    target = root / "tools" / wheel.name / "uv"
    if target.exists():
        return target
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next((m for m in zf.namelist() if m.endswith(".data/scripts/uv")), None)
            if member is None:
                raise HostError(f"{wheel.name} holds no uv program")
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name("uv.part")
            with zf.open(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
    except (OSError, zipfile.BadZipFile) as exc:
        raise HostError(f"cannot unpack uv from {wheel.name}: {exc}") from exc
    os.chmod(part, 0o755)
    os.replace(part, target)
    return target


def _installed(root: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((root / "venv" / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data


def _run(argv: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(
        argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise HostError(f"{' '.join(argv[:5])} ... failed (exit {done.returncode}): {tail}")


# ---------------------------------------------------------------------------
# agents and their records


def _start(root: Path, node_id: str, argv: list[str], env: dict[str, str]) -> int:
    """A new session, stdin from /dev/null, output to the node's log: the
    agent outlives this process and the SSH channel."""
    with open(root / "logs" / f"{node_id}.log", "ab") as log:
        try:
            proc = subprocess.Popen(
                argv,
                cwd=str(root),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise HostError(f"cannot start {argv[0]}: {exc}") from exc
    return proc.pid


def _running(root: Path, cluster: str) -> list[dict[str, Any]]:
    """The live agents of ``cluster`` started from this dir; records of dead
    agents (exited by themselves) are removed on the way."""
    found = []
    for path in sorted((root / "run").glob("*.json")):
        node_id = path.stem
        record = _record(root, node_id)
        if record is None:
            continue
        if not _is_agent(int(record["pid"]), node_id):
            path.unlink(missing_ok=True)
            continue
        if record.get("cluster") == cluster:
            found.append({"node_id": node_id, "pid": record["pid"]})
    return found


def _record(root: Path, node_id: str) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((root / "run" / f"{node_id}.json").read_text())
    except (OSError, ValueError):
        return None
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _root(request: dict[str, Any]) -> Path:
    return Path(os.path.expanduser(request["dir"])).absolute()


def _made(root: Path) -> Path:
    """``root``, made private to its user if it is new (logs may hold task output)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700)
    return root


def _node_id(text: str) -> str:
    if not NODE_ID.fullmatch(text):
        raise HostError(f"bad node id {text!r}")
    return text


# ---------------------------------------------------------------------------
# processes (Linux /proc; ps and kill(2) elsewhere)

PROC = Path("/proc")


def _is_agent(pid: int, node_id: str) -> bool:
    """Whether ``pid`` is alive and is the herder agent of ``node_id`` (pids get reused)."""
    state = _state(pid)
    if state is None or state[0] in "ZX":
        return False
    argv = state[1]
    return (
        "agent" in argv
        and any("herder" in a for a in argv)
        and any(argv[i] == "--node-id" and argv[i + 1] == node_id for i in range(len(argv) - 1))
    )


def _state(pid: int) -> tuple[str, list[str]] | None:
    """(state letter, argv) of a process, None if there is none."""
    if PROC.joinpath("self").exists():
        try:
            stat = PROC.joinpath(str(pid), "stat").read_text()
            argv = PROC.joinpath(str(pid), "cmdline").read_bytes().split(b"\0")[:-1]
        except (FileNotFoundError, ProcessLookupError):
            return None
        return stat.rpartition(")")[2].split()[0], [a.decode(errors="replace") for a in argv]
    done = subprocess.run(
        ["ps", "-o", "stat=", "-o", "args=", "-p", str(pid)],
        capture_output=True,
        text=True,
        check=False,
    )
    fields = done.stdout.split()
    return (fields[0][0], fields[1:]) if fields else None


def _table() -> list[tuple[int, int, int, str]]:
    """(pid, ppid, pgid, state) of every process (Linux only; empty elsewhere)."""
    rows = []
    for entry in PROC.iterdir() if PROC.joinpath("self").exists() else []:
        if not entry.name.isdigit():
            continue
        try:
            fields = entry.joinpath("stat").read_text().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        rows.append((int(entry.name), int(fields[1]), int(fields[2]), fields[0]))
    return rows


def _group_alive(pgid: int) -> bool:
    table = _table()
    if not table:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    return any(group == pgid and state not in "ZX" for _, _, group, state in table)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for child, parent, _, _ in _table():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return pid


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    if pgid == os.getpgid(0):
        return  # never our own group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _wait(done: Callable[[], bool], within: float) -> bool:
    deadline = time.monotonic() + within
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


if __name__ == "__main__":  # by hand: python ssh_remote.py probe < request.json
    main(sys.argv[1], json.load(sys.stdin))
