"""Settings: ``herder.toml`` in the herder home plus ``HERDER_*`` environment variables.

One source per knob. The environment is passed in as a mapping (never read
behind the caller's back), so tests build settings for a temporary home
without touching ``os.environ``. Precedence: explicit overrides (CLI options)
> environment > ``herder.toml`` > defaults.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from herder.errors import ConfigError
from herder.model import RELEASE_ID_PATTERN

DEFAULT_PORT = 7420


@dataclass(frozen=True)
class Timeouts:
    """Every time limit in one place (seconds)."""

    heartbeat_s: float = 1.0
    lost_after_s: float = 5.0
    # at most 2 s (x1.5 jitter) between tries: back within 5 s of a link's return
    reconnect_max_s: float = 2.0
    shutdown_grace_s: float = 10.0
    replace_check_s: float = 0.5
    # a connection's TLS handshake must be over by then (asyncio's own default: 60 s)
    tls_handshake_s: float = 10.0


@dataclass(frozen=True)
class Settings:
    home: Path
    store_url: str
    listen: str = f"127.0.0.1:{DEFAULT_PORT}"
    advertise_url: str | None = None
    # Where outputs and inputs live (fsspec URL); ``None`` means ``<home>/data``.
    datastore_url: str | None = None
    # Passed to the fsspec filesystem, e.g. ``{endpoint_url = "http://..."}`` for S3.
    datastore_options: dict[str, Any] = field(default_factory=dict)
    timeouts: Timeouts = field(default_factory=Timeouts)
    # ``[fleet] release``: the release every node loads before it takes work
    fleet_release: str | None = None
    # Names clients may reach the coordinator by besides its own addresses (a DNS
    # name, a load balancer's): any other Host header is refused (DNS rebinding).
    allowed_hosts: tuple[str, ...] = ()
    # Failed authentications a source may make in a minute before it is refused (429).
    max_auth_failures: int = 20
    # HTTP connections one source may hold open; request bodies larger than this
    # (besides datastore uploads, which stream) are refused with 413.
    max_connections_per_source: int = 512
    max_body_mb: float = 256.0
    # Serve with these instead of the coordinator's own CA (``herder certs`` writes
    # a set); all three or none. Join tokens then pin ``tls_ca``.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    # Agents must present a client certificate signed by the CA to pair.
    agent_mtls: bool = False

    @property
    def secret_path(self) -> Path:
        return self.home / "secret"

    @property
    def tls_dir(self) -> Path:
        return self.home / "tls"

    @property
    def datastore(self) -> str:
        """The datastore URL in effect: ``datastore_url`` or ``file://<home>/data``."""
        return self.datastore_url or (self.home / "data").as_uri()

    @property
    def state_path(self) -> Path:
        """Where a running coordinator writes its URL and pid for the CLI."""
        return self.home / "coordinator.json"

    @property
    def listen_host(self) -> str:
        return split_host_port(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return split_host_port(self.listen)[1]

    @property
    def url(self) -> str:
        """The URL agents and clients use to reach this coordinator."""
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = self.listen_host
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"https://{host}:{self.listen_port}"


def split_host_port(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"listen address {listen!r} must look like HOST:PORT", field="listen")
    return host.strip("[]"), int(port)


def _release_id(value: Any, path: Path) -> str:
    if not isinstance(value, str) or not re.match(RELEASE_ID_PATTERN, value):
        raise ConfigError(
            f"{path}: [fleet] release must be a release id like r-0123456789abcdef0123 "
            f"(herder release create prints one), not {value!r}",
            path=str(path),
            field="release",
        )
    return value


def default_home(env: Mapping[str, str]) -> Path:
    if env.get("HERDER_HOME"):
        return Path(env["HERDER_HOME"]).expanduser()
    return Path(env.get("HOME", "~")).expanduser() / ".herder"


def home_ca_path(env: Mapping[str, str]) -> Path:
    """Where ``herder up`` keeps its own CA certificate in the herder home of ``env``
    (the one its tokens pin, unless it serves with a user's own CA)."""
    return default_home(env) / "tls" / "ca.pem"


_ENV_KEYS = {
    "HERDER_STORE": "store_url",
    "HERDER_LISTEN": "listen",
    "HERDER_ADVERTISE_URL": "advertise_url",
    "HERDER_DATASTORE": "datastore_url",
    "HERDER_MAX_AUTH_FAILURES": "max_auth_failures",
    "HERDER_MAX_CONNECTIONS_PER_SOURCE": "max_connections_per_source",
    "HERDER_MAX_BODY_MB": "max_body_mb",
    "HERDER_TLS_CERT": "tls_cert",
    "HERDER_TLS_KEY": "tls_key",
    "HERDER_TLS_CA": "tls_ca",
    "HERDER_AGENT_MTLS": "agent_mtls",
}
_TIMEOUT_KEYS = {f.name for f in fields(Timeouts)}
_TOP_KEYS = {
    "store_url",
    "listen",
    "advertise_url",
    "datastore_url",
    "datastore_options",
    "allowed_hosts",
    "max_auth_failures",
    "max_connections_per_source",
    "max_body_mb",
    "tls_cert",
    "tls_key",
    "tls_ca",
    "agent_mtls",
}


def _tls_values(values: dict[str, Any], home: Path) -> None:
    """Paths of the user's own certificates (relative to the home), all or none;
    ``agent_mtls`` as a boolean (``1``/``true``/``yes`` from the environment)."""
    given = [key for key in ("tls_cert", "tls_key", "tls_ca") if values.get(key)]
    if given and len(given) != 3:
        missing = sorted({"tls_cert", "tls_key", "tls_ca"} - set(given))
        raise ConfigError(
            f"serving with your own certificates needs tls_cert, tls_key and tls_ca; "
            f"missing: {', '.join(missing)}",
            field=missing[0],
        )
    for key in given:
        values[key] = home / Path(str(values[key])).expanduser()
    flag = values.get("agent_mtls")
    if isinstance(flag, str):
        if flag.strip().lower() not in ("1", "true", "yes", "0", "false", "no", ""):
            raise ConfigError(f"agent_mtls must be true or false, not {flag!r}", field="agent_mtls")
        values["agent_mtls"] = flag.strip().lower() in ("1", "true", "yes")
    elif flag is not None and not isinstance(flag, bool):
        raise ConfigError(f"agent_mtls must be true or false, not {flag!r}", field="agent_mtls")


def load_settings(env: Mapping[str, str], **overrides: Any) -> Settings:
    """Build settings from ``herder.toml`` in the home, then ``env``, then ``overrides``.

    ``None`` overrides are ignored so CLI options can be passed through as they are.
    """
    home = Path(overrides.pop("home", None) or default_home(env))
    values: dict[str, Any] = {}
    timeouts: dict[str, float] = {}
    toml_path = home / "herder.toml"
    if toml_path.exists():
        try:
            data = tomllib.loads(toml_path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{toml_path}: {exc}", path=str(toml_path)) from exc
        for key, value in data.get("fleet", {}).items():
            if key != "release":
                raise ConfigError(
                    f"{toml_path}: [fleet] has an unknown key {key!r} (it knows: release)",
                    path=str(toml_path),
                    field=key,
                )
            values["fleet_release"] = _release_id(value, toml_path)
        section = data.get("coordinator", {})
        for key, value in section.items():
            if key in _TOP_KEYS:
                values[key] = value
            elif key in _TIMEOUT_KEYS:
                timeouts[key] = float(value)
            else:
                raise ConfigError(
                    f"{toml_path}: [coordinator] has an unknown key {key!r}",
                    path=str(toml_path),
                    field=key,
                )
    for env_key, name in _ENV_KEYS.items():
        if env.get(env_key):
            values[name] = env[env_key]
    if env.get("HERDER_ALLOWED_HOSTS"):
        values["allowed_hosts"] = env["HERDER_ALLOWED_HOSTS"].split(",")
    if "allowed_hosts" in values:
        values["allowed_hosts"] = tuple(h.strip() for h in values["allowed_hosts"] if h.strip())
    for key, value in overrides.items():
        if value is None:
            continue
        if key in _TIMEOUT_KEYS:
            timeouts[key] = float(value)
        else:
            values[key] = value
    values.setdefault("store_url", f"sqlite:///{home / 'herd.db'}")
    for key in ("max_auth_failures", "max_connections_per_source"):
        if key in values:
            values[key] = int(values[key])
    if "max_body_mb" in values:
        values["max_body_mb"] = float(values["max_body_mb"])
    _tls_values(values, home)
    settings = Settings(home=home, **values)
    if timeouts:
        settings = replace(settings, timeouts=replace(settings.timeouts, **timeouts))
    split_host_port(settings.listen)  # validate early, naming the field
    return settings
