"""Health checking (asyncio): one grpc.health.v1 Watch stream per backend, as a task.

The task reads the Watch and follows the shared policy (``_core.health``,
gRFC A17) for every answer and every end. The Watch uses wait_for_ready, so
while the backend is down it waits for the backend channel to reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from .._core.backend import Health
from .._core.backoff import Backoff
from .._core.health import WatchPolicy


class HealthWatcher:
    """Watches one backend's health on a task of the running loop until stopped."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
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
        self._stopped = asyncio.Event()
        # Set when the backend channel leaves READY: the connection the last
        # Watch ran on is gone.
        self._connection_lost = asyncio.Event()
        self._call: Any = None
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"grpc_leastconn health {name}"
        )

    async def _run(self) -> None:
        policy = self._policy
        while not self._stopped.is_set():
            self._connection_lost.clear()
            self._call = call = self._watch(policy.request, wait_for_ready=True)
            try:
                async for response in call:
                    self._on_health(policy.answered(response))
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
                if code is not grpc.StatusCode.UNIMPLEMENTED and not self._stopped.is_set():
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
            self._on_health(end.health)
            if end.retry_after is None:
                await self._connection_lost.wait()
                if self._stopped.is_set():
                    return
                self._on_health(policy.reconnected())
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(end.retry_after):
                        await self._stopped.wait()

    def connectivity_changed(self, state: grpc.ChannelConnectivity) -> None:
        if state is not grpc.ChannelConnectivity.READY:
            self._connection_lost.set()

    def stop(self) -> None:
        """End the watch; the task returns at once (see BackendChannel.close)."""
        self._stopped.set()
        self._connection_lost.set()
        if self._call is not None:
            self._call.cancel()

    async def wait_stopped(self) -> None:
        await self._task
        self._call = None
