"""The fleet on EC2 (moto in server mode, started here): boot timeouts end
instances that never pair, a coordinator killed with -9 and restarted
finds and terminates the instances nobody tracks, and a stop file ends the
herd with no instance left running."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from herder.local import LocalHerd
from herder.providers.ec2 import TAG_CLUSTER, TAG_NODE
from tests.helpers import db_rows, free_port, kill_tree, wait_for
from tests.moto import AWS_TEST_ENV, start_moto

ROOT = Path(__file__).resolve().parents[2]
LIVE = ["pending", "running", "stopping", "stopped"]


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    port = free_port()
    proc = start_moto(port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        kill_tree(proc.pid)
        proc.wait(10)


@pytest.fixture(scope="module")
def ec2(moto_url: str) -> Any:
    session = boto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-west-1"
    )
    return session.client("ec2", endpoint_url=moto_url)


def instances(ec2: Any, cluster: str, states: list[str]) -> dict[str, dict[str, Any]]:
    """Instances of the cluster in ``states``, by their herder node id."""
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[
            {"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]},
            {"Name": "instance-state-name", "Values": states},
        ]
    )
    found = {}
    for page in pages:
        for reservation in page["Reservations"]:
            for i in reservation["Instances"]:
                tags = {t["Key"]: t["Value"] for t in i.get("Tags", [])}
                found[tags.get(TAG_NODE, i["InstanceId"])] = i
    return found


def test_boot_timeouts_orphans_after_kill_9_and_the_stop_file(
    moto_url: str, ec2: Any, tmp_path: Path
) -> None:
    ami = ec2.describe_images()["Images"][0]["ImageId"]
    env = {
        **os.environ,
        **AWS_TEST_ENV,
        "HERDER_TEST_AMI": ami,
        "HERDER_TEST_EC2_URL": moto_url,
        "PYTHONPATH": str(ROOT),
    }
    home = tmp_path / "home"
    stop_file = tmp_path / "stop"

    def start() -> LocalHerd:
        local = LocalHerd(
            nodes=0,
            herd="tests.herds:OnEC2",
            home=home,
            env=env,
            extra_args=["--stop-file", str(stop_file)],
        )
        local.start()
        return local

    first = start()
    try:
        cluster = db_rows(home, "SELECT value FROM meta WHERE key = 'cluster'")[0][0]
        wait_for(lambda: len(instances(ec2, cluster, LIVE)) == 2, 15, "2 instances")
        booted = instances(ec2, cluster, LIVE)
        for node_id, instance in booted.items():
            assert instance["InstanceLifecycle"] == "spot"
            node = db_rows(home, "SELECT state, address FROM nodes WHERE id = ?", node_id)
            assert node == [("booting", instance["InstanceId"])]

        # none of them pairs: terminated at the boot timeout (3 s), and replaced
        wait_for(
            lambda: set(booted) <= set(instances(ec2, cluster, ["terminated", "shutting-down"])),
            12,
            "the first instances to be terminated at their boot timeout",
        )
        reasons = dict(db_rows(home, "SELECT id, reason FROM nodes"))
        assert {reasons[n] for n in booted} == {"boot timeout"}
        wait_for(lambda: len(instances(ec2, cluster, LIVE)) == 2, 10, "2 replacements")
        assert len(instances(ec2, cluster, LIVE)) <= 3
    finally:
        assert first.process is not None
        os.kill(first.process.pid, signal.SIGKILL)  # no shutdown, no cleanup
        first.process.wait(10)

    left = instances(ec2, cluster, LIVE)
    assert left  # the crash left machines behind
    orphan = ec2.run_instances(
        ImageId=ami,
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": TAG_CLUSTER, "Value": cluster},
                    {"Key": TAG_NODE, "Value": "ec2-unknown"},
                ],
            }
        ],
    )["Instances"][0]["InstanceId"]

    second = start()
    try:
        gone = ["terminated", "shutting-down"]
        wait_for(
            lambda: "ec2-unknown" in instances(ec2, cluster, gone), 10, "the orphan terminated"
        )
        events = db_rows(home, "SELECT node_id FROM events WHERE action = 'orphan_terminated'")
        assert ("ec2-unknown",) in events
        wait_for(
            lambda: set(left) <= set(instances(ec2, cluster, gone)),
            15,
            "the crashed coordinator's unpaired instances terminated",
        )
        assert orphan in {i["InstanceId"] for i in instances(ec2, cluster, gone).values()}

        stop_file.touch()
        assert second.process is not None
        assert second.process.wait(30) == 0
        assert instances(ec2, cluster, LIVE) == {}  # nothing left that costs money
        alive = db_rows(home, "SELECT id FROM nodes WHERE state NOT IN ('terminated', 'lost')")
        assert alive == []
    finally:
        second.stop()
