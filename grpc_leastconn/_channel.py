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
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from ._balancer import Backend, Balancer
from ._errors import FailedCall
from ._picker import TIE_BREAKS, TieBreak
from ._resolver import ResolutionError, Resolver
from ._subchannel import SubChannel
from ._target import parse_target

_Backend = Backend[SubChannel]
Options = Sequence[tuple[str, Any]] | None


class _Core:
    """Balancer + lock + sub-channels: what the channel and its calls share."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        credentials: grpc.ChannelCredentials | None,
        options: Options,
        compression: grpc.Compression | None,
        tie_break: TieBreak,
        rng: random.Random | None,
    ) -> None:
        parsed = parse_target(target)
        _check_tie_break(tie_break)
        _check_options(options)
        self.target = parsed.text
        self._credentials = credentials
        self._options = options
        self._compression = compression
        self._lock = threading.Lock()
        # Waiters for a backend to become eligible (wait_for_ready).
        self._eligible = threading.Condition(self._lock)
        self._balancer: Balancer[SubChannel] = Balancer(parsed.text, tie_break=tie_break, rng=rng)
        self._subscribers: dict[Callable[[grpc.ChannelConnectivity], None], None] = {}
        self._reported_state: grpc.ChannelConnectivity | None = None
        try:
            resolution = Resolver(parsed).resolve()
        except ResolutionError as exc:
            raise ValueError(str(exc)) from None
        with self._lock:
            change = self._balancer.set_addresses(resolution.addresses)
            for backend in change.added:
                self._open(backend)

    def _open(self, backend: _Backend) -> None:
        # A weak reference: the sub-channel's polling thread must not keep an
        # abandoned channel alive.
        report = functools.partial(_report_connectivity, weakref.ref(self), backend)
        backend.leaf = SubChannel(
            backend.address,
            credentials=self._credentials,
            options=self._options,
            compression=self._compression,
            on_connectivity=report,
        )

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
            # Closing a channel from its own callback thread can block it; a
            # drained backend has nothing left in flight, so close it aside.
            threading.Thread(target=backend.leaf.close, daemon=True).start()

    def _wait_for_backend(self, wait_for_ready: bool | None, timeout: float | None) -> _Backend:
        # Called with the lock held.
        balancer = self._balancer
        if balancer.closed:
            raise ValueError(f"Cannot invoke RPC: channel for {self.target!r} is closed")
        if not wait_for_ready:
            raise FailedCall(grpc.StatusCode.UNAVAILABLE, balancer.unavailable_details())
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise FailedCall(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "deadline exceeded while waiting for a backend: "
                    + balancer.unavailable_details(),
                )
            self._eligible.wait(remaining)
            if balancer.closed:
                raise FailedCall(grpc.StatusCode.CANCELLED, f"channel {self.target!r} closed")
            backend = balancer.pick()
            if backend is not None:
                return backend

    # -- events ---------------------------------------------------------------

    def on_connectivity(self, backend: _Backend, state: grpc.ChannelConnectivity) -> None:
        with self._lock:
            if backend.removed:
                return
            if self._balancer.set_connectivity(backend, state) and self._balancer.has_eligible:
                self._eligible.notify_all()
        self._report_state()

    def _report_state(self) -> None:
        with self._lock:
            state = self._balancer.aggregate_state()
            if state == self._reported_state:
                return
            self._reported_state = state
            subscribers = list(self._subscribers)
        for callback in subscribers:
            _call_subscriber(callback, state)

    def subscribe(
        self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool
    ) -> None:
        with self._lock:
            self._subscribers[callback] = None
            state = self._balancer.aggregate_state()
        # grpcio reports the current state at once, on another thread.
        threading.Thread(target=_call_subscriber, args=(callback, state), daemon=True).start()

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
            self._eligible.notify_all()
        for backend in backends:
            if backend.leaf is not None:
                backend.leaf.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _report_connectivity(
    core_ref: weakref.ref[_Core], backend: _Backend, state: grpc.ChannelConnectivity
) -> None:
    core = core_ref()
    if core is not None:
        core.on_connectivity(backend, state)


def _call_subscriber(
    callback: Callable[[grpc.ChannelConnectivity], None], state: grpc.ChannelConnectivity
) -> None:
    try:
        callback(state)
    except Exception:
        import logging

        logging.getLogger("grpc_leastconn").exception("connectivity callback failed")


def _check_tie_break(tie_break: object) -> None:
    if not isinstance(tie_break, str):
        raise TypeError(f"tie_break must be a str, not {type(tie_break).__name__}")
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be one of {', '.join(TIE_BREAKS)}; got {tie_break!r}")


def _check_options(options: object) -> None:
    if options is None:
        return
    if not isinstance(options, (list, tuple)):
        raise TypeError(
            f"options must be a list of (name, value) pairs, not {type(options).__name__}"
        )
    for option in options:
        if not (isinstance(option, tuple) and len(option) == 2 and isinstance(option[0], str)):
            raise TypeError(f"each option must be a (str, value) pair; got {option!r}")


# -- calls ----------------------------------------------------------------------


class _Release:
    """Done callback that releases one RPC's count exactly once."""

    __slots__ = ("_backend", "_core")

    def __init__(self, core: _Core, backend: _Backend) -> None:
        self._core = core
        self._backend: _Backend | None = backend

    def __call__(self, _call: object = None) -> None:
        backend, self._backend = self._backend, None
        if backend is not None:
            self._core.release(backend)


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


