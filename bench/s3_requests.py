"""S3 requests per command task: a herd on an S3 datastore (moto in server mode)
runs N tasks that each fetch one input and upload one output; the requests
are counted from moto's request log, by kind.

S3 bills per request and each one is a round trip, so this is the datastore's
cost per task as a user pays it. Writes ``bench/results-s3-requests.json``.
Run: ``.venv/bin/python bench/s3_requests.py [--tasks 50]`` (moto comes with
the test extras).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import boto3  # type: ignore[import-untyped]
from moto.server import ThreadedMotoServer

from herder.local import LocalHerd

HERE = Path(__file__).parent
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
TASKS = """
[[tasks]]
name = "part-{i}"
matrix = {i = [@VALUES@]}
fetch = ["inputs/offset.txt"]
run = "echo $(( {i} + $(cat offset.txt) )) > part.txt"
upload = ["part.txt"]
"""


class RequestLog(logging.Handler):
    """``METHOD /path?query`` of each request moto answered."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())
        if '"' in text:
            self.lines.append(text.split('"')[1].rsplit(" ", 1)[0])


def kind(request: str) -> str:
    """A request's method, what it touches (a sidecar or an object) and its S3 operation."""
    method, _, target = request.partition(" ")
    path, _, query = target.partition("?")
    what = "sidecar" if "/.herder-meta/" in path else "object"
    operation = next(
        (op for op in ("uploads", "partNumber", "uploadId", "list-type") if op in query), ""
    )
    return " ".join(part for part in (method, what, operation) if part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=50)
    args = parser.parse_args()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=True)
    log = RequestLog()
    logging.getLogger("werkzeug").addHandler(log)
    logging.getLogger("werkzeug").setLevel(logging.INFO)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory(prefix="herder-s3-bench-") as tmp:
            home = Path(tmp) / "home"
            home.mkdir()
            (home / "herder.toml").write_text(
                "[coordinator]\n"
                'datastore_url = "s3://bench/runs"\n'
                f'datastore_options = {{ endpoint_url = "{endpoint}" }}\n'
            )
            tasks = Path(tmp) / "tasks.toml"
            values = ", ".join(str(i) for i in range(args.tasks))
            tasks.write_text(textwrap.dedent(TASKS).replace("@VALUES@", values))
            herd = LocalHerd(nodes=2, slots=2, home=home, env={**os.environ, **CREDENTIALS})
            client = herd.start()
            try:
                herd.wait_nodes(2, timeout=60)
                client.data.put("inputs/offset.txt", b"1000\n")
                log.lines.clear()
                started = time.perf_counter()
                pushed = subprocess.run(
                    [sys.executable, "-m", "herder", "push", str(tasks), "--json"],
                    env=herd.env(),
                    capture_output=True,
                    text=True,
                    check=True,
                )
                job = json.loads(pushed.stdout)["job_id"]
                deadline = time.monotonic() + 600
                while not client.job(job)["finished"] and time.monotonic() < deadline:
                    time.sleep(0.05)
                summary = client.job(job)
                elapsed = time.perf_counter() - started
            finally:
                herd.stop()
    finally:
        logging.getLogger("werkzeug").removeHandler(log)
        server.stop()
    if summary["counts"] != {"succeeded": args.tasks}:
        raise SystemExit(f"the job did not succeed: {summary['counts']}")
    kinds = collections.Counter(kind(r) for r in log.lines)
    result = {
        "tasks": args.tasks,
        "seconds": elapsed,
        "requests": len(log.lines),
        "requests_per_task": len(log.lines) / args.tasks,
        "by_kind_per_task": {k: v / args.tasks for k, v in kinds.most_common()},
    }
    path = HERE / "results-s3-requests.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.tasks} tasks in {elapsed:.2f} s: {result['requests_per_task']:.1f} requests each")
    for name, per_task in result["by_kind_per_task"].items():
        print(f"  {per_task:5.2f}  {name}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
