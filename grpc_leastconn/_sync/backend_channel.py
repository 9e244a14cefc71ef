"""Backend channel (sync): one real grpc.Channel per backend address."""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc

from .._core.backend import Health
from .._core.backend_options import BackendChannelSpec
from .._core.backoff import Backoff
from .health import HealthWatcher


def _ignore(state: grpc.ChannelConnectivity) -> None:
    pass


class BackendChannel:
    """A backend's own grpc.Channel, reporting connectivity and health upward."""

    def __init__(
        self,
        spec: BackendChannelSpec,
        *,
        name: str,
        health_check_service: str | None,
        health_backoff: Backoff,
        on_connectivity: Callable[[grpc.ChannelConnectivity], None],
        on_health: Callable[[Health], None],
        on_error: Callable[[str], None],
    ) -> None:
        options = list(spec.options)
        # By keyword, as the asyncio twin: wrappers of grpcio's factories
        # (OpenTelemetry's instrumentor) look there.
        if spec.credentials is None:
            self.grpc_channel = grpc.insecure_channel(
                spec.target, options=options, compression=spec.compression
            )
        else:
            self.grpc_channel = grpc.secure_channel(
                spec.target, spec.credentials, options=options, compression=spec.compression
            )
        self._report_connectivity = on_connectivity
        self._closing_lock = threading.Lock()
        self._closing = False
        self._health = (
            None
            if health_check_service is None
            else HealthWatcher(
                self.grpc_channel,
                health_check_service,
                on_health,
                on_error=on_error,
                backoff=health_backoff,
                name=name,
            )
        )
        # try_to_connect: connect now, so the backend is READY before the
        # first pick needs it.
        self.grpc_channel.subscribe(self._on_connectivity, try_to_connect=True)

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        # The health watcher first: a new connection must be watched anew.
        if self._health is not None:
            self._health.connectivity_changed(state)
        if state is grpc.ChannelConnectivity.IDLE:
            # An idle channel (grpc.client_idle_timeout_ms) waits for a call
            # to reconnect, but calls only go to READY backends: ask for the
            # connection. A subscription with try_to_connect is the public
            # way; the connectivity poller acts on it within 0.2 s. Never
            # while closing: the poller would ask a closed channel and fail.
            with self._closing_lock:
                if not self._closing:
                    self.grpc_channel.subscribe(_ignore, try_to_connect=True)
                    self.grpc_channel.unsubscribe(_ignore)
        self._report_connectivity(state)

    def close(self) -> None:
        with self._closing_lock:
            self._closing = True
        if self._health is not None:
            self._health.stop()
        self.grpc_channel.unsubscribe(self._on_connectivity)
        self.grpc_channel.close()
