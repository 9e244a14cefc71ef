"""Asyncio channel: the ``grpc.aio.Channel`` users hold, and the factories that build it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Unpack

import grpc

from .._core.foundation import ChannelViews
from .._core.seams import DEFAULT_SEAMS, Seams
from .._core.settings import Options, Tuning, check_credentials, make_settings
from .calls import _StreamStream, _StreamUnary, _UnaryStream, _UnaryUnary
from .core import Core, Interceptors

_READY = grpc.ChannelConnectivity.READY


class LeastConnChannel(ChannelViews, grpc.aio.Channel):
    """A grpc.aio.Channel sending each new RPC to the backend with the fewest in flight.

    Build it with ``insecure_channel()`` or ``secure_channel()`` inside a
    coroutine; use it on that event loop only.
    """

    def __init__(self, core: Core) -> None:
        self._core: Core = core

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.UnaryUnaryMultiCallable[Any, Any]:
        return _UnaryUnary(
            self._core, method, request_serializer, response_deserializer, _registered_method
        )

    def unary_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.UnaryStreamMultiCallable[Any, Any]:
        return _UnaryStream(
            self._core, method, request_serializer, response_deserializer, _registered_method
        )

    def stream_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.StreamUnaryMultiCallable[Any, Any]:
        return _StreamUnary(
            self._core, method, request_serializer, response_deserializer, _registered_method
        )

    def stream_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.StreamStreamMultiCallable[Any, Any]:
        return _StreamStream(
            self._core, method, request_serializer, response_deserializer, _registered_method
        )

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """The aggregate state: READY while any backend is eligible.

        Otherwise CONNECTING while some backend is on its way, IDLE when all
        are idle, else TRANSIENT_FAILURE; SHUTDOWN once closed.
        """
        return self._core.state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._core.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        """Wait until some backend is eligible."""
        state = self.get_state(try_to_connect=True)
        while state is not _READY:
            await self.wait_for_state_change(state)
            state = self.get_state(try_to_connect=True)

    async def close(self, grace: float | None = None) -> None:
        """Close every backend channel; RPCs still running after ``grace`` seconds are cancelled."""
        await self._core.close(grace)

    async def __aenter__(self) -> LeastConnChannel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<grpc_leastconn.aio.LeastConnChannel target={self.target!r}>"


def insecure_channel(
    target: str | Sequence[str],
    options: Options = None,
    compression: grpc.Compression | None = None,
    *,
    interceptors: Interceptors = None,
    **tuning: Unpack[Tuning],
) -> LeastConnChannel:
    """A least-connection ``grpc.aio`` channel over plaintext connections.

    Call it inside a coroutine: the channel's tasks run on the running event
    loop, and it is to be used on that loop only. The keywords are those of
    ``grpc_leastconn.insecure_channel`` (see the README), plus:

    ``interceptors``: ``grpc.aio`` client interceptors, given to every
    backend's channel. They run per call after the pick, on the backend
    chosen for it: a call an interceptor retries goes to the same backend
    and counts once. They also see each backend's grpc.health.v1 Watch,
    which shares the backend's channel (turn health checking off with
    ``health_check_service=None``).
    """
    return open_channel(
        target, options=options, compression=compression, interceptors=interceptors, **tuning
    )


def secure_channel(
    target: str | Sequence[str],
    credentials: grpc.ChannelCredentials,
    options: Options = None,
    compression: grpc.Compression | None = None,
    *,
    interceptors: Interceptors = None,
    **tuning: Unpack[Tuning],
) -> LeastConnChannel:
    """A least-connection ``grpc.aio`` channel over TLS (or other channel credentials).

    Same keywords as ``insecure_channel``, interceptors included.
    """
    check_credentials(credentials)
    return open_channel(
        target,
        credentials=credentials,
        options=options,
        compression=compression,
        interceptors=interceptors,
        **tuning,
    )


def open_channel(
    target: str | Sequence[str],
    *,
    credentials: grpc.ChannelCredentials | None = None,
    options: Options = None,
    compression: grpc.Compression | None = None,
    interceptors: Interceptors = None,
    seams: Seams = DEFAULT_SEAMS,
    **tuning: Unpack[Tuning],
) -> LeastConnChannel:
    """What both factories do, with the declared seams (see ``Seams``) for tests."""
    factory = "insecure_channel" if credentials is None else "secure_channel"
    settings = make_settings(factory, target, credentials, options, compression, tuning)
    checked = _check_interceptors(interceptors)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            "grpc_leastconn.aio channels must be created inside a coroutine: "
            "their tasks run on the running event loop"
        ) from None
    return LeastConnChannel(Core(settings, checked, loop, seams))


def _check_interceptors(interceptors: object) -> tuple[grpc.aio.ClientInterceptor, ...] | None:
    if interceptors is None:
        return None
    if not isinstance(interceptors, (list, tuple)):
        raise TypeError(
            f"interceptors must be a list of grpc.aio client interceptors, "
            f"not {type(interceptors).__name__}"
        )
    for index, interceptor in enumerate(interceptors):
        if not isinstance(interceptor, grpc.aio.ClientInterceptor):
            raise TypeError(
                f"interceptors[{index}] must be a grpc.aio client interceptor "
                f"(e.g. grpc.aio.UnaryUnaryClientInterceptor), not {type(interceptor).__name__}"
            )
    return tuple(interceptors)
