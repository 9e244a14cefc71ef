"""The rules every RPC follows, in both front ends.

Each front end has its own machinery (a lock and threads, or the event loop
and its tasks). What an RPC is subject to is written here once: how it ends
when no backend is eligible, when it may be sent to another backend after a
failure, how its count is released exactly once, and how each balanced
multicallable keeps one inner multicallable per backend.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import grpc

from .backend import Backend
from .balancer import Balancer
from .errors import never_sent, never_sent_details
from .seams import Seams
from .settings import Settings
from .tracing import traced

InnerT = TypeVar("InnerT")
ValueT = TypeVar("ValueT")
ChannelT = TypeVar("ChannelT")

# A re-pick marks nothing; each attempt only skips the backends this RPC
# already failed to reach. Bounded so a flapping fleet cannot loop a call.
MAX_REPICKS = 3
# Inner multicallables kept before those of removed backends are forgotten.
_INNER_CACHE_PRUNE_AT = 64


class Releaser(Protocol):
    def release_call(self, backend: Any, call: Any, cost: int) -> None: ...


def make_balancer(settings: Settings, seams: Seams) -> Balancer[Any]:
    return Balancer(
        settings.target.text,
        tie_break=settings.tie_break,
        rng=settings.rng,
        health_checking=settings.health_checking,
        initial_health=settings.initial_health,
        drain_timeout=settings.drain_timeout,
        clock=seams.clock,
        observer=seams.observer,
        failure_codes=settings.failure_codes,
        failure_penalty=settings.failure_penalty,
        outlier_detection=settings.outlier_detection,
        weighted=settings.weighted,
        fractional_costs=bool(settings.call_costs),
        weight_of=settings.weights.of,
        step_of=None if settings.weights.steps is None else settings.weights.step_of,
        slow_start=settings.slow_start,
        server_load=settings.server_load,
        two_choices=seams.two_choices,
    )


def no_backend(
    balancer: Balancer[Any], wait_for_ready: bool | None, remaining: float | None
) -> tuple[grpc.StatusCode, str] | None:
    """How an RPC that found no eligible backend ends now; None: it waits.

    Like a gRPC channel: calls queue while some backend is connecting, fail
    fast once none can serve, and with wait_for_ready wait for one until
    their deadline.
    """
    if not wait_for_ready and not balancer.starting:
        balancer.counts.fail_fast += 1
        return grpc.StatusCode.UNAVAILABLE, balancer.unavailable_details()
    if remaining is not None and remaining <= 0:
        return (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "deadline exceeded while waiting for a backend: " + balancer.unavailable_details(),
        )
    return None


def may_repick(error: grpc.RpcError, failed: int, backend: Backend[Any]) -> bool:
    """Whether an RPC that failed on ``backend``, ``failed`` times before, may go elsewhere.

    Only an RPC that never left this process (see never_sent) can be sent
    again without risk of running twice.
    """
    return failed < MAX_REPICKS and never_sent(error, backend.address)


class Release:
    """Done callback that releases one RPC's count exactly once, with how it ended."""

    __slots__ = ("_backend", "_core", "_cost")

    def __init__(self, core: Releaser, backend: Backend[Any], cost: int) -> None:
        self._core = core
        self._backend: Backend[Any] | None = backend
        self._cost = cost

    def __call__(self, call: object = None) -> None:
        backend, self._backend = self._backend, None
        if backend is not None:
            self._core.release_call(backend, call, self._cost)


Outcome = tuple[grpc.StatusCode | None, str | None]
_OK_OUTCOME: Outcome = (grpc.StatusCode.OK, None)


