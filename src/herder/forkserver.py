"""A process that has imported the agent once and forks one per local agent.

``herder up --local N`` starts it before the coordinator imports its own
libraries, so the two import side by side; each local agent is then a fork
of it and starts with everything loaded (about 20 ms) instead of importing
the world again (about 0.4 s). This is how a fresh herd gets to its first
result sooner, and how a dead local agent is replaced sooner.

It listens on no address: it reads requests only on the socket pair's end
that the coordinator handed it (its argument, a descriptor), one JSON
request per line: ``{"argv": [...], "env": {...}, "log": PATH}``, and answers
``{"pid": N}`` or ``{"error": "..."}``. The child is an agent in a session
of its own, its output in ``log``, its environment exactly ``env`` (the join
token travels there, never in argv). The kernel reaps the children (SIGCHLD
ignored here), so none stays a zombie. It leaves when the socket closes:
the coordinator that started it is gone.

Forking is safe only with one thread: if importing started a thread, it
refuses to serve and exits, and the provider starts agents the slow way.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import random
import signal
import socket
import sys
import threading
import traceback
from typing import Any


def _preload() -> Any:
    """Import what an agent runs, and build the CLI, so that a fork has nothing left to do
    but run it."""
    import herder.agent.agent
    import herder.cli
    import herder.security

    return functools.partial(herder.cli.main, herder.cli.built_command())


def _child(request: dict[str, Any], server: socket.socket, cli_main: Any) -> None:
    """Become the agent ``request`` asks for; never returns."""
    code = 1
    try:
        # closed for real, not just released (the request stream still refers to
        # it): an agent holding it would keep the provider from seeing the
        # server's end when the server dies
        os.close(server.detach())
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the agent waits for its workers
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        os.environ.clear()
        os.environ.update(request["env"])
        random.seed()  # else every agent would draw the same jitter as its siblings
        # what the server froze stays frozen: the agent's collections never touch
        # (and so never copy) the pages it shares with the server and its siblings
        sys.argv = ["herder", *request["argv"]]
        try:
            cli_main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # the log is gone: none to tell
                stream.flush()
        os._exit(code)


def _fork(request: dict[str, Any], server: socket.socket, cli_main: Any) -> dict[str, Any]:
    for key, kind in (("argv", list), ("env", dict), ("log", str)):
        if not isinstance(request.get(key), kind):
            return {"error": f"the request's {key!r} must be a {kind.__name__}"}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError as exc:
        return {"error": f"fork failed: {exc}"}
    if pid == 0:
        _child(request, server, cli_main)
    return {"pid": pid}


def serve(server: socket.socket) -> int:
    """Answer spawn requests until the socket closes; the exit code."""
    gc.disable()  # no collections while importing (they find nothing); frozen below
    cli_main = _preload()
    if threading.active_count() != 1:
        names = ", ".join(t.name for t in threading.enumerate())
        print(
            f"herder forkserver: importing started threads ({names}); not forking", file=sys.stderr
        )
        return 1
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    gc.freeze()  # what is loaded now stays shared with the children, not copied on write
    gc.enable()  # for the children: an agent collects what it makes
    with server.makefile("rb") as requests:
        for line in requests:
            try:
                request = json.loads(line)
            except ValueError as exc:
                answer = {"error": f"not a JSON request: {exc}"}
            else:
                answer = (
                    _fork(request, server, cli_main)
                    if isinstance(request, dict)
                    else {"error": "a request is a JSON object"}
                )
            server.sendall(json.dumps(answer).encode() + b"\n")
    return 0


def main() -> None:
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: python -m herder.forkserver FD")
    sys.exit(serve(socket.socket(fileno=int(sys.argv[1]))))


if __name__ == "__main__":
    main()
