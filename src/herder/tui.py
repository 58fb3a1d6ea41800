"""``herder top``: a live terminal view of the herd, in the manner of ``htop``.

It is a thin face over the client API (STYLE.md, habit 4): one refresh asks
the coordinator for its executors, status, recent jobs and new events, and
draws them. The layout fits an 80×24 terminal over SSH::

    status line: nodes by state, tasks by state, throughput, uptime, errors
    nodes:        id, name, state, CPU and memory bars, slots used/total
    jobs | tasks/s sparkline over the last minute
    running tasks: id, name, node, elapsed
    recent events
    footer: the keys

Every network call runs in a worker thread through the sync client, so a slow
or unreachable coordinator never freezes the screen; a failed refresh puts its
error in the status line and the last data stays on screen.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import httpx
from rich.text import Text
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Input, Label, RichLog, Sparkline, Static
from textual.worker import Worker, WorkerState

from herder.errors import HerderError

if TYPE_CHECKING:
    from herder.client import Client

# What a refresh or an action may raise when the coordinator is slow, gone or
# refuses: shown to the user, never hidden. Anything else is a bug and ends the app.
CLIENT_ERRORS: tuple[type[BaseException], ...] = (HerderError, httpx.HTTPError, OSError)

JOBS_SHOWN = 3
EVENTS_KEPT = 20
EVENTS_PAGE = 1000  # a refresh reads at most this many new events from the log
THROUGHPUT_SAMPLES = 60  # one a refresh: the last minute at the default 1 s
GONE_NODE_KEPT_S = 60.0  # terminated and lost nodes stay listed this long
LOG_TAIL_LINES = 200
BAR_WIDTH = 8

FINAL_NODE_STATES = frozenset({"terminated", "lost"})
FINAL_TASK_STATES = frozenset({"succeeded", "failed", "cancelled"})
STATE_STYLES = {
    "ready": "green",
    "busy": "cyan",
    "connected": "green",
    "requested": "yellow",
    "booting": "yellow",
    "draining": "magenta",
    "terminated": "dim",
    "lost": "red",
    "running": "cyan",
    "leased": "cyan",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
    "waiting": "yellow",
}
# A job's counts, folded into the few groups that fit on one line.
COUNT_GROUPS = (
    ("ok", ("succeeded",)),
    ("fail", ("failed",)),
    ("cxl", ("cancelled",)),
    ("run", ("running", "leased")),
    ("wait", ("ready", "waiting")),
)


class TopSource(Protocol):
    """The client calls ``herder top`` makes; ``herder.Client`` has them all.

    Spelled out so the face's whole dependency on the coordinator is visible
    in one place, and so a fake can stand in for it.
    """

    def status(self) -> dict[str, Any]: ...

    def executors(self) -> list[dict[str, Any]]: ...

    def jobs(self, limit: int = 100) -> list[dict[str, Any]]: ...

    def job(self, job_id: str) -> dict[str, Any]: ...

    def event_log(self, after: int = 0, limit: int = 100) -> list[dict[str, Any]]: ...

    def task(self, task_id: str) -> dict[str, Any]: ...

    def logs(self, task_id: str, /, stream: str = "stdout") -> str: ...

    def cancel(self, *targets: str, job: str | None = None) -> list[str]: ...

    def drain(self, node_id: str) -> None: ...

    def terminate(self, node_id: str) -> None: ...


# --- data: fetched in a worker thread, drawn in the UI thread -------------------------


@dataclass(frozen=True)
class Snapshot:
    """One refresh's answers, taken together so the panes agree with each other."""

    at: float
    status: dict[str, Any]
    executors: list[dict[str, Any]]
    jobs: list[dict[str, Any]]
    events: list[dict[str, Any]]  # new since the last refresh, oldest first


@dataclass(frozen=True)
class Failed:
    """A refresh or an action that the coordinator did not answer (or refused)."""

    what: str
    error: BaseException

    def __str__(self) -> str:
        return f"{self.what} failed: {type(self.error).__name__}: {self.error}"


def fetch_snapshot(source: TopSource, after_event: int) -> Snapshot | Failed:
    """Ask for everything one frame shows (runs in a worker thread: it blocks)."""
    try:
        return Snapshot(
            at=time.time(),
            status=source.status(),
            executors=source.executors(),
            jobs=[
                j if j.get("finished") else source.job(j["id"])  # with its ETA
                for j in source.jobs(limit=JOBS_SHOWN)
            ],
            events=source.event_log(after=after_event, limit=EVENTS_PAGE),
        )
    except CLIENT_ERRORS as exc:
        return Failed("refresh", exc)