def outcome(
    code: grpc.StatusCode, details: Callable[[], str | None], backend: Backend[Any]
) -> Outcome:
    """The code to judge the backend by, and the error's text (None for OK).

    The code is None when the RPC never reached the backend: a call that
    never left this process (see never_sent) says nothing about the backend
    itself, only about its connection, whose state tells that. ``details``
    is asked only when the call failed.
    """
    if code is grpc.StatusCode.OK:
        return _OK_OUTCOME
    detail = details() or ""
    text = f"{code.name}: {detail}"
    if code is grpc.StatusCode.UNAVAILABLE and never_sent_details(detail, backend.address):
        return None, text
    return code, text


class Report(Generic[ChannelT, ValueT]):
    """A backend channel's report to its channel's core, delivered while the core lives.

    Backend channels hold their core through a weak reference: their
    threads and tasks must not keep an abandoned channel alive.
    """

    __slots__ = ("_backend", "_method")

    def __init__(
        self, method: Callable[[Backend[ChannelT], ValueT], None], backend: Backend[ChannelT]
    ) -> None:
        self._method = weakref.WeakMethod(method)
        self._backend = backend

    def __call__(self, value: ValueT) -> None:
        method = self._method()
        if method is not None:
            method(self._backend, value)


UnaryInnerT = TypeVar("UnaryInnerT", covariant=True)
StreamInnerT = TypeVar("StreamInnerT", covariant=True)
Serializer = Callable[[Any], bytes] | None
_Serializer = Serializer
_Deserializer = Callable[[bytes], Any] | None


class Factories(Protocol[UnaryInnerT, StreamInnerT]):
    """A backend's grpc channel (sync or asyncio) as the inner caches use it.

    grpcio's factories take ``_registered_method`` (the keyword generated
    stubs pass), which its type stubs do not declare.
    """

    def unary_unary(
        self, method: str, s: _Serializer, d: _Deserializer, *, _registered_method: bool | None
    ) -> UnaryInnerT: ...

    def unary_stream(
        self, method: str, s: _Serializer, d: _Deserializer, *, _registered_method: bool | None
    ) -> StreamInnerT: ...

    def stream_unary(
        self, method: str, s: _Serializer, d: _Deserializer, *, _registered_method: bool | None
    ) -> UnaryInnerT: ...

    def stream_stream(
        self, method: str, s: _Serializer, d: _Deserializer, *, _registered_method: bool | None
    ) -> StreamInnerT: ...


class InnerCache(Generic[InnerT]):
    """A balanced multicallable's inner multicallables, one per backend.

    grpcio stubs build their multicallables once, and so do we, once per
    backend, on its first call there. Subclasses say how to open one on a
    backend channel.
    """

    __slots__ = (
        "_core",
        "_deserializer",
        "_inner",
        "_method",
        "_registered",
        "_serializer",
        "cost",
    )

    def __init__(
        self,
        core: Any,
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
        self._inner: dict[Backend[Any], InnerT] = {}
        # What one call of this method adds to its backend's load (call_costs).
        self.cost: int = core.settings.call_cost(method)

    def _open(self, channel: Any, serializer: Callable[[Any], bytes] | None) -> InnerT:
        """This method's multicallable on a backend's own grpc channel."""
        raise NotImplementedError

    def _inner_for(self, backend: Backend[Any]) -> InnerT:
        return self._inner.get(backend) or self._build(backend)

    def _build(self, backend: Backend[Any]) -> InnerT:
        assert backend.channel is not None
        inner = self._open(
            backend.channel.grpc_channel, traced(self._serializer, self._method, backend.address)
        )
        if len(self._inner) > _INNER_CACHE_PRUNE_AT:
            # Forget backends that are gone, so a changing backend set
            # cannot grow this cache without bound.
            for old in [b for b in self._inner if b.removed]:
                del self._inner[old]
        self._inner[backend] = inner
        return inner


def error_outcome(error: BaseException, backend: Backend[Any]) -> Outcome:
    """``outcome`` of an RPC that raised ``error`` (UNKNOWN if it carries no status)."""
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    if not callable(code) or not callable(details):
        return grpc.StatusCode.UNKNOWN, f"UNKNOWN: {error!r}"
    return outcome(code(), details, backend)
