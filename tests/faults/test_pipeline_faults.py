"""Command tasks when the datastore or the node fails under them.

A full datastore during upload, an agent killed with -9 in the middle of an
upload, and a whole fan-out/fan-in pipeline over S3 (moto in server mode).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import psutil
import pytest
from moto.server import ThreadedMotoServer

from herder.local import LocalHerd
from tests.helpers import agent_pids, herder, kill_tree, recorded_agents, tmpfs, wait_for
from tests.integration.test_pipeline import push, task_named, wait_job

MiB = 1 << 20


@pytest.fixture
def tiny_datastore(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs to serve as the datastore."""
    with tmpfs(tmp_path / "tiny", "4m") as mount_point:
        yield mount_point


def files_in(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_a_full_datastore_fails_the_upload_and_stores_nothing(
    tiny_datastore: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "HERDER_DATASTORE": tiny_datastore.as_uri()}
    herd = LocalHerd(nodes=1, slots=1, home=tmp_path / "home", env=env)
    herd.start()
    try:
        herd.wait_nodes()
        job = push(
            herd,
            tmp_path,
            """
            [[tasks]]
            name = "too-big"
            run = "head -c 8388608 /dev/zero > big.bin && echo small > note.txt"
            upload = ["note.txt", "big.bin"]
            retries = 0
            """,
        )
        wait_job(herd, job)
        task = task_named(herd, job, "too-big")["task"]
        assert task["state"] == "failed"
        assert task["reason"] == "datastore_full"
        assert f"jobs/{job}/too-big/big.bin" in task["error"]["message"]
        assert task["error"]["phase"] == "upload"
        assert str(tiny_datastore) in task["error"]["message"]  # the path on disk, too
        # what fitted before the full disk is there whole; nothing partial is visible
        assert herd.client is not None
        keys = [o.key for o in herd.client.data.ls()]
        assert f"jobs/{job}/too-big/big.bin" not in keys
        assert all(not name.startswith(".herder-tmp") for name in files_in(tiny_datastore))
    finally:
        herd.stop()


def test_killing_the_agent_mid_upload_leaves_no_partial_object(tmp_path: Path) -> None:
    """kill -9 of the agent (and its worker) while it uploads 512 MiB: the key never
    shows a partial object, and the retry on another node stores it whole."""
    herd = LocalHerd(nodes=2, slots=1, home=tmp_path / "home")
    herd.start()
    try:
        herd.wait_nodes()
        size = 512 * MiB
        job = push(
            herd,
            tmp_path,
            f"""
            [[tasks]]
            name = "big-output"
            run = "truncate -s {size} out.bin"
            upload = ["out.bin"]
            """,
        )
        key = f"jobs/{job}/big-output/out.bin"
        in_flight = herd.home / "data" / ".herder-tmp"

        def uploading() -> bool:
            return in_flight.is_dir() and any(
                p.stat().st_size > 32 * MiB for p in in_flight.iterdir() if p.is_file()
            )

        wait_for(uploading, 60, "the upload to be under way", every=0.01)
        assert herd.client is not None
        node = task_named(herd, job, "big-output")["task"]["node_id"]
        kill_tree(recorded_agents(herd.home)[node])
        assert not herd.client.data.exists(key)  # never a partial object under the key
        wait_job(herd, job, timeout=120)
        detail = task_named(herd, job, "big-output")
        assert detail["task"]["state"] == "succeeded"
        assert detail["task"]["node_id"] != node
        info = herd.client.data.info(key)
        assert info.size == size
        assert [a["outcome"] for a in detail["attempts"]] == ["lost", "succeeded"]
        wait_for(lambda: not any(in_flight.iterdir()), 30, "the dead upload's temp file to go")
        assert len(agent_pids(herd.home)) == 2  # the killed agent was replaced
    finally:
        herd.stop()


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[dict[str, Any]]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    s3.create_bucket(Bucket="pipeline")
    try:
        yield {"endpoint": endpoint, "env": creds, "s3": s3}
    finally:
        server.stop()


def test_a_fan_out_fan_in_pipeline_over_s3(moto_s3: dict[str, Any], tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "herder.toml").write_text(
        textwrap.dedent(
            f"""
            [coordinator]
            datastore_url = "s3://pipeline/runs"
            datastore_options = {{ endpoint_url = "{moto_s3["endpoint"]}" }}
            """
        )
    )
    herd = LocalHerd(nodes=2, slots=2, home=home, env={**os.environ, **moto_s3["env"]})
    herd.start()
    try:
        herd.wait_nodes()
        assert herd.client is not None
        herd.client.data.put("inputs/offset.txt", b"1000\n")
        job = push(
            herd,
            tmp_path,
            """
            [[tasks]]
            name = "part-{i}"
            matrix = {i = [@VALUES@]}
            fetch = ["inputs/offset.txt"]
            run = "echo $(( {i} + $(cat offset.txt) )) > part.txt"
            upload = ["part.txt"]

            [[tasks]]
            name = "sum"
            fetch = [{from = "part-*", path = "part.txt", dest = "parts"}]
            run = "cat parts/*/part.txt | paste -sd+ | bc > sum.txt"
            upload = ["sum.txt"]
            """.replace("@VALUES@", ", ".join(str(i) for i in range(200))),
        )
        summary = wait_job(herd, job, timeout=300)
        assert summary["counts"] == {"succeeded": 201}, summary
        expected = sum(i + 1000 for i in range(200))
        assert herd.client.data.cat(f"jobs/{job}/sum/sum.txt").strip() == str(expected).encode()
        # the objects really are in the bucket, under the configured prefix
        listed = moto_s3["s3"].list_objects_v2(Bucket="pipeline", Prefix=f"runs/jobs/{job}/")
        keys = {o["Key"] for o in listed.get("Contents", [])}
        assert f"runs/jobs/{job}/sum/sum.txt" in keys
        assert f"runs/jobs/{job}/part-7/part.txt" in keys
        out = tmp_path / "results"
        herder(herd.env(), "results", job, "--out", str(out))
        assert (out / "part-7" / "part.txt").read_text().strip() == "1007"
    finally:
        herd.stop()
        for proc in psutil.Process().children(recursive=True):
            proc.kill()
