"""Sync front end: a grpc.Channel that balances every RPC by least connections.

The balancer's state is guarded by one lock, held only to pick and to
release (microseconds, no I/O). Each RPC is counted from the pick until it
truly ends:

- blocking calls (``__call__``, ``with_call``) release in ``finally``;
- futures and streaming calls release in grpcio's done callback;
- a response iterator the caller drops is cancelled by our wrapper's
  ``__del__`` (grpcio keeps a dropped call alive and streaming: its done
  callback holds the call), and the cancellation fires the done callback.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import random
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from ._backoff import Backoff, ResolutionSchedule
from ._balancer import Backend, Balancer, Health, log
from ._errors import FailedCall
from ._frontend import (
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
from ._picker import TieBreak
from ._resolver import ResolutionError, Resolver
from ._settings import (
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_RESOLVE_MAX_INTERVAL,
    DEFAULT_RESOLVE_MIN_INTERVAL,
    Options,
    Settings,
    check_credentials,
    make_settings,
)
from ._subchannel import SubChannel
from ._target import Address

_Backend = Backend[SubChannel]


class _Core:
    """Balancer + lock + sub-channels + timers: what the channel and its calls share."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.target = settings.target.text
        self._lock = threading.Lock()
        # Notified on every change that could make a backend eligible, and on
        # close: calls waiting for a backend re-check then.
        self._changed = threading.Condition(self._lock)
        self._balancer: Balancer[SubChannel] = make_balancer(settings)
        self._health_backoff = Backoff(rng=settings.rng)
        self._subscribers: dict[Callable[[grpc.ChannelConnectivity], None], None] = {}
        self._reported_state: grpc.ChannelConnectivity | None = None
        self._deliveries: _Deliveries | None = None
        self._resolver = Resolver(settings.target)
        # Set before any sub-channel exists: their callbacks read it.
        self._maintenance: _Maintenance | None = None
        resolution = resolve_initial(self._resolver)
        self._apply(resolution.addresses)
        schedule = resolution_schedule(settings, resolution)
        if schedule is not None:
            self._maintenance = _Maintenance(self, schedule)

    def _apply(self, addresses: Sequence[Address]) -> None:
        with self._lock:
            if self._balancer.closed:
                return
            change = self._balancer.set_addresses(addresses)
            for backend in change.added:
                self._open(backend)
        self._close_leaves(change.to_close)

    def _open(self, backend: _Backend) -> None:
        # Weak references: the sub-channel's threads must not keep an
        # abandoned channel alive.
        core = weakref.ref(self)
        settings = self.settings
        backend.leaf = SubChannel(
            backend.address,
            credentials=settings.credentials,
            options=settings.options,
            compression=settings.compression,
            health_check_service=settings.health_check_service,
            health_backoff=self._health_backoff,
            on_connectivity=functools.partial(deliver, core, "_on_connectivity", backend),
            on_health=functools.partial(deliver, core, "_on_health", backend),
        )

    @staticmethod
    def _close_leaves(backends: Sequence[_Backend]) -> None:
        leaves = [backend.leaf for backend in backends if backend.leaf is not None]
        if len(leaves) == 1:
            leaves[0].close()
            return
        # Side by side: each close waits up to 0.2 s for grpcio's connectivity
        # poller, which would add up over many backends.
        closers = [threading.Thread(target=leaf.close, daemon=True) for leaf in leaves]
        for closer in closers:
            closer.start()
        for closer in closers:
            closer.join()

    # -- hot path -------------------------------------------------------------

    def acquire(self, wait_for_ready: bool | None, timeout: float | None) -> _Backend:
        """Pick a backend for one RPC (counted) or raise FailedCall."""
        with self._lock:
            backend = self._balancer.pick()
            if backend is None:
                backend = self._wait_for_backend(wait_for_ready, timeout)
        return backend

    def release(self, backend: _Backend) -> None:
        with self._lock:
            drained = self._balancer.release(backend)
        if drained and backend.leaf is not None:
            # This may run in the sub-channel's own callback thread, which
            # closing the channel would wait for: close it on another thread.
            threading.Thread(target=backend.leaf.close, daemon=True).start()

    def _wait_for_backend(self, wait_for_ready: bool | None, timeout: float | None) -> _Backend:
        # Called with the lock held. Like a gRPC channel: calls queue while
        # some backend is connecting, fail fast once none can serve, and with
        # wait_for_ready wait for one until their deadline.
        balancer = self._balancer
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if balancer.closed:
                raise ValueError(f"Cannot invoke RPC: channel for {self.target!r} is closed")
            remaining = None if deadline is None else deadline - time.monotonic()
            failure = no_backend(balancer, wait_for_ready, remaining)
            if failure is not None:
                raise FailedCall(*failure)
            self._changed.wait(remaining)
            backend = balancer.pick()
            if backend is not None:
                return backend

    def repick(
        self, failed: Sequence[_Backend], wait_for_ready: bool | None, deadline: float | None
    ) -> _Backend:
        """Another backend for an RPC that never reached ``failed`` (see never_sent)."""
        with self._lock:
            backend = self._balancer.pick_excluding(failed)
        if backend is not None:
            return backend
        timeout = None if deadline is None else deadline - time.monotonic()
        return self.acquire(wait_for_ready, timeout)

    # -- events ---------------------------------------------------------------

    def _on_connectivity(self, backend: _Backend, state: grpc.ChannelConnectivity) -> None:
        with self._lock:
            if backend.removed:
                return
            self._balancer.set_connectivity(backend, state)
            self._changed.notify_all()
        if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE and self._maintenance:
            # The backend may be gone for good: ask DNS again, rate-limited.
            self._maintenance.request_resolution()
        self._report_state()

    def _on_health(self, backend: _Backend, health: Health) -> None:
        with self._lock:
            if backend.removed:
                return
            self._balancer.set_health(backend, health)
            self._changed.notify_all()
        self._report_state()

    def _report_state(self) -> None:
        with self._lock:
            state = self._balancer.aggregate_state()
            if state == self._reported_state:
                return
            self._reported_state = state
            if self._deliveries is not None:
                # Queued under the lock: subscribers see states in the order
                # they happened.
                for callback in self._subscribers:
                    self._deliveries.put(callback, state)

    def resolve_now(self) -> float | None:
        """Resolve the target and apply the answer (returns its TTL).

        A failure, or an empty answer, keeps the last good set.
        """
        resolution = resolve_again(self._resolver, self.target)
        self._apply(resolution.addresses)
        return resolution.ttl

    def close_expired_drains(self) -> float | None:
        """Close backends whose drain timed out; the next drain deadline, if any."""
        with self._lock:
            expired = self._balancer.expired_drains()
            next_deadline = self._balancer.next_drain_deadline()
        self._close_leaves(expired)
        return next_deadline

    def subscribe(
        self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool
    ) -> None:
        # Backends connect as soon as they are known, so try_to_connect has
        # nothing left to ask for.
        with self._lock:
            if self._balancer.closed:
                return
            if self._deliveries is None:
                self._deliveries = _Deliveries(self.target)
            state = self._balancer.aggregate_state()
            # A change not reported yet goes to everyone now, so nobody is
            # left on a stale state; a new subscriber hears the current state
            # at once, on another thread, as with grpcio.
            if state != self._reported_state:
                self._reported_state = state
                for existing in self._subscribers:
                    self._deliveries.put(existing, state)
            self._subscribers[callback] = None
            self._deliveries.put(callback, state)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        with self._lock:
            self._subscribers.pop(callback, None)

    def connection_table(self) -> dict[str, int]:
        with self._lock:
            return self._balancer.connection_table()

    def close(self) -> None:
        with self._lock:
            if self._balancer.closed:
                return
            backends = self._balancer.close()
            self._subscribers.clear()
            if self._deliveries is not None:
                self._deliveries.stop()
            self._changed.notify_all()
        if self._maintenance is not None:
            self._maintenance.stop()
        self._close_leaves(backends)

    def __del__(self) -> None:
        # At interpreter exit grpcio's own threads are gone and closing a
        # channel would wait for them forever; the process ends anyway.
        if sys.is_finalizing():
            return
        with contextlib.suppress(Exception):
            self.close()


