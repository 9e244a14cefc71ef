"""Sync response streams: what the caller holds, counted until the stream truly ends.

``StreamingCall`` wraps grpcio's own streaming call and cancels it when the
caller drops it; ``Iterated`` stands for a stream a wrapper of the backend
channel (an interceptor) returned as a plain iterator, with no done callback.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import grpc

from .._core.backend import Backend
from .._core.rules import error_outcome
from .backend_channel import BackendChannel
from .core import Core

_Backend = Backend[BackendChannel]
_OK = grpc.StatusCode.OK


class StreamingCall(grpc.Call, grpc.Future):  # type: ignore[type-arg]
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

    def __iter__(self) -> StreamingCall:
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


class Iterated:
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

    def __iter__(self) -> Iterated:
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
