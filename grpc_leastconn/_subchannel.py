"""Sub-channel (sync): one real grpc.Channel per backend address."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc

from ._target import Address, subchannel_options


class SubChannel:
    """A backend's own grpc.Channel, reporting its connectivity upward."""

    def __init__(
        self,
        address: Address,
        *,
        credentials: grpc.ChannelCredentials | None,
        options: Sequence[tuple[str, Any]] | None,
        compression: grpc.Compression | None,
        on_connectivity: Callable[[grpc.ChannelConnectivity], None],
    ) -> None:
        self.address = address
        merged = subchannel_options(options, address)
        target = address.subchannel_target()
        if credentials is None:
            self.channel = grpc.insecure_channel(target, merged, compression)
        else:
            self.channel = grpc.secure_channel(target, credentials, merged, compression)
        self._on_connectivity = on_connectivity
        # try_to_connect: connect now, so the first pick finds a live
        # connection, as grpcio's round_robin does once it is active.
        self.channel.subscribe(on_connectivity, try_to_connect=True)

    def close(self) -> None:
        self.channel.unsubscribe(self._on_connectivity)
        self.channel.close()
