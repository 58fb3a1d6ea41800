"""A command task's four phases: fetch, run, upload, cleanup.

Each attempt gets a fresh directory ``<scratch_root>/<task>-<attempt>/``
holding ``work/`` (where inputs land, the command runs and outputs are
globbed) and the captured ``stdout`` and ``stderr`` beside it, so that an
upload pattern like ``*`` never picks up the logs. Cleanup always runs,
also after a failure or a timeout, unless ``keep_scratch``.

Runs in the slot's worker process, and in ``herder task ID --rerun-here``
with ``echo`` set so that every step is printed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from herder.errors import DatastoreError, DatastoreFull, DatastoreUnavailable, ObjectMissing
from herder.model import CommandSpec, FetchSpec, Limits

if TYPE_CHECKING:  # httpx loads when a task first fetches or uploads, not at every start
    from herder.dataclient import DataClient

TAIL_BYTES = 4096
TAIL_EVERY_S = 0.5  # how often a running command's new output is streamed
TAIL_CHUNK = 64 * 1024
_CHUNK = 1 << 20


def job_prefix(job_id: str) -> str:
    """Where a job's outputs live in the datastore."""
    return f"jobs/{job_id}/"


def output_prefix(job_id: str, task: str) -> str:
    """Where a task's uploaded outputs live: ``jobs/<job>/<task name or id>/``."""
    return f"{job_prefix(job_id)}{task}/"


def attempt_dir(scratch_root: Path, task_id: str, attempt: int) -> Path:
    return scratch_root / f"{task_id}-{attempt}"


@dataclass
class PhaseContext:
    """What the phases need besides the command itself."""

    task_id: str
    attempt: int
    job_id: str
    name: str | None
    scratch_root: Path
    data: DataClient | None  # None: no datastore reachable; fetch by key or upload fails
    timeout_s: float | None = None
    echo: Callable[[str], None] | None = None
    # Called with the process group of the command once it is started, so the
    # caller can kill it too on cancel (it leads its own group; see _run).
    on_spawn: Callable[[int], None] | None = None
    # Called from a tailing thread with (stream, new bytes) while the command runs.
    on_output: Callable[[str, bytes], None] | None = None
    upload: bool = True  # False: list what would be uploaded, write nothing (--rerun-here)
    phases: list[dict[str, Any]] = field(default_factory=list)

    @property
    def task_label(self) -> str:
        return self.name or self.task_id

    def say(self, text: str) -> None:
        if self.echo is not None:
            self.echo(text)


class PhaseFailed(Exception):
    """A phase went wrong; ``reason`` is the task's reason (``input_missing``, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@contextlib.contextmanager
def _phase(ctx: PhaseContext, name: str) -> Iterator[dict[str, Any]]:
    record: dict[str, Any] = {"phase": name, "start": time.time(), "outcome": "ok"}
    ctx.phases.append(record)
    ctx.say(f"[{name}] start")
    try:
        yield record
    except PhaseFailed as exc:
        record["outcome"] = exc.reason
        record["detail"] = str(exc)
        raise
    except BaseException as exc:
        record["outcome"] = "error"
        record["detail"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        record["end"] = time.time()
        ctx.say(
            f"[{name}] {record['outcome']} in {record['end'] - record['start']:.2f}s"
            + (f": {record['detail']}" if "detail" in record else "")
        )


def run_command_task(command: CommandSpec, ctx: PhaseContext) -> dict[str, Any]:
    """Run the four phases; returns the worker's outcome map (never raises for task faults)."""
    home = attempt_dir(ctx.scratch_root, ctx.task_id, ctx.attempt)
    work = home / "work"
    shutil.rmtree(home, ignore_errors=True)  # a leftover of a killed earlier run
    work.mkdir(parents=True)
    output: dict[str, Any] = {"phases": ctx.phases, "scratch": str(home)}
    failure: PhaseFailed | None = None
    try:
        with _phase(ctx, "fetch"):
            for spec in command.fetch:
                _fetch(spec, work, ctx)
        with _phase(ctx, "run"):
            output["returncode"] = code = _run(command, home, work, ctx)
            if code != 0:
                raise PhaseFailed("exit code", f"{command.argv()[0]} exited with code {code}")
        with _phase(ctx, "upload"):
            output["uploads"] = _upload(command.upload, work, ctx)
    except PhaseFailed as exc:
        failure = exc
    except Exception as exc:  # a bug or an OS fault in a phase: a failed task, said plainly
        failure = PhaseFailed("error", f"{type(exc).__name__}: {exc}")
    finally:
        output["stdout_tail"] = _tail(home / "stdout")
        output["stderr_tail"] = _tail(home / "stderr")
        with _phase(ctx, "cleanup") as record:
            if command.keep_scratch:
                record["outcome"] = "kept"
                record["detail"] = str(home)
            else:
                shutil.rmtree(home, ignore_errors=True)
                output.pop("scratch")
    if failure is None:
        return {"state": "succeeded", "output": output}
    phase = next((p["phase"] for p in ctx.phases if p["outcome"] not in ("ok", "kept")), "?")
    return {
        "state": "failed",
        "reason": failure.reason,
        "output": output,
        "error": {
            "type": "PhaseFailed",
            "phase": phase,
            "message": f"{phase}: {failure}",
            "traceback": output["stderr_tail"],
        },
    }


