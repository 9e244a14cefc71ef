"""Asyncio front end: a grpc.aio.Channel that balances every RPC by least connections.

Everything runs on the event loop that built the channel: picks, releases,
connectivity and health reports, the answers of re-resolution. One thread,
and no await between reading the balancer and changing it, so the balancer
needs no lock. Each RPC is counted from its pick until it truly ends (gRFC
A48: "decrement regardless of status"):

- its backend call gets a done callback that releases the count; grpc.aio
  runs it on the loop when the call's status is set, whatever the status
  (response, error, deadline, cancellation, channel close);
- a streaming call the caller drops is cancelled by our wrapper's
  ``__del__``. grpc.aio never collects a dropped call, since the done
  callbacks it stores refer to it (grpc/grpc#43462), so neither the server
  nor our count would see it end. The wrapper is referenced by the caller
  only: the state its tasks share never refers back to it.

When a backend's sub-channel closes, each finished call that went there is
swapped for a FinishedCall snapshot inside the call object the application
may still hold, so that kept calls do not keep the backend's connection open.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Sequence
from types import TracebackType
from typing import Any

import grpc

from .._backoff import Backoff, ResolutionSchedule
from .._balancer import Backend, Balancer, Health, log
from .._frontend import (
    MultiCallableBase,
    Release,
    deliver,
    make_balancer,
    may_repick,
    next_wakeup,
    no_backend,
    resolution_schedule,
    resolve_again,
    resolve_initial,
)
from .._picker import TieBreak
from .._resolver import ResolutionError, Resolver
from .._settings import (
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_RESOLVE_MAX_INTERVAL,
    DEFAULT_RESOLVE_MIN_INTERVAL,
    Options,
    Settings,
    check_credentials,
    make_settings,
)
from .._target import Address
from ._finished import LOCAL_CANCELLATION_DETAILS, FinishedCall
from ._subchannel import SubChannel

_Backend = Backend[SubChannel]
Interceptors = Sequence[grpc.aio.ClientInterceptor] | None

_READY = grpc.ChannelConnectivity.READY
_SHUTDOWN = grpc.ChannelConnectivity.SHUTDOWN
_TRANSIENT_FAILURE = grpc.ChannelConnectivity.TRANSIENT_FAILURE
# grpc.aio's own words for this case, so callers see the same text.
_CLOSED_DETAILS = "Channel is closed."


class _Closed(Exception):
    """The channel closed while an RPC waited for a backend."""


class _Core:
    """Balancer + sub-channels + tasks: what the channel and its calls share."""

    def __init__(
        self, settings: Settings, interceptors: Interceptors, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.settings = settings
        self.target = settings.target.text
        self.loop = loop
        self._interceptors = interceptors
        self._balancer: Balancer[SubChannel] = make_balancer(settings)
        # The hot path's pick: a backend, counted, or None (see ``pick``).
        self.pick_now = self._balancer.pick
        # Replaced on every change that could make a backend eligible or
        # change the aggregate state, and on close: whoever waits on the old
        # one looks again.
        self._changed = asyncio.Event()
        self._health_backoff = Backoff(rng=settings.rng)
        # Sub-channels being closed; the loop keeps only weak references to tasks.
        self._closing: set[asyncio.Task[None]] = set()
        self.resolver = Resolver(settings.target)
        self._maintenance: _Maintenance | None = None
        resolution = resolve_initial(self.resolver)
        self.apply(resolution.addresses)
        schedule = resolution_schedule(settings, resolution)
        if schedule is not None:
            self._maintenance = _Maintenance(self, schedule)

    def apply(self, addresses: Sequence[Address]) -> None:
        if self._balancer.closed:
            return
        change = self._balancer.set_addresses(addresses)
        for backend in change.added:
            self._open(backend)
        for backend in change.to_close:
            self._close_leaf(backend)
        self._notify()

    def _open(self, backend: _Backend) -> None:
        core = weakref.ref(self)
        backend.leaf = SubChannel(
            backend.address,
            self.settings,
            interceptors=self._interceptors,
            health_backoff=self._health_backoff,
            on_connectivity=functools.partial(deliver, core, "_on_connectivity", backend),
            on_health=functools.partial(deliver, core, "_on_health", backend),
        )

    def _close_leaf(self, backend: _Backend) -> None:
        if backend.leaf is None:
            return
        task = self.loop.create_task(self._retire(backend))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _retire(self, backend: _Backend, grace: float | None = None) -> None:
        """Close a backend's sub-channel, then let go of the calls it carried.

        Calls the application still holds would keep the connection open
        (see FinishedCall); closing the channel has ended them all.
        """
        leaf = backend.leaf
        assert leaf is not None
        await leaf.close(grace)
        for rpc in leaf.tracked():
            await rpc.settle(backend)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- hot path -------------------------------------------------------------

    def pick(self, wait_for_ready: bool | None, deadline: float | None) -> _Backend | None:
        """A backend for one RPC (counted), None to wait for one, or raise how it ends."""
        backend = self._balancer.pick()
        if backend is None:
            if self._balancer.closed:
                raise _Closed
            remaining = None if deadline is None else deadline - self.loop.time()
            failure = no_backend(self._balancer, wait_for_ready, remaining)
            if failure is not None:
                code, details = failure
                raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)
        return backend

    async def acquire(self, wait_for_ready: bool | None, deadline: float | None) -> _Backend:
        """Wait until ``pick`` gives a backend or says how the RPC ends."""
        while True:
            changed = self._changed
            backend = self.pick(wait_for_ready, deadline)
            if backend is not None:
                return backend
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await changed.wait()

    def pick_excluding(self, failed: Iterable[_Backend]) -> _Backend | None:
        return self._balancer.pick_excluding(failed)

    def release(self, backend: _Backend) -> None:
        if self._balancer.release(backend):
            self._close_leaf(backend)

    # -- events ---------------------------------------------------------------

    def _on_connectivity(self, backend: _Backend, state: grpc.ChannelConnectivity) -> None:
        if backend.removed:
            return
        self._balancer.set_connectivity(backend, state)
        self._notify()
        if state is _TRANSIENT_FAILURE and self._maintenance is not None:
            # The backend may be gone for good: ask DNS again, rate-limited.
            self._maintenance.request_resolution()

    def _on_health(self, backend: _Backend, health: Health) -> None:
        if backend.removed:
            return
        self._balancer.set_health(backend, health)
        self._notify()

    def close_expired_drains(self) -> float | None:
        """Close backends whose drain timed out; the next drain deadline, if any."""
        for backend in self._balancer.expired_drains():
            self._close_leaf(backend)
        return self._balancer.next_drain_deadline()

    # -- the channel's own API --------------------------------------------------

    def state(self, try_to_connect: bool) -> grpc.ChannelConnectivity:
        if try_to_connect:
            for backend in self._balancer.backends:
                if backend.leaf is not None:
                    backend.leaf.connect()
        return self._balancer.aggregate_state()

    async def wait_for_state_change(self, last_observed: grpc.ChannelConnectivity) -> None:
        while True:
            changed = self._changed
            state = self._balancer.aggregate_state()
            if state is not last_observed:
                return
            if state is _SHUTDOWN:
                raise grpc.aio.UsageError(_CLOSED_DETAILS)
            await changed.wait()

    def connection_table(self) -> dict[str, int]:
        return self._balancer.connection_table()

    async def close(self, grace: float | None) -> None:
        if self._balancer.closed:
            return
        backends = self._balancer.close()
        self._notify()
        if self._maintenance is not None:
            self._maintenance.stop()
        leaves = [self._retire(backend, grace) for backend in backends if backend.leaf is not None]
        await asyncio.gather(*leaves, *self._closing)

    def __del__(self) -> None:
        # Dropped without close(): close the sub-channels on the loop, or
        # their watcher tasks would keep them open for as long as it runs.
        with contextlib.suppress(Exception):
            if not self._balancer.closed:
                leaves = [b.leaf for b in self._balancer.close() if b.leaf is not None]
                self.loop.call_soon_threadsafe(_close_orphans, self.loop, leaves, self._maintenance)


# Closing tasks of channels dropped unclosed; the loop keeps only weak
# references to tasks.
_orphans: set[asyncio.Task[None]] = set()


def _close_orphans(
    loop: asyncio.AbstractEventLoop, leaves: list[SubChannel], maintenance: _Maintenance | None
) -> None:
    if maintenance is not None:
        maintenance.stop()
    for leaf in leaves:
        task = loop.create_task(leaf.close())
        _orphans.add(task)
        task.add_done_callback(_orphans.discard)


class _Maintenance:
    """The channel's timer task: DNS re-resolution and drain timeouts.

    A resolution runs in a task of its own (the resolver itself in a
    thread): a slow or dead DNS server must not hold up drain timeouts,
    which this task keeps serving meanwhile.
    """

    def __init__(self, core: _Core, schedule: ResolutionSchedule) -> None:
        self._schedule = schedule
        self._core_ref = weakref.ref(core)
        self._wake = asyncio.Event()
        self._resolving: asyncio.Task[None] | None = None
        self.stopped = False
        self._task = core.loop.create_task(
            self._run(), name=f"grpc_leastconn resolver {core.target}"
        )

    def request_resolution(self) -> None:
        self._schedule.request_early()
        self._wake.set()

    def stop(self) -> None:
        # Woken rather than cancelled, so that the task ends cleanly (see
        # SubChannel.close); an answer still on its way is dropped.
        self.stopped = True
        self._wake.set()

    async def _run(self) -> None:
        wait: float | None = self._schedule.seconds_until_due()
        while not self.stopped:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            self._wake.clear()
            core = self._core_ref()
            if core is None or self.stopped:
                return
            if self._resolving is None and self._schedule.seconds_until_due() <= 0:
                self._resolving = core.loop.create_task(self._resolve(core.resolver, core.target))
            next_drain = core.close_expired_drains()
            del core
            if self._resolving is None:
                wait = next_wakeup(self._schedule, next_drain)
            else:
                # The resolution wakes this task when it is done.
                wait = None if next_drain is None else max(0.0, next_drain - time.monotonic())

    async def _resolve(self, resolver: Resolver, target: str) -> None:
        try:
            # The resolver blocks (getaddrinfo, DNS queries): off the loop.
            resolution = await asyncio.to_thread(resolve_again, resolver, target)
        except ResolutionError:
            self._schedule.failed()
        except Exception:
            # Backing off as from any failure, rather than asking again at once.
            log.exception("re-resolution of %r failed", target)
            self._schedule.failed()
        else:
            core = self._core_ref()
            if core is not None and not self.stopped:
                core.apply(resolution.addresses)
            self._schedule.resolved(resolution.ttl)
        finally:
            self._resolving = None
            self._wake.set()


# -- calls ----------------------------------------------------------------------


class _Rpc:
    """One RPC: its pick, its backend call and its count. It starts when made.

    A streaming call object refers to its RPC, which the tasks driving it
    share, and never the other way round: a call the caller drops can be
    collected, and cancelled. A unary call is never cancelled on drop, so
    it is its own RPC (``_UnaryUnaryCall``): one object per call.
    """

    __slots__ = (
        "__weakref__",
        "_awaiting",
        "_begun",
        "_callbacks",
        "_compression",
        "_core",
        "_credentials",
        "_deadline",
        "_ended",
        "_first_backend",
        "_metadata",
        "_multicallable",
        "_options_set",
        "_request",
        "_sent",
        "_task",
        "_wait_for_ready",
        "backend",
        "call",
        "error",
        "loop",
        "responses",
        "was_cancelled",
    )

    def __init__(
        self,
        multicallable: _MultiCallable,
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
        # What each attempt sends, kept here rather than in a closure: one
        # object fewer per call.
        self._request = request
        self._metadata = metadata
        self._credentials = credentials
        self._compression = compression
        self._options_set = not (metadata is None and credentials is None and compression is None)
        self._deadline = None if timeout is None else core.loop.time() + timeout
        self._wait_for_ready = wait_for_ready
        self.backend: _Backend | None = None
        # The backend call; None until picked, and between the attempts of
        # a re-picked RPC.
        self.call: Any = None
        # The response stream's iterator, once the caller iterates it.
        self.responses: AsyncIterator[Any] | None = None
        # How the RPC ended when it reached no backend (call is None).
        self.error: BaseException | None = None
        self.was_cancelled = False
        self._begun: asyncio.Future[None] | None = None
        # Built on first use: most calls are begun before anyone adds one.
        self._callbacks: list[Callable[[Any], None]] | None = None
        self._task: asyncio.Task[bool] | None = None
        # A unary call's own state, kept here for speed (see _UnaryUnaryCall):
        # the coroutines awaiting it, and whether it has ended for its caller.
        self._awaiting = 0
        self._ended = False
        # The first attempt's backend, released by _first_attempt_done; later
        # attempts (re-picks) each get an _Attempt of their own.
        self._first_backend: _Backend | None = None
        self._sent = False
        # Started at once, here: the common case is a backend eligible now,
        # with nothing yet waiting on the RPC.
        backend = core.pick_now()
        if backend is not None:
            self._send(backend)
        else:
            self._start_later()

    def _start_later(self) -> None:
        """No backend now: fail as the balancer says, or wait for one in a task."""
        try:
            backend = self._core.pick(self._wait_for_ready, self._deadline)
        except _Closed:
            raise grpc.aio.UsageError(_CLOSED_DETAILS) from None
        except grpc.aio.AioRpcError as error:
            # grpc.aio reports an RPC's failure when it is awaited, not when
            # it is made.
            self._end_early(error=error)
            return
        if backend is not None:
            self._begin(backend)
        else:
            self._task = self.loop.create_task(self.wait_and_begin())

    def _first_attempt_done(self, call: Any) -> None:
        backend, self._first_backend = self._first_backend, None
        if backend is not None:
            self._core.release(backend)
        # While a coroutine awaits the call, it decides whether this attempt
        # was the last: it resumes, whatever the attempt's end.
        if not self._awaiting:
            self._attempt_done(call)

    def _attempt_done(self, call: Any) -> None:
        """Told of an attempt's end while nobody awaits, or (None) of an RPC that reached none."""

    @property
    def ended_early(self) -> bool:
        return self.call is None and (self.error is not None or self.was_cancelled)

    def _begin(self, backend: _Backend) -> None:
        """Start the call on ``backend``, then tell whatever waited for it."""
        call = self._send(backend)
        callbacks = self._callbacks
        if callbacks is not None:
            self._callbacks = None
            for callback in callbacks:
                call.add_done_callback(callback)
        if self._begun is not None:
            self._wake()

    def _send(self, backend: _Backend) -> Any:
        """Start the call on ``backend``, counted until its done callback releases it."""
        remaining = None
        if self._deadline is not None:
            # Time spent waiting for a backend counts against the deadline.
            remaining = max(0.0, self._deadline - self.loop.time())
        multicallable = self._multicallable
        # MultiCallableBase._inner_for, inline: one Python frame fewer per call.
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
            self._core.release(backend)
            raise
        if self._sent:
            call.add_done_callback(_Attempt(self, backend))
        else:
            # Most RPCs make one attempt: a bound method, no object of its own.
            self._sent = True
            self._first_backend = backend
            call.add_done_callback(self._first_attempt_done)
        self.backend = backend
        self.call = call
        backend.leaf.track(self)  # type: ignore[union-attr]  # a picked backend has one
        return call

    def _end_early(self, *, error: BaseException | None = None, cancelled: bool = False) -> None:
        """The RPC ends before reaching a backend."""
        if self.call is not None or self.error is not None or self.was_cancelled:
            return
        self.error = error
        self.was_cancelled = cancelled
        self._wake()
        callbacks, self._callbacks = self._callbacks, None
        for callback in callbacks or ():
            callback(None)
        self._attempt_done(None)

    def _wake(self) -> None:
        if self._begun is not None and not self._begun.done():
            self._begun.set_result(None)
        self._begun = None

    async def wait_and_begin(self, failed: Sequence[_Backend] = ()) -> bool:
        """Wait for a backend and start the call there; False if the RPC ended first.

        A re-picked RPC (``failed`` given) first tries every other eligible
        backend, then waits like a new one.
        """
        try:
            backend = self._core.pick_excluding(failed) if failed else None
            if backend is None:
                backend = await self._core.acquire(self._wait_for_ready, self._deadline)
            if self.ended_early:
                self._core.release(backend)
            else:
                self._begin(backend)
        except _Closed:
            # What grpc.aio's close() does to the calls it has started.
            self._end_early(cancelled=True)
        except asyncio.CancelledError:
            self._end_early(cancelled=True)
            raise
        except Exception as exc:
            self._end_early(error=exc)
        return self.call is not None

    async def settle(self, backend: _Backend) -> None:
        """Put the outcome of this RPC's finished call to ``backend`` in the call's place."""
        call = self.call
        if self.backend is not backend or call is None or isinstance(call, FinishedCall):
            return
        if not call.done():
            return
        finished = await FinishedCall.of(
            call,
            unary_response=self._multicallable._unary_response,
            requests_iterated=self._multicallable._streams_requests and self._request is not None,
        )
        if self.call is call:
            self.call = finished
            if self.responses is not None:
                self.responses = finished.resume_responses(self.responses)

    def repick(self, failed: Sequence[_Backend]) -> None:
        """Send the RPC again, away from ``failed``: its last attempt is over (and released)."""
        self.call = None
        self.backend = None
        self._task = self.loop.create_task(self.wait_and_begin(failed))

    async def begun(self) -> Any:
        """The backend call once picked; None if the RPC ended before reaching one.

        Cancelling the caller's wait leaves the RPC alone, as grpc.aio does
        for ``code()`` and the metadata.
        """
        while self.call is None and self.error is None and not self.was_cancelled:
            if self._begun is None:
                self._begun = self.loop.create_future()
            await asyncio.shield(self._begun)
        return self.call

    async def started(self) -> Any:
        """The backend call, for an operation on it; raises if the RPC reached none.

        Cancelling the caller's wait cancels the RPC, as grpc.aio does for
        reads, writes and ``await call``.
        """
        try:
            call = await self.begun()
        except asyncio.CancelledError:
            self.cancel_rpc()
            raise
        if call is None:
            if self.was_cancelled:
                raise asyncio.CancelledError()
            assert self.error is not None
            raise self.error
        return call

    def cancel_rpc(self) -> bool:
        if self.call is not None:
            if not self.call.cancel():
                return False
            self.was_cancelled = True
            return True
        if self.ended_early:
            return False
        self._end_early(cancelled=True)
        if self._task is not None:
            self._task.cancel()
        return True

    def finished(self) -> bool:
        return bool(self.call.done()) if self.call is not None else self.ended_early

    def is_cancelled(self) -> bool:
        return bool(self.call.cancelled()) if self.call is not None else self.was_cancelled

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

    (The first attempt's is the RPC's own ``_first_attempt_done``.)
    """

    __slots__ = ("_rpc",)

    def __init__(self, rpc: _Rpc, backend: _Backend) -> None:
        Release.__init__(self, rpc._core, backend)
        self._rpc = rpc

    def __call__(self, call: object = None) -> None:
        Release.__call__(self, call)
        rpc = self._rpc
        if not rpc._awaiting:
            rpc._attempt_done(call)


class _Call:
    """grpc.aio's Call interface over one balanced RPC (``_rpc``)."""

    __slots__ = ()
    _rpc: _Rpc

    async def _settled(self) -> Any:
        """The backend call whose status is the RPC's; None if it reached none."""
        return await self._rpc.begun()

    def time_remaining(self) -> float | None:
        return self._rpc.time_remaining()

    async def initial_metadata(self) -> grpc.aio.Metadata:
        call = await self._rpc.begun()
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


