"""Health checking (sync): one grpc.health.v1 Watch stream per backend.

gRFC A17 semantics: the backend may take calls only while the Watch says
SERVING; a server without the health service (UNIMPLEMENTED) is healthy; a
broken Watch is re-established with exponential backoff and jitter, reset
once a message arrives. The Watch uses wait_for_ready, so while the backend
is down it simply waits for the sub-channel to reconnect.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ._backoff import Backoff
from ._balancer import Health

_STATUS = {
    health_pb2.HealthCheckResponse.SERVING: Health.SERVING,
    health_pb2.HealthCheckResponse.NOT_SERVING: Health.NOT_SERVING,
    health_pb2.HealthCheckResponse.SERVICE_UNKNOWN: Health.SERVICE_UNKNOWN,
    health_pb2.HealthCheckResponse.UNKNOWN: Health.UNKNOWN,
}


def health_from_response(response: Any) -> Health:
    return _STATUS.get(response.status, Health.UNKNOWN)


class HealthWatcher:
    """Watches one backend's health on a daemon thread until stopped."""

    def __init__(
        self,
        channel: grpc.Channel,
        service: str,
        on_health: Callable[[Health], None],
        *,
        backoff: Backoff,
        name: str,
    ) -> None:
        self._watch = health_pb2_grpc.HealthStub(channel).Watch
        self._request = health_pb2.HealthCheckRequest(service=service)
        self._on_health = on_health
        self._backoff = backoff
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._call: Any = None
        # Set when the sub-channel leaves READY: the connection the last
        # Watch ran on is gone.
        self._connection_lost = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"grpc_leastconn health {name}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        attempt = 0
        while not self._stopped.is_set():
            with self._lock:
                if self._stopped.is_set():
                    return
                self._connection_lost.clear()
                self._call = call = self._watch(self._request, wait_for_ready=True)
            try:
                for response in call:
                    attempt = 0
                    self._on_health(health_from_response(response))
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
            if self._stopped.is_set():
                return
            if code is grpc.StatusCode.UNIMPLEMENTED:
                # gRFC A17: no retry on this connection; the next one is
                # watched again (the server may have been replaced).
                self._on_health(Health.UNIMPLEMENTED)
                self._connection_lost.wait()
                if self._stopped.is_set():
                    return
                self._on_health(Health.PENDING)
                continue
            # Until a new Watch answers, the backend's health is not known.
            self._on_health(Health.PENDING)
            if self._stopped.wait(self._backoff.delay(attempt)):
                return
            attempt += 1

    def connectivity_changed(self, state: grpc.ChannelConnectivity) -> None:
        if state is not grpc.ChannelConnectivity.READY:
            self._connection_lost.set()

    def stop(self) -> None:
        with self._lock:
            self._stopped.set()
            self._connection_lost.set()
            call = self._call
        if call is not None:
            call.cancel()
