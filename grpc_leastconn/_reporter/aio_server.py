"""The grpc.aio server's interceptor: counts every call and puts the report in its trailers.

As the sync one (``sync_server``), for ``grpc.aio.server(interceptors=...)``.
The wrapper keeps the behavior's kind, which grpc.aio dispatches on: a
coroutine function (unary responses, or the ``context.write`` style of
response streams) stays one, an async generator function stays one. The
call counts when the handler starts; its end is registered with
``context.add_done_callback``, which grpc.aio runs once when the call's
task is done, whatever ended it (status sent, abort, exception, the task
cancelled by a client's cancellation or deadline or by the server stopping).

Trailers: the ``_AioContext`` proxy records ``set_trailing_metadata``;
``abort`` (a coroutine that sends the status itself) is given the merged
trailers; a handler that returns or raises gets them set on the real
context before grpc.aio sends its status. A cancelled call sends no status.

Sync behaviors (run in the aio server's ``migration_thread_pool``) are
passed through uncounted: grpc.aio gives them a context with neither a done
callback nor a status code to read.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from .load import Call, Load
from .orca import counted, merged_trailers
from .sync_server import Wrapped, behavior_of

# grpc.aio's context, typed loosely: its stubs' done callback type is not callable.
_AioServicerContext = Any
if TYPE_CHECKING:
    _Handler = grpc.RpcMethodHandler[Any, Any]

_OK = grpc.StatusCode.OK
_UNKNOWN = grpc.StatusCode.UNKNOWN


class _AioContext:
    """The grpc.aio ServicerContext a wrapped handler sees."""

    __slots__ = ("_call", "_context", "_load", "_sent", "_trailers")

    def __init__(self, context: _AioServicerContext, load: Load, call: Call) -> None:
        self._context = context
        self._load = load
        self._call = call
        self._trailers: Any = None
        self._sent = False

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self._trailers = trailing_metadata
        self._context.set_trailing_metadata(trailing_metadata)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        if trailing_metadata:
            self._trailers = trailing_metadata
        if not self._sent:
            self._sent = True
            self._call.code = code
            merged = merged_trailers(self._trailers, self._load.report_bytes())
            await self._context.abort(code, details, merged)
        await self._context.abort(code, details, trailing_metadata)  # raises UsageError

    async def abort_with_status(self, status: grpc.Status) -> None:
        await self.abort(status.code, status.details, status.trailing_metadata)

    def finish(self, raised: bool) -> None:
        """Record the status and set the merged trailers, unless abort sent them."""
        if self._sent:
            return
        self._sent = True
        code = self._context.code()
        if raised:
            code = code if code is not None and code is not _OK else _UNKNOWN
        self._call.code = code if code is not None else _OK
        self._context.set_trailing_metadata(
            merged_trailers(self._trailers, self._load.report_bytes())
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def __repr__(self) -> str:
        return f"<load-reporting {self._context!r}>"


class AioInterceptor(grpc.aio.ServerInterceptor):
    """Counts the calls of a ``grpc.aio.server`` and reports its load in their trailers."""

    def __init__(self, load: Load) -> None:
        self._wrapped = Wrapped(wrap_handler, load)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or not counted(handler_call_details.method):
            return handler
        return self._wrapped.get(handler)


def wrap_handler(handler: _Handler, load: Load) -> _Handler:
    """``handler`` with its async behavior wrapped for counting and trailers."""
    behavior, make = behavior_of(handler)
    if inspect.isasyncgenfunction(behavior):
        wrapped: Callable[..., Any] = _async_generator(behavior, load)
    elif inspect.iscoroutinefunction(behavior):
        wrapped = _coroutine(behavior, load)
    else:
        return handler
    result: _Handler = make(
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    return result


def _begin(load: Load, context: _AioServicerContext) -> _AioContext:
    call = load.begin()
    end = load.end
    context.add_done_callback(lambda _context: end(call))
    return _AioContext(context, load, call)


def _coroutine(behavior: Callable[..., Any], load: Load) -> Callable[..., Any]:
    """Wraps coroutine behaviors: unary responses, and streams written with ``context.write``."""

    async def handle(request: Any, context: _AioServicerContext) -> Any:
        proxy = _begin(load, context)
        try:
            result = await behavior(request, proxy)
        except asyncio.CancelledError:
            raise
        except BaseException:
            proxy.finish(raised=True)
            raise
        proxy.finish(raised=False)
        return result

    return handle


def _async_generator(behavior: Callable[..., Any], load: Load) -> Callable[..., Any]:
    """Wraps async generator behaviors of response streams."""

    async def handle(request: Any, context: _AioServicerContext) -> AsyncIterator[Any]:
        proxy = _begin(load, context)
        try:
            async for response in behavior(request, proxy):
                yield response
        except (GeneratorExit, asyncio.CancelledError):
            raise  # closed unfinished or cancelled: no status will be sent
        except BaseException:
            proxy.finish(raised=True)
            raise
        proxy.finish(raised=False)

    return handle
