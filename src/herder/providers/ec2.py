"""The ``ec2`` provider: one EC2 instance per node, on-demand or spot.

Every instance carries the tags ``herder:cluster=<cluster id>``,
``herder:node=<node id>`` and ``Name=herder-<node id>`` (plus the user's
tags), so :meth:`EC2.list_own` finds a cluster's machines from the tags
alone, including those an earlier coordinator started before it crashed:
the fleet terminates the ones its store does not know, and the ones that
never pair.

Creating machines must not create them twice. Each node is one
``RunInstances`` call whose ``ClientToken`` is derived from the cluster and
node id, so EC2 answers a retried call with the instance it already made;
before asking, :meth:`EC2.spawn` also looks for live instances already
tagged with the node ids (this covers a retry after a spot refusal fell
back to on-demand, whose token differs).

A node that could not start is reported in :attr:`SpawnResult.failed` with
a short reason that starts with its class (see :func:`failure_reason`):
``capacity:``, ``quota:``, ``spot price too low:``, ``credentials:``,
``config:``, ``unreachable:``, ``throttled:`` or ``error:``, followed by
EC2's own code and message. A failure of the whole call (no credentials,
an unreachable endpoint) raises :class:`ProviderError` with such a reason.

Instances shut down by themselves are terminated
(``InstanceInitiatedShutdownBehavior="terminate"``), so an orphaned agent
that runs ``shutdown -h now`` also stops the billing.

boto3 blocks: every call runs in a thread (:func:`asyncio.to_thread`), on
one client per provider made on first use.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import logging
import shlex
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
)

from herder.errors import ConfigError, ProviderError

from .base import LaunchSpec, NodeHandle, Provider, SpawnResult

log = logging.getLogger("herder.providers.ec2")

TAG_CLUSTER = "herder:cluster"
TAG_NODE = "herder:node"
IMDS_URL = "http://169.254.169.254"
# States of an instance that still exists (and may bill).
LIVE_STATES = ("pending", "running", "stopping", "stopped")
# At most this many RunInstances calls in flight at once (EC2 throttles per account).
MAX_PARALLEL_CALLS = 8
MAX_REASON_CHARS = 300

# EC2 error codes by the class of failure ``herder nodes`` shows.
_KINDS: dict[str, str] = {
    "InsufficientInstanceCapacity": "capacity",
    "InsufficientHostCapacity": "capacity",
    "InsufficientReservedInstanceCapacity": "capacity",
    "InsufficientCapacity": "capacity",
    "InsufficientFreeAddressesInSubnet": "capacity",
    "Unsupported": "config",  # e.g. this instance type is not offered in this zone
    "InstanceLimitExceeded": "quota",
    "VcpuLimitExceeded": "quota",
    "MaxSpotInstanceCountExceeded": "quota",
    "ResourceLimitExceeded": "quota",
    "SpotMaxPriceTooLow": "spot price too low",
    "RequestLimitExceeded": "throttled",
    "Throttling": "throttled",
    "AuthFailure": "credentials",
    "UnauthorizedOperation": "credentials",
    "InvalidClientTokenId": "credentials",
    "SignatureDoesNotMatch": "credentials",
    "ExpiredToken": "credentials",
    "RequestExpired": "credentials",
    "OptInRequired": "credentials",
    "Blocked": "credentials",
    "PendingVerification": "credentials",
}
# Refusals of a spot request that on-demand capacity may still satisfy.
SPOT_REFUSALS = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientCapacity",
        "SpotMaxPriceTooLow",
        "MaxSpotInstanceCountExceeded",
    }
)

T = TypeVar("T")


def failure_reason(exc: BaseException) -> str:
    """A short reason for a failed EC2 call, classified: ``"<class>: <code> <message>"``.

    The class comes first so the fleet's records (and ``herder nodes``) say
    at a glance whether to wait (capacity), ask AWS (quota) or fix the setup
    (credentials, config).
    """
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        kind = _KINDS.get(code) or ("config" if code.startswith("Invalid") else "error")
        text = f"{kind}: {code} {error.get('Message', '')}".strip()
    elif isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        text = f"credentials: {exc}"
    elif isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
        text = f"unreachable: {exc}"
    else:
        text = f"error: {type(exc).__name__}: {exc}"
    return text[:MAX_REASON_CHARS]


def client_token(cluster: str, node_id: str, market: str) -> str:
    """The idempotency token of one node's RunInstances (at most 64 characters).

    Derived, not random, so a retried call (after a timeout, or by a restarted
    coordinator) is recognised by EC2 and makes no second machine. The market
    is part of it: EC2 refuses one token reused with other parameters.
    """
    digest = hashlib.sha256(f"{cluster}\0{node_id}\0{market}".encode()).hexdigest()
    return f"herder-{digest[:48]}"


def default_install(python: str = "python3") -> str:
    """The bootloader's install line: this very version of herder, from PyPI."""
    try:
        version = importlib.metadata.version("herder")
    except importlib.metadata.PackageNotFoundError:
        return f"{python} -m pip install herder"
    return f"{python} -m pip install {shlex.quote(f'herder=={version}')}"