class _MultiCallable:
    __slots__ = ("_core", "_deserializer", "_inner", "_method", "_registered", "_serializer")

    _factory_name = ""

    def __init__(
        self,
        core: _Core,
        method: str,
        request_serializer: Callable[[Any], bytes] | None,
        response_deserializer: Callable[[bytes], Any] | None,
        registered_method: bool | None,
    ) -> None:
        self._core = core
        self._method = method
        self._serializer = request_serializer
        self._deserializer = response_deserializer
        self._registered = registered_method
        # The inner multicallable per backend, built on first use: grpcio
        # stubs build theirs once, and so do we, once per backend.
        self._inner: dict[_Backend, Any] = {}

    def _build(self, backend: _Backend) -> Any:
        assert backend.leaf is not None
        factory = getattr(backend.leaf.channel, self._factory_name)
        inner = factory(
            self._method,
            self._serializer,
            self._deserializer,
            _registered_method=self._registered,
        )
        if len(self._inner) > 64:
            # Forget backends that are gone, so a changing backend set
            # cannot grow this cache without bound.
            for old in [b for b in self._inner if b.removed]:
                del self._inner[old]
        self._inner[backend] = inner
        return inner

    def _start_streaming(
        self, start: Callable[[Any], Any], wait_for_ready: bool | None, timeout: float | None
    ) -> Any:
        core = self._core
        try:
            backend = core.acquire(wait_for_ready, timeout)
        except FailedCall as failure:
            return failure
        try:
            call = start(self._inner.get(backend) or self._build(backend))
        except BaseException:
            core.release(backend)
            raise
        call.add_done_callback(_Release(core, backend))
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
        core = self._core
        backend = core.acquire(wait_for_ready, timeout)
        try:
            inner = self._inner.get(backend) or self._build(backend)
            return inner(request, timeout, metadata, credentials, wait_for_ready, compression)
        finally:
            core.release(backend)

    def with_call(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        core = self._core
        backend = core.acquire(wait_for_ready, timeout)
        try:
            inner = self._inner.get(backend) or self._build(backend)
            return inner.with_call(
                request, timeout, metadata, credentials, wait_for_ready, compression
            )
        finally:
            core.release(backend)

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
            lambda inner: inner.future(
                request, timeout, metadata, credentials, wait_for_ready, compression
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
            lambda inner: inner(
                request, timeout, metadata, credentials, wait_for_ready, compression
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
        core = self._core
        backend = core.acquire(wait_for_ready, timeout)
        try:
            inner = self._inner.get(backend) or self._build(backend)
            return inner(
                request_iterator, timeout, metadata, credentials, wait_for_ready, compression
            )
        finally:
            core.release(backend)

    def with_call(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        core = self._core
        backend = core.acquire(wait_for_ready, timeout)
        try:
            inner = self._inner.get(backend) or self._build(backend)
            return inner.with_call(
                request_iterator, timeout, metadata, credentials, wait_for_ready, compression
            )
        finally:
            core.release(backend)

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
            lambda inner: inner.future(
                request_iterator, timeout, metadata, credentials, wait_for_ready, compression
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
            lambda inner: inner(
                request_iterator, timeout, metadata, credentials, wait_for_ready, compression
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
    rng: random.Random | None = None,
) -> LeastConnChannel:
    """A least-connection channel over plaintext connections."""
    core = _Core(
        target,
        credentials=None,
        options=options,
        compression=compression,
        tie_break=tie_break,
        rng=rng,
    )
    return LeastConnChannel(core)


def secure_channel(
    target: str | Sequence[str],
    credentials: grpc.ChannelCredentials,
    options: Options = None,
    compression: grpc.Compression | None = None,
    *,
    tie_break: TieBreak = "round_robin",
    rng: random.Random | None = None,
) -> LeastConnChannel:
    """A least-connection channel over TLS (or other channel credentials)."""
    if not isinstance(credentials, grpc.ChannelCredentials):
        raise TypeError(
            f"credentials must be grpc.ChannelCredentials, not {type(credentials).__name__}"
        )
    core = _Core(
        target,
        credentials=credentials,
        options=options,
        compression=compression,
        tie_break=tie_break,
        rng=rng,
    )
    return LeastConnChannel(core)
