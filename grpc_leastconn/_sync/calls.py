"""Sync calls: the balanced multicallables and the calls they return.

Each RPC is counted from the pick until it truly ends (gRFC A48: "decrement
regardless of status"):

- blocking calls (``__call__``, ``with_call``) release in ``finally``;
- futures and streaming calls release in grpcio's done callback;
- a response iterator the caller drops is cancelled by our wrapper's
  ``__del__`` (grpcio keeps a dropped call alive and streaming: its done
  callback holds the call), and the cancellation fires the done callback.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import grpc

from .._core.backend import Backend
from .._core.balancer import log
from .._core.rules import Factories, InnerCache, Release, error_outcome, may_repick
from .._core.rules import Serializer as _Serializer
from .backend_channel import BackendChannel
from .core import Core
from .failed import FailedCall
from .streams import Iterated, StreamingCall

_Backend = Backend[BackendChannel]
_OK = grpc.StatusCode.OK


class _Future(Protocol):
    """What we use of the call or future an inner multicallable returns."""

    def add_done_callback(self, fn: Callable[[Any], None]) -> None: ...

    def cancel(self) -> bool: ...


class _InnerUnaryResponse(Protocol):
    """A backend channel's unary_unary or stream_unary multicallable, as we call it."""

    def __call__(
        self,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> Any: ...

    def with_call(
        self,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> tuple[Any, grpc.Call]: ...

    def future(
        self,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> _Future: ...


class _InnerStreamResponse(Protocol):
    """A backend channel's unary_stream or stream_stream multicallable, as we call it."""

    def __call__(
        self,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> Any: ...


_Factories = Factories[_InnerUnaryResponse, _InnerStreamResponse]


_InnerT = TypeVar("_InnerT", _InnerUnaryResponse, _InnerStreamResponse)


class _MultiCallable(InnerCache[_InnerT]):
    __slots__ = ()
    _core: Core

    def _start_call(
        self,
        start: Callable[[_InnerT, float | None], _Future],
        wait_for_ready: bool | None,
        timeout: float | None,
    ) -> Any:
        """A call released by its done callback; ``start(inner, timeout)`` begins it."""
        core, cost = self._core, self.cost
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            backend = core.acquire(wait_for_ready, timeout, cost)
        except FailedCall as failure:
            return failure
        if deadline is not None:
            # Time spent waiting for a backend counts against the deadline.
            timeout = max(0.0, deadline - time.monotonic())
        try:
            call = start(self._inner_for(backend), timeout)
        except BaseException:
            core.release(backend, None, cost)
            raise
        add_done_callback = getattr(call, "add_done_callback", None)
        if add_done_callback is None:
            # Someone else's wrapper of the backend channel (an interceptor)
            # handed back a plain iterator: the RPC ends when iteration does.
            return Iterated(call, core, backend, cost)
        add_done_callback(Release(core, backend, cost))
        return call


class _UnaryResponse(_MultiCallable[_InnerUnaryResponse]):
    """unary_unary and stream_unary: blocking calls as well as futures."""

    __slots__ = ()

    def _blocking(
        self,
        with_call: bool,
        repick: bool,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> Any:
        """A blocking call, released in ``finally``; re-picked if it never left."""
        core, cost = self._core, self.cost
        reads_load = core.reads_load
        deadline = None if timeout is None else time.monotonic() + timeout
        backend = core.acquire(wait_for_ready, timeout, cost)
        failed: list[_Backend] = []
        while True:
            if deadline is not None:
                # Time spent waiting for a backend counts against the deadline.
                timeout = max(0.0, deadline - time.monotonic())
            inner = self._inner_for(backend)
            # How the attempt ended, for the failure signals; None: it never
            # reached the backend, so it says nothing about it.
            code: grpc.StatusCode | None = None
            text: str | None = None
            trailers = None
            try:
                # wait_for_ready is ours to honour, at the pick: passed down, it
                # would pin the RPC to this one backend until it came back.
                if reads_load:
                    # The call, for its trailers' load report.
                    response, call = inner.with_call(
                        request, timeout, metadata, credentials, None, compression
                    )
                    trailers = call.trailing_metadata()
                    code = _OK
                    return (response, call) if with_call else response
                response = (inner.with_call if with_call else inner)(
                    request, timeout, metadata, credentials, None, compression
                )
                code = _OK
                return response
            except grpc.RpcError as error:
                if reads_load:
                    trailers = getattr(error, "trailing_metadata", lambda: None)()
                if not (repick and may_repick(error, len(failed), backend)):
                    code, text = error_outcome(error, backend)
                    raise
                text = error_outcome(error, backend)[1]
            finally:
                core.release(backend, code, cost, text, trailers)
            failed.append(backend)
            log.debug("RPC never reached %s; re-picking", backend.key)
            backend = core.repick(failed, wait_for_ready, deadline, cost)


class _UnaryUnary(_UnaryResponse, grpc.UnaryUnaryMultiCallable):  # type: ignore[type-arg]
    __slots__ = ()

    def _open(self, channel: _Factories, serializer: _Serializer) -> _InnerUnaryResponse:
        return channel.unary_unary(
            self._method, serializer, self._deserializer, _registered_method=self._registered
        )

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._blocking(
            False, True, request, timeout, metadata, credentials, wait_for_ready, compression
        )

    def with_call(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._blocking(
            True, True, request, timeout, metadata, credentials, wait_for_ready, compression
        )

    def future(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._start_call(
            lambda inner, timeout: inner.future(
                request, timeout, metadata, credentials, None, compression
            ),
            wait_for_ready,
            timeout,
        )


class _UnaryStream(_MultiCallable[_InnerStreamResponse], grpc.UnaryStreamMultiCallable):  # type: ignore[type-arg]
    __slots__ = ()

    def _open(self, channel: _Factories, serializer: _Serializer) -> _InnerStreamResponse:
        return channel.unary_stream(
            self._method, serializer, self._deserializer, _registered_method=self._registered
        )

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        call = self._start_call(
            lambda inner, timeout: inner(
                request, timeout, metadata, credentials, None, compression
            ),
            wait_for_ready,
            timeout,
        )
        return call if isinstance(call, FailedCall) else StreamingCall(call)


class _StreamUnary(_UnaryResponse, grpc.StreamUnaryMultiCallable):  # type: ignore[type-arg]
    __slots__ = ()

    def _open(self, channel: _Factories, serializer: _Serializer) -> _InnerUnaryResponse:
        return channel.stream_unary(
            self._method, serializer, self._deserializer, _registered_method=self._registered
        )

    def __call__(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        # No re-pick: grpcio may already have consumed requests from the
        # iterator, which cannot be replayed.
        return self._blocking(
            False,
            False,
            request_iterator,
            timeout,
            metadata,
            credentials,
            wait_for_ready,
            compression,
        )

    def with_call(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._blocking(
            True,
            False,
            request_iterator,
            timeout,
            metadata,
            credentials,
            wait_for_ready,
            compression,
        )

    def future(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        return self._start_call(
            lambda inner, timeout: inner.future(
                request_iterator, timeout, metadata, credentials, None, compression
            ),
            wait_for_ready,
            timeout,
        )


class _StreamStream(_MultiCallable[_InnerStreamResponse], grpc.StreamStreamMultiCallable):  # type: ignore[type-arg]
    __slots__ = ()

    def _open(self, channel: _Factories, serializer: _Serializer) -> _InnerStreamResponse:
        return channel.stream_stream(
            self._method, serializer, self._deserializer, _registered_method=self._registered
        )

    def __call__(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        call = self._start_call(
            lambda inner, timeout: inner(
                request_iterator, timeout, metadata, credentials, None, compression
            ),
            wait_for_ready,
            timeout,
        )
        return call if isinstance(call, FailedCall) else StreamingCall(call)
