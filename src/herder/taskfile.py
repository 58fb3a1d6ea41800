"""Tasks files: what ``herder push tasks.toml`` reads, turned into validated TaskSpecs.

The same content may be written in TOML, JSON or YAML (chosen by the suffix:
``.toml``, ``.json``, ``.yaml`` / ``.yml``)::

    job = "nightly"                  # optional job name
    [[tasks]]
    name = "prepare"                 # required, unique, 1-100 of [A-Za-z0-9._-], alnum first
    run = ["python", "prep.py"]      # required: argv (no shell), or a string run by ``sh -c``
    depends_on = ["other", "align-*"]  # optional: names in this file, or fnmatch globs
    retries = 2                      # optional int >= 0, default 2 (max_attempts = retries + 1)
    timeout = 30                     # optional seconds, > 0
    env = { K = "v" }                # optional string -> string
    cwd = "/tmp"                     # optional
    labels = { gpu = "1" }           # optional string -> string, a node must carry them
    priority = 5                     # optional int
    run_on_failure = false           # optional bool
    matrix = { sample = ["a", "b"] }  # optional: one task per combination

A service is a command kept running (restarted whenever it exits, on any
node, until cancelled)::

    [[tasks]]
    name = "web"
    run = ["python", "-m", "http.server", "8000"]
    service = true
    health = "http://127.0.0.1:8000/"  # optional: a URL (2xx is healthy) or a command
    health_s = 10                    # optional: seconds between checks, default 10
    health_timeout_s = 5             # optional: a check's time limit, default 5
    unhealthy_after = 3              # optional: failed checks in a row before a restart
    grace_s = 30                     # optional: seconds before the first check (health_s)
    replicas = 3                     # optional: web-0, web-1, web-2 (HERDER_REPLICA=0..2)

The health fields and ``replicas`` are for services only, ``retries`` is
not (a service is restarted without limit), and no task may depend on a
service (it never finishes).

In JSON and YAML the top level is ``{"job": ..., "tasks": [...]}`` or a bare
list of tasks.

A ``matrix`` entry expands into the cartesian product of its lists.
``{key}`` is replaced by the value in ``name``, ``run``, ``env`` values,
``cwd`` and ``depends_on``; ``${...}`` is left to the shell and ``{{key}}``
gives a literal ``{key}``. Booleans are written ``true`` / ``false``.
Tasks without a matrix are taken literally.

A glob dependency (one holding ``*``, ``?`` or ``[``; names cannot) stands for
every *other* task whose name it matches and must match at least one.

The whole file is checked before anything is returned: the first mistake
raises :class:`~herder.errors.TaskFileError` naming the file, the task (its
name, and its entry number ``#n`` counted from 1) and the field (a path such as
``env.HOME`` or ``run[0]``, list items counted from 0).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import heapq
import itertools
import json
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal, NoReturn

import pydantic

from herder import selector
from herder.errors import TaskFileError
from herder.model import (
    CommandSpec,
    FetchSpec,
    ServiceSpec,
    TaskSpec,
    find_cycle,
    gc_paused,
    is_release_id,
    new_id,
    relative_path,
)

__all__ = [
    "SUFFIXES",
    "TaskFileFormat",
    "TasksFile",
    "load_tasks_file",
    "parse_tasks",
    "read_tasks_file",
]

TaskFileFormat = Literal["toml", "json", "yaml"]

SUFFIXES: dict[str, TaskFileFormat] = {
    ".toml": "toml",
    ".json": "json",
    ".yaml": "yaml",
    ".yml": "yaml",
}

TOP_LEVEL_KEYS = ("job", "tasks")
TASK_FIELDS = (
    "name",
    "run",
    "depends_on",
    "retries",
    "timeout",
    "env",
    "cwd",
    "labels",
    "priority",
    "run_on_failure",
    "matrix",
    "fetch",
    "upload",
    "keep_scratch",
    "service",
    "health",
    "health_s",
    "health_timeout_s",
    "unhealthy_after",
    "grace_s",
    "replicas",
    "select",
    "resources",
    "release",
)
# The settings of a service, as ServiceSpec names them; only with ``service = true``.
SERVICE_FIELDS = ("health", "health_s", "health_timeout_s", "unhealthy_after", "grace_s")
MAX_REPLICAS = 10_000
# Names people reach for out of habit (other tools, herder's own TaskSpec).
_ALIASES = {
    "deps": "depends_on",
    "dependencies": "depends_on",
    "needs": "depends_on",
    "after": "depends_on",
    "requires": "depends_on",
    "cmd": "run",
    "command": "run",
    "argv": "run",
    "args": "run",
    "script": "run",
    "max_attempts": "retries",
    "attempts": "retries",
    "timeout_s": "timeout",
    "environment": "env",
    "workdir": "cwd",
    "working_dir": "cwd",
    "dir": "cwd",
    "selector": "select",
    "query": "select",
    "constraints": "labels",
    "inputs": "fetch",
    "outputs": "upload",
    "healthcheck": "health",
    "health_check": "health",
    "liveness": "health",
    "interval": "health_s",
    "instances": "replicas",
    "count": "replicas",
}

DEFAULT_RETRIES = 2
MAX_RETRIES = 99  # TaskSpec allows at most 100 attempts
MAX_TIMEOUT_S = 30 * 86400  # as TaskSpec
MAX_PRIORITY = 1_000_000  # as TaskSpec
MAX_MATRIX_TASKS = 1_000_000  # per entry: a typo should not eat the machine's memory

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# "<job id>:<name>" must fit a task id (128 characters) with the longest name (100)
MAX_JOB_ID_LENGTH = 128 - 1 - 100
_MATRIX_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# ${...} (kept for the shell) | {{key}} (a literal {key}) | {key} (substituted)
_PLACEHOLDER_RE = re.compile(
    r"\$\{[^{}]*\}|\{\{([A-Za-z_][A-Za-z0-9_]*)\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}"
)
_GLOB_CHARS = frozenset("*?[")
_TASK_FIELD_SET = frozenset(TASK_FIELDS)
_BAD_ENV_KEY = re.compile("[=\0]")
_BAD_ENV_VALUE = re.compile("[\0]")
# constraint_key() joins labels as "k=v,k=v"
_BAD_LABEL_KEY = re.compile("[,=]")
_BAD_LABEL_VALUE = re.compile("[,]")
_TOML_LINE_RE = re.compile(r"at line (\d+)")


@dataclasses.dataclass(frozen=True)
class TasksFile:
    """A parsed tasks file: specs ordered so that every task follows its dependencies."""

    path: Path
    job_name: str | None
    specs: list[TaskSpec]


def load_tasks_file(path: str | os.PathLike[str]) -> TasksFile:
    """Read and check a tasks file; its suffix says whether it is TOML, JSON or YAML."""
    text, fmt = read_tasks_file(path)
    return parse_tasks(text, fmt=fmt, source=os.fspath(path))


def read_tasks_file(path: str | os.PathLike[str]) -> tuple[str, TaskFileFormat]:
    """The text of a tasks file and its format (from the suffix), or TaskFileError."""
    source = os.fspath(path)
    suffix = Path(source).suffix
    fmt = SUFFIXES.get(suffix.lower())
    if fmt is None:
        known = ", ".join(SUFFIXES)
        what = f"unknown suffix '{suffix}'" if suffix else "no suffix"
        raise _file_error(source, f"{what}: a tasks file ends in {known}")
    try:
        data = Path(source).read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise _file_error(source, f"cannot read the tasks file: {reason}") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _file_error(source, f"not UTF-8 text (byte {exc.start})") from exc
    return text, fmt


def parse_tasks(
    text: str, *, fmt: TaskFileFormat, source: str = "<tasks>", job_id: str | None = None
) -> TasksFile:
    """Check the text of a tasks file and turn it into TaskSpecs (all or nothing).

    With ``job_id`` each task's id is ``<job_id>:<name>``, so parsing the same
    file for the same job again gives the same ids: a resent push is stored
    once. Without it ids are random.
    """
    with gc_paused():
        data = _decode(text, fmt, source)
        job_name, raw_tasks = _top_level(data, source)
        entries: list[_Entry] = []
        for index, raw in enumerate(raw_tasks, 1):
            try:
                entries.extend(_read_entry(raw, index))
            except _Invalid as exc:
                raise _task_error(source, exc.task, index, exc.field, exc.what) from None
        specs = _link(entries, source, job_id)
    return TasksFile(path=Path(source), job_name=job_name, specs=specs)


# ---------------------------------------------------------------------------
# Errors


class _Invalid(Exception):
    """A mistake inside one task entry; parse_tasks adds the file and entry number."""

    def __init__(self, field: str | None, what: str, task: str | None = None) -> None:
        super().__init__(what)
        self.field = field
        self.what = what
        self.task = task


def _task_error(
    source: str, name: str | None, index: int, field: str | None, what: str
) -> TaskFileError:
    who = f"task '{name}' (#{index})" if name is not None else f"task #{index}"
    where = f": field '{field}'" if field is not None else ""
    return TaskFileError(
        f"{source}: {who}{where}: {what}",
        path=source,
        task=name if name is not None else index,
        field=field,
    )


def _file_error(
    source: str, what: str, *, field: str | None = None, line: int | None = None
) -> TaskFileError:
    where = f": field '{field}'" if field is not None else ""
    return TaskFileError(f"{source}{where}: {what}", path=source, task=None, field=field, line=line)


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {_short(value)!r}"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    if isinstance(value, dict):
        return "a table" if value else "an empty table"
    return f"a {type(value).__name__}"


def _short(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."


def _usable_name(value: object) -> str | None:
    """The name to show for a task, or None when it is not fit to print."""
    if isinstance(value, str) and 0 < len(value) <= 100 and value.isprintable():
        return value
    return None


def _suggest(word: str, known: tuple[str, ...]) -> str:
    alias = _ALIASES.get(word.lower()) if known is TASK_FIELDS else None
    if alias == "retries":
        return "; did you mean 'retries'? (max_attempts = retries + 1)"
    if alias is not None:
        return f"; did you mean '{alias}'?"
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f" (known: {', '.join(known)})"


# ---------------------------------------------------------------------------
# Decoding


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def _decode(text: str, fmt: str, source: str) -> object:
    if fmt == "toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            found = _TOML_LINE_RE.search(str(exc))
            line = int(found.group(1)) if found else None
            raise _file_error(source, f"invalid TOML: {exc}", line=line) from exc
    if fmt == "json":
        try:
            return json.loads(text, object_pairs_hook=_json_object)
        except json.JSONDecodeError as exc:
            raise _file_error(
                source,
                f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                line=exc.lineno,
            ) from exc
        except _DuplicateKey as exc:
            raise _file_error(
                source, f"invalid JSON: key '{exc.key}' appears twice in one object"
            ) from exc
        except RecursionError as exc:
            raise _file_error(source, "invalid JSON: nested too deeply") from exc
    if fmt == "yaml":
        import yaml  # only YAML files need PyYAML (1 MB and 10 ms of a coordinator's start)

        from herder.yaml_load import UniqueKeyLoader

        try:
            return yaml.load(text, Loader=UniqueKeyLoader)  # a safe loader
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            problem = exc.problem or exc.context or "syntax error"
            if mark is None:
                raise _file_error(source, f"invalid YAML: {problem}") from exc
            raise _file_error(
                source,
                f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}",
                line=mark.line + 1,
            ) from exc
        except yaml.YAMLError as exc:
            raise _file_error(source, f"invalid YAML: {exc}") from exc
        except RecursionError as exc:
            raise _file_error(source, "invalid YAML: nested too deeply") from exc
    raise _file_error(source, f"unknown format {fmt!r}: use 'toml', 'json' or 'yaml'")


def _top_level(data: object, source: str) -> tuple[str | None, list[object]]:
    if data is None:
        raise _file_error(source, "the file is empty: no tasks")
    if isinstance(data, list):
        job_name: str | None = None
        tasks: list[object] = data
    elif isinstance(data, dict):
        for key in data:
            if key not in TOP_LEVEL_KEYS:
                hint = (
                    "; task fields go inside each entry of 'tasks' ([[tasks]] in TOML)"
                    if key in TASK_FIELDS
                    else _suggest(str(key), TOP_LEVEL_KEYS)
                )
                raise _file_error(source, f"unknown top-level key{hint}", field=str(key))
        job = data.get("job")
        if job is not None and (not isinstance(job, str) or not job.strip()):
            raise _file_error(
                source, f"must be a non-empty string, got {_describe(job)}", field="job"
            )
        job_name = job
        if "tasks" not in data:
            raise _file_error(source, "no tasks: the file has no 'tasks' list")
        if not isinstance(data["tasks"], list):
            raise _file_error(
                source, f"must be a list of tables, got {_describe(data['tasks'])}", field="tasks"
            )
        tasks = data["tasks"]
    else:
        raise _file_error(
            source,
            "the top level must be a table with a 'tasks' list (or a list of tasks), "
            f"got {_describe(data)}",
        )
    if not tasks:
        raise _file_error(source, "no tasks: the 'tasks' list is empty")
    return job_name, tasks


# ---------------------------------------------------------------------------
# One entry (before names are linked)


@dataclasses.dataclass(slots=True)
class _Entry:
    index: int
    name: str
    run: list[str] | str
    env: dict[str, str]
    cwd: str | None
    depends_on: list[str]
    max_attempts: int
    timeout_s: float | None
    labels: dict[str, str]
    priority: int
    run_on_failure: bool
    fetch: list[dict[str, str]] = dataclasses.field(default_factory=list)
    upload: list[str] = dataclasses.field(default_factory=list)
    keep_scratch: bool = False
    service: dict[str, Any] | None = None  # ServiceSpec fields; None: not a service
    replicas: int | None = None
    select: str | None = None  # canonical selector text
    resources: dict[str, float] = dataclasses.field(default_factory=dict)
    release: str | None = None  # the release it runs in (herder release create)


_Matrix = list[tuple[str, list[str]]]


def _read_entry(raw: object, index: int) -> list[_Entry]:
    if not isinstance(raw, dict):
        raise _Invalid(None, f"must be a table of fields, got {_describe(raw)}")
    try:
        entry, matrix = _read_fields(raw, index)
        if matrix is not None:
            return _replicate(_expand(entry, matrix))
        _check_name(entry.name)
        _check_run(entry.run)
        _check_io(entry)
        _check_service(entry)
        return _replicate([entry])
    except _Invalid as exc:
        if exc.task is None:
            exc.task = _usable_name(raw.get("name"))
        raise


def _read_fields(raw: dict[Any, Any], index: int) -> tuple[_Entry, _Matrix | None]:
    """The entry's fields checked for type and range; name and run are still templates."""
    if not _TASK_FIELD_SET.issuperset(raw):
        for key in raw:
            if key not in _TASK_FIELD_SET:
                raise _Invalid(str(key), f"unknown field{_suggest(str(key), TASK_FIELDS)}")
    if "name" not in raw:
        raise _Invalid("name", "missing: every task needs a name")
    if "run" not in raw:
        raise _Invalid("run", "missing: give an argv list or a shell string")
    name = raw["name"]
    if not isinstance(name, str):
        raise _Invalid("name", f"must be a string, got {_describe(name)}")
    run_on_failure = raw.get("run_on_failure")
    if run_on_failure is not None and not isinstance(run_on_failure, bool):
        raise _Invalid("run_on_failure", f"must be true or false, got {_describe(run_on_failure)}")
    keep_scratch = raw.get("keep_scratch")
    if keep_scratch is not None and not isinstance(keep_scratch, bool):
        raise _Invalid("keep_scratch", f"must be true or false, got {_describe(keep_scratch)}")
    entry = _Entry(
        index=index,
        name=name,
        run=_run(raw["run"]),
        env=_str_table(raw.get("env"), "env", _BAD_ENV_KEY, _BAD_ENV_VALUE),
        cwd=_cwd(raw.get("cwd")),
        depends_on=_depends_on(raw.get("depends_on")),
        max_attempts=_int(raw.get("retries"), "retries", DEFAULT_RETRIES, 0, MAX_RETRIES) + 1,
        timeout_s=_timeout(raw.get("timeout")),
        labels=_str_table(raw.get("labels"), "labels", _BAD_LABEL_KEY, _BAD_LABEL_VALUE),
        priority=_int(raw.get("priority"), "priority", 0, -MAX_PRIORITY, MAX_PRIORITY),
        run_on_failure=bool(run_on_failure),
        fetch=_fetch(raw.get("fetch")),
        upload=_upload(raw.get("upload")),
        keep_scratch=bool(keep_scratch),
        select=_select(raw.get("select")),
        resources=_resources(raw.get("resources")),
        release=_release(raw.get("release")),
    )
    _read_service(raw, entry)
    return entry, _matrix(raw.get("matrix"))


