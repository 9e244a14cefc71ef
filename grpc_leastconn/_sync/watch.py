"""Watched streams (sync): one server stream per backend and purpose, on a thread.

The grpc.health.v1 Watch (gRFC A17) and, with ``server_load=True``, the ORCA
report stream (gRFC A51) are both a server stream per backend, read to its
end, then watched again after a backoff or on the next connection; what
each message and each end mean is the shared policy's (``_core.health``,
``_core.server_load``). The streams use wait_for_ready, so while the
backend is down they simply wait for the backend channel to reconnect.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc

from .._core.health import StreamPolicy


class StreamWatcher:
    """Watches one stream of one backend on a daemon thread until stopped."""

    def __init__(
        self,
        open_stream: Callable[[Any], Any],
        policy: StreamPolicy,
        report: Callable[[Any], None],
        *,
        on_error: Callable[[str], None] | None,
        name: str,
    ) -> None:
        self._open = open_stream
        self._policy = policy
        self._report = report
        self._on_error = on_error
        self._stopped = threading.Event()
        # Held to open a stream, so that none opens once stopped.
        self._lock = threading.Lock()
        # Set when the backend channel leaves READY: the connection the last
        # stream ran on is gone.
        self._connection_lost = threading.Event()
        # Set when it becomes READY again: a stream waiting out its backoff
        # is opened at once on the new connection (and on stop()).
        self._reconnected = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"grpc_leastconn {name}", daemon=True
        )
        self._thread.start()

    def _tell(self, value: Any) -> None:
        if value is not None:
            self._report(value)

    def _run(self) -> None:
        policy = self._policy
        while not self._stopped.is_set():
            with self._lock:
                if self._stopped.is_set():
                    return
                self._connection_lost.clear()
                self._reconnected.clear()
                call = self._open(policy.request)
            try:
                for message in call:
                    self._tell(policy.answered(message))
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
                if (
                    self._on_error is not None
                    and code is not grpc.StatusCode.UNIMPLEMENTED
                    and not self._stopped.is_set()
                ):
                    # The connection's own words (Socket closed, ...), for the logs.
                    self._on_error(f"{code.name}: {exc.details()}")
            if self._stopped.is_set():
                return
            end = policy.ended(code)
            self._tell(end.report)
            if end.retry_after is None:
                self._connection_lost.wait()
                if self._stopped.is_set():
                    return
                self._tell(policy.reconnected())
            elif self._reconnected.wait(end.retry_after):
                if self._stopped.is_set():
                    return
                self._tell(policy.reconnected())

    def connectivity_changed(self, state: grpc.ChannelConnectivity) -> None:
        if state is grpc.ChannelConnectivity.READY:
            self._reconnected.set()
        else:
            self._connection_lost.set()

    def stop(self) -> None:
        """Stop watching: the stream ends when its backend channel closes, which follows.

        Not cancelled here: closing the channel cancels it (a wrapped channel's
        plain iterator too, which has no cancel()), and a cancel would wake
        this watcher's thread, and grpcio's of the stream, while the closer
        still has many channels to close.
        """
        with self._lock:
            self._stopped.set()
            self._connection_lost.set()
            self._reconnected.set()
