"""What the sync and asyncio front ends share, apart from how they run.

Each front end has its own machinery (a lock and threads, or the event loop
and its tasks). The rules both follow live here once: how a channel's
balancer and resolution schedule come from its settings, what an RPC gets
when no backend is eligible, when a failed RPC may go to another backend,
how each backend's inner multicallable is cached, and how an RPC's count is
released exactly once.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import grpc

from ._backoff import ResolutionSchedule
from ._balancer import Backend, Balancer, log
from ._errors import never_sent
from ._resolver import Resolution, ResolutionError, Resolver
from ._settings import Settings

Leaf = TypeVar("Leaf")
CoreT = TypeVar("CoreT", bound="Releaser")

# A re-pick marks nothing; each attempt only skips the backends this RPC
# already failed to reach. Bounded so a flapping fleet cannot loop a call.
MAX_REPICKS = 3


class Releaser(Protocol):
    def release(self, backend: Any) -> None: ...


# -- building a channel ---------------------------------------------------------


def make_balancer(settings: Settings) -> Balancer[Any]:
    return Balancer(
        settings.target.text,
        tie_break=settings.tie_break,
        rng=settings.rng,
        health_checking=settings.health_check_service is not None,
        drain_timeout=settings.drain_timeout,
    )


def resolve_initial(resolver: Resolver) -> Resolution:
    """The first resolution: a target that names no address is a bad argument."""
    try:
        return resolver.resolve()
    except ResolutionError as exc:
        raise ValueError(str(exc)) from None


def resolution_schedule(settings: Settings, first: Resolution) -> ResolutionSchedule | None:
    """When to resolve again; None for targets of IP literals only."""
    if not settings.target.needs_dns:
        return None
    schedule = ResolutionSchedule(
        settings.resolve_min_interval, settings.resolve_max_interval, rng=settings.rng
    )
    schedule.resolved(first.ttl)
    return schedule


def resolve_again(resolver: Resolver, target: str) -> Resolution:
    """Re-resolution; the caller keeps the last good set when it raises."""
    try:
        return resolver.resolve()
    except ResolutionError as exc:
        log.warning("re-resolution of %r failed, keeping the last good backends: %s", target, exc)
        raise


def next_wakeup(schedule: ResolutionSchedule, next_drain: float | None) -> float:
    """Seconds until the next re-resolution or drain deadline, whichever is first."""
    wait = schedule.seconds_until_due()
    if next_drain is not None:
        wait = min(wait, max(0.0, next_drain - time.monotonic()))
    return wait


def deliver(core_ref: weakref.ref[Any], method: str, backend: Backend[Any], value: Any) -> None:
    """A sub-channel's report, delivered only while its channel is alive.

    Sub-channels hold their channel's core through a weak reference: their
    threads and tasks must not keep an abandoned channel alive.
    """
    core = core_ref()
    if core is not None:
        getattr(core, method)(backend, value)


# -- picking ----------------------------------------------------------------------


def no_backend(
    balancer: Balancer[Any], wait_for_ready: bool | None, remaining: float | None
) -> tuple[grpc.StatusCode, str] | None:
    """How an RPC that found no eligible backend ends now; None: it waits.

    Like a gRPC channel: calls queue while some backend is connecting, fail
    fast once none can serve, and with wait_for_ready wait for one until
    their deadline.
    """
    if not wait_for_ready and not balancer.starting:
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
    """Done callback that releases one RPC's count exactly once."""

    __slots__ = ("_backend", "_core")

    def __init__(self, core: Releaser, backend: Backend[Any]) -> None:
        self._core = core
        self._backend: Backend[Any] | None = backend

    def __call__(self, _call: object = None) -> None:
        backend, self._backend = self._backend, None
        if backend is not None:
            self._core.release(backend)


class MultiCallableBase(Generic[CoreT]):
    """A balanced multicallable: one inner multicallable per backend."""

    __slots__ = ("_core", "_deserializer", "_inner", "_method", "_registered", "_serializer")

    # The backend channel's factory: "unary_unary", "unary_stream", ...
    _factory_name = ""

    def __init__(
        self,
        core: CoreT,
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
        self._inner: dict[Backend[Any], Any] = {}

    def _inner_for(self, backend: Backend[Any]) -> Any:
        return self._inner.get(backend) or self._build(backend)

    def _build(self, backend: Backend[Any]) -> Any:
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
