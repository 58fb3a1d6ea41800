"""The ``herder`` command: starts the coordinator and agents, and talks to a herd.

Every option can also be set by the environment variable shown in ``--help``.
This is the only module that installs signal handlers.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from herder.cli_certs import certs_command
from herder.cli_data import data_app
from herder.cli_db import db_app
from herder.cli_query import register_query_commands
from herder.cli_release import release_app
from herder.errors import HerderError
from herder.providers.forks import ForkServer
from herder.terminal import escape, job_progress, new_table, stderr_console, stdout_console

app = typer.Typer(
    name="herder",
    help="Raise a herd of worker nodes, keep it healthy, ship code to it and feed it tasks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(data_app, name="data")
app.command("certs")(certs_command)
app.add_typer(release_app, name="release")
app.add_typer(db_app, name="db")
register_query_commands(app)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
HomeOpt = Annotated[
    Path | None, typer.Option("--home", envvar="HERDER_HOME", help="The herder home directory.")
]


def _setup_logging(
    level: str, fmt: str = "text", log_file: Path | None = None, log_file_max_mb: float = 10.0
) -> None:
    """Log to stderr, and with ``log_file`` also to that file, rotated at
    ``log_file_max_mb`` (five old files kept)."""
    formatter: logging.Formatter = (
        _JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        from logging.handlers import RotatingFileHandler

        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(
            RotatingFileHandler(
                log_file, maxBytes=max(1, int(log_file_max_mb * 2**20)), backupCount=5
            )
        )
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=handlers)
    # asyncssh logs every connection and command at INFO: the SSH provider's
    # own lines say what matters.
    logging.getLogger("asyncssh").setLevel(max(logging.WARNING, logging.root.level))


# What every LogRecord has; anything else on a record came from ``extra=`` (action,
# task_id, node_id, lease_id, ...) and is a field of the JSON line.
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class _JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, the record's ``extra``
    fields, and the traceback of an exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "at": record.created,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS:
                line[key] = value if isinstance(value, (str, int, float, bool)) else repr(value)
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line)


def _env(home: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if home is not None:
        env["HERDER_HOME"] = str(home)
    return env


def _fail(message: str, code: int = 1) -> typer.Exit:
    # unwrapped and unmarked: a path or "tasks[7].priority" must come out whole
    stderr_console().print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def _client(home: Path | None) -> Any:
    from herder.client import connect

    try:
        return connect(env=_env(home))
    except HerderError as exc:
        raise _fail(str(exc)) from exc
    except OSError as exc:
        raise _fail(f"cannot reach the coordinator: {exc}") from exc


# ---------------------------------------------------------------------------
# coordinator and agent


@app.command()
def up(
    home: HomeOpt = None,
    store: Annotated[
        str | None,
        typer.Option(envvar="HERDER_STORE", help="Store URL (sqlite:///PATH or postgresql://...)."),
    ] = None,
    listen: Annotated[
        str | None,
        typer.Option(envvar="HERDER_LISTEN", help="HOST:PORT to serve HTTPS and WebSockets on."),
    ] = None,
    local: Annotated[
        int, typer.Option(envvar="HERDER_LOCAL", help="Start and keep N local agents.")
    ] = 0,
    slots: Annotated[
        int, typer.Option(envvar="HERDER_LOCAL_SLOTS", help="Slots of each local agent.")
    ] = 1,
    idle_exit: Annotated[
        float | None,
        typer.Option(
            envvar="HERDER_LOCAL_IDLE_EXIT",
            min=0,
            help="Local agents leave after this many seconds without work; --local N is then "
            "a ceiling, and agents are started again when tasks wait.",
        ),
    ] = None,
    herd: Annotated[
        str | None,
        typer.Option(
            envvar="HERDER_HERD",
            help="The fleet policy: pkg.module:ClassName, a herder.Herd subclass.",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(envvar="HERDER_LOG_LEVEL")] = "info",
    log_format: Annotated[
        str, typer.Option(envvar="HERDER_LOG_FORMAT", help="text or json")
    ] = "text",
    parent_pid: Annotated[
        int | None, typer.Option(hidden=True, help="Stop cleanly once this process is gone.")
    ] = None,
    stop_file: Annotated[
        Path | None,
        typer.Option(
            envvar="HERDER_STOP_FILE",
            help="When this file appears: drain, stop every node this herd started, exit 0.",
        ),
    ] = None,
    log_file: Annotated[
        Path | None,
        typer.Option(envvar="HERDER_LOG_FILE", help="Also write the log here (rotated)."),
    ] = None,
    log_file_max_mb: Annotated[
        float,
        typer.Option(envvar="HERDER_LOG_FILE_MAX_MB", help="Rotate the log file at this size."),
    ] = 10.0,
    beacon: Annotated[
        bool,
        typer.Option(envvar="HERDER_BEACON", help="Broadcast a signed UDP beacon every second."),
    ] = True,
    beacon_port: Annotated[int, typer.Option(envvar="HERDER_BEACON_PORT", hidden=True)] = 7421,
    tracker: Annotated[
        str | None,
        typer.Option(envvar="HERDER_TRACKER", help="Announce to this tracker (http://host:7422)."),
    ] = None,
    serve_tracker: Annotated[
        bool, typer.Option(help="Also serve the tracker routes (/v1/announce, /v1/hosts).")
    ] = False,
    fleet_release: Annotated[
        str | None,
        typer.Option(
            "--release",
            envvar="HERDER_FLEET_RELEASE",
            help="The fleet's release: every node loads it before taking work "
            "(else [fleet] release in herder.toml).",
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            envvar="HERDER_TLS_CERT",
            help="Serve with this certificate (with --tls-key, --tls-ca; `herder certs` "
            "writes a set) instead of the coordinator's own CA.",
        ),
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(envvar="HERDER_TLS_KEY", help="The key of --tls-cert (0600).")
    ] = None,
    tls_ca: Annotated[
        Path | None,
        typer.Option(envvar="HERDER_TLS_CA", help="The CA that signed --tls-cert; tokens pin it."),
    ] = None,
    agent_mtls: Annotated[
        bool,
        typer.Option(
            envvar="HERDER_AGENT_MTLS",
            help="Agents must present a client certificate signed by the CA to pair.",
        ),
    ] = False,
) -> None:
    """Run a coordinator in the foreground (SIGTERM, `herder down`, --stop-file: a clean stop)."""
    # No collections while the coordinator's libraries are imported: the collector
    # would walk a growing heap of objects that all live on (70 ms of 0.6 s of
    # imports). They are frozen once imported, and collecting resumes for what
    # starting (and then running) the coordinator makes.
    gc.disable()
    # local agents log as this coordinator does
    agent_env = {**os.environ, "HERDER_LOG_FORMAT": log_format}
    # first: the agents' fork server imports on the other core while this process does
    forks = _start_fork_server(agent_env) if local and herd is None else None
    from herder.config import load_settings
    from herder.tls_setup import TlsSetup

    _setup_logging(log_level, log_format, log_file, log_file_max_mb)
    if herd is not None and local:
        raise _fail("give either --herd or --local, not both")
    try:
        settings = load_settings(
            _env(home),
            store_url=store,
            listen=listen,
            fleet_release=fleet_release,
            # given here: relative to where the command runs (in herder.toml: the home)
            tls_cert=tls_cert.absolute() if tls_cert else None,
            tls_key=tls_key.absolute() if tls_key else None,
            tls_ca=tls_ca.absolute() if tls_ca else None,
            agent_mtls=agent_mtls or None,  # not given: herder.toml decides
        )
    except HerderError as exc:
        raise _fail(str(exc)) from exc
    # then the certificates, made (or checked) on the other core too
    tls = TlsSetup.for_settings(settings)
    from herder.coordinator.service import Coordinator
    from herder.discovery import DiscoveryOptions
    from herder.herd import load_herd, local_herd

    try:
        policy = (
            load_herd(herd)
            if herd
            else local_herd(local, slots=slots, idle_s=idle_exit, env=agent_env, forks=forks)
        )
    except HerderError as exc:
        raise _fail(str(exc)) from exc
    gc.freeze()
    gc.enable()

    async def main() -> None:
        found = DiscoveryOptions(beacon, beacon_port, tracker, serve_tracker)
        coord = Coordinator(settings, herd=policy, discovery=found, tls=tls)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, coord.stop)
        async with coord:
            typer.echo(f"herder coordinator at {typer.style(coord.url, bold=True)}")
            # What is alive now (the imported libraries, the app: over 100,000 objects)
            # lives as long as the process; left to the collector, each full collection
            # walks it all and stalls every request for tens of milliseconds.
            gc.freeze()
            watches = []
            if parent_pid is not None:
                watches.append(asyncio.create_task(_stop_when_gone(parent_pid, coord.stop)))
            if stop_file is not None:
                watches.append(asyncio.create_task(_stop_when_file(stop_file, coord.stop)))
            await coord.wait_stopped()
            for watch in watches:
                watch.cancel()

    try:
        asyncio.run(main())
    except HerderError as exc:
        raise _fail(str(exc)) from exc
    except OSError as exc:
        raise _fail(f"cannot start the coordinator: {exc}") from exc


def _start_fork_server(env: dict[str, str]) -> ForkServer | None:
    """The fork server local agents start from (``herder.forkserver``); None if it
    cannot start, and agents start as new processes instead."""
    try:
        return ForkServer.start(env)
    except OSError as exc:
        logging.getLogger("herder.coordinator").warning("no fork server for local agents: %s", exc)
        return None


async def _stop_when_gone(pid: int, stop: Any) -> None:
    """A herd started for a program (LocalHerd) must not outlive it, even after kill -9.

    Waits on a pidfd, which becomes readable when the process exits.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        fd = None
    if fd is not None:
        gone = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(fd, gone.set)
        try:
            await gone.wait()
        finally:
            loop.remove_reader(fd)
            os.close(fd)
    logging.getLogger("herder.coordinator").warning(
        "the process that started this herd (pid %d) is gone: stopping", pid
    )
    stop()


