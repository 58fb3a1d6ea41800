"""Tasks files: parsing, validation errors, matrix, globs, order, a 100,000-task file."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from herder.errors import ConfigError, TaskFileError
from herder.model import TaskSpec
from herder.taskfile import TasksFile, load_tasks_file, parse_tasks

DATA = Path(__file__).parent.parent / "data" / "taskfiles"
SUFFIX = {"toml": ".toml", "json": ".json", "yaml": ".yaml"}


def write(tmp_path: Path, fmt: str, text: str) -> Path:
    path = tmp_path / f"tasks{SUFFIX[fmt]}"
    path.write_text(text, encoding="utf-8")
    return path


def names(tasks: TasksFile) -> list[str | None]:
    return [spec.name for spec in tasks.specs]


def dep_names(tasks: TasksFile) -> dict[str | None, list[str | None]]:
    by_id = {spec.id: spec.name for spec in tasks.specs}
    return {spec.name: [by_id[d] for d in spec.depends_on] for spec in tasks.specs}


def assert_topological(specs: list[TaskSpec]) -> None:
    seen: set[str] = set()
    for spec in specs:
        assert seen.issuperset(spec.depends_on), spec.name
        seen.add(spec.id)


def summary(tasks: TasksFile) -> list[tuple[Any, ...]]:
    deps = dep_names(tasks)
    out = []
    for spec in tasks.specs:
        assert spec.command is not None
        out.append(
            (
                spec.name,
                spec.command.run,
                spec.command.env,
                spec.command.cwd,
                deps[spec.name],
                spec.max_attempts,
                spec.timeout_s,
                spec.labels,
                spec.priority,
                spec.run_on_failure,
            )
        )
    return out


# ---------------------------------------------------------------------------
# The same content in three formats


PIPELINE_ORDER = [
    "prepare",
    "align-a-1",
    "align-a-2",
    "align-a-3",
    "align-b-1",
    "align-b-2",
    "align-b-3",
    "report",
]


@pytest.mark.parametrize("suffix", ["toml", "json", "yaml"])
def test_pipeline_file(suffix: str) -> None:
    path = DATA / f"pipeline.{suffix}"
    tasks = load_tasks_file(path)

    assert tasks.path == path
    assert tasks.job_name == "nightly"
    # report comes first in the file but depends on everything else
    assert names(tasks) == PIPELINE_ORDER
    assert_topological(tasks.specs)
    by_name = {spec.name: spec for spec in tasks.specs}
    prepare, report = by_name["prepare"], by_name["report"]
    assert prepare.kind == "command"
    assert prepare.id.startswith("t-")
    assert prepare.command is not None
    assert prepare.command.run == ["python", "prep.py"]
    assert prepare.command.env == {"DATA": "/data"}
    assert prepare.command.cwd == "/tmp"
    assert prepare.labels == {"gpu": "1"}
    assert (prepare.max_attempts, prepare.timeout_s) == (1, 30.0)
    assert report.command is not None
    assert report.command.argv() == ["sh", "-c", "python report.py > report.txt"]
    assert (report.max_attempts, report.priority, report.run_on_failure) == (3, 5, True)
    assert report.timeout_s is None
    # the glob comes first in depends_on: its matches in file order, then prepare
    assert dep_names(tasks)["report"] == [*PIPELINE_ORDER[1:7], "prepare"]
    assert len({spec.id for spec in tasks.specs}) == len(tasks.specs)


def test_formats_are_equivalent() -> None:
    toml, js, yaml = (load_tasks_file(DATA / f"pipeline.{s}") for s in ("toml", "json", "yaml"))
    assert summary(toml) == summary(js) == summary(yaml)


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        ("json", '[{"name": "a", "run": "x"}, {"name": "b", "run": "y", "depends_on": ["a"]}]'),
        ("yaml", "- {name: a, run: x}\n- {name: b, run: y, depends_on: [a]}\n"),
    ],
)
def test_bare_list(fmt: str, text: str) -> None:
    tasks = parse_tasks(text, fmt=fmt, source=f"t.{fmt}")  # type: ignore[arg-type]
    assert tasks.job_name is None
    assert tasks.path == Path(f"t.{fmt}")
    assert dep_names(tasks) == {"a": [], "b": ["a"]}


def test_yml_suffix_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "x.YML"
    path.write_text("tasks:\n  - name: only\n    run: [true]\n    depends_on:\n")
    with pytest.raises(TaskFileError, match=r"field 'run\[0\]': must be a string, got boolean"):
        load_tasks_file(path)
    path.write_text("tasks:\n  - name: only\n    run: ['true']\n    depends_on:\n")
    (spec,) = load_tasks_file(path).specs
    assert (spec.max_attempts, spec.priority, spec.timeout_s) == (3, 0, None)
    assert (spec.depends_on, spec.labels, spec.run_on_failure) == ([], {}, False)
    assert spec.command is not None
    assert spec.command.env == {}
    assert spec.command.cwd is None


# ---------------------------------------------------------------------------
# Matrix, globs, order


def test_matrix_expansion() -> None:
    text = """
