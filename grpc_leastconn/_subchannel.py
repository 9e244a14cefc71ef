"""Sub-channel (sync): one real grpc.Channel per backend address."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc

from ._backoff import Backoff
from ._balancer import Health
from ._health import HealthWatcher
from ._target import Address, subchannel_options


class SubChannel:
    """A backend's own grpc.Channel, reporting connectivity and health upward."""

    def __init__(
        self,
        address: Address,
        *,
        credentials: grpc.ChannelCredentials | None,
        options: Sequence[tuple[str, Any]] | None,
        compression: grpc.Compression | None,
        health_check_service: str | None,
        health_backoff: Backoff,
        on_connectivity: Callable[[grpc.ChannelConnectivity], None],
        on_health: Callable[[Health], None],
    ) -> None:
        self.address = address
        merged = subchannel_options(options, address)
        target = address.subchannel_target()
        if credentials is None:
            self.channel = grpc.insecure_channel(target, merged, compression)
        else:
            self.channel = grpc.secure_channel(target, credentials, merged, compression)
        self._on_connectivity = on_connectivity
        # try_to_connect: connect now, so the backend is READY before the
        # first pick needs it.
        self.channel.subscribe(on_connectivity, try_to_connect=True)
        self._health = (
            None
            if health_check_service is None
            else HealthWatcher(
                self.channel,
                health_check_service,
                on_health,
                backoff=health_backoff,
                name=str(address),
            )
        )

    def close(self) -> None:
        if self._health is not None:
            self._health.stop()
        self.channel.unsubscribe(self._on_connectivity)
        self.channel.close()
