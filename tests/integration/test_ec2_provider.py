"""The EC2 provider against moto's EC2 API (a real server process), and its
bootloader run for real on this machine against a real coordinator.

moto is the only stand-in here: EC2 cannot run on a test machine. Where
moto does not model the cloud's answer (a spot request refused for want of
capacity), a botocore hook on the provider's own client gives EC2's answer.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from herder.errors import ConfigError, ProviderError
from herder.providers.base import LaunchSpec
from herder.providers.ec2 import (
    EC2,
    TAG_CLUSTER,
    TAG_NODE,
    bootloader,
    client_token,
    failure_reason,
)
from tests.helpers import free_port, herder, kill_tree, wait_for
from tests.moto import start_moto

REGION = "us-west-1"
SECRET = "s3cr3t-" + secrets.token_hex(8)
JOIN = f"{SECRET}@https://10.0.0.1:7420"
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def aws_env() -> Iterator[None]:
    """Fake credentials, and no real AWS configuration from this machine."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_SESSION_TOKEN", "testing")
        mp.setenv("AWS_DEFAULT_REGION", REGION)
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield


@pytest.fixture(scope="module")
def moto_url(aws_env: None) -> Iterator[str]:
    port = free_port()
    proc = start_moto(port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        kill_tree(proc.pid)
        proc.wait(10)


@pytest.fixture(scope="module")
def ec2(moto_url: str) -> Any:
    """The test's own view of the cloud (not the provider's client)."""
    return boto3.client("ec2", region_name=REGION, endpoint_url=moto_url)


@pytest.fixture(scope="module")
def ami(ec2: Any) -> str:
    images = ec2.describe_images(Filters=[{"Name": "architecture", "Values": ["x86_64"]}])
    image_id: str = images["Images"][0]["ImageId"]
    return image_id


@pytest.fixture
async def make(moto_url: str, ami: str, tmp_path: Path) -> AsyncIterator[Any]:
    """``make(**options)``: an attached EC2 provider of a fresh cluster; closed afterwards."""
    made: list[EC2] = []

    def _make(cluster: str | None = None, **options: Any) -> EC2:
        options.setdefault("endpoint_url", moto_url)
        provider = EC2(ami=ami, region=REGION, install="true", **options)
        provider.attach(cluster=cluster or f"c-{secrets.token_hex(4)}", home=tmp_path)
        made.append(provider)
        return provider

    yield _make
    for provider in made:
        await provider.close()


def _launch(cluster: str, **options: Any) -> LaunchSpec:
    return LaunchSpec(join=JOIN, cluster=cluster, **options)


def _instances(ec2: Any, *filters: tuple[str, list[str]]) -> list[dict[str, Any]]:
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": n, "Values": v} for n, v in filters]
    )
    return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]


