"""Health checking (sync): one grpc.health.v1 Watch stream per backend, on a thread.

The thread reads the Watch and follows the shared policy (``_core.health``,
gRFC A17) for every answer and every end. The Watch uses wait_for_ready, so
while the backend is down it simply waits for the backend channel to
reconnect.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from .._core.backend import Health
from .._core.backoff import Backoff
from .._core.health import WatchPolicy


class HealthWatcher:
    """Watches one backend's health on a daemon thread until stopped."""

    def __init__(
        self,
        channel: grpc.Channel,
        service: str,
        on_health: Callable[[Health], None],
        *,
        on_error: Callable[[str], None],
        backoff: Backoff,
        name: str,
    ) -> None:
        self._watch = health_pb2_grpc.HealthStub(channel).Watch
        self._policy = WatchPolicy(service, backoff)
        self._on_health = on_health
        self._on_error = on_error
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._call: Any = None
        # Set when the backend channel leaves READY: the connection the last
        # Watch ran on is gone.
        self._connection_lost = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"grpc_leastconn health {name}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        policy = self._policy
        while not self._stopped.is_set():
            with self._lock:
                if self._stopped.is_set():
                    return
                self._connection_lost.clear()
                self._call = call = self._watch(policy.request, wait_for_ready=True)
            try:
                for response in call:
                    self._on_health(policy.answered(response))
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
                if code is not grpc.StatusCode.UNIMPLEMENTED and not self._stopped.is_set():
                    # The connection's own words (Socket closed, ...), for the logs.
                    self._on_error(f"{code.name}: {exc.details()}")
            if self._stopped.is_set():
                return
            end = policy.ended(code)
            self._on_health(end.health)
            if end.retry_after is None:
                self._connection_lost.wait()
                if self._stopped.is_set():
                    return
                self._on_health(policy.reconnected())
            elif self._stopped.wait(end.retry_after):
                return

    def connectivity_changed(self, state: grpc.ChannelConnectivity) -> None:
        if state is not grpc.ChannelConnectivity.READY:
            self._connection_lost.set()

    def stop(self) -> None:
        with self._lock:
            self._stopped.set()
            self._connection_lost.set()
            call = self._call
        # A wrapped backend channel (an interceptor's) may hand back a plain
        # iterator with no cancel(); closing the backend channel, which
        # follows, ends the Watch all the same.
        cancel = getattr(call, "cancel", None)
        if cancel is not None:
            cancel()