# --- fetch -------------------------------------------------------------------------


def _fetch(spec: FetchSpec, work: Path, ctx: PhaseContext) -> None:
    target = work / spec.target()
    target.parent.mkdir(parents=True, exist_ok=True)
    if spec.url is not None:
        ctx.say(f"  {spec.url} -> {spec.target()}")
        _download(spec.url, target)
        return
    if spec.key is not None:
        key = spec.key
    else:
        key = output_prefix(ctx.job_id, spec.from_task or "") + (spec.path or "")
    ctx.say(f"  {key} -> {spec.target()}")
    if ctx.data is None:
        raise PhaseFailed("datastore_unavailable", f"no datastore to fetch {key!r} from")
    try:
        ctx.data.get_file(key, target)
    except ObjectMissing as exc:
        raise PhaseFailed("input_missing", f"input {key!r} is not in the datastore") from exc
    except DatastoreFull as exc:
        raise PhaseFailed("disk_full", f"no space to fetch {key!r} into {target}") from exc
    except DatastoreUnavailable as exc:
        raise PhaseFailed("datastore_unavailable", f"fetching {key!r}: {exc}") from exc
    except DatastoreError as exc:
        raise PhaseFailed("fetch_failed", f"fetching {key!r}: {exc}") from exc


def _download(url: str, target: Path) -> None:
    import httpx

    tmp = target.with_name(f".{target.name}.part")
    try:
        with (
            httpx.stream("GET", url, follow_redirects=True, timeout=60) as response,
            open(tmp, "wb") as out,
        ):
            if response.status_code == 404:
                raise PhaseFailed("input_missing", f"input {url} answered 404 Not Found")
            if response.status_code >= 400:
                raise PhaseFailed("fetch_failed", f"input {url} answered {response.status_code}")
            for chunk in response.iter_bytes(_CHUNK):
                out.write(chunk)
        os.replace(tmp, target)
    except httpx.HTTPError as exc:
        raise PhaseFailed("fetch_failed", f"input {url}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


# --- run ---------------------------------------------------------------------------


def _run(command: CommandSpec, home: Path, work: Path, ctx: PhaseContext) -> int:
    """Run the command with its output captured to files; returns its exit code.

    The command leads its own process group, so a timeout kills everything it
    started and nothing else; ``on_spawn`` tells the caller the group, so a
    cancel (which kills the worker) takes the command down too.
    """
    argv = command.argv()
    cwd = work / command.cwd if command.cwd else work
    env = {**os.environ, **command.env, "HERDER_TASK_ID": ctx.task_id, "HERDER_JOB": ctx.job_id}
    ctx.say(f"  $ {' '.join(argv)}  (in {cwd})")
    account = _switch_user(command.run_as, home)
    switch: dict[str, Any] = (
        {} if account is None
        else {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    )  # fmt: skip
    with open(home / "stdout", "wb") as out, open(home / "stderr", "wb") as err:
        try:
            proc = subprocess.Popen(
                limited(argv, command.limits),
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=err,
                start_new_session=True,
                **switch,  # the user's own groups only: none of the agent's
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise PhaseFailed("error", f"cannot start {argv[0]}: {exc}") from exc
        if ctx.on_spawn is not None:
            ctx.on_spawn(proc.pid)
        tail = _Tail(home, ctx.on_output) if ctx.on_output is not None else None
        try:
            code = proc.wait(timeout=ctx.timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise PhaseFailed("timeout", f"ran past its timeout of {ctx.timeout_s}s") from None
        finally:
            # whatever the command left running in its group goes with it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            if tail is not None:
                tail.stop()
    return code


# Sets the limits, then becomes the command (exec): the limits are in force from
# its first instruction, with no preexec_fn in a threaded worker.
_LIMITED = (
    "import os, resource, sys\n"
    "for name, value in zip(sys.argv[1::2][:4], sys.argv[2::2][:4]):\n"
    "    if value != '-':\n"
    "        limit = int(value)\n"
    "        resource.setrlimit(getattr(resource, name), (limit, limit))\n"
    "os.execvp(sys.argv[9], sys.argv[9:])\n"
)


def limited(argv: list[str], limits: Limits | None) -> list[str]:
    """``argv`` started under ``limits`` (through a small Python that sets them and
    execs it), or as it is without limits."""
    if limits is None:
        return argv
    pairs = [
        ("RLIMIT_AS", None if limits.memory_mb is None else limits.memory_mb * 2**20),
        ("RLIMIT_CPU", limits.cpu_s),
        ("RLIMIT_NOFILE", limits.open_files),
        ("RLIMIT_NPROC", limits.processes),
    ]
    flat = [x for name, value in pairs for x in (name, "-" if value is None else str(value))]
    return [sys.executable, "-c", _LIMITED, *flat, *argv]


def _switch_user(run_as: str | None, home: Path) -> pwd.struct_passwd | None:
    """The account to run as, with the attempt's directory handed to it; None: ours."""
    if run_as is None:
        return None
    try:
        account = pwd.getpwnam(run_as)
    except KeyError:
        raise PhaseFailed("error", f"run_as: there is no user {run_as!r} on this node") from None
    if os.geteuid() != 0:
        raise PhaseFailed("error", f"run_as {run_as!r}: the agent must run as root to switch")
    for root, dirs, files in os.walk(home):
        for name in (*dirs, *files):
            os.chown(os.path.join(root, name), account.pw_uid, account.pw_gid)
    os.chown(home, account.pw_uid, account.pw_gid)
    return account


class _Tail:
    """Streams what the command appends to ``stdout``/``stderr`` while it runs.

    A thread reads the capture files every ``TAIL_EVERY_S`` and hands new bytes
    (at most ``TAIL_CHUNK`` per stream per read) to ``emit``; on ``stop`` it
    sends what is left. Output beyond the chunk per interval is skipped in the
    stream, not lost: the files and the result's tails keep it.
    """

    def __init__(self, home: Path, emit: Callable[[str, bytes], None]) -> None:
        self._paths = {name: home / name for name in ("stdout", "stderr")}
        self._offsets = dict.fromkeys(self._paths, 0)
        self._emit = emit
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="herder-tail", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._done.wait(TAIL_EVERY_S):
            self._read()

    def _read(self) -> None:
        for name, path in self._paths.items():
            size = path.stat().st_size
            start = max(self._offsets[name], size - TAIL_CHUNK)
            if size <= start:
                continue
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(size - start)
            self._offsets[name] = start + len(data)
            self._emit(name, data)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        self._read()


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - TAIL_BYTES))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


# --- upload ------------------------------------------------------------------------


def _upload(patterns: list[str], work: Path, ctx: PhaseContext) -> list[dict[str, Any]]:
    files: dict[str, Path] = {}
    for pattern in patterns:
        matched = [p for p in sorted(work.glob(pattern)) if p.is_file()]
        if not matched:
            raise PhaseFailed("output_missing", f"upload pattern {pattern!r} matched no file")
        for path in matched:
            files.setdefault(path.relative_to(work).as_posix(), path)
    if files and ctx.upload and ctx.data is None:
        raise PhaseFailed("datastore_unavailable", "no datastore to upload outputs to")
    prefix = output_prefix(ctx.job_id, ctx.task_label)
    uploads: list[dict[str, Any]] = []
    for rel, path in files.items():
        key = prefix + rel
        if not ctx.upload:
            ctx.say(f"  {rel} would go to {key} (not uploaded)")
            uploads.append({"key": key, "size": path.stat().st_size, "sha256": None})
            continue
        ctx.say(f"  {rel} -> {key}")
        assert ctx.data is not None
        try:
            info = ctx.data.put_file(key, path)
        except DatastoreFull as exc:
            raise PhaseFailed("datastore_full", f"uploading {key!r}: {exc}") from exc
        except DatastoreUnavailable as exc:
            raise PhaseFailed("datastore_unavailable", f"uploading {key!r}: {exc}") from exc
        except DatastoreError as exc:
            raise PhaseFailed("upload_failed", f"uploading {key!r}: {exc}") from exc
        uploads.append({"key": key, "size": info.size, "sha256": info.sha256})
    return uploads
