"""Balancer: owns every backend's state and applies events one at a time.

Events are address sets from the resolver, connectivity changes of each
sub-channel, health reports, picks and releases. The balancer decides which
backends are eligible and keeps the picker in step; it never does I/O, never
starts threads and never blocks. Each front end serializes calls into it (a
lock in the sync front end, the event loop in the asyncio one) and carries out
what the return values ask for: open a sub-channel, close one.

A backend is eligible when it is in the current address set, its
sub-channel is READY and its health check (if any) says it may serve.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, TypeVar

import grpc

from ._picker import LeastConnPicker, Node, TieBreak
from ._target import Address

log = logging.getLogger("grpc_leastconn")

Leaf = TypeVar("Leaf")
Clock = Callable[[], float]

_Connectivity = grpc.ChannelConnectivity


class Health(Enum):
    """A backend's grpc.health.v1 status as the balancer uses it (gRFC A17)."""

    # Health checking is off for this channel: the connection state decides.
    DISABLED = "DISABLED"
    # Watch not answered yet: like gRFC A17's CONNECTING, not yet eligible.
    PENDING = "PENDING"
    SERVING = "SERVING"
    NOT_SERVING = "NOT_SERVING"
    SERVICE_UNKNOWN = "SERVICE_UNKNOWN"
    UNKNOWN = "UNKNOWN"
    # gRFC A17: a server without the health service is treated as healthy.
    UNIMPLEMENTED = "UNIMPLEMENTED"

    @property
    def may_serve(self) -> bool:
        return self in _MAY_SERVE


_MAY_SERVE = frozenset({Health.DISABLED, Health.SERVING, Health.UNIMPLEMENTED})


class Backend(Node, Generic[Leaf]):
    """One backend address, its in-flight count and its sub-channel."""

    __slots__ = (
        "address",
        "connectivity",
        "drain_deadline",
        "health",
        "key",
        "leaf",
        "removed",
        "warned_unimplemented",
    )

    def __init__(self, address: Address, health: Health) -> None:
        super().__init__()
        self.address = address
        self.key = str(address)
        self.connectivity = _Connectivity.IDLE
        self.health = health
        self.removed = False
        self.drain_deadline: float | None = None
        self.leaf: Leaf | None = None
        # Each new connection is watched anew; say it has no health service once.
        self.warned_unimplemented = False

    @property
    def eligible(self) -> bool:
        return (
            not self.removed and self.connectivity is _Connectivity.READY and self.health.may_serve
        )

    @property
    def starting(self) -> bool:
        """Not eligible yet, but on its way: connecting or awaiting its first health report."""
        if self.removed:
            return False
        if self.connectivity in (_Connectivity.IDLE, _Connectivity.CONNECTING):
            return True
        return self.connectivity is _Connectivity.READY and self.health is Health.PENDING

    def problem(self) -> str:
        """Why it is not eligible, for error details and logs."""
        if self.removed:
            return "DRAINING"
        if self.connectivity is not _Connectivity.READY:
            return self.connectivity.name
        if not self.health.may_serve:
            return self.health.value
        return "READY"

    def __repr__(self) -> str:
        return f"Backend({self.key}, in_flight={self.in_flight}, {self.problem()})"


@dataclass(slots=True)
class AddressChange(Generic[Leaf]):
    """What the front end must do after a new address set."""

    added: list[Backend[Leaf]] = field(default_factory=list)
    # Removed backends with nothing in flight: close their sub-channels now.
    # The others drain: each is returned by release() once its last RPC ends,
    # or by expired_drains() when the drain timeout passes.
    to_close: list[Backend[Leaf]] = field(default_factory=list)


