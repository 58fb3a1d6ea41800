"""The local provider's side of ``herder.forkserver``: start it, ask it for agents.

Only the standard library here: ``herder up`` starts the fork server before
it imports anything heavy, so that the server's imports and the
coordinator's run on two cores at once.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading

from herder.errors import ProviderError

# The first request waits for the server's imports (under a second on a quiet
# machine); a server that takes longer than this is taken for broken.
ANSWER_TIMEOUT_S = 30.0


class ForkServer:
    """A running ``python -m herder.forkserver``; one request at a time."""

    def __init__(self, process: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.process = process
        self._sock = sock
        self._answers = sock.makefile("rb")
        self._lock = threading.Lock()

    @classmethod
    def start(cls, env: dict[str, str]) -> ForkServer:
        """Start the server (it imports the agent in the background); returns at once."""
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "herder.forkserver", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.settimeout(ANSWER_TIMEOUT_S)
        return cls(process, ours)

    async def spawn(self, argv: list[str], env: dict[str, str], log: str) -> int:
        """Fork an agent running ``herder *argv`` with exactly ``env``; its pid."""
        return await asyncio.to_thread(self._request, {"argv": argv, "env": env, "log": log})

    def _request(self, request: dict[str, object]) -> int:
        with self._lock:
            try:
                self._sock.sendall(json.dumps(request).encode() + b"\n")
                line = self._answers.readline()
            except OSError as exc:  # a timeout, or the server is gone
                raise ProviderError(f"the fork server did not answer: {exc}") from exc
        if not line:
            code = self.process.poll()
            raise ProviderError(f"the fork server is gone (exit code {code})")
        answer = json.loads(line)
        if "pid" not in answer:
            raise ProviderError(f"the fork server refused: {answer.get('error')}")
        return int(answer["pid"])

    def close(self) -> None:
        """Let the server go (it exits on the closed socket); its agents live on."""
        self._answers.close()
        self._sock.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
