"""``LocalHerd`` when its coordinator cannot start: the error says why, from its log."""

from __future__ import annotations

from pathlib import Path

import pytest

from herder.errors import HerderError
from herder.local import LocalHerd
from tests.helpers import free_port


def test_a_coordinator_that_cannot_start_is_reported_with_its_log(tmp_path: Path) -> None:
    nobody = f"postgresql://postgres@127.0.0.1:{free_port()}/herder"  # nothing listens there
    herd = LocalHerd(nodes=1, home=tmp_path, store=nobody, ready_timeout=60)
    with pytest.raises(HerderError) as failed:
        herd.start()
    herd.stop()
    message = str(failed.value)
    assert "the coordinator did not start" in message
    assert "herder up exited with code 1" in message
    assert "Connect call failed" in message, message
