"""Watched streams (asyncio): one server stream per backend and purpose, as a task.

The grpc.health.v1 Watch (gRFC A17) and, with ``server_load=True``, the ORCA
report stream (gRFC A51) are both a server stream per backend, read to its
end, then watched again after a backoff or on the next connection; what
each message and each end mean is the shared policy's (``_core.health``,
``_core.server_load``). The streams use wait_for_ready, so while the
backend is down they wait for the backend channel to reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import grpc

from .._core.health import StreamPolicy


class StreamWatcher:
    """Watches one stream of one backend on a task of the running loop until stopped."""

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
        self._stopped = asyncio.Event()
        # Set when the backend channel leaves READY: the connection the last
        # stream ran on is gone.
        self._connection_lost = asyncio.Event()
        # Set when it becomes READY again: a stream waiting out its backoff
        # is opened at once on the new connection (and on stop()).
        self._reconnected = asyncio.Event()
        self._call: Any = None
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"grpc_leastconn {name}"
        )

    def _tell(self, value: Any) -> None:
        if value is not None:
            self._report(value)

    async def _run(self) -> None:
        policy = self._policy
        while not self._stopped.is_set():
            self._connection_lost.clear()
            self._reconnected.clear()
            self._call = call = self._open(policy.request)
            try:
                async for message in call:
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
            except asyncio.CancelledError:
                # grpc.aio raises this for a call cancelled locally: by
                # stop(), or by the channel closing (which stop() precedes).
                if self._stopped.is_set():
                    return
                raise
            if self._stopped.is_set():
                return
            end = policy.ended(code)
            self._tell(end.report)
            if end.retry_after is None:
                await self._connection_lost.wait()
                if self._stopped.is_set():
                    return
                self._tell(policy.reconnected())
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(end.retry_after):
                        await self._reconnected.wait()
                if self._stopped.is_set():
                    return
                if self._reconnected.is_set():
                    self._tell(policy.reconnected())

    def connectivity_changed(self, state: grpc.ChannelConnectivity) -> None:
        if state is grpc.ChannelConnectivity.READY:
            self._reconnected.set()
        else:
            self._connection_lost.set()

    def stop(self) -> None:
        """End the watch; the task returns at once (see BackendChannel.close)."""
        self._stopped.set()
        self._connection_lost.set()
        self._reconnected.set()
        if self._call is not None:
            self._call.cancel()

    async def wait_stopped(self) -> None:
        await self._task
        self._call = None
