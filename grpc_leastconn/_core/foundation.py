"""What both front ends' cores are built on, and read the same way.

A channel's core (``_sync.core.Core``, ``_aio.core.Core``) is this
foundation plus its own machinery: how events are serialized (a lock, or
the event loop), how waiters are woken, how backend channels open and
close. The foundation builds the balancer, the resolver and the
maintenance plan from the settings and seams, resolves the target once, and
answers the read-only questions under the front end's ``_guard``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar

from .backend import Backend, BackendState, ChannelT, Health
from .backend_options import BackendChannelSpec, backend_channel_spec
from .backoff import Backoff
from .balancer import Balancer
from .health import WatchSpec, health_watch
from .maintenance import MaintenancePlan, resolve_initial
from .resolver import Resolver
from .rules import Report, make_balancer
from .seams import ResolverLike, Seams
from .server_load import Unreported, load_watch
from .settings import Settings
from .target import Address

_T = TypeVar("_T")


class Foundation(Generic[ChannelT]):
    """Settings, balancer, resolver and maintenance plan of one channel."""

    # The front end's serialization for reads (its lock, or nothing on the loop).
    _guard: AbstractContextManager[Any] = contextlib.nullcontext()

    def __init__(self, settings: Settings, seams: Seams) -> None:
        self.settings = settings
        self.target = settings.target.text
        self._balancer: Balancer[ChannelT] = make_balancer(settings, seams)
        # One backoff (stateless but for its randomness) for every health Watch.
        self._health_backoff = Backoff(rng=settings.rng)
        self.resolver: ResolverLike = seams.resolver or Resolver(settings.target)
        first = resolve_initial(self.resolver)
        self.plan = MaintenancePlan.for_target(settings, first, seams.clock, self._balancer.counts)
        # Applied by the front end once its own machinery stands.
        self.first_addresses: tuple[Address, ...] = first.addresses
        # Whether calls' trailers are read for load reports (server_load).
        self.reads_load = settings.server_load

    def _watches(self, backend: Backend[ChannelT]) -> list[WatchSpec]:
        """The streams a backend channel keeps watching: health, load reports.

        With health_checker="grpc" there is no health stream of ours: the
        backend channel checks health itself (``_spec``), and the load report
        stream (server_load=True) is then the only one.
        """
        settings = self.settings
        watches = []
        # health_checker="grpc": the backend channel checks (see _spec).
        if settings.health_check_service is not None and settings.watches_health:
            watches.append(
                health_watch(
                    settings.health_check_service,
                    self._health_backoff,
                    Report(self.on_health, backend),
                    Report(self.on_error, backend),
                )
            )
        if settings.server_load:
            watches.append(load_watch(self._health_backoff, Report(self.on_load, backend)))
        return watches

    def on_health(self, backend: Backend[ChannelT], health: Health) -> None:
        raise NotImplementedError

    def on_load(self, backend: Backend[ChannelT], report: float | Unreported) -> None:
        """A load report of the backend's (or: it serves none)."""
        with self._guard:
            if isinstance(report, Unreported):
                self._balancer.load_unreported(backend)
            else:
                self._balancer.report_load(backend, report)

    def _spec(self, backend: Backend[ChannelT]) -> BackendChannelSpec:
        settings = self.settings
        return backend_channel_spec(
            backend.address,
            settings.options,
            settings.credentials,
            settings.compression,
            settings.channel_health_service,
        )

    def on_error(self, backend: Backend[ChannelT], error: str) -> None:
        """An error a backend channel saw (its Watch broke), for the operators' logs."""
        with self._guard:
            self._balancer.note_error(backend, error)

    def connection_table(self) -> dict[str, int]:
        with self._guard:
            return self._balancer.connection_table()

    def backends(self) -> tuple[BackendState, ...]:
        with self._guard:
            return self._balancer.states()

    def inspect(self, look: Callable[[Balancer[ChannelT]], _T]) -> _T:
        """``look(balancer)``, serialized as every event is: a seam for tests."""
        with self._guard:
            return look(self._balancer)


class ChannelViews:
    """What both balanced channels show of themselves beyond grpc's API."""

    _core: Foundation[Any]

    @property
    def target(self) -> str:
        return self._core.target

    def connection_table(self) -> dict[str, int]:
        """Every known backend ("host:port") -> RPCs in flight on it now."""
        return self._core.connection_table()

    def backends(self) -> tuple[BackendState, ...]:
        """Every backend as it stands now: the current address set's, then those draining."""
        return self._core.backends()
