"""Who may do what: bearer tokens, their roles, and the rule of every route.

Two kinds of bearer token:

- the **join token** (``hd1.…``) carries the cluster secret: whoever holds it
  can pair agents, so it is ``admin``;
- an **API token** (``hk1.<id>.…``, ``herder token create --role R``) names a
  record in the store with a role, an optional expiry and a revocation
  time; the store keeps only a digest of its secret. Revoking one takes
  effect at once: the registry here is updated in the same call, and the
  coordinator closes the WebSockets opened with it.

Roles: ``read`` (every GET, the live feed: the dashboard's default),
``submit`` (read, plus submitting, uploading inputs and cancelling its own
jobs), ``admin`` (everything), ``agent`` (what a worker node needs: pairing,
and the datastore). An agent token's secret is derived from the cluster
secret, so that the coordinator can prove itself to the node at pairing
without storing the secret (:func:`herder.security.agent_token_secret`).

Every route is listed in :data:`RULES`; a route missing from it is ``admin``
only, and a test walks the app's routes so none is missed.

Failed authentications are counted per source address: past
``max_failures`` (``max_auth_failures`` in the settings, 20) in
``FAILURE_WINDOW_S`` the source is refused (429), right token or not, until
the window passes, so a token cannot be guessed at line speed.
"""

from __future__ import annotations

import hmac
import re
import time
from collections import deque
from dataclasses import dataclass

from herder import security
from herder.errors import SecurityError
from herder.model import TokenRecord
from herder.store.base import Store

# What each role may do, as the permissions a rule asks for.
GRANTS: dict[str, frozenset[str]] = {
    "read": frozenset({"read"}),
    "submit": frozenset({"read", "submit"}),
    "admin": frozenset({"read", "submit", "admin", "agent"}),
    "agent": frozenset({"agent"}),
}

# (method, path template) -> the permissions any one of which lets a request through.
# ``public`` needs no token: files and facts that carry no data.
RULES: dict[tuple[str, str], frozenset[str]] = {
    ("GET", "/v1/ca"): frozenset({"public"}),  # the CA certificate: clients pin it
    ("GET", "/v1/health"): frozenset({"public"}),  # liveness only: {"ok": true}
    ("GET", "/"): frozenset({"public"}),  # the dashboard's files (no data in them)
    ("GET", "/static/plotly.min.js"): frozenset({"public"}),
    ("GET", "/static/{name}"): frozenset({"public"}),
    # reading the herd
    **{
        ("GET", path): frozenset({"read"})
        for path in (
            "/v1/status",
            "/v1/tasks",
            "/v1/tasks/{task_id}",
            "/v1/tasks/{task_id}/logs",
            "/v1/jobs",
            "/v1/jobs/{job_id}",
            "/v1/nodes",
            "/v1/services",
            "/v1/events",
            "/v1/executors",
            "/v1/usage",
            "/v1/telemetry",
            "/v1/timeline",
            "/v1/fleet",
            "/v1/releases",
            "/v1/releases/status",
            "/v1/releases/{release_id}",
            "/metrics",
            "/openapi.json",
        )
    },
    # the datastore: users read outputs and put inputs, agents do both for tasks
    ("GET", "/v1/data/{key}"): frozenset({"read", "agent"}),
    ("GET", "/v1/data-info/{key}"): frozenset({"read", "agent"}),
    ("GET", "/v1/data"): frozenset({"read", "agent"}),
    ("PUT", "/v1/data/{key}"): frozenset({"submit", "agent"}),
    ("DELETE", "/v1/data/{key}"): frozenset({"submit"}),
    # running work
    ("POST", "/v1/tasks"): frozenset({"submit"}),
    ("POST", "/v1/push"): frozenset({"submit"}),
    ("POST", "/v1/cancel"): frozenset({"submit"}),  # its own jobs only (checked there)
    ("POST", "/v1/send"): frozenset({"submit"}),
    ("POST", "/v1/releases"): frozenset({"submit"}),
    # running the herd
    ("DELETE", "/v1/releases/{release_id}"): frozenset({"admin"}),
    ("POST", "/v1/releases/{release_id}/roll"): frozenset({"admin"}),
    ("POST", "/v1/fleet/scale"): frozenset({"admin"}),
    ("POST", "/v1/nodes/{node_id}/drain"): frozenset({"admin"}),
    ("POST", "/v1/nodes/{node_id}/terminate"): frozenset({"admin"}),
    ("POST", "/v1/nodes/{node_id}/pause"): frozenset({"admin"}),
    ("POST", "/v1/nodes/{node_id}/resume"): frozenset({"admin"}),
    ("POST", "/v1/shutdown"): frozenset({"admin"}),
    ("GET", "/v1/tokens"): frozenset({"admin"}),
    ("POST", "/v1/tokens"): frozenset({"admin"}),
    ("DELETE", "/v1/tokens/{token_id}"): frozenset({"admin"}),
    # WebSockets (checked in their handlers, by the same rules)
    ("WS", "/v1/session"): frozenset({"read"}),  # submitting over it needs "submit"
    ("WS", "/v1/live"): frozenset({"read"}),
}
ADMIN_ONLY = frozenset({"admin"})
_CONVERTER = re.compile(r"\{(\w+):[^}]+\}")

