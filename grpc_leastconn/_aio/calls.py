"""Asyncio calls: the balanced multicallables and the grpc.aio call objects they return.

A call object answers grpc.aio's Call interface over one ``Rpc``. A unary
call is its own RPC; a streaming call refers to its RPC and is cancelled
when the caller drops it (grpc.aio never collects a dropped call: the done
callbacks it stores refer to it, grpc/grpc#43462), so neither the server
nor our count would see it end otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any, Protocol

import grpc

from .._core.backend import Backend
from .._core.balancer import log
from .._core.rules import Factories, InnerCache, may_repick
from .._core.rules import Serializer as _Serializer
from .backend_channel import BackendChannel
from .core import Core
from .rpc import Rpc, Stage

_Backend = Backend[BackendChannel]
_FINISHED = Stage.FINISHED
_SENT = Stage.SENT
# A unary call's outcome is final in these stages.
_DONE = frozenset({Stage.FINISHED, Stage.FAILED, Stage.CANCELLED})


class _Inner(Protocol):
    """A backend channel's grpc.aio multicallable, as we call it."""

    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any: ...


class _Call:
    """grpc.aio's Call interface over one balanced RPC (``_rpc``)."""

    __slots__ = ()
    _rpc: Rpc

    async def _settled(self) -> Any:
        """The backend call whose status is the RPC's; None if it reached none."""
        return await self._rpc.wait_sent()

    def time_remaining(self) -> float | None:
        return self._rpc.time_remaining()

    async def initial_metadata(self) -> grpc.aio.Metadata:
        call = await self._rpc.wait_sent()
        return grpc.aio.Metadata() if call is None else await call.initial_metadata()

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        call = await self._settled()
        return grpc.aio.Metadata() if call is None else await call.trailing_metadata()

    async def code(self) -> grpc.StatusCode:
        call = await self._settled()
        return self._rpc.early_status()[0] if call is None else await call.code()

    async def details(self) -> str:
        call = await self._settled()
        return self._rpc.early_status()[1] if call is None else await call.details()

    async def debug_error_string(self) -> str | None:
        call = await self._settled()
        return self._rpc.early_status()[1] if call is None else await call.debug_error_string()

    def __repr__(self) -> str:
        call = self._rpc.call
        inner = "waiting for a backend" if call is None else repr(call)
        return f"<{type(self).__name__} {inner}>"