@dataclass(frozen=True)
class TaskDetail:
    """A task's record, attempts and history, with the known tail of its output."""

    info: dict[str, Any]
    stdout: str
    stderr: str


def fetch_task(source: TopSource, task_id: str) -> TaskDetail | Failed:
    """Ask for one task and its logs (runs in a worker thread: it blocks)."""
    try:
        return TaskDetail(
            info=source.task(task_id),
            stdout=source.logs(task_id, "stdout"),
            stderr=source.logs(task_id, "stderr"),
        )
    except CLIENT_ERRORS as exc:
        return Failed(f"task {task_id}", exc)


def perform(what: str, call: Callable[[], object]) -> str | Failed:
    """Run one control call (cancel, drain, terminate) and say how it went."""
    try:
        call()
    except CLIENT_ERRORS as exc:
        return Failed(what, exc)
    return f"{what}: done"


# --- formatting: pure functions, so they are easy to read and to test -----------------


def bar(fraction: float | None, width: int = BAR_WIDTH, *, label: bool = True) -> Text:
    """``████░░░░ 50%``, coloured by load; ``–`` when nothing is known."""
    if fraction is None:
        return Text("–", style="dim")
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    style = "green" if fraction < 0.6 else "yellow" if fraction < 0.85 else "red"
    text = Text("█" * filled, style=style)
    text.append("░" * (width - filled), style="dim")
    if label:
        text.append(f"{fraction * 100:4.0f}%")
    return text


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``, ``3d04h``: short enough for a narrow column."""
    s = max(int(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def styled(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state, ""))


def percent(telemetry: Mapping[str, Any] | None, key: str) -> float | None:
    """A telemetry percentage as a fraction (None while the node has not reported it)."""
    if not telemetry or telemetry.get(key) is None:
        return None
    return float(telemetry[key]) / 100


def matches(needle: str, *haystack: object) -> bool:
    """The ``/`` filter: a case-insensitive substring of any of the fields."""
    needle = needle.strip().lower()
    return not needle or any(needle in str(h).lower() for h in haystack if h is not None)


def task_matches(needle: str, task: Mapping[str, Any]) -> bool:
    return matches(needle, task["task_id"], task.get("name"), task["node_id"], task.get("job_id"))


def shown_nodes(executors: Iterable[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    """Live nodes, then the recently gone ones (so a terminate is seen to happen)."""
    alive = [e for e in executors if e["state"] not in FINAL_NODE_STATES]
    gone = [
        e
        for e in executors
        if e["state"] in FINAL_NODE_STATES
        and now - float(e.get("last_seen") or 0) < GONE_NODE_KEPT_S
    ]
    return sorted(alive, key=lambda e: e["id"]) + sorted(gone, key=lambda e: e["id"])


def node_row(node: Mapping[str, Any]) -> tuple[object, ...]:
    telemetry = node.get("telemetry")
    slots = f"{node.get('used', 0)}/{node.get('slots', 0)}"
    state = "paused" if node.get("paused") and node["state"] == "ready" else node["state"]
    return (
        node["id"],
        node.get("name") or "",
        styled(state),
        bar(percent(telemetry, "cpu_percent")),
        bar(percent(telemetry, "memory_percent")),
        slots,
    )


def running_tasks(executors: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every running task, with its node, oldest first."""
    tasks = [{**t, "node_id": e["id"]} for e in executors for t in e.get("running") or []]
    return sorted(tasks, key=lambda t: float(t.get("started_at") or 0))


def task_row(task: Mapping[str, Any], now: float) -> tuple[object, ...]:
    started = task.get("started_at")
    elapsed = duration(now - float(started)) if started else str(task.get("state") or "–")
    return (task["task_id"], task.get("name") or "", task["node_id"], elapsed)


