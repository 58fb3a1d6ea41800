"""Workload D's child for herder: a fresh process starts a herd of 2 agents and waits
for one result.

Its own script, so that it imports what a user's script would (``LocalHerd``),
not what ``compare_herder.py``'s other workloads need; the peers' cold
children in ``compare_peers.py`` import their systems inside the function too.
"""

from __future__ import annotations

import subprocess

from compare_common import FIRST_RESULT, noop

from herder import LocalHerd


def main() -> None:
    herd = LocalHerd(nodes=2, slots=1, log=subprocess.DEVNULL)
    try:
        client = herd.start()
        assert client.submit(noop, 7).result(timeout=60) == 7
        print(FIRST_RESULT, flush=True)
    finally:
        herd.stop()


if __name__ == "__main__":
    main()