async def _stop_when_file(path: Path, stop: Any) -> None:
    """Stop once ``path`` exists: a way to end a herd for tools that can only make files."""
    while not await asyncio.to_thread(path.exists):  # noqa: ASYNC110 - no event to wait on
        await asyncio.sleep(0.5)
    logging.getLogger("herder.coordinator").info("stop file %s appeared: stopping", path)
    stop()


@app.command()
def down(
    home: HomeOpt = None, wait: Annotated[float, typer.Option(help="Seconds to wait.")] = 60
) -> None:
    """Drain and stop the running coordinator (and its local agents)."""
    from herder.config import default_home

    state = default_home(_env(home)) / "coordinator.json"
    with _client(home) as herd:
        herd.shutdown()
    deadline = time.monotonic() + wait
    while state.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if state.exists():
        raise _fail(f"the coordinator did not stop within {wait}s")
    typer.echo("coordinator stopped")


token_app = typer.Typer(help="The join token, and API tokens with a role (create, ls, revoke).")
app.add_typer(token_app, name="token")


@token_app.callback(invoke_without_command=True)
def token(
    ctx: typer.Context,
    home: HomeOpt = None,
    url: Annotated[str | None, typer.Option(help="URL to put in the token.")] = None,
) -> None:
    """Print the join token (TOKEN@URL): the cluster secret, for agents and admins."""
    if ctx.invoked_subcommand is not None:
        return
    from herder.client import resolve_target

    try:
        target, parsed = resolve_target(url, None, _env(home))
    except HerderError as exc:
        raise _fail(str(exc)) from exc
    print(parsed.without_url().encode() + "@" + target)


