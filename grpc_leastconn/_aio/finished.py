"""The outcome of a finished grpc.aio call, standing in for the call itself.

A grpc.aio call object keeps C-core's call alive, and C-core's call keeps
its channel's connection: a channel closed by ``close()`` lets go of its
connection only once every call object made on it is gone. Applications
keep finished calls (to read metadata later, in logs, in lists of results),
so a backend removed by discovery would keep its connection for as long as
any of them lived. When a backend's backend channel closes, each finished call
that went to it is replaced by this snapshot, which answers every question
the call would have: status, metadata, the response of a unary-response
call, and the same errors.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Generator
from typing import Any

import grpc

_OK = grpc.StatusCode.OK
_CANCELLED = grpc.StatusCode.CANCELLED
# grpc.aio's own words, kept so that the snapshot speaks as the call did.
LOCAL_CANCELLATION_DETAILS = "Locally cancelled by application!"
_ALREADY_FINISHED_DETAILS = "RPC already finished."
_API_STYLE_ERROR = "The iterator and read/write APIs may not be mixed on a single RPC."


class FinishedCall:
    """What a finished grpc.aio call tells, without the call (or its connection)."""

    __slots__ = (
        "_code",
        "_debug_error_string",
        "_details",
        "_initial_metadata",
        "_requests_iterated",
        "_response",
        "_trailing_metadata",
    )

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        initial_metadata: grpc.aio.Metadata,
        trailing_metadata: grpc.aio.Metadata,
        debug_error_string: str | None,
        response: Any = None,
        requests_iterated: bool = False,
    ) -> None:
        self._code = code
        self._details = details
        self._initial_metadata = initial_metadata
        self._trailing_metadata = trailing_metadata
        self._debug_error_string = debug_error_string
        self._response = response
        self._requests_iterated = requests_iterated

    @classmethod
    async def of(
        cls, call: Any, *, unary_response: bool, requests_iterated: bool = False
    ) -> FinishedCall:
        """The snapshot of ``call``, which must be done (ValueError otherwise).

        Nothing here waits for the network: a done call has its status and
        metadata, and the response of a successful unary-response call is
        ready or one loop iteration away. ``requests_iterated``: the call's
        requests came from an iterator, so its write API is not to be used.
        """
        if not call.done():
            # Its answers would wait for the network, and be stale at once.
            raise ValueError(f"{call!r} has not finished")
        code = await call.code()
        response = None
        if unary_response and code is _OK:
            response = await call
        return cls(
            code,
            await call.details(),
            await call.initial_metadata(),
            await call.trailing_metadata(),
            await call.debug_error_string(),
            response,
            requests_iterated,
        )

    def _raise_for_status(self) -> None:
        # As grpc.aio: CancelledError for a call cancelled on this side,
        # AioRpcError for any other failure.
        if self._code is _OK:
            return
        if self._code is _CANCELLED and self._details == LOCAL_CANCELLATION_DETAILS:
            raise asyncio.CancelledError()
        raise grpc.aio.AioRpcError(
            self._code,
            self._initial_metadata,
            self._trailing_metadata,
            self._details,
            self._debug_error_string,
        )

    def done(self) -> bool:
        return True

    def cancelled(self) -> bool:
        return self._code is _CANCELLED

    def cancel(self) -> bool:
        return False

    def add_done_callback(self, callback: Any) -> None:
        callback(self)

    async def code(self) -> grpc.StatusCode:
        return self._code

    async def details(self) -> str:
        return self._details

    async def initial_metadata(self) -> grpc.aio.Metadata:
        return self._initial_metadata

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        return self._trailing_metadata

    async def debug_error_string(self) -> str | None:
        return self._debug_error_string

    def __await__(self) -> Generator[Any, None, Any]:
        self._raise_for_status()
        return self._response
        yield  # a generator that never suspends, as awaiting a finished call

    async def read(self) -> Any:
        self._raise_for_status()
        return grpc.aio.EOF

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._responses()

    async def _responses(self) -> AsyncIterator[Any]:
        # Every message was read before the status arrived: C-core reports
        # a streaming call's status only once its messages are consumed.
        self._raise_for_status()
        return
        yield

    def resume_responses(self, begun: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """What takes the place of the call's response iterator the caller had begun.

        An iterator that had ended stays ended, as grpc.aio's would (it
        raises an error once); one still running ends as the call did.
        """
        if inspect.isasyncgen(begun) and begun.ag_frame is None:
            return _ended()
        return self._responses()

    async def write(self, _request: Any) -> None:
        if self._requests_iterated:
            raise grpc.aio.UsageError(_API_STYLE_ERROR)
        raise asyncio.InvalidStateError(_ALREADY_FINISHED_DETAILS)

    async def done_writing(self) -> None:
        if self._requests_iterated:
            raise grpc.aio.UsageError(_API_STYLE_ERROR)

    async def wait_for_connection(self) -> None:
        self._raise_for_status()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} of RPC that terminated with: "
            f"status={self._code}, details={self._details!r}>"
        )


async def _ended() -> AsyncIterator[Any]:
    return
    yield