class Balancer(Generic[Leaf]):
    def __init__(
        self,
        target: str,
        *,
        tie_break: TieBreak = "round_robin",
        rng: random.Random | None = None,
        health_checking: bool = True,
        drain_timeout: float | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.target = target
        self._picker = LeastConnPicker(tie_break, rng)
        # The eligible backend with the fewest in-flight RPCs, counted +1
        # (None if none is eligible): the picker's own method, with no
        # call of ours around it on the hot path.
        self.pick: Callable[[], Backend[Leaf] | None] = self._picker.pick  # type: ignore[assignment]
        self._backends: dict[Address, Backend[Leaf]] = {}
        # Removed from the address set, with RPCs still running: no new picks.
        self._draining: dict[Backend[Leaf], None] = {}
        self._initial_health = Health.PENDING if health_checking else Health.DISABLED
        self._drain_timeout = drain_timeout
        self._clock = clock
        self.closed = False

    # -- events from the resolver and the sub-channels ---------------------

    def set_addresses(self, addresses: Iterable[Address]) -> AddressChange[Leaf]:
        wanted = dict.fromkeys(addresses)
        change: AddressChange[Leaf] = AddressChange()
        for address in [a for a in self._backends if a not in wanted]:
            backend = self._backends.pop(address)
            backend.removed = True
            self._picker.remove(backend)
            if backend.in_flight:
                if self._drain_timeout is not None:
                    backend.drain_deadline = self._clock() + self._drain_timeout
                self._draining[backend] = None
                log.info(
                    "backend %s removed from %r: draining %d RPCs",
                    backend.key,
                    self.target,
                    backend.in_flight,
                )
            else:
                change.to_close.append(backend)
                log.info("backend %s removed from %r", backend.key, self.target)
        for address in wanted:
            if address not in self._backends:
                # An address back before its old backend finished draining
                # gets a fresh backend; the old one still closes when idle.
                backend = Backend(address, self._initial_health)
                self._backends[address] = backend
                change.added.append(backend)
                log.info("backend %s added to %r", backend.key, self.target)
        return change

    def set_connectivity(self, backend: Backend[Leaf], state: grpc.ChannelConnectivity) -> bool:
        """Record a sub-channel's state; True when eligibility changed."""
        if backend.connectivity is state:
            return False
        before = backend.eligible
        backend.connectivity = state
        log.debug("backend %s of %r is %s", backend.key, self.target, state.name)
        return self._refresh(backend, before)

    def set_health(self, backend: Backend[Leaf], health: Health) -> bool:
        """Record a health report; True when eligibility changed."""
        if backend.health is health:
            return False
        before = backend.health
        was_eligible = backend.eligible
        backend.health = health
        if health is Health.UNIMPLEMENTED:
            if not backend.warned_unimplemented:
                backend.warned_unimplemented = True
                log.warning(
                    "backend %s of %r has no grpc.health.v1 service: treated as healthy",
                    backend.key,
                    self.target,
                )
        elif not health.may_serve and health is not Health.PENDING:
            log.warning("backend %s of %r is %s", backend.key, self.target, health.value)
        elif health is Health.SERVING and before not in (Health.PENDING, Health.DISABLED):
            log.info("backend %s of %r is %s again", backend.key, self.target, health.value)
        return self._refresh(backend, was_eligible)

    def _refresh(self, backend: Backend[Leaf], was_eligible: bool) -> bool:
        now = backend.eligible
        if now and not was_eligible:
            self._picker.add(backend)
        elif was_eligible and not now:
            self._picker.remove(backend)
        return now != was_eligible

    # -- the hot path -------------------------------------------------------

    def pick_excluding(self, excluded: Iterable[Backend[Leaf]]) -> Backend[Leaf] | None:
        """A pick that skips backends an RPC already failed to reach."""
        skipped = [backend for backend in excluded if backend.in_picker]
        for backend in skipped:
            self._picker.remove(backend)
        try:
            return self.pick()
        finally:
            for backend in skipped:
                self._picker.add(backend)

    def release(self, backend: Backend[Leaf]) -> bool:
        """gRFC A48: count an RPC as ended, whatever its status.

        True when the backend was draining and this was its last RPC: the
        front end closes its sub-channel now.
        """
        self._picker.release(backend)
        if backend.removed and backend.in_flight == 0 and backend in self._draining:
            del self._draining[backend]
            log.info("backend %s of %r drained", backend.key, self.target)
            return True
        return False

    # -- timers ---------------------------------------------------------------

    def expired_drains(self) -> list[Backend[Leaf]]:
        """Draining backends past the drain timeout: close them, cancelling their RPCs."""
        now = self._clock()
        expired = [
            b for b in self._draining if b.drain_deadline is not None and b.drain_deadline <= now
        ]
        for backend in expired:
            del self._draining[backend]
            log.warning(
                "backend %s of %r: drain timeout, cancelling %d RPCs",
                backend.key,
                self.target,
                backend.in_flight,
            )
        return expired

    def next_drain_deadline(self) -> float | None:
        deadlines = [b.drain_deadline for b in self._draining if b.drain_deadline is not None]
        return min(deadlines, default=None)

    # -- views ----------------------------------------------------------------

    @property
    def backends(self) -> list[Backend[Leaf]]:
        return list(self._backends.values())

    @property
    def has_eligible(self) -> bool:
        return self._picker.size > 0

    @property
    def starting(self) -> bool:
        """Some backend may become eligible without outside help."""
        return any(b.starting for b in self._backends.values())

    def connection_table(self) -> dict[str, int]:
        """Every known backend (draining ones too) -> RPCs in flight now."""
        table = {backend.key: backend.in_flight for backend in self._backends.values()}
        for backend in self._draining:
            table[backend.key] = table.get(backend.key, 0) + backend.in_flight
        return table

    def aggregate_state(self) -> grpc.ChannelConnectivity:
        """The channel's state: READY while any backend is eligible.

        Otherwise CONNECTING while some backend is on its way, IDLE when all
        are idle, else TRANSIENT_FAILURE; SHUTDOWN once closed.
        """
        if self.closed:
            return _Connectivity.SHUTDOWN
        if self._picker.size:
            return _Connectivity.READY
        backends = self._backends.values()
        if backends and all(b.connectivity is _Connectivity.IDLE for b in backends):
            return _Connectivity.IDLE
        if any(b.starting for b in backends):
            return _Connectivity.CONNECTING
        return _Connectivity.TRANSIENT_FAILURE

    def unavailable_details(self) -> str:
        backends = self._backends.values()
        listed = ", ".join(f"{b.key} {b.problem()}" for b in backends)
        return f"no healthy backend for {self.target!r} ({len(backends)} known: {listed})"

    def close(self) -> list[Backend[Leaf]]:
        """Forget every backend; the front end closes all their sub-channels."""
        self.closed = True
        backends = [*self._backends.values(), *self._draining]
        for backend in backends:
            backend.removed = True
            self._picker.remove(backend)
        self._backends.clear()
        self._draining.clear()
        return backends