def _read_service(raw: dict[Any, Any], entry: _Entry) -> None:
    """``service`` and its settings, checked for type; refused on an ordinary task."""
    service = raw.get("service")
    if service is not None and not isinstance(service, bool):
        raise _Invalid("service", f"must be true or false, got {_describe(service)}")
    if not service:
        for key in (*SERVICE_FIELDS, "replicas"):
            if key in raw:
                what = "runs copies of a service" if key == "replicas" else "checks a service"
                raise _Invalid(key, f"{what}: only for a task with service = true")
        return
    if "retries" in raw:
        raise _Invalid(
            "retries", "a service is restarted whenever it exits, without limit: drop retries"
        )
    settings: dict[str, Any] = {}
    if "health" in raw:
        settings["health"] = _health(raw["health"])
    for key in ("health_s", "health_timeout_s", "grace_s"):
        if key in raw:
            settings[key] = _seconds(raw[key], key, allow_zero=key == "grace_s")
    if "unhealthy_after" in raw:
        settings["unhealthy_after"] = _int(raw["unhealthy_after"], "unhealthy_after", 3, 1, 1000)
    entry.service = settings
    if "replicas" in raw:
        entry.replicas = _int(raw["replicas"], "replicas", 1, 1, MAX_REPLICAS)


def _health(value: object) -> list[str] | str:
    return _argv_or_shell(
        value,
        "health",
        "a URL (http:// or https://), a command as a list of strings or a string run by sh -c",
    )