def job_line(job: Mapping[str, Any]) -> Text:
    """``name ████░░░░ 5/10 ok 4 fail 1 run 2 wait 3`` (and the ETA when known)."""
    counts: Mapping[str, int] = job.get("counts") or {}
    total = int(job.get("total") or sum(counts.values()))
    done = sum(counts.get(s, 0) for s in ("succeeded", "failed", "cancelled"))
    line = Text(f"{(job.get('name') or job['id'])[:12]:<12} ")
    line.append_text(bar(done / total if total else None, label=False))
    line.append(f" {done}/{total}")
    for label, states in COUNT_GROUPS:
        n = sum(counts.get(s, 0) for s in states)
        if n:
            line.append(f" {label} {n}", style=STATE_STYLES.get(states[0], ""))
    if job.get("eta_s") is not None and not job.get("finished"):
        line.append(f" eta {duration(float(job['eta_s']))}", style="dim")
    return line


def event_line(event: Mapping[str, Any]) -> Text:
    """``12:04:05 task_started t-… on local-…`` with the event's reason, if any."""
    stamp = time.strftime("%H:%M:%S", time.localtime(float(event["at"])))
    line = Text(f"{stamp} ", style="dim")
    line.append(str(event["action"]), style="bold")
    if event.get("task_id"):
        line.append(f" {event['task_id']}")
    if event.get("node_id"):
        line.append(f" on {event['node_id']}", style="dim")
    data = event.get("data") or {}
    if isinstance(data, dict) and data.get("reason"):
        line.append(f" ({data['reason']})", style="yellow")
    return line


def status_line(status: Mapping[str, Any]) -> str:
    """One line over the herd: nodes by state, tasks by state, tasks/s and uptime."""
    nodes = " ".join(f"{n} {s}" for s, n in sorted((status.get("nodes") or {}).items()))
    counts: Mapping[str, int] = status.get("counts") or {}
    tasks = " ".join(
        f"{label} {n}"
        for label, states in COUNT_GROUPS
        if (n := sum(counts.get(s, 0) for s in states))
    )
    return (
        f"nodes: {nodes or 'none'} │ tasks: {tasks or 'none'} │ "
        f"{float(status.get('throughput') or 0):.1f}/s │ up {duration(status.get('uptime_s') or 0)}"
    )


def sync_rows(table: DataTable[object], rows: Mapping[str, tuple[object, ...]]) -> None:
    """Bring ``table`` to ``rows`` in place, by key, so the cursor stays on its row."""
    for gone in [k for k in table.rows if k.value not in rows]:
        table.remove_row(gone)
    columns = list(table.columns)
    for key, cells in rows.items():
        if key in table.rows:
            for column, cell in zip(columns, cells, strict=True):
                table.update_cell(key, column, cell, update_width=True)
        else:
            table.add_row(*cells, key=key)


def selected_key(table: DataTable[object]) -> str | None:
    """The key of the row under the cursor, None for an empty table."""
    if table.row_count == 0:
        return None
    key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
    return str(key) if key is not None else None


def detail_text(detail: TaskDetail) -> Text:
    """A task's spec, state, attempts and error, for the detail screen."""
    task: Mapping[str, Any] = detail.info["task"]
    text = Text()
    text.append(f"{task['id']}  ", style="bold")
    text.append_text(styled(task["state"]))
    if task.get("reason"):
        text.append(f" ({task['reason']})", style="yellow")
    text.append(f"\nname {task.get('name')}  job {task.get('job_id')}  kind {task.get('kind')}")
    timeout = duration(float(task["timeout_s"])) if task.get("timeout_s") else "none"
    text.append(f"\npriority {task.get('priority', 0)}  timeout {timeout}")
    text.append(f"  attempt {task.get('attempt')}/{task.get('max_attempts')}")
    if task.get("command"):
        text.append(f"\ncommand {task['command']}")
    if task.get("depends_on"):
        text.append(f"\ndepends on {', '.join(task['depends_on'])}")
    if task.get("select") or task.get("resources"):
        text.append(f"\nselect {task.get('select')}  resources {task.get('resources')}")
    if task.get("waiting_reason"):
        text.append(f"\nwaiting: {task['waiting_reason']}", style="yellow")
    text.append("\n\nattempts", style="bold")
    for a in detail.info.get("attempts") or []:
        ran = (
            duration(float(a["ended_at"]) - float(a["started_at"]))
            if a.get("ended_at") and a.get("started_at")
            else "…"
        )
        text.append(f"\n  #{a['attempt']} on {a.get('node_id')} {ran} ")
        text.append_text(styled(a.get("outcome") or "running"))
        if a.get("reason"):
            text.append(f" ({a['reason']})", style="yellow")
    error = task.get("error")
    if error:
        text.append("\n\nerror", style="bold red")
        if isinstance(error, dict):
            text.append(f"\n{error.get('type')}: {error.get('message')}")
            if error.get("traceback"):
                text.append(f"\n{error['traceback']}", style="dim")
        else:
            text.append(f"\n{error}")
    return text