class UnaryUnaryCall(Rpc, _Call, grpc.aio.UnaryUnaryCall[Any, Any]):
    """A unary call: its own RPC, re-picked by whoever awaits it while it never left.

    Its backend call starts when it is made (or, with no backend eligible
    yet, once one is), with no task of its own: a task per call would cost
    more client CPU than the balancing itself. Only the awaiting coroutine
    sees an attempt's error, so only an awaited call is re-picked; one
    nobody awaits runs to its end on its first backend, like grpc.aio's own
    unary calls, and its failure is raised where it is awaited, never logged.
    The call is done once its stage is FINISHED (or it ended early).
    """

    # Defaults in the class, set on the call only when they change, which is
    # rare: an __init__ of its own would cost every call one more frame.
    # Resolved once done, for whoever waits for the outcome.
    _ending: asyncio.Future[None] | None = None
    # Backends this RPC never reached; built at the first re-pick.
    _failed: list[_Backend] | None = None
    # The first attempt's backend and call, released while a coroutine
    # awaited it: the awaiter judges how it ended (see _first_attempt_ended).
    _unjudged: tuple[_Backend, Any] | None = None
    _done_callbacks: list[Callable[[Any], None]] | None = None

    @property
    def _rpc(self) -> Rpc:  # type: ignore[override]
        # _Call's methods reach their RPC through _rpc: a unary call is its own.
        return self

    def _attempt_ended(self, call: Any) -> None:
        self._finish()

    def _finish(self) -> None:
        """SENT -> FINISHED (an RPC that ended early stays as it is); then tell everyone."""
        if self.stage is _SENT:
            self.stage = _FINISHED
        ending, self._ending = self._ending, None
        if ending is not None and not ending.done():
            ending.set_result(None)
        callbacks, self._done_callbacks = self._done_callbacks, None
        if callbacks is not None:
            for callback in callbacks:
                callback(self)

    async def _settled(self) -> Any:
        if self.stage not in _DONE:
            if self._ending is None:
                self._ending = self.loop.create_future()
            await asyncio.shield(self._ending)
        return self.call

    def _first_attempt_ended(self, call: Any) -> None:
        backend, self._first_backend = self._first_backend, None
        awaiting = self._awaiting
        if backend is not None:
            core = self._core
            if awaiting and not core.reads_load:
                # Its awaiter resumes with the response or the error: the outcome
                # is judged there, for free, rather than read from the call here
                # (the first read of a grpc.aio call's status costs microseconds).
                core.release(backend, None, self._cost)
                self._unjudged = (backend, call)
            else:
                core.release_call(backend, call, self._cost)
        # While a coroutine awaits the call, it decides whether this attempt
        # was the last: it resumes, whatever the attempt's end.
        if not awaiting:
            self._finish()

    def _judge(self, call: Any, error: grpc.aio.AioRpcError | None) -> None:
        unjudged = self._unjudged
        if unjudged is not None and unjudged[1] is call:
            self._unjudged = None
            self._core.judge(unjudged[0], error)

    def __await__(self) -> Generator[Any, None, Any]:
        self._awaiting += 1
        try:
            while True:
                call = self.call
                if call is None:
                    call = yield from self.sent_call().__await__()
                try:
                    response = yield from call.__await__()
                except grpc.aio.AioRpcError as error:
                    self._judge(call, error)
                    if self.call is not call:
                        continue  # Another awaiter re-picked it.
                    backend = self.backend
                    assert backend is not None
                    failed = self._failed
                    if failed is None:
                        failed = self._failed = []
                    if self.stage is _FINISHED or not may_repick(error, len(failed), backend):
                        self._finish()
                        raise
                else:
                    # _judge(call, None), inline: this is every awaited call.
                    unjudged = self._unjudged
                    if unjudged is not None and unjudged[1] is call:
                        self._unjudged = None
                        self._core.succeeded(unjudged[0])
                    self._finish()
                    return response
                failed.append(backend)
                log.debug("RPC never reached %s; re-picking", backend.key)
                self.repick(failed)
        finally:
            self._awaiting -= 1
            if not self._awaiting:
                unjudged = self._unjudged
                if unjudged is not None:
                    # Its awaiters gave up before seeing how the attempt ended.
                    self._unjudged = None
                    self._core.judge_call(*unjudged)
                if self.stage not in _DONE and self.finished():
                    # Its awaiter gave up on an attempt that ended meanwhile.
                    self._finish()

    def cancel(self) -> bool:
        if self.stage in _DONE or not self.cancel_rpc():
            return False
        # No attempt follows a cancellation: done now, as grpc.aio's calls are.
        self._finish()
        return True

    def cancelled(self) -> bool:
        return self.is_cancelled()

    def done(self) -> bool:
        return self.stage in _DONE

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self.stage in _DONE:
            callback(self)
        elif self._done_callbacks is None:
            self._done_callbacks = [callback]
        else:
            self._done_callbacks.append(callback)

    async def initial_metadata(self) -> grpc.aio.Metadata:
        call = await self.wait_sent()
        if call is not None:
            metadata = await call.initial_metadata()
            if not call.done():
                # Headers arrived: this attempt reached the server, it is the last.
                return metadata  # type: ignore[no-any-return]
        call = await self._settled()
        return grpc.aio.Metadata() if call is None else await call.initial_metadata()

    async def wait_for_connection(self) -> None:
        # grpc.aio's unary calls wait for the response here, and raise its error.
        await self


class _StreamingCall(_Call):
    """A call with a request or response stream, cancelled when the caller drops it."""

    def __init__(self, rpc: Rpc) -> None:
        self._rpc = rpc

    def __del__(self) -> None:
        rpc = self._rpc
        with contextlib.suppress(Exception):
            if not rpc.finished():
                # Never cancel here and now: the collector may run inside any
                # code on the loop, in the middle of a pick, and the
                # cancellation's done callback changes the balancer.
                rpc.loop.call_soon_threadsafe(rpc.cancel_rpc)

    def cancel(self) -> bool:
        return self._rpc.cancel_rpc()

    def cancelled(self) -> bool:
        return self._rpc.is_cancelled()

    def done(self) -> bool:
        return self._rpc.finished()

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        # The callback gets this call without grpc.aio's stored callback
        # keeping it alive (that would defeat cancel-on-drop).
        wrapper = weakref.ref(self)
        rpc, cls = self._rpc, type(self)
        rpc.when_finished(lambda _: callback(wrapper() or cls(rpc)))

    async def wait_for_connection(self) -> None:
        call = await self._rpc.sent_call()
        await call.wait_for_connection()