FAILURE_WINDOW_S = 60.0


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: an API token (``token_id``) or the cluster secret (None)."""

    role: str
    token_id: str | None = None
    name: str | None = None

    def may(self, needed: frozenset[str]) -> bool:
        return bool(GRANTS[self.role] & needed)

    @property
    def owner(self) -> str | None:
        """What jobs it submits are recorded as owned by (None: an admin's)."""
        return None if self.role == "admin" else self.token_id


CLUSTER_ADMIN = Principal(role="admin", name="cluster secret")


def rule(method: str, path: str) -> frozenset[str]:
    """The permissions a route needs (admin for a route nobody listed).

    ``path`` is the route's template, as in the OpenAPI spec (``{key}``, not
    the ``{key:datakey}`` of its declaration).
    """
    return RULES.get((method, _CONVERTER.sub(r"{\1}", path)), ADMIN_ONLY)


class Authenticator:
    """Turns bearer text into a Principal, and keeps API tokens and failure counts."""

    def __init__(self, secret: bytes, store: Store, max_failures: int = 20) -> None:
        self._secret = secret
        self._max_failures = max_failures
        self._store = store
        self._tokens: dict[str, TokenRecord] = {}
        self._failures: dict[str, deque[float]] = {}

    async def load(self) -> None:
        self._tokens = {t.id: t for t in await self._store.tokens()}

    def principal(self, bearer: str) -> Principal | None:
        """Who ``bearer`` is, or None (unknown, forged, expired, revoked, malformed)."""
        try:
            token = security.parse_token(bearer)
        except SecurityError:
            return None
        if isinstance(token, security.JoinToken):
            ok = hmac.compare_digest(token.secret, self._secret)
            return CLUSTER_ADMIN if ok else None
        record = self._tokens.get(token.id)
        if record is None or not record.usable(time.time()):
            return None
        if not hmac.compare_digest(record.digest, token.digest):
            return None
        return Principal(role=record.role, token_id=record.id, name=record.name)

    def throttled(self, source: str) -> bool:
        """Whether ``source`` failed too often lately to be heard now."""
        failures = self._failures.get(source)
        if not failures:
            return False
        cutoff = time.monotonic() - FAILURE_WINDOW_S
        while failures and failures[0] < cutoff:
            failures.popleft()
        if not failures:
            del self._failures[source]
            return False
        return len(failures) >= self._max_failures

    def failed(self, source: str) -> None:
        failures = self._failures.setdefault(source, deque(maxlen=self._max_failures))
        failures.append(time.monotonic())
        if len(self._failures) > 100_000:  # a flood of sources: forget the oldest
            self._failures.pop(next(iter(self._failures)))

    # --- API tokens ---------------------------------------------------------------------

    async def create(
        self, role: str, name: str | None, ttl_s: float | None, fingerprint: bytes, url: str
    ) -> tuple[security.ApiToken, TokenRecord]:
        token = security.ApiToken.new(fingerprint, url)
        if role == "agent":  # its secret is derived, so pairing needs no stored secret
            secret = security.agent_token_secret(self._secret, token.id)
            token = security.ApiToken(token.id, secret, fingerprint, url)
        now = time.time()
        record = TokenRecord(
            id=token.id,
            name=name,
            role=role,  # type: ignore[arg-type]  # checked by the route's model
            digest=token.digest,
            created_at=now,
            expires_at=now + ttl_s if ttl_s is not None else None,
        )
        await self._store.add_token(record)
        self._tokens[record.id] = record
        return token, record

    def pairing_key(self, token_id: str) -> bytes:
        """The key a node paired by the ``agent`` token ``token_id`` proves itself with
        (see :func:`herder.security.agent_token_secret` for why both sides can derive
        it); SecurityError with the reason when that token may not pair now."""
        record = self._tokens.get(token_id)
        if record is None:
            raise SecurityError(f"no token {token_id}")
        if record.revoked_at is not None:
            raise SecurityError(f"token {token_id} was revoked")
        if not record.usable(time.time()):
            raise SecurityError(f"token {token_id} has expired")
        if record.role != "agent":
            raise SecurityError(f"token {token_id} is a {record.role} token, not an agent token")
        secret = security.agent_token_secret(self._secret, token_id)
        if not hmac.compare_digest(security.token_digest(secret), record.digest):
            raise SecurityError(
                f"token {token_id} was not made by this cluster: create a new agent token"
            )
        return security.pairing_key(secret, token_id)

    def token_secret(self, token_id: str) -> bytes:
        """An agent token's secret, derived again (what values sealed for its node use)."""
        return security.agent_token_secret(self._secret, token_id)

    def tokens(self) -> list[TokenRecord]:
        return sorted(self._tokens.values(), key=lambda t: (t.created_at, t.id))

    async def revoke(self, token_id: str) -> TokenRecord | None:
        record = await self._store.revoke_token(token_id, time.time())
        if record is not None:
            self._tokens[record.id] = record
        return record
