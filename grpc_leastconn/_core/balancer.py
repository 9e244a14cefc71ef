"""Balancer: owns every backend's state and applies events one at a time.

Events are address sets from the resolver, connectivity changes of each
backend channel, health reports, picks and releases. The balancer decides
which backends are eligible and keeps the picker in step; it never does I/O,
never starts threads and never blocks. Each front end serializes calls into
it (a lock in the sync front end, the event loop in the asyncio one) and
carries out what the return values ask for: open a backend channel, close one.

A backend is eligible when it is in the current address set, its backend
channel is READY and its health check (if any) says it may serve.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic

import grpc

from .backend import Backend, BackendState, ChannelT, Health
from .choice import TwoChoices, make_picker
from .counts import Counts
from .failures import DEFAULT_FAILURE_CODES, decayed_penalty
from .outlier import OutlierDetection
from .picker import Picker, TieBreak
from .reachability import log_reachability
from .server_load import trailer_in_flight
from .signals import Signals
from .slowstart import SlowStart
from .stepped import SteppedPicker
from .target import Address
from .weighted import UNIT

if TYPE_CHECKING:
    from .seams import Observer

log = logging.getLogger("grpc_leastconn")

Clock = Callable[[], float]

_Connectivity = grpc.ChannelConnectivity
_OK = grpc.StatusCode.OK


@dataclass(slots=True)
class AddressChange(Generic[ChannelT]):
    """What the front end must do after a new address set."""

    added: list[Backend[ChannelT]] = field(default_factory=list)
    # Removed backends with nothing in flight: close their backend channels now.
    # The others drain: each is returned by release() once its last RPC ends,
    # or by expired_drains() when the drain timeout passes.
    to_close: list[Backend[ChannelT]] = field(default_factory=list)


class Balancer(Generic[ChannelT]):
    """All backends of one channel: the current set, the draining ones, the picker."""

    def __init__(
        self,
        target: str,
        *,
        tie_break: TieBreak = "round_robin",
        rng: random.Random | None = None,
        health_checking: bool = True,
        initial_health: Health | None = None,
        drain_timeout: float | None = None,
        clock: Clock = time.monotonic,
        observer: Observer | None = None,
        failure_codes: Collection[grpc.StatusCode] = DEFAULT_FAILURE_CODES,
        failure_penalty: bool = True,
        outlier_detection: OutlierDetection | None = None,
        weighted: bool = False,
        fractional_costs: bool = False,
        weight_of: Callable[[Address], float] | None = None,
        step_of: Callable[[Address], int] | None = None,
        slow_start: SlowStart | None = None,
        server_load: bool = False,
        two_choices: bool | None = None,
    ) -> None:
        self.target = target
        self._picker: Picker = make_picker(
            tie_break,
            rng,
            weighted=weighted,
            fractional_costs=fractional_costs,
            slow_start=slow_start is not None,
            stepped=step_of is not None,
        )
        self._step_of = step_of if isinstance(self._picker, SteppedPicker) else None
        self._weight_of = weight_of
        self._observer = observer
        self.clock = clock
        # Events, counted for metrics (metrics.py reads them when collected).
        self.counts = Counts()
        self._signals = Signals(
            target,
            picker=self._picker,
            clock=clock,
            rng=rng,
            counts=self.counts,
            failure_codes=failure_codes,
            failure_penalty=failure_penalty,
            outlier_detection=outlier_detection,
            slow_start=slow_start,
            server_load=server_load,
        )
        # The hot path calls the observer only for the hooks it overrides.
        self._on_release = (
            observer.on_release if observer is not None and observer.watches("on_release") else None
        )
        # Loads read from reports other clients read too: the better of two
        # random backends, so they do not herd (choice.py); by default so
        # exactly when server_load is on.
        self._two_choices = (
            TwoChoices(self._picker, rng or random.Random())
            if (server_load if two_choices is None else two_choices)
            else None
        )
        self._choose: Callable[[int], Backend[ChannelT] | None] = (
            self._picker.pick if self._two_choices is None else self._two_choices.pick  # type: ignore[assignment]
        )
        # The choice itself, or ours around it when someone observes.
        self._pick: Callable[[int], Backend[ChannelT] | None] = (
            self._observed_pick
            if observer is not None and observer.watches("on_pick")
            else self._choose
        )
        self._backends: dict[Address, Backend[ChannelT]] = {}
        # Removed from the address set, with RPCs still running: no new picks.
        self._draining: dict[Backend[ChannelT], None] = {}
        # A new backend's health: PENDING until its Watch answers, DISABLED
        # with checking off, or as given (CHANNEL: its backend channel checks).
        if initial_health is None:
            initial_health = Health.PENDING if health_checking else Health.DISABLED
        self._initial_health = initial_health
        self._drain_timeout = drain_timeout
        self.closed = False

    # -- events from the resolver and the backend channels -------------------

    def set_addresses(self, addresses: Iterable[Address]) -> AddressChange[ChannelT]:
        wanted = dict.fromkeys(addresses)
        change: AddressChange[ChannelT] = AddressChange()
        for address in [a for a in self._backends if a not in wanted]:
            backend = self._backends.pop(address)
            backend.removed = True
            self._withdraw(backend)
            self._signals.forget(backend)
            if backend.in_flight:
                if self._drain_timeout is not None:
                    backend.drain_deadline = self.clock() + self._drain_timeout
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
                weight = 1.0 if self._weight_of is None else self._weight_of(address)
                backend = Backend(address, self._initial_health, weight)
                if self._step_of is not None:
                    backend.step = self._step_of(address)
                self._backends[address] = backend
                change.added.append(backend)
                log.info("backend %s added to %r", backend.key, self.target)
        return change

    def set_connectivity(self, backend: Backend[ChannelT], state: grpc.ChannelConnectivity) -> bool:
        """Record a backend channel's state; True when it changed anything.

        Reports about removed backends (draining, or closed) change nothing.
        """
        if backend.connectivity is state or backend.removed:
            return False
        before, backend.connectivity = backend.connectivity, state
        log.debug("backend %s of %r is %s", backend.key, self.target, state.name)
        self.counts.connection_changed(before, state)
        log_reachability(backend, state, self.target, self.clock)
        if self._observer is not None:
            self._observer.on_connectivity(backend, state)
        self._place(backend)
        return True

    def report_load(self, backend: Backend[ChannelT], in_flight: float) -> None:
        """The backend reported ``in_flight`` RPCs of all its clients (ORCA)."""
        if not backend.removed:
            self._signals.reported(backend, in_flight)

    def load_unreported(self, backend: Backend[ChannelT]) -> None:
        """The backend serves no load report stream (UNIMPLEMENTED)."""
        if self._signals.load is not None:
            self._signals.load.unimplemented(backend)

    @property
    def reads_server_load(self) -> bool:
        return self._signals.load is not None

    def note_error(self, backend: Backend[ChannelT], error: str) -> None:
        """An error seen on the backend (a failed call, a broken Watch), for the logs."""
        backend.last_error = error

    def set_health(self, backend: Backend[ChannelT], health: Health) -> bool:
        """Record a health report; True when it changed anything (as set_connectivity)."""
        if backend.health is health or backend.removed:
            return False
        before = backend.health
        backend.health = health
        self.counts.health_changes += 1
        if self._observer is not None:
            self._observer.on_health(backend, health)
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
        self._place(backend)
        return True

    def _place(self, backend: Backend[ChannelT]) -> None:
        """Keep the picker's members exactly the eligible backends."""
        if backend.eligible:
            if not backend.in_picker:
                self._admit(backend)
                self._signals.joined(backend, self._eligible(), self.clock())
        elif backend.in_picker:
            self._withdraw(backend)
            self._signals.left(backend)

    def _admit(self, backend: Backend[ChannelT]) -> None:
        self._picker.add(backend)
        if self._two_choices is not None:
            self._two_choices.add(backend)

    def _withdraw(self, backend: Backend[ChannelT]) -> None:
        self._picker.remove(backend)
        if self._two_choices is not None:
            self._two_choices.remove(backend)

    def _eligible(self) -> Iterator[Backend[ChannelT]]:
        return (backend for backend in self._backends.values() if backend.in_picker)

    # -- the hot path -------------------------------------------------------

    def pick(self, cost: int = UNIT) -> Backend[ChannelT] | None:
        """The eligible backend of lowest cost (or the better of two random
        ones), now carrying one more RPC of ``cost`` (milli-calls), or None.

        Time-driven signals catch up first when due: ramps and decays must
        move under long streams too, where no call ends for minutes.
        """
        signals = self._signals
        if signals.due != math.inf and (now := self.clock()) >= signals.due:
            self.refresh(now)
        return self._pick(cost)

    def _observed_pick(self, cost: int = UNIT) -> Backend[ChannelT] | None:
        backend = self._choose(cost)
        if backend is not None:
            assert self._observer is not None
            self._observer.on_pick(backend)
        return backend

    def pick_excluding(
        self, excluded: Iterable[Backend[ChannelT]], cost: int = UNIT
    ) -> Backend[ChannelT] | None:
        """A pick that skips backends an RPC already failed to reach (a re-pick)."""
        self.counts.repicks += 1
        # Before the excluded step aside: a refresh must see them as they are.
        self.refresh_if_due()
        skipped = [backend for backend in excluded if backend.in_picker]
        for backend in skipped:
            self._withdraw(backend)
        try:
            return self._pick(cost)
        finally:
            for backend in skipped:
                self._admit(backend)

    def release(
        self,
        backend: Backend[ChannelT],
        code: grpc.StatusCode | None = None,
        cost: int = UNIT,
        error: str | None = None,
        trailers: Any = None,
    ) -> bool:
        """gRFC A48: count an RPC as ended, whatever its status.

        ``code`` is how it ended, for the failure signals; None when it says
        nothing about the backend (the RPC never left this process); ``cost``
        what it was picked with; ``error`` the failure's text, kept for the
        logs when it is the backend's; ``trailers`` its trailing metadata, read
        for a load report (server_load). True when the backend was draining and
        this was its last RPC: the front end closes its backend channel now.
        """
        if self._on_release is not None:
            self._on_release(backend)
        if trailers is not None and not backend.removed:
            # Before the release: the report counts this call, and so do we.
            in_flight = trailer_in_flight(trailers)
            if in_flight is not None:
                self._signals.reported(backend, in_flight)
        self._picker.release(backend, cost)
        backend.released += 1
        if code is _OK:
            self.succeeded(backend)
        elif code is not None or error is not None:
            self.judge(backend, code, error)
        signals = self._signals
        if signals.due != math.inf and (now := self.clock()) >= signals.due:
            self.refresh(now)
        if backend.removed and backend.in_flight == 0 and backend in self._draining:
            del self._draining[backend]
            log.info("backend %s of %r drained", backend.key, self.target)
            return True
        return False

    def judge(
        self, backend: Backend[ChannelT], code: grpc.StatusCode | None, error: str | None = None
    ) -> None:
        """What the end of one of its RPCs says of ``backend``: the failure signals.

        release() judges when given the code; an awaited asyncio call is
        released without it and judged here once its awaiter knows.
        """
        if code is _OK:
            self.succeeded(backend)
            return
        signals = self._signals
        if code is not None and not backend.removed:
            signals.judge(backend, code)
        if error is not None and (code is None or code in signals.failure_codes):
            backend.last_error = error

    def succeeded(self, backend: Backend[ChannelT]) -> None:
        """judge(backend, OK): the hot path, usually a backend with no penalty."""
        if not backend.removed:
            if backend.penalty:
                self._signals.succeeded(backend)
            backend.calls_succeeded += 1

    def refresh(self, now: float) -> None:
        """Bring time-driven signals up to date: penalties, A50 sweeps, slow-start ramps."""
        for backend in self._signals.refresh(now, list(self._backends.values()), self._eligible()):
            self._place(backend)

    def refresh_if_due(self) -> None:
        """refresh() if some time-driven signal is due (pick and release inline this)."""
        if self._signals.due != math.inf and (now := self.clock()) >= self._signals.due:
            self.refresh(now)

    def seconds_until_due(self) -> float | None:
        """When a wait for a backend should look again: a penalty decays, a sweep is due.

        None when nothing changes with time alone.
        """
        due: float = self._signals.due
        if due == math.inf:
            return None
        return max(0.0, due - self.clock())

    def pick_fresh(self, cost: int = UNIT) -> Backend[ChannelT] | None:
        """A pick after refresh(): for when ``pick`` found nobody (penalties may have decayed)."""
        self.refresh(self.clock())
        return self._pick(cost)

    # -- timers ---------------------------------------------------------------

    def expired_drains(self) -> list[Backend[ChannelT]]:
        """Draining backends past the drain timeout: close them, cancelling their RPCs."""
        now = self.clock()
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
    def backends(self) -> list[Backend[ChannelT]]:
        """The current address set's backends (not the draining ones)."""
        return list(self._backends.values())

    def backend(self, address: str) -> Backend[ChannelT]:
        """The current backend for ``"host:port"``; KeyError if there is none."""
        for backend in self._backends.values():
            if backend.key == address:
                return backend
        raise KeyError(address)

    def snapshot(self) -> tuple[Backend[ChannelT], ...]:
        """Every backend, current then draining, copied in one step.

        Safe to call from another thread (metrics.py): the copy is made in
        one bytecode, so no event can change the dicts halfway through it.
        """
        return (*self._backends.values(), *self._draining)

    def states(self) -> tuple[BackendState, ...]:
        """Every backend, the current set's first, then those draining.

        Time-driven signals are brought up to date first, as a pick would:
        a ramping weight shows its value now, not at the last pick.
        """
        self.refresh_if_due()
        now = self.clock()
        return tuple(b.state(decayed_penalty(b, now)) for b in self.snapshot())

    def check_invariants(self) -> None:
        """Assert that every count and the picker agree (for tests)."""
        eligible = [b for b in self._backends.values() if b.eligible]
        self._picker.check_invariants(eligible)
        if self._two_choices is not None:
            self._two_choices.check_invariants(eligible)  # type: ignore[arg-type]
        for backend in (*self._backends.values(), *self._draining):
            assert backend.in_flight >= 0, backend
            assert backend.in_picker == backend.eligible, backend

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

    def close(self) -> list[Backend[ChannelT]]:
        """Forget every backend; the front end closes all their backend channels."""
        self.closed = True
        backends = [*self._backends.values(), *self._draining]
        for backend in backends:
            backend.removed = True
            self._withdraw(backend)
            self._signals.forget(backend)
        self._backends.clear()
        self._draining.clear()
        return backends