def tail(log: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(log.splitlines()[-lines:]) or "(nothing yet)"


# --- screens ---------------------------------------------------------------------------


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question before an action that cannot be undone (terminate)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]
    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Label {
        width: 60; padding: 1 2; border: thick $error; background: $surface;
    }
    """

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        yield Label(f"{self.question}\n\n[b]y[/b] yes   [b]n[/b] / [b]escape[/b] no")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class HerdView(Screen[None]):
    """What both views share: the client, the pace, and control calls off the UI thread.

    Each screen owns its keys, so a key never acts on a pane that is not shown.
    """

    def __init__(self, source: TopSource, refresh_s: float) -> None:
        super().__init__()
        self.source = source
        self.refresh_s = refresh_s
        self._fetching = False

    def fetch(self, name: str, call: Callable[[], object]) -> None:
        """Start a fetch unless one is still out (a slow coordinator gets no pile-up)."""
        if self._fetching:
            return
        self._fetching = True
        self.run_worker(call, name=name, thread=True)

    def act(self, what: str, call: Callable[[], object]) -> None:
        """Run a control call in a worker thread; its outcome arrives as a notification."""
        self.run_worker(lambda: perform(what, call), name="action", thread=True)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state != WorkerState.SUCCESS:
            return
        result = event.worker.result
        if event.worker.name == "action":
            if isinstance(result, Failed):
                self.notify(str(result), severity="error", timeout=8)
            else:
                self.notify(str(result))
            self.reload()
        else:
            self._fetching = False
            self.arrived(result)

    def reload(self) -> None:
        """Fetch this view's data now (and on every tick)."""
        raise NotImplementedError

    def arrived(self, result: object) -> None:
        """Draw what a fetch brought back (a Failed, or this view's data)."""
        raise NotImplementedError


class TaskTable(DataTable[object]):
    """The running tasks; enter opens the one under the cursor."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "select_cursor", "Detail"),
    ]


class FilterInput(Input):
    """The ``/`` filter: narrows nodes and running tasks as you type."""

    DEFAULT_CSS = """
    FilterInput, FilterInput:focus {
        height: 1; border: none; padding: 0 1; display: none; background: $boost;
    }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "clear_filter", "Clear filter"),
    ]

    def action_clear_filter(self) -> None:
        self.value = ""  # posts Changed: the tables fill up again
        self.display = False
        self.screen.query_one("#nodes", DataTable).focus()


