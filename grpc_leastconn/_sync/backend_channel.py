"""Backend channel (sync): one real grpc.Channel per backend address."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from .._core.backend_options import BackendChannelSpec
from .._core.health import WatchSpec
from .watch import StreamWatcher

# How long a close waits for the first report of a channel started just
# before (see close()); it comes within milliseconds unless the process is
# starved of CPU.
_FIRST_REPORT_TIMEOUT_S = 2.0


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
        self._name = name
        self._watches = tuple(watches)
        self._closing_lock = threading.Lock()
        self._closing = False
        self._watchers: list[StreamWatcher] = []
        self._started = False
        # Set by the first connectivity report: grpcio's poller has looked once.
        self._first_report = threading.Event()
        # Whether it has been anything but IDLE (it starts IDLE).
        self._left_idle = False

    def start(self) -> None:
        """Watch its connectivity (connecting now) and its streams; nothing once closed.

        Apart from construction, so that the front end can make the channel
        known to its backend before the first report about it arrives.
        """
        with self._closing_lock:
            if self._closing:
                return
            # The health Watch and the load report stream, each on its own.
            self._watchers = [
                StreamWatcher(
                    _opener(self.grpc_channel.unary_stream(w.method, w.serializer, w.deserializer)),
                    w.policy,
                    w.report,
                    on_error=w.on_error,
                    name=f"{w.kind} {self._name}",
                )
                for w in self._watches
            ]
            # try_to_connect: connect now, so the backend is READY before the
            # first pick needs it.
            self.grpc_channel.subscribe(self._on_connectivity, try_to_connect=True)
            self._started = True

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        self._first_report.set()
        # The watchers first: a new connection must be watched anew.
        for watcher in self._watchers:
            watcher.connectivity_changed(state)
        if state is not grpc.ChannelConnectivity.IDLE:
            self._left_idle = True
        elif self._left_idle:
            # An idle channel (grpc.client_idle_timeout_ms) waits for a call
            # to reconnect, but calls only go to READY backends: ask for the
            # connection. A subscription with try_to_connect is the public
            # way; the connectivity poller acts on it within 0.2 s. Not for
            # the first IDLE, which start() has asked to leave already: the
            # request stays pending until the poller's next look, and a close
            # meanwhile (a channel closed soon after it opened) would have it
            # ask a closed channel and fail. Never while closing, for that.
            with self._closing_lock:
                if not self._closing:
                    self.grpc_channel.subscribe(_ignore, try_to_connect=True)
                    self.grpc_channel.unsubscribe(_ignore)
        self._report_connectivity(state)

    def stop_watching(self) -> None:
        """Stop reporting and watching; close() must follow.

        Wakes no thread: the watchers, told to stop, end when closing the
        channel ends their streams, and grpcio's connectivity poller ends at
        its next look (within 0.2 s) once nothing is subscribed. A close
        waits for that look, so closing many channels stops them all first.
        """
        with self._closing_lock:
            self._closing = True
        # After start() (or instead of it): the watchers are all known now.
        for watcher in self._watchers:
            watcher.stop()
        self.grpc_channel.unsubscribe(self._on_connectivity)

    def close(self) -> None:
        """Close the channel, cancelling its RPCs (the watched streams among them)."""
        self.stop_watching()
        if self._started:
            # A poller that has not looked yet would look at a closed channel,
            # and die with a traceback on stderr (grpcio does not expect it);
            # once it has, a close waits for its look in progress.
            self._first_report.wait(_FIRST_REPORT_TIMEOUT_S)
        self.grpc_channel.close()


def _opener(stream: Any) -> Callable[[Any], Any]:
    """Opens a watched stream: wait_for_ready, so it waits out a reconnection."""
    return lambda request: stream(request, wait_for_ready=True)
