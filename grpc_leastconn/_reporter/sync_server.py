"""The sync server's interceptor: counts every call and puts the report in its trailers.

``intercept_service`` rebuilds the continuation's ``RpcMethodHandler``
around a wrapped behavior (same arity, request deserializer and response
serializer). The wrapper counts the call when the handler starts and
registers its end with ``context.add_callback``, which grpcio runs exactly
once when the RPC terminates for any reason (OK, error, abort, exception,
cancellation, deadline, server stop); when it returns False the RPC is
already over and the end is counted at once.

The handler gets a ``_Context`` proxy that records the trailing metadata it
sets (``set_trailing_metadata``, ``abort_with_status``) and forwards
everything else. When the handler returns or raises (for response streams:
when the generator ends or raises), the merged trailers (the application's,
then the report under ``endpoint-load-metrics-bin`` and its mirror key) are
set on the real context just before grpcio sends the status;
``context.abort`` raises, the wrapper sets them on the way out, and grpcio's
abort path sends them. The report is made then, so it counts the call.

Handlers marked ``experimental_non_blocking`` (the callback-style response
API) are passed through uncounted; ``experimental_thread_pool`` is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from .load import Call, Load
from .orca import counted, merged_trailers

_Behavior = Callable[[Any, grpc.ServicerContext], Any]

if TYPE_CHECKING:
    _Handler = grpc.RpcMethodHandler[Any, Any]

_OK = grpc.StatusCode.OK
_UNKNOWN = grpc.StatusCode.UNKNOWN


class _Context:
    """The ServicerContext a wrapped handler sees: records its trailers, forwards the rest."""

    __slots__ = ("_context", "_trailers")

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context
        self._trailers: Any = None

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self._trailers = trailing_metadata
        self._context.set_trailing_metadata(trailing_metadata)

    def abort_with_status(self, status: grpc.Status) -> None:
        self._trailers = status.trailing_metadata
        self._context.abort_with_status(status)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def __repr__(self) -> str:
        return f"<load-reporting {self._context!r}>"


class SyncInterceptor(grpc.ServerInterceptor):
    """Counts the calls of a ``grpc.server`` and reports its load in their trailers."""

    def __init__(self, load: Load) -> None:
        self._wrapped = Wrapped(wrap_handler, load)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], _Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        handler = continuation(handler_call_details)
        if handler is None or not counted(handler_call_details.method):
            return handler
        return self._wrapped.get(handler)


class Wrapped:
    """The wrapped version of each handler, built once per handler object.

    Generic and registered handlers hand out the same handler object for
    every call of a method, so the wrapper is built on a method's first
    call only. Entries hold their handler, so an ``id`` is never reused
    while cached; a service making new handlers per call only refills it.
    """

    MAX_ENTRIES = 1024

    def __init__(self, wrap: Callable[[_Handler, Load], _Handler], load: Load) -> None:
        self._wrap = wrap
        self._load = load
        self._entries: dict[int, tuple[_Handler, _Handler]] = {}

    def get(self, handler: _Handler) -> _Handler:
        entry = self._entries.get(id(handler))
        if entry is not None and entry[0] is handler:
            return entry[1]
        wrapped = self._wrap(handler, self._load)
        if len(self._entries) >= self.MAX_ENTRIES:
            self._entries.clear()
        self._entries[id(handler)] = (handler, wrapped)
        return wrapped


def behavior_of(handler: _Handler) -> tuple[Any, Callable[..., Any]]:
    """A handler's behavior and the ``grpc.*_rpc_method_handler`` that builds its kind."""
    if handler.request_streaming and handler.response_streaming:
        return handler.stream_stream, grpc.stream_stream_rpc_method_handler
    if handler.request_streaming:
        return handler.stream_unary, grpc.stream_unary_rpc_method_handler
    if handler.response_streaming:
        return handler.unary_stream, grpc.unary_stream_rpc_method_handler
    return handler.unary_unary, grpc.unary_unary_rpc_method_handler


def wrap_handler(handler: _Handler, load: Load) -> _Handler:
    """``handler`` with its behavior wrapped for counting and trailers."""
    behavior, make = behavior_of(handler)
    if behavior is None or getattr(behavior, "experimental_non_blocking", False):
        return handler
    if handler.response_streaming:
        wrapped = _stream_response(behavior, load)
    else:
        wrapped = _unary_response(behavior, load)
    pool = getattr(behavior, "experimental_thread_pool", None)
    if pool is not None:
        wrapped.experimental_thread_pool = pool  # type: ignore[attr-defined]
    result: _Handler = make(
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    return result


def _begin(load: Load, context: grpc.ServicerContext) -> Call:
    call = load.begin()
    end = load.end
    if not context.add_callback(lambda: end(call)):
        end(call)  # the RPC already terminated: its callbacks have run
    return call


def _finish(
    load: Load, call: Call, context: grpc.ServicerContext, proxy: _Context, raised: bool
) -> None:
    """Record the call's status and set the merged trailers (the call still counts)."""
    code = _code(context)
    call.code = code if code is not None else (_UNKNOWN if raised else _OK)
    context.set_trailing_metadata(merged_trailers(proxy._trailers, load.report_bytes()))


def _code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """The status code the handler set (``set_code``, ``abort``), None if none."""
    code = getattr(context, "code", None)
    return code() if code is not None else None


def _unary_response(behavior: _Behavior, load: Load) -> Callable[..., Any]:
    """Wraps unary-unary and stream-unary behaviors."""

    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        call = _begin(load, context)
        proxy = _Context(context)
        try:
            response = behavior(request, proxy)  # type: ignore[arg-type]
        except BaseException:
            _finish(load, call, context, proxy, raised=True)
            raise
        _finish(load, call, context, proxy, raised=False)
        return response

    return handle


def _stream_response(behavior: _Behavior, load: Load) -> Callable[..., Any]:
    """Wraps unary-stream and stream-stream behaviors."""

    def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        call = _begin(load, context)
        proxy = _Context(context)
        try:
            responses = behavior(request, proxy)  # type: ignore[arg-type]
        except BaseException:
            _finish(load, call, context, proxy, raised=True)
            raise
        return _responses(responses, load, call, context, proxy)

    return handle


def _responses(
    responses: Any, load: Load, call: Call, context: grpc.ServicerContext, proxy: _Context
) -> Iterator[Any]:
    try:
        yield from responses
    except GeneratorExit:
        raise  # closed unfinished: the RPC is over, no status left to send
    except BaseException:
        _finish(load, call, context, proxy, raised=True)
        raise
    _finish(load, call, context, proxy, raised=False)