def _tags(instance: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def _user_data(ec2: Any, instance_id: str) -> str:
    attr = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return base64.b64decode(attr["UserData"]["Value"]).decode()


def _refuse_spot(provider: EC2, seen: list[str]) -> None:
    """Answer every spot RunInstances as EC2 does when it has no spot capacity."""

    def handler(params: dict[str, Any], **_: Any) -> Any:
        body = params.get("body") or {}
        if not any(key.startswith("InstanceMarketOptions") for key in body):
            return None
        seen.append(str(body.get("ClientToken")))
        error = {
            "Error": {
                "Code": "InsufficientInstanceCapacity",
                "Message": "There is no Spot capacity available that matches your request.",
            },
            "ResponseMetadata": {"HTTPStatusCode": 500},
        }
        return AWSResponse(params.get("url", ""), 500, {}, None), error

    provider.client.meta.events.register("before-call.ec2.RunInstances", handler)


# --- spawn -----------------------------------------------------------------------------


async def test_spawn_makes_one_tagged_spot_instance_per_node_and_a_retry_makes_none(
    make: Any, ec2: Any
) -> None:
    provider = make(spot_price=0.05, instance_type="m5.large", tags={"team": "ml"}, volume_gb=20)
    launch = _launch(provider.cluster, slots=2, labels={"gpu": "0"}, orphan_after_s=600)
    ids = ["ec2-a1", "ec2-a2", "ec2-a3"]

    result = await provider.spawn(ids, launch)

    assert result.failed == {}
    assert sorted(h.node_id for h in result.started) == ids
    found = {
        _tags(i)[TAG_NODE]: i for i in _instances(ec2, (f"tag:{TAG_CLUSTER}", [provider.cluster]))
    }
    assert sorted(found) == ids
    for node_id, instance in found.items():
        assert {h.address for h in result.started if h.node_id == node_id} == {
            instance["InstanceId"]
        }
        assert _tags(instance) == {
            "team": "ml",
            "Name": f"herder-{node_id}",
            TAG_CLUSTER: provider.cluster,
            TAG_NODE: node_id,
        }
        assert instance["InstanceType"] == "m5.large"
        assert instance["InstanceLifecycle"] == "spot"
        assert instance["ClientToken"] == client_token(provider.cluster, node_id, "spot")
        behaviour = ec2.describe_instance_attribute(
            InstanceId=instance["InstanceId"], Attribute="instanceInitiatedShutdownBehavior"
        )
        assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
        script = _user_data(ec2, instance["InstanceId"])
        assert script == bootloader(node_id, launch, install="true")
        assert script.startswith("#!/bin/bash\n")
        assert f"--node-id {node_id} " in script
        assert "--slots 2 --label gpu=0 --orphan-after 600 --orphan-action shutdown" in script
        # the secret is on exactly one line: the env file's content, not a command
        secret_lines = [ln for ln in script.splitlines() if SECRET in ln]
        assert secret_lines == [f"HERDER_JOIN={JOIN}"]
        assert script.splitlines().index(secret_lines[0]) + 1 == script.splitlines().index(
            "HERDER_ENV_EOF"
        )
        root = instance["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
        assert ec2.describe_volumes(VolumeIds=[root])["Volumes"][0]["Size"] == 20

    again = await provider.spawn(ids, launch)
    assert again.failed == {}
    assert sorted((h.node_id, h.address) for h in again.started) == sorted(
        (h.node_id, h.address) for h in result.started
    )
    assert len(_instances(ec2, (f"tag:{TAG_CLUSTER}", [provider.cluster]))) == 3


async def test_on_demand_by_default(make: Any, ec2: Any) -> None:
    provider = make()
    result = await provider.spawn(["od-1"], _launch(provider.cluster))
    assert [h.node_id for h in result.started] == ["od-1"]
    (instance,) = _instances(ec2, (f"tag:{TAG_NODE}", ["od-1"]))
    assert "InstanceLifecycle" not in instance
    assert instance["InstanceType"] == "c5.large"
    assert instance["ClientToken"] == client_token(provider.cluster, "od-1", "on-demand")


async def test_spot_refused_falls_back_to_on_demand(make: Any, ec2: Any) -> None:
    provider = make(spot_price=0.02, spot_fallback="on-demand")
    refused: list[str] = []
    _refuse_spot(provider, refused)

    result = await provider.spawn(["fb-1", "fb-2"], _launch(provider.cluster))

    assert result.failed == {}
    assert sorted(h.node_id for h in result.started) == ["fb-1", "fb-2"]
    assert sorted(refused) == sorted(
        client_token(provider.cluster, n, "spot") for n in ("fb-1", "fb-2")
    )
    for instance in _instances(ec2, (f"tag:{TAG_CLUSTER}", [provider.cluster])):
        assert "InstanceLifecycle" not in instance  # on-demand
        node_id = _tags(instance)[TAG_NODE]
        assert instance["ClientToken"] == client_token(provider.cluster, node_id, "on-demand")

    # asked again (a retried call): the on-demand instances are found, no spot is asked
    again = await provider.spawn(["fb-1", "fb-2"], _launch(provider.cluster))
    assert len(again.started) == 2
    assert len(refused) == 2
    assert len(_instances(ec2, (f"tag:{TAG_CLUSTER}", [provider.cluster]))) == 2


async def test_spot_refused_without_fallback_is_a_capacity_failure(make: Any, ec2: Any) -> None:
    provider = make(spot_price=0.02)
    _refuse_spot(provider, [])

    result = await provider.spawn(["nf-1", "nf-2"], _launch(provider.cluster))

    assert result.started == []
    assert sorted(result.failed) == ["nf-1", "nf-2"]
    for reason in result.failed.values():
        assert reason.startswith("capacity: InsufficientInstanceCapacity There is no Spot")
    assert _instances(ec2, (f"tag:{TAG_CLUSTER}", [provider.cluster])) == []


async def test_bad_credentials_fail_the_call_with_a_classified_reason(
    make: Any, aws_env: None
) -> None:
    port = free_port()
    strict = start_moto(port, {"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # checks keys for real
    try:
        session = boto3.Session(
            aws_access_key_id="AKIAWRONGWRONGWRONG1",
            aws_secret_access_key="wrong",
            region_name=REGION,
        )
        provider = make(endpoint_url=f"http://127.0.0.1:{port}", session=session)
        with pytest.raises(ProviderError, match=r"credentials: AuthFailure") as info:
            await provider.spawn(["cr-1"], _launch(provider.cluster))
        assert info.value.provider == "ec2"
        with pytest.raises(ProviderError, match=r"credentials: AuthFailure"):
            await provider.list_own()
        with pytest.raises(ProviderError, match=r"credentials: AuthFailure"):
            await provider.terminate("cr-1", grace=1)
    finally:
        kill_tree(strict.pid)
        strict.wait(10)


async def test_unreachable_endpoint_fails_the_call(make: Any) -> None:
    provider = make(endpoint_url=f"http://127.0.0.1:{free_port()}")  # nothing listens
    started = time.monotonic()
    with pytest.raises(ProviderError, match=r"unreachable: Could not connect"):
        await provider.spawn(["un-1"], _launch(provider.cluster))
    assert time.monotonic() - started < 30


def test_failure_reasons_are_classified() -> None:
    def err(code: str, message: str = "m") -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": message}}, "RunInstances")

    assert failure_reason(err("InstanceLimitExceeded", "You have requested more")) == (
        "quota: InstanceLimitExceeded You have requested more"
    )
    assert failure_reason(err("VcpuLimitExceeded")).startswith("quota: ")
    assert failure_reason(err("SpotMaxPriceTooLow")).startswith("spot price too low: ")
    assert failure_reason(err("InsufficientInstanceCapacity")).startswith("capacity: ")
    assert failure_reason(err("UnauthorizedOperation")).startswith("credentials: ")
    assert failure_reason(err("InvalidAMIID.NotFound")).startswith("config: ")
    assert failure_reason(err("RequestLimitExceeded")).startswith("throttled: ")
    assert failure_reason(err("Weird")).startswith("error: Weird")
    assert failure_reason(NoCredentialsError()).startswith("credentials: Unable to locate")
    assert failure_reason(EndpointConnectionError(endpoint_url="http://x")).startswith(
        "unreachable: "
    )
    assert len(failure_reason(err("Weird", "x" * 5000))) == 300


def test_bad_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="spot_fallback"):
        EC2(ami="ami-1", spot_fallback="on-demand")
    with pytest.raises(ConfigError, match="spot_fallback"):
        EC2(ami="ami-1", spot_price=0.1, spot_fallback="never")
    with pytest.raises(ConfigError, match="spot_price"):
        EC2(ami="ami-1", spot_price=0)


async def test_a_provider_must_be_attached(ami: str, moto_url: str) -> None:
    provider = EC2(ami=ami, endpoint_url=moto_url)
    with pytest.raises(ProviderError, match="attach"):
        await provider.list_own()


# --- list_own and terminate ------------------------------------------------------------


async def test_list_own_finds_this_clusters_live_instances_only(
    make: Any, ec2: Any, ami: str
) -> None:
    ours = make()
    theirs = make()
    await ours.spawn(["lo-1", "lo-2"], _launch(ours.cluster))
    await theirs.spawn(["lo-3"], _launch(theirs.cluster))
    untagged = ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1)["Instances"][0]
    # tagged with the cluster only (a node tag lost): still ours, known by instance id
    nameless = ec2.run_instances(
        ImageId=ami,
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[
            {"ResourceType": "instance", "Tags": [{"Key": TAG_CLUSTER, "Value": ours.cluster}]}
        ],
    )["Instances"][0]

    own = await ours.list_own()

    assert sorted(h.node_id for h in own) == sorted(["lo-1", "lo-2", nameless["InstanceId"]])
    assert {h.provider for h in own} == {"ec2"}
    assert all(h.address and h.address.startswith("i-") for h in own)
    assert untagged["InstanceId"] not in {h.address for h in own}
    assert [h.node_id for h in await theirs.list_own()] == ["lo-3"]


async def test_terminate_is_idempotent(make: Any, ec2: Any) -> None:
    provider = make()
    other = make()
    result = await provider.spawn(["te-1", "te-2"], _launch(provider.cluster))
    (same_id,) = (await other.spawn(["te-1"], _launch(other.cluster))).started
    address = {h.node_id: h.address for h in result.started}

    await provider.terminate("te-1", grace=5)

    state = ec2.describe_instances(InstanceIds=[address["te-1"]])["Reservations"][0]
    assert state["Instances"][0]["State"]["Name"] in ("shutting-down", "terminated")
    assert [h.node_id for h in await provider.list_own()] == ["te-2"]
    # the same node id in another cluster is not touched
    assert [h.address for h in await other.list_own()] == [same_id.address]
    await provider.terminate("te-1", grace=5)  # again: fine
    await provider.terminate("never-was", grace=5)  # unknown: fine
    await provider.terminate("te-2", grace=5)
    assert await provider.list_own() == []


# --- the bootloader, run for real ------------------------------------------------------


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HERDER_", "AWS_"))}
    env["HERDER_HOME"] = str(home)
    with open(tmp_path / "coordinator.log", "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "herder",
                "up",
                "--home",
                str(home),
                "--listen",
                f"127.0.0.1:{free_port()}",
            ],
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:
        wait_for(lambda: (home / "coordinator.json").exists(), 30, "the coordinator")
        yield home, env
    finally:
        kill_tree(proc.pid)
        proc.wait(10)


def test_the_bootloader_starts_an_agent_that_pairs_as_its_node(
    coordinator: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    home, env = coordinator
    join = herder(env, "token", "--home", str(home)).stdout.strip()
    secret = join.split("@", 1)[0]
    state = tmp_path / "state"
    script = bootloader(
        "ec2-boot-1",
        LaunchSpec(join=join, cluster="c-boot", slots=2, labels={"zone": "test"}),
        install="true",  # herder is already here
        metadata_url=f"http://127.0.0.1:{free_port()}",  # no metadata service: logged, ignored
        state_dir=str(state),
    )
    (tmp_path / "user-data").write_text(script)
    boot_env = {
        "PATH": f"{VENV_BIN}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "HERDER_SCRATCH_DIR": str(tmp_path / "scratch"),
    }
    agent_pid = None
    try:
        done = subprocess.run(
            ["bash", str(tmp_path / "user-data")],
            env=boot_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        agent_pid = int((state / "agent.pid").read_text())

        def paired() -> dict[str, Any] | None:
            out = herder(env, "nodes", "--json", "--home", str(home)).stdout
            nodes = {n["id"]: n for n in json.loads(out)}
            node = nodes.get("ec2-boot-1")
            return node if node and node["state"] in ("ready", "busy") else None

        node = wait_for(paired, 30, "the booted agent to pair", every=0.3)
        assert node["provider"] == "ec2"
        assert node["slots"] == 2
        assert node["labels"] == {"zone": "test"}

        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert stat.S_IMODE((state / "agent.env").stat().st_mode) == 0o600
        with open(f"/proc/{agent_pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert b"ec2-boot-1" in argv
        assert not any(secret.encode() in arg for arg in argv)
        with open(f"/proc/{agent_pid}/environ", "rb") as f:
            assert f"HERDER_JOIN={join}".encode() in f.read().split(b"\0")
        log = (state / "agent.log").read_text()
        assert "instance metadata" in log
        assert "unavailable" in log
        assert secret not in log
    finally:
        if agent_pid is not None:
            kill_tree(agent_pid)
