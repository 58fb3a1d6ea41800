"""Services in tasks files: the fields, ``replicas`` expansion, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from herder.errors import TaskFileError
from herder.model import ServiceSpec
from herder.taskfile import load_tasks_file, parse_tasks

WEB = """
[[tasks]]
name = "web"
run = ["python", "-m", "http.server", "8000"]
service = true
health = "http://127.0.0.1:8000/"
health_s = 2
health_timeout_s = 1.5
unhealthy_after = 5
grace_s = 0
"""


def test_a_service_and_its_health_settings() -> None:
    [spec] = parse_tasks(WEB, fmt="toml", job_id="j").specs
    assert spec.id == "j:web"
    assert spec.service == ServiceSpec(
        health="http://127.0.0.1:8000/",
        health_s=2,
        health_timeout_s=1.5,
        unhealthy_after=5,
        grace_s=0,
    )
    assert spec.service.health_url == "http://127.0.0.1:8000/"
    assert spec.service.first_check_s == 0


def test_defaults_and_a_health_command() -> None:
    text = json.dumps(
        [
            {"name": "plain", "run": "x"},
            {"name": "svc", "run": "x", "service": True, "health": ["test", "-f", "ready"]},
            {"name": "off", "run": "x", "service": False},
        ]
    )
    specs = {s.name: s for s in parse_tasks(text, fmt="json").specs}
    assert specs["plain"].service is None
    assert specs["off"].service is None
    svc = specs["svc"].service
    assert svc is not None
    assert svc.health_argv() == ["test", "-f", "ready"]
    assert (svc.health_s, svc.health_timeout_s, svc.unhealthy_after, svc.first_check_s) == (
        10.0,
        5.0,
        3,
        10.0,
    )


def test_replicas_expand_into_named_copies(tmp_path: Path) -> None:
    path = tmp_path / "web.yaml"
    path.write_text(
        "job: site\n"
        "tasks:\n"
        "  - name: web\n"
        "    run: serve --port 80$HERDER_REPLICA\n"
        "    env: {MODE: prod}\n"
        "    service: true\n"
        "    replicas: 3\n"
        "  - name: batch\n"
        "    run: make\n"
    )
    tasks = load_tasks_file(path)
    assert [s.name for s in tasks.specs] == ["web-0", "web-1", "web-2", "batch"]
    for i, spec in enumerate(tasks.specs[:3]):
        assert spec.service == ServiceSpec()
        assert spec.command is not None
        assert spec.command.env == {"MODE": "prod", "HERDER_REPLICA": str(i)}
    assert tasks.specs[3].service is None


def test_replicas_of_every_matrix_combination_with_the_check_filled_in() -> None:
    text = """