def bootloader(
    node_id: str,
    launch: LaunchSpec,
    *,
    install: str,
    python: str = "python3",
    metadata_url: str = IMDS_URL,
    state_dir: str = "/var/lib/herder",
) -> str:
    """The user data of one node: a bash script that installs herder and starts its agent.

    The join token is written to ``<state_dir>/agent.env`` (mode 0600,
    directory 0700) by a here-document, so it is never on a command line;
    the script loads it into its environment and starts the agent detached
    with ``setsid`` (the agent logs to ``<state_dir>/agent.log`` and its pid
    is in ``<state_dir>/agent.pid``). ``setsid`` rather than a systemd unit:
    it works on any AMI with bash and util-linux, and the same script runs
    unchanged outside EC2 (the tests run it on the test machine). Nothing
    restarts a dead agent: its node stops heartbeating, and the fleet
    terminates and replaces it.

    The agent watches ``metadata_url`` for a spot interruption notice and
    shuts the machine down (terminating it) once no coordinator has answered
    for ``launch.orphan_after_s``.

    Security: user data is readable by any process on the instance through
    the instance metadata service (``/latest/user-data``), so there the join
    token is open to every task, whatever the mode of the file. Where tasks
    are not trusted with the secret, block the metadata service for their
    user (an iptables owner match; a hop limit of 1 for containers).
    """
    if "\n" in launch.join or "\r" in launch.join:
        raise ConfigError("the join token must be one line", field="join")
    env_file = f"{state_dir}/agent.env"
    argv = [
        python,
        "-m",
        "herder",
        "agent",
        "--node-id",
        node_id,
        "--provider",
        "ec2",
        "--slots",
        str(launch.slots),
        *(arg for k, v in launch.labels.items() for arg in ("--label", f"{k}={v}")),
        "--orphan-after",
        f"{launch.orphan_after_s:g}",
        "--orphan-action",
        "shutdown",
        "--metadata-url",
        metadata_url,
    ]
    q = shlex.quote
    lines = [
        "#!/bin/bash",
        f"# herder bootloader: node {node_id} of cluster {launch.cluster}",
        "set -euo pipefail",
        f"install -d -m 0700 {q(state_dir)}",
        f"(umask 077 && cat > {q(env_file)}) <<'HERDER_ENV_EOF'",
        f"HERDER_JOIN={q(launch.join)}",
        "HERDER_ENV_EOF",
        f"chmod 0600 {q(env_file)}",
        "# install herder",
        install,
        "set -a",
        f". {q(env_file)}",
        "set +a",
        f"cd {q(state_dir)}",
        f"setsid {shlex.join(argv)} </dev/null >>{q(state_dir + '/agent.log')} 2>&1 &",
        f"echo $! > {q(state_dir + '/agent.pid')}",
        "",
    ]
    return "\n".join(lines)