@token_app.command("create")
def token_create(
    role: Annotated[str, typer.Option(help="read, submit, admin or agent.")],
    ttl: Annotated[
        str | None, typer.Option(help="How long it is valid: 90s, 30m, 12h, 7d (default: ever).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="What it is for.")] = None,
    home: HomeOpt = None,
) -> None:
    """Make an API token with a role; it is printed once and stored only as a digest."""
    ttl_s = _duration(ttl) if ttl is not None else None
    with _client(home) as herd:
        try:
            made = herd.create_token(role, name=name, ttl_s=ttl_s)
        except HerderError as exc:
            raise _fail(str(exc)) from exc
    print(made["token"])


@token_app.command("ls")
def token_ls(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """API tokens: id, role, name, created, expires, revoked (never the secret)."""
    with _client(home) as herd:
        rows = herd.tokens()
    if as_json:
        _print_json(rows)
        return
    table = new_table("id", "role", "name", "created", "expires", "revoked")
    for t in rows:
        table.add_row(
            t["id"],
            t["role"],
            t["name"] or "",
            _when(t["created_at"]),
            _when(t["expires_at"]) if t["expires_at"] else "never",
            _when(t["revoked_at"]) if t["revoked_at"] else "",
        )
    stdout_console().print(table)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(help="Token id (k-…).")], home: HomeOpt = None
) -> None:
    """Revoke an API token now (its open sessions are closed)."""
    with _client(home) as herd:
        try:
            herd.revoke_token(token_id)
        except HerderError as exc:
            raise _fail(str(exc)) from exc
    stdout_console().print(f"revoked {token_id}")


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    number, unit = text[:-1], text[-1:]
    if unit not in units or not number.replace(".", "", 1).isdigit() or float(number) <= 0:
        raise _fail(f"--ttl {text!r}: give a number and a unit, like 90s, 30m, 12h or 7d")
    return float(number) * units[unit]


def _node_facts(data: str | None, overrides: list[str]) -> tuple[dict[str, Any], dict[str, float]]:
    """``--data`` parsed (a JSON object) and the detected resources with ``--resource`` applied."""
    from herder.agent.resources import detect_resources, parse_resource_overrides

    node_data: dict[str, Any] = {}
    if data is not None:
        try:
            node_data = json.loads(data)
        except ValueError as exc:
            raise _fail(f"--data is not valid JSON: {exc}") from exc
        if not isinstance(node_data, dict):
            raise _fail(f"--data must be a JSON object, got {type(node_data).__name__}")
    try:
        resources = {**detect_resources(), **parse_resource_overrides(overrides)}
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    return node_data, resources


agent_app = typer.Typer(
    help="Run an agent (no subcommand), or pause / resume one.", no_args_is_help=False
)
app.add_typer(agent_app, name="agent")


@agent_app.callback(invoke_without_command=True)
def agent(
    ctx: typer.Context,
    join: Annotated[
        str | None, typer.Option(envvar="HERDER_JOIN", help="TOKEN@URL printed by `herder token`.")
    ] = None,
    coordinator: Annotated[
        list[str] | None,
        typer.Option(
            "--coordinator",
            envvar="HERDER_COORDINATORS",
            help="Another coordinator sharing the store (https://HOST:PORT; repeat, or "
            "comma-separate): the agent moves there, tasks and all, when its own fails.",
        ),
    ] = None,
    slots: Annotated[int, typer.Option(envvar="HERDER_SLOTS", help="Tasks run at once.")] = 1,
    label: Annotated[
        list[str] | None, typer.Option("--label", help="k=v label (repeatable).")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option("--data", help='JSON object for selectors, e.g. \'{"disk": "ssd"}\'.'),
    ] = None,
    resource: Annotated[
        list[str] | None,
        typer.Option(
            "--resource", help="Override a detected resource: cpus|mem_gb|disk_gb|gpus=N."
        ),
    ] = None,
    node_id: Annotated[str | None, typer.Option(envvar="HERDER_NODE_ID")] = None,
    name: Annotated[str | None, typer.Option(envvar="HERDER_NODE_NAME")] = None,
    prefetch: Annotated[
        int | None,
        typer.Option(
            envvar="HERDER_PREFETCH",
            help="Tasks queued beyond the slots (default: adapts to task length).",
        ),
    ] = None,
    provider: Annotated[str, typer.Option(hidden=True)] = "joined",
    scratch_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="HERDER_SCRATCH_DIR",
            help="Where command tasks run, one directory per attempt (default: a temp dir).",
        ),
    ] = None,
    orphan_after: Annotated[
        float,
        typer.Option(
            envvar="HERDER_ORPHAN_AFTER", help="Exit after this many seconds without a coordinator."
        ),
    ] = 15 * 60.0,
    idle_exit: Annotated[
        float | None,
        typer.Option(
            envvar="HERDER_IDLE_EXIT",
            min=0,
            help="Leave (exit 0) after this many seconds connected without work.",
        ),
    ] = None,
    orphan_action: Annotated[
        str,
        typer.Option(
            envvar="HERDER_ORPHAN_ACTION",
            help="After --orphan-after: exit, or shutdown (also run --shutdown-command).",
        ),
    ] = "exit",
    shutdown_command: Annotated[
        str,
        typer.Option(
            envvar="HERDER_SHUTDOWN_COMMAND",
            help="What --orphan-action shutdown runs (split like a shell would).",
        ),
    ] = "shutdown -h now",
    metadata_url: Annotated[
        str | None,
        typer.Option(
            envvar="HERDER_METADATA_URL",
            help="Instance metadata service to watch for a spot interruption notice "
            "(e.g. http://169.254.169.254); off when not given.",
        ),
    ] = None,
    spot_poll_s: Annotated[
        float,
        typer.Option(
            envvar="HERDER_SPOT_POLL_S", min=0.01, help="Seconds between spot notice checks."
        ),
    ] = 5.0,
    log_level: Annotated[str, typer.Option(envvar="HERDER_LOG_LEVEL")] = "info",
    log_format: Annotated[
        str, typer.Option(envvar="HERDER_LOG_FORMAT", help="text or json")
    ] = "text",
    discover: Annotated[
        bool, typer.Option(help="Find the coordinator by its UDP beacon (and follow it).")
    ] = False,
    tracker: Annotated[
        str | None,
        typer.Option(envvar="HERDER_TRACKER", help="Find the coordinator through this tracker."),
    ] = None,
    cluster: Annotated[
        str | None, typer.Option(help="With discovery: only pair with this cluster id.")
    ] = None,
    secret_file: Annotated[
        Path | None,
        typer.Option(help="With discovery: the cluster secret (else HERDER_SECRET or --join)."),
    ] = None,
    beacon_port: Annotated[int, typer.Option(envvar="HERDER_BEACON_PORT", hidden=True)] = 7421,
    release_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="HERDER_RELEASE_DIR",
            help="Where releases are installed (default: ~/.cache/herder/releases).",
        ),
    ] = None,
    release_cache_gb: Annotated[
        float,
        typer.Option(
            envvar="HERDER_RELEASE_CACHE_GB",
            min=0,
            help="Evict the least recently used releases beyond this size.",
        ),
    ] = 10.0,
    find_links: Annotated[
        list[str] | None,
        typer.Option(help="A wheelhouse (directory or URL) releases install from (repeat)."),
    ] = None,
    no_index: Annotated[
        bool, typer.Option(help="Install releases from --find-links only (offline).")
    ] = False,
    exec_log: Annotated[
        Path | None,
        typer.Option(
            envvar="HERDER_EXEC_LOG",
            help="Append a JSON line per attempt started and ended (for fault checking).",
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            envvar="HERDER_AGENT_TLS_CERT",
            help="Present this client certificate (for a coordinator with --agent-mtls).",
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(envvar="HERDER_AGENT_TLS_KEY", help="The key of --tls-cert (0600)."),
    ] = None,
) -> None:
    """Run an agent: pair with a coordinator and run its tasks."""
    if ctx.invoked_subcommand is not None:
        return  # `herder agent pause|resume NODE`
    import dataclasses
    import shlex

    from herder.agent.agent import Agent, AgentConfig
    from herder.model import new_id
    from herder.security import ApiToken, JoinToken, parse_token

    _setup_logging(log_level, log_format)
    if (tls_cert is None) != (tls_key is None):
        raise _fail("give --tls-cert and --tls-key together")
    finding = discover or tracker is not None
    parsed: JoinToken | ApiToken
    if finding:  # the address and fingerprint come from discovery; placeholders until then
        parsed = JoinToken(_discovery_secret(join, secret_file), bytes(32), "https://unknown")
    elif not join:
        raise _fail("give --join TOKEN@URL (or HERDER_JOIN), or --discover / --tracker URL")
    else:
        try:
            parsed = parse_token(join)  # the cluster's join token, or an agent token
        except HerderError as exc:
            raise _fail(str(exc)) from exc
    fallback_urls = _coordinator_urls(coordinator or [])
    url = parsed.url or next(iter(fallback_urls), None)
    if url is None:
        raise _fail(
            "the join token has no @URL part (give TOKEN@URL, --coordinator URL, "
            "or --discover / --tracker URL)"
        )
    if orphan_action not in ("exit", "shutdown"):
        raise _fail(f"--orphan-action must be exit or shutdown, not {orphan_action!r}")
    shutdown_argv = tuple(shlex.split(shutdown_command))
    if not shutdown_argv:
        raise _fail("--shutdown-command is empty")
    labels = {}
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _fail(f"--label {item!r} must look like key=value")
        labels[key] = value
    node_data, resources = _node_facts(data, resource or [])
    config = AgentConfig(
        url=url,
        fallback_urls=fallback_urls,
        secret=parsed.secret,
        fingerprint=parsed.fingerprint,
        node_id=node_id or new_id("n"),
        name=name or socket.gethostname(),
        slots=slots,
        prefetch=prefetch,
        labels=labels,
        data=node_data,
        resources=resources,
        provider=provider,
        orphan_after_s=orphan_after,
        idle_exit_s=idle_exit,
        scratch_dir=scratch_dir,
        metadata_url=metadata_url,
        spot_poll_s=spot_poll_s,
        orphan_action="shutdown" if orphan_action == "shutdown" else "exit",
        shutdown_command=shutdown_argv,
        release_dir=release_dir,
        release_cache_bytes=int(release_cache_gb * 2**30),
        find_links=tuple(find_links or ()),
        no_index=no_index,
        exec_log=exec_log,
        token_id=parsed.id if isinstance(parsed, ApiToken) else None,
        client_cert=tls_cert,
        client_key=tls_key,
    )

    async def main() -> int:
        # discovery (the tracker module imports fastapi) only for an agent that uses it:
        # a plain ``herder agent --join`` pairs sooner without it
        if tracker is not None:
            from herder.discovery.tracker_client import TrackerClient

            client: TrackerClient | None = TrackerClient(tracker, parsed.secret)
        else:
            client = None

        async def locate() -> tuple[str, bytes]:
            from herder.discovery import find_coordinator

            found = await find_coordinator(
                parsed.secret, beacon=discover, beacon_port=beacon_port, tracker=client,
                cluster=cluster,
            )  # fmt: skip
            return found.url, found.fingerprint

        node = Agent(dataclasses.replace(config, locate=locate) if finding else config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, node.stop)
        if client is None:
            return await node.run()
        from herder.discovery.tracker import Entry
        from herder.discovery.tracker_client import announce_loop

        me = Entry(kind="agent", id=config.node_id, data={"name": config.name, "slots": slots})
        try:
            async with asyncio.TaskGroup() as tg:
                announcing = tg.create_task(announce_loop(client, lambda: me), name="announce")
                code = await node.run()
                announcing.cancel()
            return code
        finally:
            await client.aclose()

    raise typer.Exit(asyncio.run(main()))


