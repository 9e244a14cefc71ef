"""Backend channel (sync): one real grpc.Channel per backend address."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from .._core.backend_options import BackendChannelSpec
from .._core.health import WatchSpec
from .watch import StreamWatcher


def _ignore(state: grpc.ChannelConnectivity) -> None:
    pass


class BackendChannel:
    """A backend's own grpc.Channel, reporting connectivity and health upward."""

    def __init__(
        self,
        spec: BackendChannelSpec,
        *,
        name: str,
        watches: Sequence[WatchSpec],
        on_connectivity: Callable[[grpc.ChannelConnectivity], None],
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
        # The health Watch and the load report stream, each on its own.
        self._watchers = [
            StreamWatcher(
                _opener(self.grpc_channel.unary_stream(w.method, w.serializer, w.deserializer)),
                w.policy,
                w.report,
                on_error=w.on_error,
                name=f"{w.kind} {name}",
            )
            for w in watches
        ]
        # try_to_connect: connect now, so the backend is READY before the
        # first pick needs it.
        self.grpc_channel.subscribe(self._on_connectivity, try_to_connect=True)

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        # The watchers first: a new connection must be watched anew.
        for watcher in self._watchers:
            watcher.connectivity_changed(state)
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
        for watcher in self._watchers:
            watcher.stop()
        self.grpc_channel.unsubscribe(self._on_connectivity)
        self.grpc_channel.close()


def _opener(stream: Any) -> Callable[[Any], Any]:
    """Opens a watched stream: wait_for_ready, so it waits out a reconnection."""
    return lambda request: stream(request, wait_for_ready=True)