class EC2(Provider):
    """Nodes as EC2 instances: ``EC2(ami="ami-...", spot_price=0.05)``.

    ``spot_price`` (USD per hour, the most to pay) asks for one-time spot
    instances terminated on interruption; ``spot_fallback="on-demand"`` asks
    for an on-demand instance instead when spot is refused (no capacity,
    price too low, spot quota). ``iam_instance_profile`` is a name or an
    ARN. ``install`` replaces the bootloader's install line (default:
    ``python3 -m pip install herder==<this version>``; an AMI without pip
    needs e.g. ``"dnf install -y python3-pip && python3 -m pip install herder"``).
    ``endpoint_url`` points at another EC2 API (moto, a private cloud);
    ``session`` is a ``boto3.Session`` (default: the standard credential chain).
    """

    name = "ec2"

    def __init__(
        self,
        *,
        ami: str,
        region: str = "us-west-1",
        instance_type: str = "c5.large",
        spot_price: float | None = None,
        spot_fallback: str | None = None,
        subnet_id: str | None = None,
        security_group_ids: Iterable[str] = (),
        key_name: str | None = None,
        iam_instance_profile: str | None = None,
        tags: Mapping[str, str] | None = None,
        install: str | None = None,
        python: str = "python3",
        endpoint_url: str | None = None,
        session: Any = None,
        volume_gb: int | None = None,
    ) -> None:
        _validate(spot_price=spot_price, spot_fallback=spot_fallback, volume_gb=volume_gb)
        self.ami = ami
        self.region = region
        self.instance_type = instance_type
        self.spot_price = spot_price
        self.spot_fallback = spot_fallback
        self.subnet_id = subnet_id
        self.security_group_ids = tuple(security_group_ids)
        self.key_name = key_name
        self.iam_instance_profile = iam_instance_profile
        self.tags = dict(tags or {})
        self.python = python
        self.install = install if install is not None else default_install(python)
        self.endpoint_url = endpoint_url
        self.volume_gb = volume_gb
        self._session = session
        self._client: Any = None
        self._root_device: str | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        """The boto3 EC2 client, made on first use (for botocore event hooks, say)."""
        with self._lock:
            if self._client is None:
                session = self._session if self._session is not None else boto3.session.Session()
                self._client = session.client(
                    "ec2",
                    region_name=self.region,
                    endpoint_url=self.endpoint_url,
                    config=Config(
                        connect_timeout=10,
                        read_timeout=60,
                        retries={"mode": "standard", "max_attempts": 4},
                    ),
                )
            return self._client

    # --- the Provider interface -------------------------------------------------------

    async def spawn(self, node_ids: list[str], launch: LaunchSpec) -> SpawnResult:
        self._require_cluster()
        if not node_ids:
            return SpawnResult()
        existing = await self._call("look for existing instances", self._live, node_ids)
        if self.volume_gb is not None:
            await self._call("look up the AMI", self._root_device_name)
        have = {h.node_id: h for h in map(self._handle, existing)}  # one per node
        result = SpawnResult(started=list(have.values()))
        todo = [n for n in node_ids if n not in have]
        limit = asyncio.Semaphore(MAX_PARALLEL_CALLS)
        outcomes = await asyncio.gather(*(self._spawn_one(n, launch, limit) for n in todo))
        for node_id, outcome in zip(todo, outcomes, strict=True):
            if isinstance(outcome, NodeHandle):
                result.started.append(outcome)
            else:
                result.failed[node_id] = outcome
        return result

    async def terminate(self, node_id: str, grace: float) -> None:
        """Terminate the node's instance(s); EC2 shuts the system down politely
        by itself, so ``grace`` is not ours to enforce."""
        self._require_cluster()
        found = await self._call("find the instance", self._live, [node_id])
        ids = [i["InstanceId"] for i in found]
        if ids:
            await self._call("terminate", self._terminate, ids)
            log.info(
                "terminating %s (%s)",
                node_id,
                ", ".join(ids),
                extra={"action": "ec2_terminate", "node_id": node_id},
            )

    async def list_own(self) -> list[NodeHandle]:
        self._require_cluster()
        found = await self._call("list instances", self._live, None)
        return [self._handle(i) for i in found]

    async def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)

    # --- helpers ----------------------------------------------------------------------

    def _require_cluster(self) -> None:
        if not self.cluster:
            raise ProviderError("the ec2 provider is used before attach()", provider=self.name)

    async def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking boto3 step in a thread; its failure is a ProviderError."""
        try:
            return await asyncio.to_thread(fn, *args)
        except (ClientError, BotoCoreError) as exc:
            raise ProviderError(
                f"ec2 in {self.region}: {what}: {failure_reason(exc)}", provider=self.name
            ) from exc

    async def _spawn_one(
        self, node_id: str, launch: LaunchSpec, limit: asyncio.Semaphore
    ) -> NodeHandle | str:
        """The node's handle, or why it could not start."""
        try:
            async with limit:
                instance = await asyncio.to_thread(self._run, node_id, launch)
        except (ClientError, BotoCoreError) as exc:
            reason = failure_reason(exc)
            log.warning(
                "node %s not started: %s",
                node_id,
                reason,
                extra={"action": "ec2_spawn_failed", "node_id": node_id},
            )
            return reason
        state = instance.get("State", {}).get("Name")
        if state in ("shutting-down", "terminated"):
            # EC2 remembers a ClientToken for a day after its instance ends: a
            # reused node id gets the old, dead instance back
            return (
                f"config: node id {node_id} reused: EC2 returned {state} {instance['InstanceId']}"
            )
        log.info(
            "node %s is instance %s (%s)",
            node_id,
            instance["InstanceId"],
            instance.get("InstanceLifecycle", "on-demand"),
            extra={"action": "ec2_spawned", "node_id": node_id},
        )
        return self._handle(instance)

    def _run(self, node_id: str, launch: LaunchSpec) -> dict[str, Any]:
        """One RunInstances (in a thread): spot when asked, on-demand on a spot refusal
        if ``spot_fallback`` says so."""
        if self.spot_price is None:
            return self._run_instance(self.run_params(node_id, launch, spot=False))
        try:
            return self._run_instance(self.run_params(node_id, launch, spot=True))
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code not in SPOT_REFUSALS or self.spot_fallback != "on-demand":
                raise
            log.warning(
                "spot refused for %s (%s): asking for on-demand",
                node_id,
                failure_reason(exc),
                extra={"action": "ec2_spot_fallback", "node_id": node_id},
            )
            return self._run_instance(self.run_params(node_id, launch, spot=False))

    def _run_instance(self, params: dict[str, Any]) -> dict[str, Any]:
        instance: dict[str, Any] = self.client.run_instances(**params)["Instances"][0]
        return instance

    def run_params(self, node_id: str, launch: LaunchSpec, *, spot: bool) -> dict[str, Any]:
        """The RunInstances parameters of one node (blocking: may look up the AMI's root device)."""
        tags = [
            {"Key": k, "Value": v}
            for k, v in {
                **self.tags,
                "Name": f"herder-{node_id}",
                TAG_CLUSTER: self.cluster,
                TAG_NODE: node_id,
            }.items()
        ]
        params: dict[str, Any] = {
            "ImageId": self.ami,
            "InstanceType": self.instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "ClientToken": client_token(self.cluster, node_id, "spot" if spot else "on-demand"),
            "UserData": bootloader(node_id, launch, install=self.install, python=self.python),
            "InstanceInitiatedShutdownBehavior": "terminate",
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": tags},
                {"ResourceType": "volume", "Tags": tags},
            ],
        }
        if spot:
            params["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {
                    "MaxPrice": f"{self.spot_price}",
                    "SpotInstanceType": "one-time",
                    "InstanceInterruptionBehavior": "terminate",
                },
            }
        if self.subnet_id:
            params["SubnetId"] = self.subnet_id
        if self.security_group_ids:
            params["SecurityGroupIds"] = list(self.security_group_ids)
        if self.key_name:
            params["KeyName"] = self.key_name
        if self.iam_instance_profile:
            key = "Arn" if self.iam_instance_profile.startswith("arn:") else "Name"
            params["IamInstanceProfile"] = {key: self.iam_instance_profile}
        if self.volume_gb is not None:
            params["BlockDeviceMappings"] = [
                {
                    "DeviceName": self._root_device_name(),
                    "Ebs": {
                        "VolumeSize": self.volume_gb,
                        "VolumeType": "gp3",
                        "DeleteOnTermination": True,
                    },
                }
            ]
        return params

    def _root_device_name(self) -> str:
        """The AMI's root device (a larger root volume must be named by it); looked up once."""
        if self._root_device is None:
            images = self.client.describe_images(ImageIds=[self.ami])["Images"]
            if not images:
                raise ProviderError(
                    f"ec2 in {self.region}: config: AMI {self.ami} not found", provider=self.name
                )
            self._root_device = str(images[0].get("RootDeviceName") or "/dev/xvda")
        return self._root_device

    def _live(self, node_ids: list[str] | None) -> list[dict[str, Any]]:
        """Live instances of this cluster (in a thread), only those of ``node_ids`` if given."""
        filters = [
            {"Name": f"tag:{TAG_CLUSTER}", "Values": [self.cluster]},
            {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
        ]
        if node_ids is not None:
            filters.append({"Name": f"tag:{TAG_NODE}", "Values": list(node_ids)})
        pages = self.client.get_paginator("describe_instances").paginate(Filters=filters)
        return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]

    def _terminate(self, instance_ids: list[str]) -> None:
        try:
            self.client.terminate_instances(InstanceIds=instance_ids)
        except ClientError as exc:
            # gone between the lookup and now: what terminate wanted anyway
            if exc.response.get("Error", {}).get("Code") != "InvalidInstanceID.NotFound":
                raise

    def _handle(self, instance: Mapping[str, Any]) -> NodeHandle:
        node_id = _tag(instance, TAG_NODE) or str(instance["InstanceId"])
        return NodeHandle(node_id=node_id, provider=self.name, address=instance["InstanceId"])


def _tag(instance: Mapping[str, Any], key: str) -> str | None:
    for tag in instance.get("Tags", []):
        if tag.get("Key") == key:
            return str(tag.get("Value"))
    return None


def _validate(
    *, spot_price: float | None, spot_fallback: str | None, volume_gb: int | None
) -> None:
    if spot_price is not None and spot_price <= 0:
        raise ConfigError("spot_price must be a positive price per hour", field="spot_price")
    if spot_fallback not in (None, "on-demand"):
        raise ConfigError('spot_fallback must be None or "on-demand"', field="spot_fallback")
    if spot_fallback is not None and spot_price is None:
        raise ConfigError(
            "spot_fallback needs spot_price (spot is not asked for)", field="spot_fallback"
        )
    if volume_gb is not None and volume_gb < 1:
        raise ConfigError("volume_gb must be at least 1", field="volume_gb")
