"""Health checking (asyncio): one grpc.health.v1 Watch stream per backend, as a task.

Same rules as the sync watcher (gRFC A17): the backend may take calls only
while the Watch says SERVING; a server without the health service
(UNIMPLEMENTED) is healthy, and is watched again only on its next
connection; a broken Watch is re-established with exponential backoff and
jitter, reset once a message arrives. The Watch uses wait_for_ready, so
while the backend is down it waits for the sub-channel to reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .._backoff import Backoff
from .._balancer import Health
from .._health import health_from_response


class HealthWatcher:
    """Watches one backend's health on a task of the running loop until stopped."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
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
        self._stopped = asyncio.Event()
        # Set when the sub-channel leaves READY: the connection the last
        # Watch ran on is gone.
        self._connection_lost = asyncio.Event()
        self._call: Any = None
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"grpc_leastconn health {name}"
        )

    async def _run(self) -> None:
        attempt = 0
        while not self._stopped.is_set():
            self._connection_lost.clear()
            self._call = call = self._watch(self._request, wait_for_ready=True)
            try:
                async for response in call:
                    attempt = 0
                    self._on_health(health_from_response(response))
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
            except asyncio.CancelledError:
                # grpc.aio raises this for a call cancelled locally: by
                # stop(), or by the channel closing (which stop() precedes).
                if self._stopped.is_set():
                    return
                raise
            if self._stopped.is_set():
                return
            if code is grpc.StatusCode.UNIMPLEMENTED:
                # gRFC A17: no retry on this connection; the next one is
                # watched again (the server may have been replaced).
                self._on_health(Health.UNIMPLEMENTED)
                await self._connection_lost.wait()
                if self._stopped.is_set():
                    return
                self._on_health(Health.PENDING)
                continue
            # Until a new Watch answers, the backend's health is not known.
            self._on_health(Health.PENDING)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._backoff.delay(attempt)):
                    await self._stopped.wait()
            attempt += 1

    def connectivity_changed(self, state: grpc.ChannelConnectivity) -> None:
        if state is not grpc.ChannelConnectivity.READY:
            self._connection_lost.set()

    def stop(self) -> None:
        """End the watch; the task returns at once (see SubChannel.close)."""
        self._stopped.set()
        self._connection_lost.set()
        if self._call is not None:
            self._call.cancel()

    async def wait_stopped(self) -> None:
        await self._task
        self._call = None