class _Maintenance:
    """The channel's timer thread: DNS re-resolution and drain timeouts."""

    def __init__(self, core: _Core, schedule: ResolutionSchedule) -> None:
        self._schedule = schedule
        self._wake = threading.Event()
        self._stopped = False
        self._resolving = False
        self._thread = threading.Thread(
            target=self._run,
            args=(weakref.ref(core),),
            name=f"grpc_leastconn resolver {core.target}",
            daemon=True,
        )
        self._thread.start()

    def request_resolution(self) -> None:
        self._schedule.request_early()
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    def _run(self, core_ref: weakref.ref[_Core]) -> None:
        wait: float | None = self._schedule.seconds_until_due()
        while not self._stopped:
            self._wake.wait(wait)
            self._wake.clear()
            core = core_ref()
            if core is None or self._stopped:
                return
            if not self._resolving and self._schedule.seconds_until_due() <= 0:
                # On a thread of its own: a DNS server that does not answer
                # must not hold up drain deadlines.
                self._resolving = True
                threading.Thread(target=self._resolve, args=(core,), daemon=True).start()
            next_drain = core.close_expired_drains()
            if self._resolving:
                # _resolve wakes this loop when it is done.
                wait = None if next_drain is None else max(0.0, next_drain - time.monotonic())
            else:
                wait = next_wakeup(self._schedule, next_drain)
            del core

    def _resolve(self, core: _Core) -> None:
        try:
            ttl = core.resolve_now()
        except ResolutionError:
            self._schedule.failed()
        else:
            self._schedule.resolved(ttl)
        finally:
            self._resolving = False
            self._wake.set()