[[tasks]]
name = "prep-{sample}"
run = "prep {sample}"
matrix = { sample = ["a", "b"] }

[[tasks]]
name = "align-{sample}-{k}"
run = ["align", "{sample}", "-k", "{k}", "${HOME}", "{{k}}"]
depends_on = ["prep-{sample}"]
env = { SAMPLE = "{sample}", FIXED = "x" }
cwd = "/work/{sample}"
labels = { "mem" = "{k}" }
matrix = { sample = ["a", "b"], k = [1, 2, 3] }

[[tasks]]
name = "flag-{on}-{x}"
run = "echo {on} {x}"
matrix = { on = [true, false], x = [1.5] }
"""
    tasks = parse_tasks(text, fmt="toml")
    aligns = [spec for spec in tasks.specs if spec.name and spec.name.startswith("align-")]
    assert [spec.name for spec in aligns] == [
        f"align-{s}-{k}" for s in ("a", "b") for k in (1, 2, 3)
    ]
    spec = aligns[4]  # align-b-2
    assert spec.command is not None
    assert spec.command.run == ["align", "b", "-k", "2", "${HOME}", "{k}"]
    assert spec.command.env == {"SAMPLE": "b", "FIXED": "x"}
    assert spec.command.cwd == "/work/b"
    assert spec.labels == {"mem": "{k}"}  # labels are not templates
    deps = dep_names(tasks)
    assert deps["align-b-2"] == ["prep-b"]
    assert deps["align-a-3"] == ["prep-a"]
    assert names(tasks)[:2] == ["prep-a", "prep-b"]
    flags = {spec.name: spec.command.run for spec in tasks.specs if spec.command}
    assert flags["flag-true-1.5"] == "echo true 1.5"
    assert flags["flag-false-1.5"] == "echo false 1.5"


def test_glob_fan_in_and_dedup() -> None:
    text = json.dumps(
        {
            "tasks": [
                {"name": "final", "run": "x", "depends_on": ["s-?", "s-1", "s-[12]", "*"]},
                {"name": "s-1", "run": "x"},
                {"name": "s-2", "run": "x", "depends_on": ["s-*"]},  # matches s-1, not itself
                {"name": "other", "run": "x"},
            ]
        }
    )
    tasks = parse_tasks(text, fmt="json")
    deps = dep_names(tasks)
    assert deps["final"] == ["s-1", "s-2", "other"]
    assert deps["s-2"] == ["s-1"]
    assert names(tasks) == ["s-1", "s-2", "other", "final"]


def test_topological_order_is_stable() -> None:
    text = """