class _UnaryUnaryCall(_Rpc, _Call, grpc.aio.UnaryUnaryCall[Any, Any]):
    """A unary call: its own RPC, re-picked by whoever awaits it while it never left.

    Its backend call starts when it is made (or, with no backend eligible
    yet, once one is), with no task of its own: a task per call would cost
    more client CPU than the balancing itself. Only the awaiting coroutine
    sees an attempt's error, so only an awaited call is re-picked; one
    nobody awaits runs to its end on its first backend, like grpc.aio's own
    unary calls, and its failure is raised where it is awaited, never logged.
    """

    # Unary state beyond _Rpc's _awaiting (coroutines awaiting the call:
    # while there are some, they decide whether an attempt that ended is
    # the last) and _ended. Defaults in the class, set on the call only when
    # they change, which is rare: an __init__ of its own would cost every
    # call one more Python frame.
    _ending: asyncio.Future[None] | None = None
    # Backends this RPC never reached; built at the first re-pick.
    _failed: list[_Backend] | None = None
    _done_callbacks: list[Callable[[Any], None]] | None = None

    @property
    def _rpc(self) -> _Rpc:  # type: ignore[override]
        # _Call's methods reach their RPC through _rpc: a unary call is its own.
        return self

    def _attempt_done(self, call: Any) -> None:
        self._finish()

    def _finish(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self._ending is not None and not self._ending.done():
            self._ending.set_result(None)
        callbacks, self._done_callbacks = self._done_callbacks, None
        if callbacks is not None:
            for callback in callbacks:
                callback(self)

    async def _settled(self) -> Any:
        if not self._ended:
            if self._ending is None:
                self._ending = self.loop.create_future()
            await asyncio.shield(self._ending)
        return self.call

    def __await__(self) -> Generator[Any, None, Any]:
        self._awaiting += 1
        try:
            while True:
                call = self.call
                if call is None:
                    call = yield from self.started().__await__()
                try:
                    response = yield from call.__await__()
                except grpc.aio.AioRpcError as error:
                    if self.call is not call:
                        continue  # Another awaiter re-picked it.
                    backend = self.backend
                    assert backend is not None
                    failed = self._failed
                    if failed is None:
                        failed = self._failed = []
                    if self._ended or not may_repick(error, len(failed), backend):
                        self._finish()
                        raise
                else:
                    self._finish()
                    return response
                failed.append(backend)
                log.debug("RPC never reached %s; re-picking", backend.key)
                self.repick(failed)
        finally:
            self._awaiting -= 1
            if not self._awaiting and not self._ended and self.finished():
                # Its awaiter gave up on an attempt that ended meanwhile.
                self._finish()

    def cancel(self) -> bool:
        if self._ended or not self.cancel_rpc():
            return False
        # No attempt follows a cancellation: done now, as grpc.aio's calls are.
        self._finish()
        return True

    def cancelled(self) -> bool:
        return self.is_cancelled()

    def done(self) -> bool:
        return self._ended

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self._ended:
            callback(self)
        elif self._done_callbacks is None:
            self._done_callbacks = [callback]
        else:
            self._done_callbacks.append(callback)

    async def initial_metadata(self) -> grpc.aio.Metadata:
        call = await self.begun()
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

    def __init__(self, rpc: _Rpc) -> None:
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
        call = await self._rpc.started()
        await call.wait_for_connection()


class _ResponseStream(_StreamingCall):
    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        rpc = self._rpc
        if rpc.responses is None:
            call = await rpc.started()
            rpc.responses = call.__aiter__()
        return await rpc.responses.__anext__()

    async def read(self) -> Any:
        call = await self._rpc.started()
        return await call.read()


class _RequestStream(_StreamingCall):
    async def write(self, request: Any) -> None:
        call = await self._rpc.started()
        await call.write(request)

    async def done_writing(self) -> None:
        call = await self._rpc.started()
        await call.done_writing()


class _UnaryStreamCall(_ResponseStream, grpc.aio.UnaryStreamCall[Any, Any]):
    pass


class _StreamUnaryCall(_RequestStream, grpc.aio.StreamUnaryCall[Any, Any]):
    def __await__(self) -> Generator[Any, None, Any]:
        call = yield from self._rpc.started().__await__()
        response = yield from call.__await__()
        return response


class _StreamStreamCall(_ResponseStream, _RequestStream, grpc.aio.StreamStreamCall[Any, Any]):
    pass


class _MultiCallable(MultiCallableBase[_Core]):
    __slots__ = ()
    # Whether its calls end with one response, which a finished call keeps.
    _unary_response = True
    # Whether its calls take a request stream (an iterator, or written).
    _streams_requests = False


class _UnaryUnary(_MultiCallable, grpc.aio.UnaryUnaryMultiCallable[Any, Any]):
    __slots__ = ()
    _factory_name = "unary_unary"

    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> _UnaryUnaryCall:
        return _UnaryUnaryCall(
            self, request, timeout, metadata, credentials, wait_for_ready, compression
        )


class _UnaryStream(_MultiCallable, grpc.aio.UnaryStreamMultiCallable[Any, Any]):
    __slots__ = ()
    _unary_response = False
    _factory_name = "unary_stream"

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
        rpc = _Rpc(self, request, timeout, metadata, credentials, wait_for_ready, compression)
        return _UnaryStreamCall(rpc)


class _StreamUnary(_MultiCallable, grpc.aio.StreamUnaryMultiCallable[Any, Any]):
    __slots__ = ()
    _streams_requests = True
    _factory_name = "stream_unary"

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
        rpc = _Rpc(
            self, request_iterator, timeout, metadata, credentials, wait_for_ready, compression
        )
        return _StreamUnaryCall(rpc)


class _StreamStream(_MultiCallable, grpc.aio.StreamStreamMultiCallable[Any, Any]):
    __slots__ = ()
    _streams_requests = True
    _unary_response = False
    _factory_name = "stream_stream"

    def __call__(
        self,
        request_iterator: Any = None,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> _StreamStreamCall:
        rpc = _Rpc(
            self, request_iterator, timeout, metadata, credentials, wait_for_ready, compression
        )
        return _StreamStreamCall(rpc)


# -- the channel ----------------------------------------------------------------


class LeastConnChannel(grpc.aio.Channel):
    """A grpc.aio.Channel sending each new RPC to the backend with the fewest in flight.

    Build it with ``insecure_channel()`` or ``secure_channel()`` inside a
    coroutine; use it on that event loop only.
    """

    def __init__(self, core: _Core) -> None:
        self._core = core

    @property
    def target(self) -> str:
        return self._core.target

    def connection_table(self) -> dict[str, int]:
        """Every known backend ("host:port") -> RPCs in flight on it now."""
        return self._core.connection_table()

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
        """Close every sub-channel; RPCs still running after ``grace`` seconds are cancelled."""
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
    tie_break: TieBreak = "round_robin",
    health_check_service: str | None = "",
    resolve_min_interval: float = DEFAULT_RESOLVE_MIN_INTERVAL,
    resolve_max_interval: float = DEFAULT_RESOLVE_MAX_INTERVAL,
    drain_timeout: float | None = DEFAULT_DRAIN_TIMEOUT,
    rng: random.Random | None = None,
) -> LeastConnChannel:
    """A least-connection ``grpc.aio`` channel over plaintext connections.

    Call it inside a coroutine: the channel's tasks run on the running event
    loop, and it is to be used on that loop only. The options are those of
    ``grpc_leastconn.insecure_channel`` (see the README), plus:

    ``interceptors``: ``grpc.aio`` client interceptors, given to every
    backend's channel. They run per call after the pick, on the backend
    chosen for it: a call an interceptor retries goes to the same backend
    and counts once. They also see each backend's grpc.health.v1 Watch,
    which shares the backend's channel (turn health checking off with
    ``health_check_service=None``).
    """
    return _make(
        target,
        None,
        options,
        compression,
        interceptors,
        tie_break=tie_break,
        health_check_service=health_check_service,
        resolve_min_interval=resolve_min_interval,
        resolve_max_interval=resolve_max_interval,
        drain_timeout=drain_timeout,
        rng=rng,
    )


def secure_channel(
    target: str | Sequence[str],
    credentials: grpc.ChannelCredentials,
    options: Options = None,
    compression: grpc.Compression | None = None,
    *,
    interceptors: Interceptors = None,
    tie_break: TieBreak = "round_robin",
    health_check_service: str | None = "",
    resolve_min_interval: float = DEFAULT_RESOLVE_MIN_INTERVAL,
    resolve_max_interval: float = DEFAULT_RESOLVE_MAX_INTERVAL,
    drain_timeout: float | None = DEFAULT_DRAIN_TIMEOUT,
    rng: random.Random | None = None,
) -> LeastConnChannel:
    """A least-connection ``grpc.aio`` channel over TLS (or other channel credentials).

    Same options as ``insecure_channel``, interceptors included.
    """
    check_credentials(credentials)
    return _make(
        target,
        credentials,
        options,
        compression,
        interceptors,
        tie_break=tie_break,
        health_check_service=health_check_service,
        resolve_min_interval=resolve_min_interval,
        resolve_max_interval=resolve_max_interval,
        drain_timeout=drain_timeout,
        rng=rng,
    )


def _make(
    target: str | Sequence[str],
    credentials: grpc.ChannelCredentials | None,
    options: Options,
    compression: grpc.Compression | None,
    interceptors: Interceptors,
    **tuning: Any,
) -> LeastConnChannel:
    settings = make_settings(
        target, credentials=credentials, options=options, compression=compression, **tuning
    )
    checked = _check_interceptors(interceptors)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            "grpc_leastconn.aio channels must be created inside a coroutine: "
            "their tasks run on the running event loop"
        ) from None
    return LeastConnChannel(_Core(settings, checked, loop))


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