class _Deliveries:
    """One thread that calls connectivity subscribers, in order, off our locks."""

    def __init__(self, target: str) -> None:
        self._queue: queue.SimpleQueue[
            tuple[Callable[[grpc.ChannelConnectivity], None], grpc.ChannelConnectivity] | None
        ] = queue.SimpleQueue()
        threading.Thread(
            target=self._run, name=f"grpc_leastconn subscribers {target}", daemon=True
        ).start()

    def put(
        self, callback: Callable[[grpc.ChannelConnectivity], None], state: grpc.ChannelConnectivity
    ) -> None:
        self._queue.put((callback, state))

    def stop(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            callback, state = item
            try:
                callback(state)
            except Exception:
                log.exception("connectivity callback failed")


# -- calls ----------------------------------------------------------------------


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


class _MultiCallable(MultiCallableBase["_Core"]):
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
        core = self._core
        deadline = None if timeout is None else time.monotonic() + timeout
        backend = core.acquire(wait_for_ready, timeout)
        failed: list[_Backend] = []
        while True:
            if deadline is not None:
                # Time spent waiting for a backend counts against the deadline.
                timeout = max(0.0, deadline - time.monotonic())
            inner = self._inner_for(backend)
            try:
                # wait_for_ready is ours to honour, at the pick: passed down, it
                # would pin the RPC to this one backend until it came back.
                return (inner.with_call if with_call else inner)(
                    request, timeout, metadata, credentials, None, compression
                )
            except grpc.RpcError as error:
                if not (repick and may_repick(error, len(failed), backend)):
                    raise
            finally:
                core.release(backend)
            failed.append(backend)
            log.debug("RPC never reached %s; re-picking", backend.key)
            backend = core.repick(failed, wait_for_ready, deadline)

    def _start_streaming(
        self,
        start: Callable[[Any, float | None], Any],
        wait_for_ready: bool | None,
        timeout: float | None,
    ) -> Any:
        """A call released by its done callback; ``start(inner, timeout)`` begins it."""
        core = self._core
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            backend = core.acquire(wait_for_ready, timeout)
        except FailedCall as failure:
            return failure
        if deadline is not None:
            # Time spent waiting for a backend counts against the deadline.
            timeout = max(0.0, deadline - time.monotonic())
        try:
            call = start(self._inner_for(backend), timeout)
        except BaseException:
            core.release(backend)
            raise
        call.add_done_callback(Release(core, backend))
        return call


class _UnaryUnary(_MultiCallable, grpc.UnaryUnaryMultiCallable):  # type: ignore[type-arg]
    __slots__ = ()
    _factory_name = "unary_unary"

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
        return self._start_streaming(
            lambda inner, timeout: inner.future(
                request, timeout, metadata, credentials, None, compression
            ),
            wait_for_ready,
            timeout,
        )


class _UnaryStream(_MultiCallable, grpc.UnaryStreamMultiCallable):  # type: ignore[type-arg]
    __slots__ = ()
    _factory_name = "unary_stream"

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        call = self._start_streaming(
            lambda inner, timeout: inner(
                request, timeout, metadata, credentials, None, compression
            ),
            wait_for_ready,
            timeout,
        )
        return call if isinstance(call, FailedCall) else _StreamingCall(call)


class _StreamUnary(_MultiCallable, grpc.StreamUnaryMultiCallable):  # type: ignore[type-arg]
    __slots__ = ()
    _factory_name = "stream_unary"

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
        return self._start_streaming(
            lambda inner, timeout: inner.future(
                request_iterator, timeout, metadata, credentials, None, compression
            ),
            wait_for_ready,
            timeout,
        )


class _StreamStream(_MultiCallable, grpc.StreamStreamMultiCallable):  # type: ignore[type-arg]
    __slots__ = ()
    _factory_name = "stream_stream"

    def __call__(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        call = self._start_streaming(
            lambda inner, timeout: inner(
                request_iterator, timeout, metadata, credentials, None, compression
            ),
            wait_for_ready,
            timeout,
        )
        return call if isinstance(call, FailedCall) else _StreamingCall(call)


# -- the channel ----------------------------------------------------------------


class LeastConnChannel(grpc.Channel):
    """A grpc.Channel sending each new RPC to the backend with the fewest in flight.

    Build it with ``insecure_channel()`` or ``secure_channel()``.
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
        """Close every sub-channel; RPCs in flight are cancelled."""
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
    *,
    tie_break: TieBreak = "round_robin",
    health_check_service: str | None = "",
    resolve_min_interval: float = DEFAULT_RESOLVE_MIN_INTERVAL,
    resolve_max_interval: float = DEFAULT_RESOLVE_MAX_INTERVAL,
    drain_timeout: float | None = DEFAULT_DRAIN_TIMEOUT,
    rng: random.Random | None = None,
) -> LeastConnChannel:
    """A least-connection channel over plaintext connections.

    See the README for every option; ``secure_channel`` takes the same.
    """
    return _make(
        target,
        None,
        options,
        compression,
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
    tie_break: TieBreak = "round_robin",
    health_check_service: str | None = "",
    resolve_min_interval: float = DEFAULT_RESOLVE_MIN_INTERVAL,
    resolve_max_interval: float = DEFAULT_RESOLVE_MAX_INTERVAL,
    drain_timeout: float | None = DEFAULT_DRAIN_TIMEOUT,
    rng: random.Random | None = None,
) -> LeastConnChannel:
    """A least-connection channel over TLS (or other channel credentials)."""
    check_credentials(credentials)
    return _make(
        target,
        credentials,
        options,
        compression,
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
    **tuning: Any,
) -> LeastConnChannel:
    settings = make_settings(
        target, credentials=credentials, options=options, compression=compression, **tuning
    )
    return LeastConnChannel(_Core(settings))
