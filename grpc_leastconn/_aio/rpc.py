"""One balanced asyncio RPC: its stage, its attempts and its count.

An RPC starts as it is made. Its ``stage`` says where it is:

    PICKING --send--> SENT --finish--> FINISHED       (unary calls only)
       |               |
       |               +--repick--> PICKING            (never-sent unary attempts)
       +--end_early--> FAILED | CANCELLED

- PICKING: waiting for a backend, before the first attempt or between the
  attempts of a re-picked unary call;
- SENT: an attempt is (or was) on ``backend``; ``call`` is its backend call;
- FAILED / CANCELLED: it ended before reaching any backend;
- FINISHED: a unary call's last attempt has ended, its outcome is final.

Every attempt is counted on its backend from the pick until grpc.aio's done
callback of its backend call releases it, whatever the status (gRFC A48).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any

import grpc

from .._core.backend import Backend
from .._core.rules import Release
from .backend_channel import BackendChannel
from .core import CLOSED_DETAILS, Closed
from .finished import LOCAL_CANCELLATION_DETAILS, FinishedCall

if TYPE_CHECKING:
    from .calls import MultiCallable

_Backend = Backend[BackendChannel]


class Stage(Enum):
    PICKING = "picking"
    SENT = "sent"
    FAILED = "failed"
    CANCELLED = "cancelled"
    FINISHED = "finished"

    # Members are singletons, so identity hashes them; Enum's own __hash__ is
    # a Python call, paid by every ``stage in {...}`` on the hot path.
    __hash__ = object.__hash__


_PICKING = Stage.PICKING
_SENT = Stage.SENT
_FAILED = Stage.FAILED
_CANCELLED = Stage.CANCELLED
_ENDED_EARLY = frozenset({Stage.FAILED, Stage.CANCELLED})


class Rpc:
    """One RPC. A streaming call object refers to its RPC, never the other way round.

    The tasks driving an RPC share it, so a call object the caller drops can
    be collected, and cancelled. A unary call is never cancelled on drop, so
    it is its own RPC (``UnaryUnaryCall``): one object per call.
    """

    __slots__ = (
        "__weakref__",
        "_attempts",
        "_awaiting",
        "_callbacks",
        "_compression",
        "_core",
        "_cost",
        "_credentials",
        "_deadline",
        "_first_backend",
        "_metadata",
        "_multicallable",
        "_options_set",
        "_request",
        "_task",
        "_wait_for_ready",
        "_waiter",
        "backend",
        "call",
        "error",
        "loop",
        "responses",
        "stage",
    )

    def __init__(
        self,
        multicallable: MultiCallable,
        request: Any,
        timeout: float | None,
        metadata: Any,
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> None:
        self._core = core = multicallable._core
        self.loop = core.loop
        self._multicallable = multicallable
        self._cost = cost = multicallable.cost
        # What each attempt sends, kept here rather than in a closure: one
        # object fewer per call.
        self._request = request
        self._metadata = metadata
        self._credentials = credentials
        self._compression = compression
        self._options_set = not (metadata is None and credentials is None and compression is None)
        self._deadline = None if timeout is None else core.loop.time() + timeout
        self._wait_for_ready = wait_for_ready
        self.stage = _PICKING
        self.backend: _Backend | None = None
        # The backend call while SENT (and FINISHED).
        self.call: Any = None
        # The response stream's iterator, once the caller iterates it.
        self.responses: AsyncIterator[Any] | None = None
        # How a FAILED RPC ended.
        self.error: BaseException | None = None
        # Resolved when the RPC leaves PICKING, for whoever waits for that.
        self._waiter: asyncio.Future[None] | None = None
        # Done callbacks added while PICKING; built on first use.
        self._callbacks: list[Callable[[Any], None]] | None = None
        self._task: asyncio.Task[bool] | None = None
        # Coroutines awaiting a unary call: while there are some, they decide
        # whether an attempt that ended is the last (kept here for speed).
        self._awaiting = 0
        self._attempts = 0
        # The first attempt's backend, released by _first_attempt_ended;
        # later attempts (re-picks) each get an _Attempt of their own.
        self._first_backend: _Backend | None = None
        # Sent at once, here: the common case is a backend eligible now, with
        # nothing yet waiting on the RPC.
        backend = core.pick_now(cost)
        if backend is not None:
            self._send(backend)
        else:
            self._pick_later()

    # -- stage changes ------------------------------------------------------------

    def _pick_later(self) -> None:
        """No backend now: end as the balancer says, or wait for one in a task."""
        try:
            backend = self._core.pick(self._wait_for_ready, self._deadline, self._cost)
        except Closed:
            raise grpc.aio.UsageError(CLOSED_DETAILS) from None
        except grpc.aio.AioRpcError as error:
            # grpc.aio reports an RPC's failure when it is awaited, not when
            # it is made.
            self._end_early(_FAILED, error)
            return
        if backend is not None:
            self._send(backend)
        else:
            self._task = self.loop.create_task(self._wait_and_send())

    def _send(self, backend: _Backend) -> Any:
        """PICKING -> SENT: start an attempt on ``backend``, counted until it ends."""
        remaining = None
        if self._deadline is not None:
            # Time spent waiting for a backend counts against the deadline.
            remaining = max(0.0, self._deadline - self.loop.time())
        multicallable = self._multicallable
        # InnerCache._inner_for, inline: one Python frame fewer per call.
        inner = multicallable._inner.get(backend) or multicallable._build(backend)
        try:
            # wait_for_ready is ours to honour, at the pick: passed down, it
            # would pin the RPC to this one backend until it came back.
            if self._options_set:
                call = inner(
                    self._request,
                    timeout=remaining,
                    metadata=self._metadata,
                    credentials=self._credentials,
                    compression=self._compression,
                )
            elif remaining is None:
                # Keywords cost measurably on this path even when None.
                call = inner(self._request)
            else:
                call = inner(self._request, timeout=remaining)
        except BaseException:
            self._core.release(backend, None, self._cost)
            raise
        self.backend = backend
        self.call = call
        self.stage = _SENT
        if self._attempts:
            call.add_done_callback(_Attempt(self, backend))
        else:
            # Most RPCs make one attempt: a bound method, no object of its own.
            self._first_backend = backend
            call.add_done_callback(self._first_attempt_ended)
        self._attempts += 1
        backend.channel.remember(self)  # type: ignore[union-attr]  # a picked backend has one
        callbacks = self._callbacks
        if callbacks is not None:
            self._callbacks = None
            for callback in callbacks:
                call.add_done_callback(callback)
        if self._waiter is not None:
            self._wake()
        return call

    def _end_early(self, stage: Stage, error: BaseException | None = None) -> None:
        """PICKING -> FAILED or CANCELLED: the RPC ends before reaching a backend."""
        if self.stage is not _PICKING:
            return
        self.stage = stage
        self.error = error
        self._wake()
        callbacks, self._callbacks = self._callbacks, None
        for callback in callbacks or ():
            callback(None)
        self._attempt_ended(None)

    def repick(self, failed: Sequence[_Backend]) -> None:
        """SENT -> PICKING: send again, away from ``failed``; the last attempt is released."""
        self.stage = _PICKING
        self.call = None
        self.backend = None
        self._task = self.loop.create_task(self._wait_and_send(failed))

    async def _wait_and_send(self, failed: Sequence[_Backend] = ()) -> bool:
        """Wait for a backend and send there; False if the RPC ended first.

        A re-picked RPC (``failed`` given) first tries every other eligible
        backend, then waits like a new one.
        """
        try:
            core, cost = self._core, self._cost
            backend = core.pick_excluding(failed, cost) if failed else None
            if backend is None:
                backend = await core.acquire(self._wait_for_ready, self._deadline, cost)
            if self.stage is _PICKING:
                self._send(backend)
            else:
                core.release(backend, None, cost)
        except Closed:
            # What grpc.aio's close() does to the calls it has started.
            self._end_early(_CANCELLED)
        except asyncio.CancelledError:
            self._end_early(_CANCELLED)
            raise
        except Exception as exc:
            self._end_early(_FAILED, exc)
        return self.call is not None

    def cancel_rpc(self) -> bool:
        if self.call is not None:
            return bool(self.call.cancel())
        if self.stage is not _PICKING:
            return False
        self._end_early(_CANCELLED)
        if self._task is not None:
            self._task.cancel()
        return True

    # -- attempts ending ----------------------------------------------------------

    def _first_attempt_ended(self, call: Any) -> None:
        """The first attempt's done callback: release it with its status
        (UnaryUnaryCall's own version lets its awaiter judge it)."""
        backend, self._first_backend = self._first_backend, None
        if backend is not None:
            self._core.release_call(backend, call, self._cost)
        self._attempt_ended(call)

    def _attempt_ended(self, call: Any) -> None:
        """An attempt ended while nobody awaits (or, with None, the RPC ended early)."""

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- waiting for the RPC ------------------------------------------------------

    async def wait_sent(self) -> Any:
        """The backend call once sent; None if the RPC ended before reaching one.

        Cancelling the caller's wait leaves the RPC alone, as grpc.aio does
        for ``code()`` and the metadata.
        """
        while self.stage is _PICKING:
            if self._waiter is None:
                self._waiter = self.loop.create_future()
            await asyncio.shield(self._waiter)
        return self.call

    async def sent_call(self) -> Any:
        """The backend call, for an operation on it; raises if the RPC reached none.

        Cancelling the caller's wait cancels the RPC, as grpc.aio does for
        reads, writes and ``await call``.
        """
        try:
            call = await self.wait_sent()
        except asyncio.CancelledError:
            self.cancel_rpc()
            raise
        if call is None:
            if self.stage is _CANCELLED:
                raise asyncio.CancelledError()
            assert self.error is not None
            raise self.error
        return call

    async def settle(self, backend: _Backend) -> None:
        """Put the outcome of this RPC's finished call to ``backend`` in the call's place."""
        call = self.call
        if self.backend is not backend or call is None or isinstance(call, FinishedCall):
            return
        if not call.done():
            return
        multicallable = self._multicallable
        finished = await FinishedCall.of(
            call,
            unary_response=multicallable.unary_response,
            requests_iterated=multicallable.streams_requests and self._request is not None,
        )
        if self.call is call:
            self.call = finished
            if self.responses is not None:
                self.responses = finished.resume_responses(self.responses)

    # -- what the call objects ask ------------------------------------------------

    @property
    def ended_early(self) -> bool:
        return self.stage in _ENDED_EARLY

    def finished(self) -> bool:
        return bool(self.call.done()) if self.call is not None else self.ended_early

    def is_cancelled(self) -> bool:
        return bool(self.call.cancelled()) if self.call is not None else self.stage is _CANCELLED

    def when_finished(self, callback: Callable[[Any], None]) -> None:
        """Run ``callback`` (with the backend call, or None) once the RPC has ended."""
        if self.call is not None:
            self.call.add_done_callback(callback)
        elif self.ended_early:
            callback(None)
        elif self._callbacks is None:
            self._callbacks = [callback]
        else:
            self._callbacks.append(callback)

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - self.loop.time())

    def early_status(self) -> tuple[grpc.StatusCode, str]:
        """Code and details of an RPC that reached no backend."""
        if isinstance(self.error, grpc.aio.AioRpcError):
            return self.error.code(), self.error.details() or ""
        if self.error is not None:
            return grpc.StatusCode.UNKNOWN, str(self.error)
        return grpc.StatusCode.CANCELLED, LOCAL_CANCELLATION_DETAILS


class _Attempt(Release):
    """Done callback of a re-picked attempt: releases its count once, then tells its RPC.

    (The first attempt's is the RPC's own ``_first_attempt_ended``.)
    """

    __slots__ = ("_rpc",)

    def __init__(self, rpc: Rpc, backend: _Backend) -> None:
        Release.__init__(self, rpc._core, backend, rpc._cost)
        self._rpc = rpc

    def __call__(self, call: object = None) -> None:
        Release.__call__(self, call)
        rpc = self._rpc
        if not rpc._awaiting:
            rpc._attempt_ended(call)
