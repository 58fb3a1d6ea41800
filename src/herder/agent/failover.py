"""Which coordinator an agent tries next, when it has several to choose from.

Coordinators that share one store (PostgreSQL) also share the secret and
the CA, so an agent may pair with any of them and, when its own dies, move
to another: its hello names the leases it holds and the new coordinator
adopts them from the shared store. The agent tries the coordinators in
turn: after a failure the next one at once, and only once a whole round has
failed does it back off. A round starts again from the coordinator it last
paired with. With discovery (beacon or tracker) as well, asking discovery
is one step of the round, the first one.

An address that answers as another cluster (its CA does not match the pin,
or it refuses the pairing) is dropped for good; the others are retried
until the agent's orphan rules end it. This module only decides: the agent
does the connecting (see :mod:`herder.agent.agent`).
"""

from __future__ import annotations

from collections.abc import Sequence


class Rotation:
    """The round of coordinators to try: addresses, and ``None`` for "ask discovery".

    >>> r = Rotation(["https://a:7420", "https://b:7420"], discover=False)
    >>> r.target, r.advance(), r.target, r.advance()
    ('https://a:7420', False, 'https://b:7420', True)
    """

    def __init__(self, urls: Sequence[str], *, discover: bool) -> None:
        steps: list[str | None] = [None] if discover else []
        for url in urls:
            if url not in steps:
                steps.append(url)
        if not steps:
            raise ValueError("no coordinator to try: give an address or discovery")
        self._steps = steps
        self._dropped: set[int] = set()
        self._at = 0
        self._round_start = 0

    @property
    def target(self) -> str | None:
        """The address to try now; ``None``: ask discovery for one."""
        return self._steps[self._at]

    @property
    def choices(self) -> int:
        """How many steps the round has left (dropped addresses not counted)."""
        return len(self._steps) - len(self._dropped)

    def paired(self) -> None:
        """The current step worked: the next round starts from here."""
        self._round_start = self._at

    def advance(self) -> bool:
        """Move to the next step still in the round.

        True when that begins a new round, i.e. every step failed since the
        last pairing (or since the start): time to back off.
        """
        wrapped = False
        for _ in range(len(self._steps)):
            self._at = (self._at + 1) % len(self._steps)
            wrapped = wrapped or self._at == self._round_start
            if self._at not in self._dropped:
                break
        return wrapped

    def drop(self) -> bool:
        """Leave the current address out from now on (another cluster's).

        False when nothing is left to try. Discovery is never dropped: it
        may name another coordinator next time.
        """
        if self._steps[self._at] is not None:
            self._dropped.add(self._at)
        return self.choices > 0
