"""Example servers as real subprocesses, for failover tests that SIGKILL them.

An in-process server stops politely (GOAWAY, health NOT_SERVING first); a
killed process just vanishes, its sockets reset by the kernel. Shared by the
sync and asyncio front ends' failover tests, which hold both to the same
promises.
"""

from __future__ import annotations

import asyncio
import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
import pytest
from helpers import ROOT

SERVER_SCRIPT = ROOT / "examples" / "server.py"
RPC_TIMEOUT = 5.0
# A cold interpreter importing grpcio on a busy 2-core machine.
SPAWN_TIMEOUT_S = 30.0
SPAWN_ATTEMPTS = 5
# The promises under test.
FAILURES_ALLOWED_FOR_S = 1.0
RELEASE_WITHIN_S = 2.0
FAIL_FAST_WITHIN_S = 1.0
REUSE_WITHIN_S = 15.0
STREAM_MS = 5000
FRAME_MS = 100
LOAD_THREADS = 4
LOAD_LIMIT_S = 30.0
# C-core's details when a backend channel has no connection to send on: what a
# re-pick exists to hide.
PICK_FAILURES = ("failed to connect to all addresses", "connections to all backends failing")


# -- backend processes ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """One ``examples/server.py`` process serving one backend on 127.0.0.1."""

    port: int
    proc: subprocess.Popen[str]
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)

    def reap(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """Terminate a child we started, killing it if it does not exit; reap it (bounded)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait(5.0)


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    # Drains the pipe so the server never blocks on a full one; ends at EOF.
    for line in stream:
        lines.put(line)
    lines.put(None)


def _spawn_once(port: int, log_dir: Path) -> ServerProcess | None:
    stderr = (log_dir / f"server-{port}-{time.monotonic_ns()}.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, str(SERVER_SCRIPT), "--host", "127.0.0.1", "--port", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    stderr.close()
    server = ServerProcess(port, proc)
    assert proc.stdout is not None
    threading.Thread(target=_pump, args=(proc.stdout, server.lines), daemon=True).start()
    try:
        line = server.lines.get(timeout=SPAWN_TIMEOUT_S)
    except queue.Empty:
        server.reap()
        raise AssertionError(
            f"server on port {port} said nothing in {SPAWN_TIMEOUT_S:g}s"
        ) from None
    if line is not None and json.loads(line).get("event") == "listening":
        return server
    # Exited before listening: the port was taken between our probe and its bind.
    server.reap()
    return None


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: ``spawn()`` on a free port, ``spawn(port)`` on that one; reaped at teardown."""
    started: list[ServerProcess] = []

    def start(port: int | None = None) -> ServerProcess:
        for _ in range(SPAWN_ATTEMPTS):
            server = _spawn_once(free_port() if port is None else port, tmp_path)
            if server is not None:
                started.append(server)
                return server
            if port is not None:
                # The same port again: wait for whatever holds it to let go.
                time.sleep(0.2)
        raise AssertionError(f"no server could listen after {SPAWN_ATTEMPTS} attempts")

    yield start
    for server in started:
        server.reap()


@dataclass(frozen=True)
class Outcome:
    started: float
    ended: float
    code: grpc.StatusCode
    details: str
    backend: str


def failures(outcomes: list[Outcome], since: float = float("-inf")) -> list[Outcome]:
    return [o for o in outcomes if o.code is not grpc.StatusCode.OK and o.started >= since]


def ipv4_target(servers: list[ServerProcess]) -> str:
    return "ipv4:" + ",".join(s.address for s in servers)


def eligible(channel: Any, key: str) -> bool:
    return any(s.eligible for s in channel.backends() if s.address == key and not s.draining)


class Watch:
    """Times, from a start, when each named condition first held (polled each ms).

    Polled by a thread of its own (``in_thread``) for the sync channel, whose
    state changes on grpc's threads; by a task (``watched``) for an asyncio
    channel, whose state changes on the loop only.
    """

    def __init__(self, conditions: dict[str, Callable[[], bool]], limit: float) -> None:
        self.start = time.monotonic()
        self.seen: dict[str, float] = {}
        self._conditions = conditions
        self._limit = limit
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        """Record what holds now; True once all have held or the limit has passed."""
        now = time.monotonic()
        for name, condition in self._conditions.items():
            if name not in self.seen and condition():
                self.seen[name] = now - self.start
        return len(self.seen) == len(self._conditions) or now - self.start >= self._limit

    def in_thread(self) -> Watch:
        def poll() -> None:
            while not self.check():
                time.sleep(0.001)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def result(self) -> dict[str, float]:
        assert self._thread is not None
        self._thread.join(self._limit + 1)
        return self.seen

    async def watched(self) -> dict[str, float]:
        while not self.check():
            await asyncio.sleep(0.001)
        return self.seen