[[tasks]]
name = "api-{port}"
run = "serve {port}"
service = true
health = "http://127.0.0.1:{port}/health"
matrix = { port = [8001, 8002] }
replicas = 2
"""
    specs = parse_tasks(text, fmt="toml").specs
    assert [s.name for s in specs] == ["api-8001-0", "api-8001-1", "api-8002-0", "api-8002-1"]
    assert [s.service.health for s in specs if s.service] == [
        "http://127.0.0.1:8001/health",
        "http://127.0.0.1:8001/health",
        "http://127.0.0.1:8002/health",
        "http://127.0.0.1:8002/health",
    ]


def task(body: str, name: str = "a") -> str:
    return f'[[tasks]]\nname = "{name}"\nrun = "x"\n{body}\n'


SERVICE = "service = true"

# id -> (TOML text, task shown, field, fragment)
CASES: dict[str, tuple[str, str, str, str]] = {
    "replicas-without-service": (
        task("replicas = 2"),
        "a",
        "replicas",
        "only for a task with service = true",
    ),
    "health-without-service": (
        task('health = "true"'),
        "a",
        "health",
        "only for a task with service = true",
    ),
    "health-s-with-service-false": (
        task("service = false\nhealth_s = 3"),
        "a",
        "health_s",
        "only for a task with service = true",
    ),
    "replicas-zero": (task(f"{SERVICE}\nreplicas = 0"), "a", "replicas", "between 1 and"),
    "replicas-negative": (task(f"{SERVICE}\nreplicas = -2"), "a", "replicas", "between 1 and"),
    "replicas-not-int": (task(f'{SERVICE}\nreplicas = "3"'), "a", "replicas", "an integer"),
    "service-not-bool": (task('service = "yes"'), "a", "service", "must be true or false"),
    "retries-on-service": (task(f"{SERVICE}\nretries = 3"), "a", "retries", "without limit"),
    "health-s-zero": (task(f"{SERVICE}\nhealth_s = 0"), "a", "health_s", "greater than 0"),
    "grace-negative": (task(f"{SERVICE}\ngrace_s = -1"), "a", "grace_s", "at least 0"),
    "health-timeout-string": (
        task(f'{SERVICE}\nhealth_timeout_s = "5"'),
        "a",
        "health_timeout_s",
        "number of seconds",
    ),
    "unhealthy-after-zero": (
        task(f"{SERVICE}\nunhealthy_after = 0"),
        "a",
        "unhealthy_after",
        "between 1 and 1000",
    ),
    "health-type": (task(f"{SERVICE}\nhealth = 5"), "a", "health", "a URL (http:// or https://)"),
    "health-item-type": (task(f'{SERVICE}\nhealth = ["x", 1]'), "a", "health[1]", "a string"),
    "health-empty": (task(f'{SERVICE}\nhealth = "  "'), "a", "health", "must not be empty"),
    "health-bad-url": (task(f'{SERVICE}\nhealth = "http:/x"'), "a", "health", "http://"),
    "health-unknown-matrix-key": (
        task(f'{SERVICE}\nhealth = "curl :{{p}}"\nmatrix = {{ q = [1] }}', "a-{q}"),
        "a-{q}",
        "health",
        "'{p}' is not a matrix key",
    ),
    "replica-name-too-long": (
        task(f"{SERVICE}\nreplicas = 10", "a" * 99),
        "a" * 99,
        "replicas",
        "(the name of replica 0)",
    ),
    "depends-on-a-service": (
        task(SERVICE, "web") + task('depends_on = ["web"]', "b"),
        "b",
        "depends_on[0]",
        "'web', a service: it never finishes",
    ),
    "depends-on-a-replica-by-glob": (
        task(f"{SERVICE}\nreplicas = 2", "web") + task('depends_on = ["web-*"]', "b"),
        "b",
        "depends_on[0]",
        "the pattern 'web-*' matches 'web-0', a service",
    ),
    "fetches-from-a-service": (
        task(SERVICE, "web") + task('fetch = [{from = "web", path = "x"}]', "b"),
        "b",
        "fetch[0].from",
        "'web', a service",
    ),
    "fetches-from-a-service-by-glob": (
        task(SERVICE, "web") + task('fetch = [{from = "w*", path = "x"}]', "b"),
        "b",
        "fetch[0].from",
        "the pattern 'w*' matches 'web', a service",
    ),
    "unknown-field-suggests-health": (task("healthcheck = 1"), "a", "healthcheck", "'health'"),
}


@pytest.mark.parametrize(("text", "who", "field", "fragment"), CASES.values(), ids=CASES.keys())
def test_refused(tmp_path: Path, text: str, who: str, field: str, fragment: str) -> None:
    path = tmp_path / "tasks.toml"
    path.write_text(text)
    with pytest.raises(TaskFileError) as caught:
        load_tasks_file(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: task '{who}' (#")
    assert f": field '{field}': " in message
    assert fragment in message
    assert caught.value.context["task"] == who
    assert caught.value.context["field"] == field


def test_a_service_may_wait_for_ordinary_tasks() -> None:
    text = task("", "setup") + task(f'{SERVICE}\ndepends_on = ["setup"]', "web")
    specs = {s.name: s for s in parse_tasks(text, fmt="toml", job_id="j").specs}
    assert specs["web"].depends_on == ["j:setup"]
