"""Sync channel: the ``grpc.Channel`` users hold, and the factories that build it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Unpack

import grpc

from .._core.foundation import ChannelViews
from .._core.seams import DEFAULT_SEAMS, Seams
from .._core.settings import Options, Tuning, check_credentials, make_settings
from .calls import _StreamStream, _StreamUnary, _UnaryStream, _UnaryUnary
from .core import Core


class LeastConnChannel(ChannelViews, grpc.Channel):
    """A grpc.Channel sending each new RPC to the backend with the fewest in flight.

    Build it with ``insecure_channel()`` or ``secure_channel()``.
    """

    def __init__(self, core: Core) -> None:
        self._core: Core = core

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.UnaryUnaryMultiCallable[Any, Any]:
        return _UnaryUnary(
            self._core, method, request_serializer, response_deserializer, _registered_method
        )

    def unary_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.UnaryStreamMultiCallable[Any, Any]:
        return _UnaryStream(
            self._core, method, request_serializer, response_deserializer, _registered_method
        )

    def stream_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.StreamUnaryMultiCallable[Any, Any]:
        return _StreamUnary(
            self._core, method, request_serializer, response_deserializer, _registered_method
        )

    def stream_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: bool | None = False,
    ) -> grpc.StreamStreamMultiCallable[Any, Any]:
        return _StreamStream(
            self._core, method, request_serializer, response_deserializer, _registered_method
        )

    def subscribe(
        self,
        callback: Callable[[grpc.ChannelConnectivity], None],
        try_to_connect: bool = False,
    ) -> None:
        """Report the aggregate state: READY while any eligible backend is."""
        self._core.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        self._core.unsubscribe(callback)

    def close(self) -> None:
        """Close every backend channel; RPCs in flight are cancelled."""
        self._core.close()

    def __enter__(self) -> LeastConnChannel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<LeastConnChannel target={self.target!r}>"


def insecure_channel(
    target: str | Sequence[str],
    options: Options = None,
    compression: grpc.Compression | None = None,
    **tuning: Unpack[Tuning],
) -> LeastConnChannel:
    """A least-connection channel over plaintext connections.

    See the README for every keyword; ``secure_channel`` takes the same.
    """
    return open_channel(target, options=options, compression=compression, **tuning)


def secure_channel(
    target: str | Sequence[str],
    credentials: grpc.ChannelCredentials,
    options: Options = None,
    compression: grpc.Compression | None = None,
    **tuning: Unpack[Tuning],
) -> LeastConnChannel:
    """A least-connection channel over TLS (or other channel credentials)."""
    check_credentials(credentials)
    return open_channel(
        target, credentials=credentials, options=options, compression=compression, **tuning
    )


def open_channel(
    target: str | Sequence[str],
    *,
    credentials: grpc.ChannelCredentials | None = None,
    options: Options = None,
    compression: grpc.Compression | None = None,
    seams: Seams = DEFAULT_SEAMS,
    **tuning: Unpack[Tuning],
) -> LeastConnChannel:
    """What both factories do, with the declared seams (see ``Seams``) for tests."""
    factory = "insecure_channel" if credentials is None else "secure_channel"
    settings = make_settings(factory, target, credentials, options, compression, tuning)
    return LeastConnChannel(Core(settings, seams))