def _seconds(value: object, field: str, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(field, f"must be a number of seconds, got {_describe(value)}")
    if not math.isfinite(value):
        raise _Invalid(field, f"must be a finite number of seconds, got {value}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = "at least 0" if allow_zero else "greater than 0"
        raise _Invalid(field, f"must be {bound}, got {value}")
    return float(value)


def _check_service(entry: _Entry) -> None:
    """The service settings as ServiceSpec takes them (after matrix substitution)."""
    if entry.service is None:
        return
    try:
        ServiceSpec.model_validate(entry.service)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "service"
        raise _Invalid(field, _pydantic_reason(exc)) from None


def _replicate(entries: list[_Entry]) -> list[_Entry]:
    """``replicas = N``: N copies of each service, named ``<name>-0`` ... ``<name>-<N-1>``.

    Each copy is told which it is in ``HERDER_REPLICA``, so copies on one
    machine can, say, listen on different ports.
    """
    out: list[_Entry] = []
    for entry in entries:
        if entry.replicas is None:
            out.append(entry)
            continue
        for i in range(entry.replicas):
            copy = dataclasses.replace(
                entry, name=f"{entry.name}-{i}", env={**entry.env, "HERDER_REPLICA": str(i)}
            )
            try:
                _check_name(copy.name)
            except _Invalid as exc:
                exc.field, exc.task = "replicas", _usable_name(entry.name)
                exc.what = f"{exc.what} (the name of replica {i})"
                raise
            out.append(copy)
    return out


def _expand(template: _Entry, matrix: _Matrix) -> list[_Entry]:
    """One entry per combination of the matrix values, placeholders filled in."""
    keys = [key for key, _ in matrix]
    _check_placeholders(template, keys)
    out: list[_Entry] = []
    for combo in itertools.product(*(values for _, values in matrix)):
        values = dict(zip(keys, combo, strict=True))
        entry = dataclasses.replace(
            template,
            name=_fill(template.name, values),
            run=_fill(template.run, values)
            if isinstance(template.run, str)
            else [_fill(item, values) for item in template.run],
            env={k: _fill(v, values) for k, v in template.env.items()},
            cwd=None if template.cwd is None else _fill(template.cwd, values),
            depends_on=[_fill(dep, values) for dep in template.depends_on],
            fetch=[{k: _fill(v, values) for k, v in f.items()} for f in template.fetch],
            upload=[_fill(pattern, values) for pattern in template.upload],
            service=_fill_service(template.service, values),
        )
        try:
            _check_name(entry.name)
            _check_run(entry.run)
            _check_io(entry)
            _check_service(entry)
        except _Invalid as exc:
            shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
            exc.what = f"{exc.what} (matrix {shown})"
            exc.task = _usable_name(entry.name) or _usable_name(template.name)
            raise
        out.append(entry)
    return out


def _fill_service(service: dict[str, Any] | None, values: dict[str, str]) -> dict[str, Any] | None:
    """A service's settings with ``{key}`` filled in its health check."""
    if service is None or "health" not in service:
        return service
    health = service["health"]
    filled = (
        _fill(health, values) if isinstance(health, str) else [_fill(h, values) for h in health]
    )
    return {**service, "health": filled}


def _check_placeholders(template: _Entry, keys: list[str]) -> None:
    run = [template.run] if isinstance(template.run, str) else template.run
    health = (template.service or {}).get("health")
    checks = (
        [("health", health)]
        if isinstance(health, str)
        else [(f"health[{i}]", h) for i, h in enumerate(health or [])]
    )
    fields = [
        ("name", template.name),
        *(("run" if isinstance(template.run, str) else f"run[{i}]", t) for i, t in enumerate(run)),
        *((f"env.{k}", v) for k, v in template.env.items()),
        *([("cwd", template.cwd)] if template.cwd is not None else []),
        *((f"depends_on[{i}]", dep) for i, dep in enumerate(template.depends_on)),
        *((f"fetch[{i}].{k}", v) for i, f in enumerate(template.fetch) for k, v in f.items()),
        *((f"upload[{i}]", pattern) for i, pattern in enumerate(template.upload)),
        *checks,
    ]
    for field, text in fields:
        for found in _PLACEHOLDER_RE.finditer(text):
            key = found.group(2)
            if key is not None and key not in keys:
                raise _Invalid(
                    field, f"'{{{key}}}' is not a matrix key (the matrix has {', '.join(keys)})"
                )


def _run(value: object) -> list[str] | str:
    return _argv_or_shell(value, "run", "a list of strings (argv) or a string (run by sh -c)")


def _argv_or_shell(value: object, field: str, expected: str) -> list[str] | str:
    """A command as argv (a list of strings) or as a string for ``sh -c``."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise _Invalid(f"{field}[{i}]", f"must be a string, got {_describe(item)}")
        return list(value)
    raise _Invalid(field, f"must be {expected}, got {_describe(value)}")


def _check_run(run: list[str] | str) -> None:
    if isinstance(run, str):
        if not run.strip():
            raise _Invalid("run", "must not be empty")
        if "\0" in run:
            raise _Invalid("run", "must not contain a NUL character")
        return
    if not run:
        raise _Invalid("run", "must not be an empty list")
    for i, item in enumerate(run):
        if not item:
            raise _Invalid(f"run[{i}]", "must not be an empty string")
        if "\0" in item:
            raise _Invalid(f"run[{i}]", "must not contain a NUL character")
    if not run[0].strip():
        raise _Invalid("run[0]", "must name a program, got only blanks")


def _check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise _Invalid(
            "name",
            f"{_short(name)!r} must be 1-100 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
        )


_FETCH_KEYS = ("key", "from", "path", "url", "dest")


def _fetch(value: object) -> list[dict[str, str]]:
    """Inputs: a datastore key as a string, or a table of key|from+path|url, and dest."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid("fetch", f"must be a list of inputs, got {_describe(value)}")
    out: list[dict[str, str]] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            out.append({"key": item})
            continue
        if not isinstance(item, dict):
            raise _Invalid(
                f"fetch[{i}]", f"must be a datastore key or a table, got {_describe(item)}"
            )
        for key, text in item.items():
            if key not in _FETCH_KEYS:
                raise _Invalid(
                    f"fetch[{i}].{key}", f"unknown field; an input has {', '.join(_FETCH_KEYS)}"
                )
            if not isinstance(text, str):
                raise _Invalid(f"fetch[{i}].{key}", f"must be a string, got {_describe(text)}")
        out.append(dict(item))
    return out


def _upload(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise _Invalid("upload", f"must be a list of glob patterns, got {_describe(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _Invalid(f"upload[{i}]", f"must be a glob pattern, got {_describe(item)}")
    return list(value)


def _check_io(entry: _Entry) -> None:
    """Inputs and output patterns well formed (after matrix substitution)."""
    for i, raw in enumerate(entry.fetch):
        try:
            FetchSpec.model_validate(raw)
        except pydantic.ValidationError as exc:
            raise _Invalid(f"fetch[{i}]", _pydantic_reason(exc)) from None
    for i, pattern in enumerate(entry.upload):
        try:
            relative_path(pattern, "the pattern")
        except ValueError as exc:
            raise _Invalid(f"upload[{i}]", str(exc)) from None


def _pydantic_reason(exc: pydantic.ValidationError) -> str:
    first = exc.errors()[0]
    return str(first["msg"]).removeprefix("Value error, ")


def _depends_on(value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid("depends_on", f"must be a list of task names, got {_describe(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise _Invalid(f"depends_on[{i}]", f"must be a task name, got {_describe(item)}")
    return list(value)


def _select(value: object) -> str | None:
    """A selector, parsed now so the error shows the bad token (with its caret line)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid("select", f"must be a string, got {_describe(value)}")
    try:
        return selector.canonical(value)
    except selector.SelectorError as exc:
        raise _Invalid("select", str(exc)) from exc


def _release(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not is_release_id(value):
        raise _Invalid(
            "release",
            "must be a release id like r-0123456789abcdef0123 (herder release create "
            f"prints it), got {_describe(value)}",
        )
    return value


def _resources(value: object) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Invalid("resources", f"must be a table like {{ cpus = 2 }}, got {_describe(value)}")
    try:
        return selector.check_resources(value)
    except ValueError as exc:
        raise _Invalid("resources", str(exc).removeprefix("resources: ")) from exc


def _int(value: object, field: str, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(field, f"must be an integer, got {_describe(value)}")
    if not low <= value <= high:
        raise _Invalid(field, f"must be between {low} and {high}, got {value}")
    return value


def _timeout(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid("timeout", f"must be a number of seconds, got {_describe(value)}")
    if not math.isfinite(value):
        raise _Invalid("timeout", f"must be a finite number of seconds, got {value}")
    if value <= 0:
        raise _Invalid("timeout", f"must be greater than 0, got {value}")
    if value > MAX_TIMEOUT_S:
        raise _Invalid("timeout", f"must be at most {MAX_TIMEOUT_S} seconds (30 days), got {value}")
    return float(value)


def _cwd(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid("cwd", f"must be a string, got {_describe(value)}")
    if not value or "\0" in value:
        raise _Invalid("cwd", "must be a non-empty path without NUL characters")
    return value


def _str_table(
    value: object, field: str, bad_key: re.Pattern[str], bad_value: re.Pattern[str]
) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Invalid(field, f"must be a table of strings, got {_describe(value)}")
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise _Invalid(field, f"keys must be non-empty strings, got {_describe(key)}")
        if bad_key.search(key):
            raise _Invalid(f"{field}.{key}", f"the key must not contain {_shown(bad_key)}")
        if not isinstance(item, str):
            raise _Invalid(f"{field}.{key}", f"must be a string, got {_describe(item)}")
        if bad_value.search(item):
            raise _Invalid(f"{field}.{key}", f"must not contain {_shown(bad_value)}")
        out[key] = item
    return out


def _shown(pattern: re.Pattern[str]) -> str:
    return " or ".join(repr(c) for c in pattern.pattern.strip("[]"))


def _matrix(value: object) -> _Matrix | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise _Invalid(
            "matrix", f"must be a non-empty table of name -> list, got {_describe(value)}"
        )
    out: _Matrix = []
    total = 1
    for key, values in value.items():
        if not isinstance(key, str) or not _MATRIX_KEY_RE.fullmatch(key):
            raise _Invalid(
                "matrix", f"key {key!r} must be a letter or '_' followed by letters, digits, '_'"
            )
        path = f"matrix.{key}"
        if not isinstance(values, list) or not values:
            raise _Invalid(path, f"must be a non-empty list, got {_describe(values)}")
        texts: list[str] = []
        for i, item in enumerate(values):
            if isinstance(item, bool):
                texts.append("true" if item else "false")
            elif isinstance(item, str | int | float):
                texts.append(str(item))
            else:
                raise _Invalid(
                    f"{path}[{i}]",
                    f"must be a string, number or boolean, got {_describe(item)}",
                )
        total *= len(texts)
        out.append((key, texts))
    if total > MAX_MATRIX_TASKS:
        raise _Invalid("matrix", f"expands to {total} tasks; at most {MAX_MATRIX_TASKS}")
    return out


def _fill(text: str, values: dict[str, str]) -> str:
    """``text`` with ``{key}`` replaced (keys checked beforehand by _check_placeholders)."""
    if "{" not in text:
        return text

    def substitute(found: re.Match[str]) -> str:
        literal, key = found.group(1), found.group(2)
        if literal is not None:
            return "{" + literal + "}"
        if key is None:
            return found.group(0)  # ${...} belongs to the shell
        return values[key]

    return _PLACEHOLDER_RE.sub(substitute, text)


# ---------------------------------------------------------------------------
# Linking names into ids, order


def _link(entries: list[_Entry], source: str, job_id: str | None) -> list[TaskSpec]:
    positions: dict[str, int] = {}
    for pos, entry in enumerate(entries):
        first = positions.setdefault(entry.name, pos)
        if first != pos:
            other = entries[first]
            if other.index == entry.index:
                what = "the matrix gives this name twice: use every matrix key in the name"
            else:
                what = f"duplicate name: task #{other.index} has it too"
            raise _task_error(source, entry.name, entry.index, "name", what)

    names = list(positions)  # file order, as entries
    globs: dict[str, list[int]] = {}  # pattern -> matching positions, found once
    deps: list[list[int]] = []
    for pos, entry in enumerate(entries):
        found: dict[int, None] = {}  # ordered and deduplicated
        if any("from" in raw for raw in entry.fetch):
            entry.fetch = _link_inputs(entries, pos, positions, names, globs, found, source)
        for i, dep in enumerate(entry.depends_on):
            if _GLOB_CHARS.isdisjoint(dep):
                target = positions.get(dep)
                if target is None:
                    what = f"no task is named {dep!r}{_suggest_name(dep, names)}"
                elif target == pos:
                    what = "a task cannot depend on itself"
                elif entries[target].service is not None:
                    what = _ON_SERVICE.format(dep)
                else:
                    found[target] = None
                    continue
                raise _task_error(source, entry.name, entry.index, f"depends_on[{i}]", what)
            matched = globs.get(dep)
            if matched is None:
                match = re.compile(fnmatch.translate(dep)).match
                matched = globs[dep] = [p for p, name in enumerate(names) if match(name)]
            if not matched or matched == [pos]:
                what = f"the pattern {dep!r} matches no other task"
                raise _task_error(source, entry.name, entry.index, f"depends_on[{i}]", what)
            service = next(
                (t for t in matched if t != pos and entries[t].service is not None), None
            )
            if service is not None:
                what = f"the pattern {dep!r} matches " + _ON_SERVICE.format(names[service])
                raise _task_error(source, entry.name, entry.index, f"depends_on[{i}]", what)
            for target in matched:
                if target != pos:
                    found[target] = None
        deps.append(list(found))

    order = _topological(deps)
    if order is None:
        _raise_cycle(entries, deps, source)
    if job_id is None:
        ids = [new_id("t") for _ in entries]
    else:
        ids = [f"{job_id}:{entry.name}" for entry in entries]
    return [_spec(entries[pos], ids[pos], [ids[d] for d in deps[pos]]) for pos in order]


_ON_SERVICE = "{!r}, a service: it never finishes, so no task can wait for it"


def _link_inputs(
    entries: list[_Entry],
    pos: int,
    positions: dict[str, int],
    names: list[str],
    globs: dict[str, list[int]],
    found: dict[int, None],
    source: str,
) -> list[dict[str, str]]:
    """Make every task an input comes ``from`` a dependency; expand ``from`` globs.

    ``{from = "align-*", path = "out.bam"}`` becomes one input per matching
    task, landing in ``<dest or .>/<task>/out.bam``: a fan-in is one line.
    """
    entry = entries[pos]
    out: list[dict[str, str]] = []
    for i, raw in enumerate(entry.fetch):
        producer = raw.get("from")
        if producer is None:
            out.append(raw)
            continue
        if _GLOB_CHARS.isdisjoint(producer):
            target = positions.get(producer)
            if target is None or target == pos or entries[target].service is not None:
                if target == pos:
                    what = "a task cannot fetch its own outputs"
                elif target is not None:
                    what = _ON_SERVICE.format(producer)
                else:
                    what = f"no task is named {producer!r}{_suggest_name(producer, names)}"
                raise _task_error(source, entry.name, entry.index, f"fetch[{i}].from", what)
            found[target] = None  # fetching a task's output depends on that task
            out.append(raw)
            continue
        matched = globs.get(producer)
        if matched is None:
            match = re.compile(fnmatch.translate(producer)).match
            matched = globs[producer] = [p for p, name in enumerate(names) if match(name)]
        matched = [p for p in matched if p != pos]
        if not matched:
            what = f"the pattern {producer!r} matches no other task"
            raise _task_error(source, entry.name, entry.index, f"fetch[{i}].from", what)
        service = next((t for t in matched if entries[t].service is not None), None)
        if service is not None:
            what = f"the pattern {producer!r} matches " + _ON_SERVICE.format(names[service])
            raise _task_error(source, entry.name, entry.index, f"fetch[{i}].from", what)
        folder = raw["dest"].rstrip("/") + "/" if raw.get("dest") else ""
        for target in matched:
            found[target] = None
            name = names[target]
            out.append({"from": name, "path": raw["path"], "dest": f"{folder}{name}/{raw['path']}"})
    return out


def _suggest_name(name: str, names: list[str]) -> str:
    if len(names) > 20_000:  # difflib over a huge file would take seconds
        return ""
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _topological(deps: list[list[int]]) -> list[int] | None:
    """Positions with each after its dependencies, else by file order; None on a cycle."""
    if all(d < pos for pos, ds in enumerate(deps) for d in ds):
        return list(range(len(deps)))  # already in order: the usual case
    waiting = [len(ds) for ds in deps]
    dependents: list[list[int]] = [[] for _ in deps]
    for pos, ds in enumerate(deps):
        for d in ds:
            dependents[d].append(pos)
    ready = [pos for pos, n in enumerate(waiting) if n == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        pos = heapq.heappop(ready)
        order.append(pos)
        for later in dependents[pos]:
            waiting[later] -= 1
            if waiting[later] == 0:
                heapq.heappush(ready, later)
    return order if len(order) == len(deps) else None


def _raise_cycle(entries: list[_Entry], deps: list[list[int]], source: str) -> NoReturn:
    edges = {entries[pos].name: [entries[d].name for d in ds] for pos, ds in enumerate(deps)}
    cycle = find_cycle(edges)
    assert cycle is not None, "a topological sort failed without a cycle"
    first = next(entry for entry in entries if entry.name == cycle[0])
    raise _task_error(
        source, first.name, first.index, "depends_on", f"dependency cycle: {' -> '.join(cycle)}"
    )


def _spec(entry: _Entry, task_id: str, depends_on: list[str]) -> TaskSpec:
    return TaskSpec(
        id=task_id,
        kind="command",
        name=entry.name,
        command=CommandSpec(
            run=entry.run,
            env=entry.env,
            cwd=entry.cwd,
            fetch=[FetchSpec.model_validate(raw) for raw in entry.fetch],
            upload=entry.upload,
            keep_scratch=entry.keep_scratch,
        ),
        depends_on=depends_on,
        priority=entry.priority,
        max_attempts=entry.max_attempts,
        timeout_s=entry.timeout_s,
        labels=entry.labels,
        run_on_failure=entry.run_on_failure,
        service=None if entry.service is None else ServiceSpec.model_validate(entry.service),
        select=entry.select,
        resources=entry.resources,
        release=entry.release,
    )
