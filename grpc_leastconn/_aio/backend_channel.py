"""Backend channel (asyncio): one real grpc.aio.Channel per backend address."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from .._core.backend_options import BackendChannelSpec
from .._core.health import WatchSpec
from .watch import StreamWatcher

_READY = grpc.ChannelConnectivity.READY
_SHUTDOWN = grpc.ChannelConnectivity.SHUTDOWN
# Dead references to RPCs are swept after this many new ones, or after as
# many as the last sweep left alive (so the list stays within twice that).
_SWEEP_AT_LEAST = 1024


class BackendChannel:
    """A backend's own grpc.aio.Channel, reporting connectivity and health upward.

    Both reports arrive from tasks on the loop that built it, so they need no
    lock. Build it inside a coroutine.
    """

    def __init__(
        self,
        spec: BackendChannelSpec,
        *,
        name: str,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None,
        watches: Sequence[WatchSpec],
        on_connectivity: Callable[[grpc.ChannelConnectivity], None],
    ) -> None:
        options = list(spec.options)
        # By keyword: whoever wraps grpcio's factories (OpenTelemetry's
        # instrumentor adds interceptors=) must find them where they look.
        if spec.credentials is None:
            self.grpc_channel = grpc.aio.insecure_channel(
                spec.target,
                options=options,
                compression=spec.compression,
                interceptors=interceptors,
            )
        else:
            self.grpc_channel = grpc.aio.secure_channel(
                spec.target,
                spec.credentials,
                options=options,
                compression=spec.compression,
                interceptors=interceptors,
            )
        self._report_connectivity = on_connectivity
        # The RPCs sent through this channel, for the front end to settle
        # once it is closed (see FinishedCall). Weak references in a list,
        # swept now and then: a WeakSet would run a callback per RPC.
        self._rpcs: list[weakref.ref[Any]] = []
        self._until_sweep = _SWEEP_AT_LEAST
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
        self._watcher = asyncio.get_running_loop().create_task(
            _watch_connectivity(self.grpc_channel, self._on_connectivity),
            name=f"grpc_leastconn connectivity {name}",
        )

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        # The watchers first: a new connection must be watched anew.
        for watcher in self._watchers:
            watcher.connectivity_changed(state)
        self._report_connectivity(state)

    def remember(self, rpc: Any) -> None:
        """Remember, weakly, an RPC sent through this channel."""
        self._rpcs.append(weakref.ref(rpc))
        self._until_sweep -= 1
        if not self._until_sweep:
            rpcs = self._rpcs
            rpcs[:] = [ref for ref in rpcs if ref() is not None]
            self._until_sweep = max(_SWEEP_AT_LEAST, len(rpcs))

    def remembered(self) -> list[Any]:
        """The RPCs sent through this channel that are still alive."""
        return [rpc for ref in self._rpcs if (rpc := ref()) is not None]

    @property
    def remembered_count(self) -> int:
        """References kept, dead ones included until the next sweep (for tests)."""
        return len(self._rpcs)

    def connect(self) -> None:
        self.grpc_channel.get_state(try_to_connect=True)

    async def close(self, grace: float | None = None) -> None:
        """Close the channel, cancelling its RPCs after ``grace``; stop reporting."""
        # Ended through their own loops, not cancelled: a cancelled task's
        # traceback refers back to its frames, which would keep the stream's
        # call, and with it the backend's connection, until a garbage
        # collection.
        for watcher in self._watchers:
            watcher.stop()
        for watcher in self._watchers:
            await watcher.wait_stopped()
        await self.grpc_channel.close(grace)
        # Cancelled: grpc.aio reports SHUTDOWN to a watcher only once every
        # call object of the channel is gone, and callers may hold theirs.
        self._watcher.cancel()


async def _watch_connectivity(
    channel: grpc.aio.Channel, report: Callable[[grpc.ChannelConnectivity], None]
) -> None:
    # try_to_connect on every change: connect now, so the backend is READY
    # before the first pick needs it, and reconnect at once after the channel
    # goes IDLE (client idle timeout), since least-connection never sends a
    # call to a backend that is not READY, which is what would wake it.
    state = channel.get_state(try_to_connect=True)
    while True:
        report(state)
        if state is _SHUTDOWN:
            return
        with contextlib.suppress(grpc.aio.UsageError):
            # Raised once the channel is closed: its state is SHUTDOWN then.
            await channel.wait_for_state_change(state)
        previous, state = state, channel.get_state(try_to_connect=True)
        if previous is _READY and state is _READY:
            # It left READY and reconnected before we looked: a new
            # connection, whose server the health watcher must ask anew.
            report(grpc.ChannelConnectivity.CONNECTING)


def _opener(stream: Any) -> Callable[[Any], Any]:
    """Opens a watched stream: wait_for_ready, so it waits out a reconnection."""
    return lambda request: stream(request, wait_for_ready=True)
