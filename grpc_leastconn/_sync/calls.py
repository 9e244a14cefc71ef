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

import contextlib
import time
import weakref
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


class _StreamingCall(grpc.Call, grpc.Future):  # type: ignore[type-arg]
    """A response iterator that cancels its RPC when the caller drops it.

    grpcio keeps a dropped iterator's call running until the channel closes
    (the done callback it stores refers to the call), so neither the server
    nor our count would ever see it end. This wrapper is referenced only by
    the caller; its ``__del__`` cancels the call, which fires the done
    callback that releases the count.
    """

    __slots__ = ("_call",)

    def __init__(self, call: Any) -> None:
        self._call = call

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._call.cancel()

    def __iter__(self) -> _StreamingCall:
        return self

    def __next__(self) -> Any:
        return self._call.__next__()

    def __getattr__(self, name: str) -> Any:
        # Anything else grpcio's call object offers (debug_error_string, ...).
        return getattr(self._call, name)

    def __repr__(self) -> str:
        return repr(self._call)

    # grpc.Call / grpc.RpcContext
    def initial_metadata(self) -> Any:
        return self._call.initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._call.trailing_metadata()

    def code(self) -> grpc.StatusCode:
        return self._call.code()  # type: ignore[no-any-return]

    def details(self) -> str:
        return self._call.details()  # type: ignore[no-any-return]

    def is_active(self) -> bool:
        return self._call.is_active()  # type: ignore[no-any-return]

    def time_remaining(self) -> float | None:  # type: ignore[override]
        return self._call.time_remaining()  # type: ignore[no-any-return]

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return self._call.add_callback(callback)  # type: ignore[no-any-return]

    # grpc.Future
    def cancel(self) -> bool:
        return self._call.cancel()  # type: ignore[no-any-return]

    def cancelled(self) -> bool:
        return self._call.cancelled()  # type: ignore[no-any-return]

    def running(self) -> bool:
        return self._call.running()  # type: ignore[no-any-return]

    def done(self) -> bool:
        return self._call.done()  # type: ignore[no-any-return]

    def result(self, timeout: float | None = None) -> Any:
        return self._call.result(timeout)

    def exception(self, timeout: float | None = None) -> Any:
        return self._call.exception(timeout)

    def traceback(self, timeout: float | None = None) -> Any:
        return self._call.traceback(timeout)

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        # Hand the callback this wrapper without letting grpcio's stored
        # callback keep it alive (that would defeat cancel-on-drop).
        wrapper = weakref.ref(self)
        call = self._call
        call.add_done_callback(lambda _: fn(wrapper() or call))


class _Iterated:
    """A response stream known only as an iterator, counted until iteration ends.

    Interceptors may return a plain generator for a server-streaming call
    (OpenTelemetry's does); it has no done callback to release the count and
    no cancel(). This wrapper releases once, with the status the iteration
    ended with; cancelling or dropping it closes the iterator and releases.
    """

    __slots__ = ("__weakref__", "_backend", "_callbacks", "_core", "_cost", "_iterator")

    def __init__(self, iterator: Any, core: Core, backend: _Backend, cost: int) -> None:
        self._iterator = iterator
        self._core = core
        self._backend: _Backend | None = backend
        self._cost = cost
        self._callbacks: list[Callable[[Any], None]] = []

    def _end(self, code: grpc.StatusCode | None, error: str | None = None) -> None:
        backend, self._backend = self._backend, None
        if backend is None:
            return
        self._core.release(backend, code, self._cost, error)
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    def __iter__(self) -> _Iterated:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._iterator)
        except StopIteration:
            self._end(_OK)
            raise
        except grpc.RpcError as error:
            backend = self._backend
            if backend is not None:
                self._end(*error_outcome(error, backend))
            raise
        except BaseException:
            self._end(None)
            raise

    def cancel(self) -> bool:
        if self._backend is None:
            return False
        close = getattr(self._iterator, "close", None)
        with contextlib.suppress(Exception):
            if close is not None:
                close()
        self._end(None)
        return True

    def done(self) -> bool:
        return self._backend is None

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self._backend is None:
            callback(self)
        else:
            self._callbacks.append(callback)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._iterator, name)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.cancel()


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
            return _Iterated(call, core, backend, cost)
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
            try:
                # wait_for_ready is ours to honour, at the pick: passed down, it
                # would pin the RPC to this one backend until it came back.
                response = (inner.with_call if with_call else inner)(
                    request, timeout, metadata, credentials, None, compression
                )
                code = _OK
                return response
            except grpc.RpcError as error:
                if not (repick and may_repick(error, len(failed), backend)):
                    code, text = error_outcome(error, backend)
                    raise
                text = error_outcome(error, backend)[1]
            finally:
                core.release(backend, code, cost, text)
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
        return call if isinstance(call, FailedCall) else _StreamingCall(call)


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
        return call if isinstance(call, FailedCall) else _StreamingCall(call)
