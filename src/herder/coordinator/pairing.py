"""What the coordinator asks of an agent before pairing, apart from the handshake itself.

* **Mutual TLS** (``agent_mtls``): the agent must have presented a client
  certificate that the TLS layer verified against the cluster CA
  (:func:`client_certificate_refusal`). A certificate from another CA, or a
  self-signed one, never gets this far: it ends the TLS handshake.
* **Bounded evidence of refusals.** Each refused pairing is worth an event,
  but a peer that retries in a loop (or an attacker with a script) must not
  be able to fill the store with them. :class:`RefusalLog` writes at most one
  ``pairing_refused`` event per source address per ``REFUSAL_INTERVAL_S``;
  the next event from that source carries how many were left out meanwhile
  (``suppressed``). The log line of every refusal stays.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from starlette.types import Scope

from herder.store.base import Store

from .guard import client_certificate

REFUSAL_INTERVAL_S = 60.0
MAX_SOURCES = 10_000  # sources remembered; past that the longest quiet is forgotten

MTLS_REQUIRED = (
    "this coordinator requires a client certificate signed by its CA "
    "(herder agent --tls-cert/--tls-key; herder certs writes one)"
)


def client_certificate_refusal(scope: Scope, required: bool) -> str | None:
    """Why an agent on this connection may not pair for want of a certificate, or None."""
    if required and client_certificate(scope) is None:
        return MTLS_REQUIRED
    return None


class RefusalLog:
    """Rate-limits ``pairing_refused`` events per source address."""

    def __init__(
        self, interval_s: float = REFUSAL_INTERVAL_S, max_sources: int = MAX_SOURCES
    ) -> None:
        self.interval_s = interval_s
        self.max_sources = max_sources
        # source -> (monotonic time of its last written event, refusals left out since)
        self._sources: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def note(self, source: str, now: float) -> int | None:
        """Count one refusal from ``source``; the number left out since the last
        event if this one is to be written, None if it is to be left out."""
        last = self._sources.get(source)
        if last is not None and now - last[0] < self.interval_s:
            self._sources[source] = (last[0], last[1] + 1)
            return None
        self._sources[source] = (now, 0)
        self._sources.move_to_end(source)
        while len(self._sources) > self.max_sources:
            self._sources.popitem(last=False)
        return last[1] if last is not None else 0

    async def record(
        self, store: Store, source: str, node_id: str | None, by: str, reason: str
    ) -> bool:
        """Write the event for one refusal unless it is to be left out; True if written."""
        suppressed = self.note(source, time.monotonic())
        if suppressed is None:
            return False
        await store.add_event(
            "pairing_refused",
            time.time(),
            node_id=node_id,
            data={"by": by, "reason": reason, "source": source, "suppressed": suppressed},
        )
        return True