[[tasks]]
name = "c"
run = "x"
depends_on = ["b"]
[[tasks]]
name = "free1"
run = "x"
[[tasks]]
name = "b"
run = "x"
depends_on = ["a"]
[[tasks]]
name = "free2"
run = "x"
[[tasks]]
name = "a"
run = "x"
"""
    tasks = parse_tasks(text, fmt="toml")
    assert names(tasks) == ["free1", "free2", "a", "b", "c"]
    assert_topological(tasks.specs)


def test_file_order_kept_when_already_sorted() -> None:
    tasks = [
        {"name": f"t{i}", "run": "x", "depends_on": [f"t{i - 1}"] if i else []} for i in range(5)
    ]
    tasks.insert(2, {"name": "solo", "run": "x"})
    result = parse_tasks(json.dumps({"tasks": tasks}), fmt="json")
    assert names(result) == ["t0", "t1", "solo", "t2", "t3", "t4"]


# ---------------------------------------------------------------------------
# Errors: each names the file, the task and the field

A = '[[tasks]]\nname = "a"\nrun = "x"\n'
B = '[[tasks]]\nname = "b"\nrun = "x"\n'


def toml_task(body: str, name: str = "a") -> str:
    """One TOML task entry named ``name`` with the given extra lines."""
    return f'[[tasks]]\nname = "{name}"\n{body}\n'


# File-level mistakes: id -> (format, text, field, fragment). No task is named.
FILE_CASES: dict[str, tuple[str, str, str | None, str]] = {
    "toml-syntax": ("toml", '[[tasks]]\nname = "a"\nrun = \n', None, "invalid TOML"),
    "json-syntax": ("json", '{"tasks": [\n{"name": "a",, }]}', None, "invalid JSON at line 2"),
    "yaml-syntax": ("yaml", "tasks:\n  - name: a\n    run: [x\n", None, "invalid YAML at line"),
    "json-duplicate-key": (
        "json",
        '[{"name": "a", "run": "x", "run": "y"}]',
        None,
        "'run' appears",
    ),
    "yaml-duplicate-key": ("yaml", "- name: a\n  run: x\n  run: y\n", None, "at line 3"),
    "top-level-scalar": ("json", "5", None, "top level must be a table"),
    "yaml-empty": ("yaml", "# nothing\n", None, "empty"),
    "tasks-not-list": ("json", '{"tasks": {"name": "a"}}', "tasks", "must be a list"),
    "empty-task-list": ("toml", "tasks = []\n", None, "no tasks"),
    "empty-bare-list": ("json", "[]", None, "no tasks"),
    "no-tasks-key": ("toml", 'job = "x"\n', None, "no tasks"),
    "unknown-top-level-key": ("toml", 'jobs = "x"\n' + A, "jobs", "did you mean 'job'?"),
    "task-fields-at-top": ("toml", 'name = "a"\nrun = "x"\n', "name", "[[tasks]]"),
    "job-type": ("toml", "job = 5\n" + A, "job", "must be a non-empty string"),
}

# Mistakes in the fields of task 'a' (#1): id -> (TOML lines, field, fragment).
FIELD_CASES: dict[str, tuple[str, str, str]] = {
    "missing-run": ("", "run", "missing"),
    "run-type": ("run = 5", "run", "got integer 5"),
    "run-empty-list": ("run = []", "run", "empty list"),
    "run-empty-string": ('run = " "', "run", "must not be empty"),
    "run-empty-item": ('run = ["x", ""]', "run[1]", "empty string"),
    "run-item-type": ('run = ["x", 5]', "run[1]", "must be a string, got integer 5"),
    "retries-string": ('run = "x"\nretries = "3"', "retries", "an integer, got string '3'"),
    "retries-bool": ('run = "x"\nretries = true', "retries", "an integer, got boolean true"),
    "retries-negative": ('run = "x"\nretries = -1', "retries", "between 0 and 99, got -1"),
    "retries-float": ('run = "x"\nretries = 2.0', "retries", "got number 2.0"),
    "priority-bool": ('run = "x"\npriority = true', "priority", "must be an integer"),
    "timeout-string": ('run = "x"\ntimeout = "x"', "timeout", "number of seconds, got string"),
    "timeout-bool": ('run = "x"\ntimeout = false', "timeout", "number of seconds, got boolean"),
    "timeout-zero": ('run = "x"\ntimeout = 0', "timeout", "greater than 0"),
    "timeout-negative": ('run = "x"\ntimeout = -1.5', "timeout", "greater than 0"),
    "timeout-nan": ('run = "x"\ntimeout = nan', "timeout", "must be a finite number"),
    "env-value-int": ('run = "x"\nenv = { K = 1 }', "env.K", "must be a string, got integer 1"),
    "env-type": ('run = "x"\nenv = ["K=v"]', "env", "table of strings"),
    "env-key-equals": ('run = "x"\nenv = { "A=B" = "v" }', "env.A=B", "must not contain '='"),
    "labels-value-list": ('run = "x"\nlabels = { gpu = ["1"] }', "labels.gpu", "got a list"),
    "labels-value-comma": ('run = "x"\nlabels = { gpu = "1,2" }', "labels.gpu", "contain ','"),
    "cwd-type": ('run = "x"\ncwd = 5', "cwd", "must be a string"),
    "run-on-failure-type": ('run = "x"\nrun_on_failure = "yes"', "run_on_failure", "true or"),
    "unknown-field-close": ('run = "x"\ndepend_on = []', "depend_on", "mean 'depends_on'?"),
    "unknown-field-alias": ('run = "x"\ndeps = []', "deps", "did you mean 'depends_on'?"),
    "unknown-field-max-attempts": ('run = "x"\nmax_attempts = 3', "max_attempts", "'retries'?"),
    "unknown-field-far": ('run = "x"\nzzz = 1', "zzz", "(known: name, run, depends_on"),
    "depends-on-type": ('run = "x"\ndepends_on = "b"', "depends_on", "must be a list"),
    "depends-on-empty": ('run = "x"\ndepends_on = [""]', "depends_on[0]", "a task name, got"),
    "unknown-dependency": ('run = "x"\ndepends_on = ["bb"]', "depends_on[0]", "named 'bb'"),
    "glob-matches-nothing": ('run = "x"\ndepends_on = ["c-*"]', "depends_on[0]", "no other task"),
    "glob-matches-only-self": ('run = "x"\ndepends_on = ["a*"]', "depends_on[0]", "no other"),
    "self-dependency": ('run = "x"\ndepends_on = ["a"]', "depends_on[0]", "depend on itself"),
    "matrix-type": ('run = "x"\nmatrix = ["a"]', "matrix", "non-empty table"),
    "matrix-empty": ('run = "x"\nmatrix = {}', "matrix", "non-empty table"),
    "matrix-empty-values": ('run = "x"\nmatrix = { s = [] }', "matrix.s", "non-empty list"),
    "matrix-values-not-list": ('run = "x"\nmatrix = { s = "ab" }', "matrix.s", "non-empty list"),
    "matrix-value-table": ('run = "x"\nmatrix = { s = [{}] }', "matrix.s[0]", "number or bool"),
    "matrix-bad-key": ('run = "x"\nmatrix = { "s-1" = [1] }', "matrix", "key 's-1'"),
    "matrix-collision": ('run = "x"\nmatrix = { s = [1, 2] }', "name", "gives this name twice"),
}

# Everything else: id -> (format, text, task shown, field, fragment).
OTHER_CASES: dict[str, tuple[str, str, str, str | None, str]] = {
    "entry-not-table": ("json", '[{"name": "a", "run": "x"}, "b"]', "task #2", None, "a table"),
    "missing-name": ("toml", '[[tasks]]\nrun = "x"\n', "task #1", "name", "missing"),
    "name-type": ("toml", '[[tasks]]\nname = 5\nrun = "x"\n', "task #1", "name", "got integer 5"),
    "name-chars": ("toml", toml_task('run = "x"', "a b"), "task 'a b' (#1)", "name", "letters"),
    "name-start": ("toml", toml_task('run = "x"', "-a"), "task '-a' (#1)", "name", "starting"),
    "name-long": ("toml", toml_task('run = "x"', "a" * 101), "task #1", "name", "1-100"),
    "duplicate-name": ("toml", A + B + A, "task 'a' (#3)", "name", "duplicate name: task #1"),
    "unknown-dependency-hint": (
        "toml",
        toml_task('run = "x"\ndepends_on = ["prepar"]', "b") + toml_task('run = "x"', "prepare"),
        "task 'b' (#1)",
        "depends_on[0]",
        "no task is named 'prepar'; did you mean 'prepare'?",
    ),
    "dependency-cycle": (
        "toml",
        toml_task('run = "x"\ndepends_on = ["b"]', "a")
        + toml_task('run = "x"\ndepends_on = ["c"]', "b")
        + toml_task('run = "x"\ndepends_on = ["a"]', "c"),
        "task 'a' (#1)",
        "depends_on",
        "dependency cycle: a -> b -> c -> a",
    ),
    "matrix-unknown-key-name": (
        "toml",
        toml_task('run = "x"\nmatrix = { s = [1] }', "a-{t}"),
        "task 'a-{t}' (#1)",
        "name",
        "'{t}' is not a matrix key (the matrix has s)",
    ),
    "matrix-unknown-key-run": (
        "toml",
        toml_task('run = ["x", "{t}"]\nmatrix = { s = [1] }', "a-{s}"),
        "task 'a-{s}' (#1)",
        "run[1]",
        "'{t}' is not a matrix key",
    ),
    "matrix-unknown-key-env": (
        "toml",
        toml_task('run = "x"\nenv = { K = "{t}" }\nmatrix = { s = [1] }', "a-{s}"),
        "task 'a-{s}' (#1)",
        "env.K",
        "'{t}' is not a matrix key",
    ),
    "matrix-collides-with-other": (
        "toml",
        A + toml_task('run = "x"\nmatrix = { s = ["a", "b"] }', "{s}"),
        "task 'a' (#2)",
        "name",
        "duplicate name: task #1",
    ),
    "matrix-bad-expanded-name": (
        "toml",
        toml_task('run = "x"\nmatrix = { s = ["ok", "x y"] }', "a-{s}"),
        "task 'a-x y' (#1)",
        "name",
        "(matrix s='x y')",
    ),
    "matrix-empty-run": (
        "toml",
        toml_task('run = "{s}"\nmatrix = { s = [""] }', "a-{s}"),
        "task 'a-' (#1)",
        "run",
        "must not be empty",
    ),
}

ERROR_CASES = (
    [
        pytest.param(fmt, text, None, field, fragment, id=case)
        for case, (fmt, text, field, fragment) in FILE_CASES.items()
    ]
    + [
        pytest.param("toml", toml_task(body) + B, "task 'a' (#1)", field, fragment, id=case)
        for case, (body, field, fragment) in FIELD_CASES.items()
    ]
    + [pytest.param(*args, id=case) for case, args in OTHER_CASES.items()]
)


@pytest.mark.parametrize(("fmt", "text", "who", "field", "fragment"), ERROR_CASES)
def test_error(
    tmp_path: Path, fmt: str, text: str, who: str | None, field: str | None, fragment: str
) -> None:
    path = write(tmp_path, fmt, text)
    with pytest.raises(TaskFileError) as caught:
        load_tasks_file(path)
    exc = caught.value
    message = str(exc)
    assert isinstance(exc, ConfigError)
    assert exc.context["path"] == str(path)
    assert message.startswith(f"{path}: ")
    assert fragment in message
    assert exc.context["field"] == field
    if field is None:
        assert "field '" not in message
    else:
        assert f": field '{field}': " in message
    if who is None:
        assert exc.context["task"] is None
        assert "task " not in message.split(": ")[1]
    else:
        assert message.startswith(f"{path}: {who}: ")
        expected_task: str | int = (
            who[len("task '") :].split("' (#")[0] if "'" in who else int(who[6:])
        )
        assert exc.context["task"] == expected_task


def test_syntax_errors_keep_line_and_cause(tmp_path: Path) -> None:
    with pytest.raises(TaskFileError, match="line 3") as caught:
        load_tasks_file(write(tmp_path, "toml", '[[tasks]]\nname = "a"\nrun = \n'))
    assert caught.value.context["line"] == 3
    assert caught.value.__cause__ is not None
    with pytest.raises(TaskFileError) as caught:
        load_tasks_file(write(tmp_path, "yaml", "tasks:\n  - name: a\n    run: [x\n"))
    assert isinstance(caught.value.context["line"], int)


def test_unusable_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(TaskFileError, match=f"^{missing}: cannot read") as caught:
        load_tasks_file(missing)
    assert caught.value.context["path"] == str(missing)
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(TaskFileError, match="cannot read"):
        load_tasks_file(tmp_path / "dir.toml")
    (tmp_path / "tasks.txt").write_text(A)
    with pytest.raises(TaskFileError, match=r"tasks\.txt: unknown suffix '\.txt'"):
        load_tasks_file(tmp_path / "tasks.txt")
    with pytest.raises(TaskFileError, match="no suffix"):
        load_tasks_file(tmp_path / "tasks")
    (tmp_path / "latin.toml").write_bytes(b'[[tasks]]\nname = "\xe9"\n')
    with pytest.raises(TaskFileError, match="not UTF-8"):
        load_tasks_file(tmp_path / "latin.toml")


def test_late_error_names_its_entry() -> None:
    tasks: list[dict[str, Any]] = [{"name": f"t{i}", "run": "x"} for i in range(1000)]
    tasks.append({"name": "bad", "run": "x", "depends_on": ["nope"]})
    with pytest.raises(TaskFileError, match=r"task 'bad' \(#1001\): field 'depends_on\[0\]'"):
        parse_tasks(json.dumps(tasks), fmt="json", source="big.json")


# ---------------------------------------------------------------------------
# Scale


def test_hundred_thousand_tasks(tmp_path: Path) -> None:
    n = 100_000
    tasks: list[dict[str, Any]] = [
        {
            "name": f"align-{i}",
            "run": ["align", str(i)],
            "depends_on": [f"align-{i - 1}"] if i else [],
            "retries": 1,
            "timeout": 60,
            "env": {"I": str(i)},
        }
        for i in range(n - 1)
    ]
    # the final task comes first in the file: the order must be rebuilt
    tasks.insert(0, {"name": "final", "run": "report", "depends_on": ["align-*", "align-0"]})
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"job": "big", "tasks": tasks}))

    started = time.perf_counter()
    result = load_tasks_file(path)
    elapsed = time.perf_counter() - started
    print(f"parsed {n} tasks in {elapsed:.2f} s")

    specs = result.specs
    assert len(specs) == n
    assert sum(len(spec.depends_on) for spec in specs) == 2 * (n - 1) - 1
    assert specs[0].name == "align-0"
    assert specs[-1].name == "final"
    assert len(specs[-1].depends_on) == n - 1
    assert_topological(specs)
    assert specs[500].depends_on == [specs[499].id]
    assert specs[500].command is not None
    assert specs[500].command.env == {"I": "500"}


# ---------------------------------------------------------------------------
# inputs and outputs of command tasks


def test_fetch_upload_and_a_fan_in_by_glob() -> None:
    tasks = parse_tasks(
        """
        [[tasks]]
        name = "part-{i}"
        matrix = {i = [1, 2, 3]}
        fetch = ["inputs/{i}.csv", {url = "https://example.org/ref.fa?v=2"}]
        run = "wc -l {i}.csv > n.txt"
        upload = ["n.txt", "logs/*.log"]

        [[tasks]]
        name = "sum"
        fetch = [
          {from = "part-*", path = "n.txt", dest = "parts"},
          {from = "part-1", path = "n.txt"},
        ]
        run = "cat parts/*/n.txt"
        keep_scratch = true
        """,
        fmt="toml",
    )
    part2 = tasks.specs[1].command
    assert part2 is not None
    assert [f.key for f in part2.fetch] == ["inputs/2.csv", None]
    assert [f.target() for f in part2.fetch] == ["2.csv", "ref.fa"]
    assert part2.upload == ["n.txt", "logs/*.log"]
    total = tasks.specs[-1]
    assert total.command is not None
    assert total.command.keep_scratch
    assert [f.target() for f in total.command.fetch] == [
        "parts/part-1/n.txt",
        "parts/part-2/n.txt",
        "parts/part-3/n.txt",
        "n.txt",
    ]
    # fetching a task's outputs makes it a dependency
    assert sorted(dep_names(tasks)["sum"]) == ["part-1", "part-2", "part-3"]  # type: ignore[type-var]


@pytest.mark.parametrize(
    ("entry", "field", "what"),
    [
        ('fetch = [{from = "nope", path = "x"}]', "fetch[0].from", "no task is named 'nope'"),
        ('fetch = [{from = "b", path = "x"}]', "fetch[0].from", "cannot fetch its own outputs"),
        ('fetch = [{from = "zz-*", path = "x"}]', "fetch[0].from", "matches no other task"),
        ('fetch = [{key = "a", url = "https://x"}]', "fetch[0]", "exactly one of key, from or url"),
        ('fetch = [{from = "a"}]', "fetch[0]", "'from' needs 'path'"),
        ('fetch = [{key = "a", dest = "../up"}]', "fetch[0]", "must not contain '..'"),
        ('fetch = [{key = "a", dest = "/etc/x"}]', "fetch[0]", "must be a relative path"),
        ('fetch = [{url = "ftp://x/y"}]', "fetch[0]", "http:// or https://"),
        ('fetch = [{kee = "a"}]', "fetch[0].kee", "unknown field"),
        ("fetch = [3]", "fetch[0]", "a datastore key or a table"),
        ('upload = ["../secrets"]', "upload[0]", "must not contain '..'"),
        ("upload = [1]", "upload[0]", "must be a glob pattern"),
        ('keep_scratch = "yes"', "keep_scratch", "must be true or false"),
    ],
)
def test_bad_inputs_and_outputs_are_named(entry: str, field: str, what: str) -> None:
    text = f'[[tasks]]\nname = "a"\nrun = "true"\n\n[[tasks]]\nname = "b"\nrun = "true"\n{entry}\n'
    with pytest.raises(TaskFileError) as caught:
        parse_tasks(text, fmt="toml", source="t.toml")
    message = str(caught.value)
    assert "task 'b'" in message
    assert f"field '{field}'" in message
    assert what in message