class _ResponseStream(_StreamingCall):
    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        rpc = self._rpc
        if rpc.responses is None:
            call = await rpc.sent_call()
            rpc.responses = call.__aiter__()
        return await rpc.responses.__anext__()

    async def read(self) -> Any:
        call = await self._rpc.sent_call()
        return await call.read()


class _RequestStream(_StreamingCall):
    async def write(self, request: Any) -> None:
        call = await self._rpc.sent_call()
        await call.write(request)

    async def done_writing(self) -> None:
        call = await self._rpc.sent_call()
        await call.done_writing()


class _UnaryStreamCall(_ResponseStream, grpc.aio.UnaryStreamCall[Any, Any]):
    pass


class _StreamUnaryCall(_RequestStream, grpc.aio.StreamUnaryCall[Any, Any]):
    def __await__(self) -> Generator[Any, None, Any]:
        call = yield from self._rpc.sent_call().__await__()
        response = yield from call.__await__()
        return response


class _StreamStreamCall(_ResponseStream, _RequestStream, grpc.aio.StreamStreamCall[Any, Any]):
    pass


_Factories = Factories[_Inner, _Inner]


class MultiCallable(InnerCache[_Inner]):
    __slots__ = ()
    _core: Core
    # Whether its calls end with one response, which a finished call keeps.
    unary_response = True
    # Whether its calls take a request stream (an iterator, or written).
    streams_requests = False


class _UnaryUnary(MultiCallable, grpc.aio.UnaryUnaryMultiCallable[Any, Any]):
    __slots__ = ()

    def _open(self, channel: _Factories, serializer: _Serializer) -> _Inner:
        return channel.unary_unary(
            self._method, serializer, self._deserializer, _registered_method=self._registered
        )

    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> UnaryUnaryCall:
        return UnaryUnaryCall(
            self, request, timeout, metadata, credentials, wait_for_ready, compression
        )


class _UnaryStream(MultiCallable, grpc.aio.UnaryStreamMultiCallable[Any, Any]):
    __slots__ = ()
    unary_response = False

    def _open(self, channel: _Factories, serializer: _Serializer) -> _Inner:
        return channel.unary_stream(
            self._method, serializer, self._deserializer, _registered_method=self._registered
        )

    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> _UnaryStreamCall:
        rpc = Rpc(self, request, timeout, metadata, credentials, wait_for_ready, compression)
        return _UnaryStreamCall(rpc)


class _StreamUnary(MultiCallable, grpc.aio.StreamUnaryMultiCallable[Any, Any]):
    __slots__ = ()
    streams_requests = True

    def _open(self, channel: _Factories, serializer: _Serializer) -> _Inner:
        return channel.stream_unary(
            self._method, serializer, self._deserializer, _registered_method=self._registered
        )

    def __call__(
        self,
        request_iterator: Any = None,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> _StreamUnaryCall:
        # Never re-picked: grpc.aio may already have consumed requests from
        # the iterator, which cannot be replayed.
        rpc = Rpc(
            self, request_iterator, timeout, metadata, credentials, wait_for_ready, compression
        )
        return _StreamUnaryCall(rpc)


class _StreamStream(MultiCallable, grpc.aio.StreamStreamMultiCallable[Any, Any]):
    __slots__ = ()
    streams_requests = True
    unary_response = False

    def _open(self, channel: _Factories, serializer: _Serializer) -> _Inner:
        return channel.stream_stream(
            self._method, serializer, self._deserializer, _registered_method=self._registered
        )

    def __call__(
        self,
        request_iterator: Any = None,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> _StreamStreamCall:
        rpc = Rpc(
            self, request_iterator, timeout, metadata, credentials, wait_for_ready, compression
        )
        return _StreamStreamCall(rpc)