@app.command("tracker")
def tracker_command(
    listen: Annotated[str, typer.Option(help="HOST:PORT to serve HTTP on.")] = "0.0.0.0:7422",
    ttl: Annotated[float, typer.Option(min=0.1, help="Seconds an entry lives unrefreshed.")] = 10,
    secret_file: Annotated[
        Path | None, typer.Option(help="The cluster secret (else HERDER_SECRET or --join).")
    ] = None,
    join: Annotated[str | None, typer.Option(envvar="HERDER_JOIN", help="A join token.")] = None,
    log_level: Annotated[str, typer.Option(envvar="HERDER_LOG_LEVEL")] = "info",
) -> None:
    """Run the rendezvous service: coordinators and agents announce and find each other.

    Plain HTTP on purpose: every call and answer is signed with the secret
    (HMAC), so the secret never travels and nothing unsigned is believed.
    """
    import uvicorn

    from herder.config import split_host_port
    from herder.discovery.tracker import tracker_app

    _setup_logging(log_level, "text")
    secret = _discovery_secret(join, secret_file)
    try:
        host, port = split_host_port(listen)
    except HerderError as exc:
        raise _fail(str(exc)) from exc
    stdout_console().print(f"herder tracker at [bold]http://{host}:{port}[/bold]", highlight=False)
    uvicorn.run(tracker_app(secret, ttl), host=host, port=port, log_level="warning")