class HerdScreen(HerdView):
    """The herd at a glance: status, nodes, jobs, throughput, running tasks, events."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("d", "drain", "Drain"),
        Binding("t", "terminate", "Terminate"),
        Binding("c", "cancel_task", "Cancel"),
        Binding("slash", "filter", "Filter"),
        Binding("enter", "open_task", "Detail"),
        Binding("tab", "app.focus_next", "Pane"),
        Binding("shift+tab", "app.focus_previous", "Pane", show=False),
        Binding("q", "app.quit", "Quit"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]
    DEFAULT_CSS = """
    HerdScreen #status { height: 1; background: $boost; padding: 0 1; }
    HerdScreen .pane { height: 1fr; border-top: solid $panel-lighten-2; }
    HerdScreen .pane:focus { border-top: solid $accent; }
    HerdScreen #middle { height: 4; }
    HerdScreen #jobs {
        width: 2fr; border-top: solid $panel-lighten-2; text-wrap: nowrap; text-overflow: ellipsis;
    }
    HerdScreen #throughput { width: 1fr; height: 4; border-top: solid $panel-lighten-2; }
    """

    def __init__(self, source: TopSource, refresh_s: float) -> None:
        super().__init__(source, refresh_s)
        self.snapshot: Snapshot | None = None
        self.error: Failed | None = None
        self.throughput: deque[float] = deque([0.0], maxlen=THROUGHPUT_SAMPLES)
        self._last_event = 0

    def compose(self) -> ComposeResult:
        yield Static("connecting…", id="status")
        yield FilterInput(placeholder="filter nodes and tasks (escape clears)", id="filter")
        nodes: DataTable[object] = DataTable(id="nodes", classes="pane", cursor_type="row")
        nodes.add_columns("node", "name", "state", "cpu", "mem", "slots")
        nodes.border_title = "nodes"
        yield nodes
        with Horizontal(id="middle"):
            jobs = Static(id="jobs")
            jobs.border_title = "jobs"
            yield jobs
            spark = Sparkline(list(self.throughput), id="throughput")
            spark.border_title = "tasks/s, 1 min"
            yield spark
        tasks = TaskTable(id="tasks", classes="pane", cursor_type="row")
        tasks.add_columns("task", "name", "node", "elapsed")
        tasks.border_title = "running tasks"
        yield tasks
        events = RichLog(id="events", classes="pane", max_lines=EVENTS_KEPT, min_width=20)
        events.border_title = "events"
        yield events
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#nodes", DataTable).focus()
        self.reload()
        self.set_interval(self.refresh_s, self.reload)

    # --- refreshing --------------------------------------------------------------------

    def reload(self) -> None:
        after = self._last_event
        self.fetch("refresh", lambda: fetch_snapshot(self.source, after))

    def arrived(self, result: object) -> None:
        if isinstance(result, Failed):
            self.error = result
            self.show_status()
        else:
            assert isinstance(result, Snapshot)
            self.show(result)

    def show(self, snap: Snapshot) -> None:
        """Draw a fresh snapshot in every pane."""
        self.snapshot = snap
        self.error = None
        self.throughput.append(float(snap.status.get("throughput") or 0))
        if snap.events:
            self._last_event = max(int(e["id"]) for e in snap.events)
        self.show_status()
        self.show_tables()
        self.query_one("#jobs", Static).update(
            Text("\n").join(job_line(j) for j in snap.jobs) if snap.jobs else "no jobs yet"
        )
        spark = self.query_one("#throughput", Sparkline)
        spark.data = list(self.throughput)
        spark.border_title = f"tasks/s, 1 min: {self.throughput[-1]:.1f}"
        log = self.query_one("#events", RichLog)
        for e in snap.events[-EVENTS_KEPT:]:
            log.write(event_line(e))

    def show_status(self) -> None:
        """The herd in one line, or why the data on screen is getting old."""
        if self.error is None:
            line = Text(status_line(self.snapshot.status) if self.snapshot else "no data yet")
        else:
            kept = ""
            if self.snapshot is not None:
                kept = f"data from {time.strftime('%H:%M:%S', time.localtime(self.snapshot.at))} · "
            line = Text(f"⚠ {kept}{self.error}", style="bold red")
        self.query_one("#status", Static).update(line)

    def show_tables(self) -> None:
        """Nodes and running tasks, narrowed by the filter (redrawn as it is typed)."""
        if self.snapshot is None:
            return
        needle = self.query_one(FilterInput).value
        now = time.time()
        running = running_tasks(self.snapshot.executors)
        tasks = [t for t in running if task_matches(needle, t)]
        # a node stays when it matches, or runs a task that does
        hosts = {t["node_id"] for t in tasks} if needle.strip() else set()
        nodes = shown_nodes(self.snapshot.executors, now)
        sync_rows(
            self.query_one("#nodes", DataTable),
            {
                n["id"]: node_row(n)
                for n in nodes
                if n["id"] in hosts or matches(needle, n["id"], n.get("name"))
            },
        )
        tasks_table = self.query_one(TaskTable)
        sync_rows(tasks_table, {t["task_id"]: task_row(t, now) for t in tasks})
        shown = f"{len(tasks)} of {len(running)}" if len(tasks) < len(running) else len(running)
        tasks_table.border_title = f"running tasks ({shown})"

    # --- filter ------------------------------------------------------------------------

    def action_clear_filter(self) -> None:
        self.query_one(FilterInput).action_clear_filter()

    def action_filter(self) -> None:
        box = self.query_one(FilterInput)
        box.display = True
        box.focus()

    @on(Input.Changed, "#filter")
    def filter_changed(self) -> None:
        self.show_tables()

    @on(Input.Submitted, "#filter")
    def filter_done(self) -> None:
        box = self.query_one(FilterInput)
        box.display = bool(box.value)
        self.query_one("#nodes", DataTable).focus()

    # --- actions -----------------------------------------------------------------------

    def selected_node(self) -> str | None:
        return selected_key(self.query_one("#nodes", DataTable))

    def selected_task(self) -> str | None:
        return selected_key(self.query_one(TaskTable))

    def action_drain(self) -> None:
        if (node := self.selected_node()) is None:
            self.notify("no node selected", severity="warning")
            return
        self.act(f"drain {node}", lambda: self.source.drain(node))

    def action_terminate(self) -> None:
        if (node := self.selected_node()) is None:
            self.notify("no node selected", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.act(f"terminate {node}", lambda: self.source.terminate(node))

        question = f"Terminate node {node} now? Its running tasks go back to the queue."
        self.app.push_screen(ConfirmScreen(question), answered)

    def action_cancel_task(self) -> None:
        if (task := self.selected_task()) is None:
            self.notify("no running task selected", severity="warning")
            return
        self.act(f"cancel {task}", lambda: self.source.cancel(task))

    def action_open_task(self) -> None:
        if (task := self.selected_task()) is None:
            self.notify("no running task selected", severity="warning")
            return
        self.open_task(task)

    @on(DataTable.RowSelected, "#tasks")
    def task_chosen(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self.open_task(str(event.row_key.value))

    def open_task(self, task_id: str) -> None:
        self.app.push_screen(TaskScreen(self.source, task_id, self.refresh_s))


class TaskScreen(HerdView):
    """One task in full, refreshed while open: spec, state, attempts, error, logs."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("c", "cancel_task", "Cancel task"),
        Binding("q", "app.quit", "Quit"),
    ]
    DEFAULT_CSS = """
    TaskScreen #task-status { height: 1; background: $boost; padding: 0 1; }
    TaskScreen .log-title { text-style: bold; margin-top: 1; }
    """

    def __init__(self, source: TopSource, task_id: str, refresh_s: float) -> None:
        super().__init__(source, refresh_s)
        self.task_id = task_id
        self.detail: TaskDetail | None = None

    def compose(self) -> ComposeResult:
        yield Static(f"task {self.task_id}: loading…", id="task-status")
        with VerticalScroll(id="task-body"):
            yield Static(id="task-info")
            yield Static("stdout (tail)", classes="log-title")
            yield Static(id="task-stdout")
            yield Static("stderr (tail)", classes="log-title")
            yield Static(id="task-stderr")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#task-body").focus()
        self.reload()
        self.ticker = self.set_interval(self.refresh_s, self.reload)

    def reload(self) -> None:
        self.fetch("detail", lambda: fetch_task(self.source, self.task_id))

    def arrived(self, result: object) -> None:
        status = self.query_one("#task-status", Static)
        if isinstance(result, Failed):
            status.update(Text(f"⚠ {result}", style="bold red"))
            return
        assert isinstance(result, TaskDetail)
        self.detail = result
        status.update(f"task {self.task_id}: {result.info['task']['state']}")
        self.query_one("#task-info", Static).update(detail_text(result))
        self.query_one("#task-stdout", Static).update(Text(tail(result.stdout)))
        self.query_one("#task-stderr", Static).update(Text(tail(result.stderr)))
        if result.info["task"]["state"] in FINAL_TASK_STATES:
            self.ticker.stop()  # a finished task's record and logs no longer change

    def action_cancel_task(self) -> None:
        self.act(f"cancel {self.task_id}", lambda: self.source.cancel(self.task_id))


# --- the app ---------------------------------------------------------------------------


class TopApp(App[None]):
    """``herder top``: the herd at a glance, refreshed every ``refresh_s`` seconds."""

    TITLE = "herder top"
    ENABLE_COMMAND_PALETTE = False  # its key would crowd the footer at 80 columns

    def __init__(self, client: TopSource, refresh_s: float = 1.0) -> None:
        super().__init__()
        self.client = client
        self.refresh_s = refresh_s

    def get_default_screen(self) -> HerdScreen:
        return HerdScreen(self.client, self.refresh_s)

    def open_task(self, task_id: str) -> None:
        """Show one task in full (``enter`` on a running task does this)."""
        self.push_screen(TaskScreen(self.client, task_id, self.refresh_s))


def run_top(client: Client, *, refresh_s: float = 1.0) -> None:
    """``herder top``: run the TUI until ``q``."""
    TopApp(client, refresh_s=refresh_s).run()
