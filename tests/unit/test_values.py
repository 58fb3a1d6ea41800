"""herder.values: what a worker imports, and pickles made before the values moved."""

from __future__ import annotations

import pickle
import subprocess
import sys

from herder.values import ResultRef, TaskRef


def test_a_worker_process_imports_neither_pydantic_nor_the_model() -> None:
    """The worker's start is every first task's wait and every restart's cost."""
    probe = (
        "import sys, herder.agent.worker, herder.task, herder.node; "
        "print(sorted(m for m in ('pydantic', 'herder.model', 'herder.protocol') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_values_pickled_under_their_old_module_load_as_the_same_classes() -> None:
    """Queued payloads and stored results from before the move name herder.model."""
    # protocol 0 names the class as a line of text, so the module can be swapped
    old_ref = pickle.dumps(TaskRef("t-1"), protocol=0).replace(b"herder.values", b"herder.model")
    old_result = pickle.dumps(ResultRef("results/t-1/1", 5), protocol=0).replace(
        b"herder.values", b"herder.model"
    )
    assert b"herder.model" in old_ref
    ref = pickle.loads(old_ref)
    result = pickle.loads(old_result)
    assert type(ref) is TaskRef
    assert ref.task_id == "t-1"
    assert type(result) is ResultRef
    assert (result.key, result.size) == ("results/t-1/1", 5)