def _coordinator_urls(values: list[str]) -> tuple[str, ...]:
    """The ``--coordinator`` addresses, in order, each checked to be ``https://HOST[:PORT]``.

    Each value may hold several, comma-separated (handy in ``HERDER_COORDINATORS``).
    """
    import urllib.parse

    urls: list[str] = []
    for value in values:
        for item in value.split(","):
            url = item.strip().rstrip("/")
            if not url:
                continue
            parts = urllib.parse.urlsplit(url)
            try:
                port_ok = parts.port is None or parts.port > 0
            except ValueError:  # not a number, or out of range
                port_ok = False
            if parts.scheme != "https" or not parts.hostname or not port_ok:
                raise _fail(f"--coordinator {item.strip()!r} must look like https://HOST[:PORT]")
            if url not in urls:
                urls.append(url)
    return tuple(urls)


def _discovery_secret(join: str | None, secret_file: Path | None) -> bytes:
    """The cluster secret for an agent that finds its coordinator by itself.

    From ``--secret-file`` (the coordinator's ``secret`` file format: hex),
    else ``HERDER_SECRET`` (the same hex), else a join token (with or
    without an address: only its secret is used).
    """
    from herder.security import SECRET_BYTES, JoinToken, load_secret

    try:
        if secret_file is not None:
            return load_secret(secret_file)
        text = os.environ.get("HERDER_SECRET", "").strip()
        if text:
            try:
                secret = bytes.fromhex(text)
            except ValueError:
                secret = b""
            if len(secret) != SECRET_BYTES:
                raise _fail(f"HERDER_SECRET must be {SECRET_BYTES * 2} hex characters")
            return secret
        if join:
            return JoinToken.parse(join).secret
    except HerderError as exc:
        raise _fail(str(exc)) from exc
    raise _fail("discovery needs the secret: --secret-file, HERDER_SECRET or --join TOKEN")


# ---------------------------------------------------------------------------
# looking at the herd


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


