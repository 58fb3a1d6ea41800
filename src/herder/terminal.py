"""The CLI's terminal output (rich), loaded on first use.

``herder up`` and every agent run through the CLI, and print a line or two
(typer's ``echo`` does); rich costs 2.8 MB and 20 ms of their start. So the
commands that show tables, colour and progress bars reach it through here
when they print, not when the CLI is imported.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.progress import Progress
    from rich.table import Table


@functools.cache
def stdout_console() -> Console:
    """The console on stdout (made once)."""
    from rich.console import Console

    return Console()


@functools.cache
def stderr_console() -> Console:
    """The console on stderr (made once): errors and progress bars."""
    from rich.console import Console

    return Console(stderr=True)


def new_table(*headers: str) -> Table:
    """A table with these column headers."""
    from rich.table import Table

    return Table(*headers)


def escape(text: str) -> str:
    """``text`` with rich's markup made literal (a ``[7]`` in a path stays)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def job_progress(*, quiet: bool) -> Progress:
    """A bar with elapsed time and ETA, and the counts by state on the line below
    (``progress.add_task(job, counts=...)``)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class JobProgress(Progress):
        def get_renderables(self) -> Iterable[RenderableType]:
            yield self.make_tasks_table(self.tasks)
            for task in self.tasks:
                yield Text("  " + str(task.fields.get("counts", "")))

    return JobProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),  # from the completion rate of the last 30 s
        console=stderr_console(),
        disable=quiet,
    )