@app.command()
def status(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Counts by state, nodes, recent throughput."""
    with _client(home) as herd:
        data = herd.status()
    if as_json:
        _print_json(data)
        return
    stdout_console().print(
        f"coordinator [bold]{data['url']}[/bold] up {data['uptime_s']:.0f}s", highlight=False
    )
    table = new_table("tasks", "count")
    for state, n in sorted(data["counts"].items()):
        table.add_row(state, str(n))
    stdout_console().print(table)
    nodes = ", ".join(f"{n} {s}" for s, n in sorted(data["nodes"].items())) or "none"
    stdout_console().print(f"nodes: {nodes}; {data['agents']} connected")
    if data.get("leader"):  # several coordinators may share the store: who runs the fleet
        stdout_console().print(f"fleet leader: {data['leader']['url']}", highlight=False)
    stdout_console().print(f"throughput: {data['throughput']:.1f} tasks/s (last 10 s)")


@app.command()
def nodes(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """The nodes of the herd."""
    with _client(home) as herd:
        rows = herd.nodes()
    if as_json:
        _print_json(rows)
        return
    table = new_table("id", "state", "provider", "address", "slots", "running", "labels", "reason")
    for n in rows:
        labels = ",".join(f"{k}={v}" for k, v in n["labels"].items())
        table.add_row(
            n["id"],
            n["state"],
            n["provider"],
            n.get("address") or "",
            str(n["slots"]),
            str(n["running"]),
            labels,
            n["reason"] or "",
        )
    stdout_console().print(table)


@app.command()
def scale(
    count: Annotated[str, typer.Argument(help="Nodes to keep, or 'auto' for the herd's policy.")],
    home: HomeOpt = None,
) -> None:
    """Keep COUNT nodes (surplus ones drain first; running tasks are not killed)."""
    if count != "auto" and not count.isdigit():
        raise _fail(f"scale: expected a count or 'auto', got {count!r}")
    with _client(home) as herd:
        try:
            target = herd.scale(None if count == "auto" else int(count))
        except HerderError as exc:
            raise _fail(str(exc)) from exc
    stdout_console().print("autoscaling" if target is None else f"keeping {target} nodes")


@app.command()
def drain(node: Annotated[str, typer.Argument(help="Node id.")], home: HomeOpt = None) -> None:
    """The node takes no more work and leaves once its running tasks are done."""
    with _client(home) as herd:
        try:
            herd.drain(node)
        except HerderError as exc:
            raise _fail(str(exc)) from exc
    stdout_console().print(f"{node} draining")


@agent_app.command("pause")
def pause(node: Annotated[str, typer.Argument(help="Node id.")], home: HomeOpt = None) -> None:
    """The node takes no new tasks; it finishes what it runs and stays paired."""
    _set_available(node, False, home)


@agent_app.command("resume")
def resume(node: Annotated[str, typer.Argument(help="Node id.")], home: HomeOpt = None) -> None:
    """A paused node takes tasks again."""
    _set_available(node, True, home)


app.command("pause", help="Same as `herder agent pause NODE`.")(pause)
app.command("resume", help="Same as `herder agent resume NODE`.")(resume)


def _set_available(node: str, available: bool, home: Path | None) -> None:
    """Through the coordinator by node id, so it works from any machine with a token."""
    with _client(home) as herd:
        try:
            herd.set_available(node, available)
        except HerderError as exc:
            raise _fail(str(exc)) from exc
    stdout_console().print(f"{node} {'available' if available else 'paused'}")


@app.command()
def terminate(node: Annotated[str, typer.Argument(help="Node id.")], home: HomeOpt = None) -> None:
    """End the node now: its running tasks are stopped and go back to the queue."""
    with _client(home) as herd:
        try:
            herd.terminate(node)
        except HerderError as exc:
            raise _fail(str(exc)) from exc
    stdout_console().print(f"{node} terminated")


@app.command()
def tasks(
    home: HomeOpt = None,
    state: Annotated[str | None, typer.Option(help="Only tasks in this state.")] = None,
    pending: Annotated[bool, typer.Option("--pending", help="Waiting or ready.")] = False,
    running: Annotated[bool, typer.Option("--running", help="Leased or running.")] = False,
    finished: Annotated[
        bool, typer.Option("--finished", help="Succeeded, failed or cancelled.")
    ] = False,
    job: Annotated[str | None, typer.Option(help="Only tasks of this job.")] = None,
    node: Annotated[str | None, typer.Option(help="Only tasks on this node.")] = None,
    name: Annotated[str | None, typer.Option(help="Only names matching this glob.")] = None,
    limit: Annotated[int, typer.Option()] = 50,
    after: Annotated[
        str | None, typer.Option(help="The page after this task id (the last one shown).")
    ] = None,
    newest: Annotated[bool, typer.Option("--newest", help="Newest first.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List tasks, a page at a time, in submission order."""
    groups = [
        g for g, on in (("pending", pending), ("running", running), ("finished", finished)) if on
    ]
    if len(groups) > 1 or (groups and state):
        raise _fail("give one of --state, --pending, --running, --finished")
    with _client(home) as herd:
        try:
            rows = herd.tasks(
                state=state,
                states=groups[0] if groups else None,
                job=job,
                node=node,
                name=name,
                limit=limit,
                after=after,
                order="desc" if newest else "asc",
            )
        except HerderError as exc:
            raise _fail(str(exc)) from exc
    if as_json:
        _print_json(rows)
        return
    table = new_table("id", "name", "state", "attempt", "node", "reason")
    for t in rows:
        table.add_row(
            t["id"],
            t["name"] or "",
            t["state"],
            f"{t['attempt']}/{t['max_attempts']}",
            t["node_id"] or "",
            t["reason"] or "",
        )
    stdout_console().print(table)


@app.command()
def services(
    home: HomeOpt = None,
    ended: Annotated[bool, typer.Option("--ended", help="Also list cancelled services.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Services kept running: where, restarts, health as last checked, last exit."""
    with _client(home) as herd:
        try:
            rows = herd.services(ended=ended)
        except HerderError as exc:
            raise _fail(str(exc)) from exc
    if as_json:
        _print_json(rows)
        return
    table = new_table("id", "name", "state", "node", "restarts", "up", "health", "last exit")
    now = time.time()
    for s in rows:
        table.add_row(
            s["id"],
            s["name"] or "",
            _service_state(s, now),
            s["node"] or "",
            str(s["restarts"]),
            _uptime(now, s["started_at"]),
            _health_text(s["health"], now),
            _exit_text(s["last_exit"]),
        )
    stdout_console().print(table)


def _service_state(service: dict[str, Any], now: float) -> str:
    """Its state, and when a service backing off after short runs starts again."""
    state = str(service["state"])
    restart_at = service["restart_at"]
    if state in ("ready", "leased") and restart_at is not None and restart_at > now:
        return f"{state} (starts in {restart_at - now:.0f}s)"
    return state


def _uptime(now: float, started_at: float | None) -> str:
    if started_at is None:
        return ""
    seconds = max(0, int(now - started_at))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _health_text(health: dict[str, Any] | None, now: float) -> str:
    if health is None:
        return "-"
    text = str(health["state"])
    if health["checked_at"] is not None:
        text += f" ({now - health['checked_at']:.0f}s ago)"
    if health["failures"]:
        text += f", {health['failures']} failed"
    if health["error"]:
        text += f": {health['error']}"
    return text


def _exit_text(last: dict[str, Any] | None) -> str:
    if last is None:
        return ""
    code = f" {last['exit_code']}" if last["exit_code"] is not None else ""
    return f"{last['reason']}{code} at {_when(last['at'])}"


@app.command("task")
def task_detail(
    task_id: str,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
    rerun_here: Annotated[
        bool,
        typer.Option(
            "--rerun-here",
            help="Run this command task's phases on this machine, printing every step, "
            "with the same inputs; outputs are listed, not uploaded; the scratch is kept.",
        ),
    ] = False,
) -> None:
    """One task: spec, state history (each phase of each attempt), result or error, output tail."""
    with _client(home) as herd:
        try:
            data = herd.task(task_id)
            if rerun_here:
                code = _rerun_here(herd, data["task"])
        except HerderError as exc:
            raise _fail(str(exc)) from exc
    if rerun_here:
        raise typer.Exit(code)
    if as_json:
        _print_json(data)
        return
    t = data["task"]
    stdout_console().print(
        f"[bold]{t['id']}[/bold] {t['name'] or ''} — {t['state']}"
        + (f" ({t['reason']})" if t["reason"] else ""),
        highlight=False,
    )
    if t.get("service") is not None:
        runs = f"service, {t['restarts']} restarts"
    else:
        runs = f"attempt {t['attempt']}/{t['max_attempts']}"
    stdout_console().print(f"job {t['job_id']}, kind {t['kind']}, {runs}, priority {t['priority']}")
    if t["command"]:
        stdout_console().print(f"run: {t['command']['run']!r}", highlight=False)
    if t["depends_on"]:
        stdout_console().print(f"depends on: {', '.join(t['depends_on'])}")
    table = new_table("when", "what", "node", "lease")
    table.add_row(_when(t["created_at"]), "submitted", "", "")
    for a in data["attempts"]:
        table.add_row(
            _when(a["leased_at"]), f"attempt {a['attempt']} leased", a["node_id"], a["lease_id"]
        )
        if a["started_at"]:
            table.add_row(_when(a["started_at"]), "started", a["node_id"], a["lease_id"])
        if a["ended_at"]:
            for p in a.get("phases") or []:
                table.add_row(
                    _when(p["start"]),
                    f"  {p['phase']}: {p['outcome']} in {p['end'] - p['start']:.2f}s"
                    + (f" ({p['detail']})" if p.get("detail") else ""),
                    a["node_id"],
                    a["lease_id"],
                )
            table.add_row(
                _when(a["ended_at"]),
                f"ended: {a['outcome']}" + (f" ({a['reason']})" if a["reason"] else ""),
                a["node_id"],
                a["lease_id"],
            )
    for e in data["events"]:
        table.add_row(_when(e["at"]), e["action"], e["node_id"] or "", e["lease_id"] or "")
    stdout_console().print(table)
    if t["error"]:
        stdout_console().print(
            f"[red]{t['error'].get('type', 'error')}[/red]: {t['error'].get('message', '')}",
            highlight=False,
        )
        if t["error"].get("traceback"):
            stdout_console().print(t["error"]["traceback"], highlight=False, markup=False)
    if data.get("progress"):
        p = data["progress"]
        stdout_console().print(
            f"progress {p['fraction'] * 100:.0f}% {p['message']}".rstrip(), highlight=False
        )
    for stream, text in (data.get("live") or {}).items():
        stdout_console().print(f"--- {stream} (live, still running) ---")
        stdout_console().print(text, highlight=False, markup=False, end="")
    if t["output"]:
        stdout_console().print(f"exit code {t['output'].get('returncode')}")
        for stream in ("stdout_tail", "stderr_tail"):
            if t["output"].get(stream):
                stdout_console().print(f"--- {stream.split('_')[0]} (tail) ---")
                stdout_console().print(t["output"][stream], highlight=False, markup=False, end="")


def _rerun_here(herd: Any, task: dict[str, Any]) -> int:
    """Run a command task's phases here the way an agent would; returns an exit code."""
    import tempfile

    from herder.agent.phases import PhaseContext, run_command_task
    from herder.model import CommandSpec

    if task["kind"] != "command" or not task["command"]:
        raise _fail(f"task {task['id']} is a {task['kind']} task; only command tasks rerun here")
    command = CommandSpec.model_validate(task["command"]).model_copy(update={"keep_scratch": True})
    ctx = PhaseContext(
        task_id=task["id"],
        attempt=0,
        job_id=task["job_id"],
        name=task["name"],
        scratch_root=Path(tempfile.mkdtemp(prefix="herder-rerun-")),
        data=herd.data,
        timeout_s=task["timeout_s"],
        echo=lambda line: stdout_console().print(line, highlight=False, markup=False),
        upload=False,
    )
    out = run_command_task(command, ctx)
    for stream in ("stdout_tail", "stderr_tail"):
        if out["output"].get(stream):
            stdout_console().print(f"--- {stream.split('_')[0]} (tail) ---")
            stdout_console().print(out["output"][stream], highlight=False, markup=False, end="")
    stdout_console().print(f"scratch kept in {out['output']['scratch']}", highlight=False)
    if out["state"] == "succeeded":
        stdout_console().print("[green]succeeded[/green]")
        return 0
    stdout_console().print(f"[red]failed[/red]: {out['error']['message']}", highlight=False)
    return 1


def _when(at: float | None) -> str:
    if at is None:
        return ""
    return time.strftime("%H:%M:%S", time.localtime(at)) + f".{int(at % 1 * 1000):03d}"


@app.command()
def push(file: Path, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Submit a tasks file (TOML, JSON or YAML) as one job, all of it or nothing."""
    with _client(home) as herd:
        try:
            pushed = herd.push_file(file)
        except HerderError as exc:
            raise _fail(str(exc)) from exc
    if as_json:
        _print_json(pushed)
    else:
        stdout_console().print(
            f"job [bold]{pushed['job_id']}[/bold]: {pushed['tasks']} tasks pushed", highlight=False
        )


@app.command()
def wait(
    job: Annotated[str | None, typer.Argument(help="Job id (default: the newest job).")] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a job's progress until it finishes; exit 1 if any task failed."""
    with _client(home) as herd:
        if job is None:
            jobs = herd.jobs(1)
            if not jobs:
                raise _fail("no jobs yet")
            job = str(jobs[0]["id"])
        summary = _watch_job(herd, job, quiet=as_json)
    if as_json:
        _print_json(summary)
    else:
        stdout_console().print(f"job {job}: {_state_counts(summary['counts'])}", highlight=False)
    if summary["failed"]:
        raise typer.Exit(1)


def _state_counts(counts: dict[str, int]) -> str:
    """``ready 120 · running 4 · succeeded 876 · failed 2``: states in lifecycle order."""
    from herder.model import TaskState

    order = [s.value for s in TaskState]
    known = [s for s in order if counts.get(s)]
    other = sorted(s for s in counts if s not in order and counts[s])
    return " · ".join(f"{s} {counts[s]}" for s in known + other) or "no tasks"


def _watch_job(herd: Any, job: str, *, quiet: bool) -> dict[str, Any]:
    """Poll the job's summary (one query per refresh) until it is finished."""
    with job_progress(quiet=quiet) as progress:
        bar = progress.add_task(job, total=None, counts="")
        while True:
            try:
                summary: dict[str, Any] = herd.job(job)
            except HerderError as exc:
                raise _fail(str(exc)) from exc
            counts = summary["counts"]
            done = sum(counts.get(s, 0) for s in ("succeeded", "failed", "cancelled"))
            running = summary.get("progress")  # the running tasks that report progress
            line = _state_counts(counts)
            if running:
                line += f" · running at {running['average'] * 100:.0f}% on average"
            progress.update(bar, total=summary["total"], completed=done, counts=line)
            if summary["finished"]:
                return summary
            time.sleep(0.2)


@app.command()
def results(
    job: str,
    out: Annotated[
        Path, typer.Option("--out", help="Directory to download into (made if missing).")
    ] = Path("results"),
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Download every output of a job's tasks (jobs/JOB/TASK/... into OUT/TASK/...)."""
    from herder.agent.phases import job_prefix

    prefix = job_prefix(job)
    got: list[dict[str, Any]] = []
    with _client(home) as herd:
        try:
            for obj in herd.data.ls(prefix):
                dest = out / obj.key.removeprefix(prefix)
                herd.data.get_file(obj.key, dest)
                got.append({"key": obj.key, "path": str(dest), "size": obj.size})
        except HerderError as exc:
            raise _fail(str(exc)) from exc
    if as_json:
        _print_json(got)
        return
    total = sum(g["size"] for g in got)
    stdout_console().print(f"{len(got)} outputs, {total:,} bytes, in {out}", highlight=False)


@app.command()
def cancel(
    task_id: Annotated[list[str] | None, typer.Argument(help="Task ids.")] = None,
    job: Annotated[
        str | None, typer.Option(help="Cancel every unfinished task of this job.")
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel tasks (running ones are killed) or a whole job."""
    if not task_id and not job:
        raise _fail("give task ids or --job")
    with _client(home) as herd:
        cancelled = herd.cancel(*(task_id or []), job=job)
    if as_json:
        _print_json({"cancelled": cancelled})
    else:
        stdout_console().print(f"{len(cancelled)} tasks cancelled")


def main(command: Callable[[], Any] | None = None) -> None:
    """``herder``; ``command`` is the CLI as :func:`built_command` made it ahead."""
    try:
        (command or app)()
    except KeyboardInterrupt:
        sys.exit(130)


def built_command() -> Callable[[], Any]:
    """The CLI's commands built now from their signatures, about 30 ms for all of
    their options: the fork server builds them once, not each agent it forks."""
    return typer.main.get_command(app)
