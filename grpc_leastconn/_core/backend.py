"""One backend as the balancer sees it: its state, its count, and its public view.

``Backend`` is the balancer's record of one address (a picker node, so its
in-flight count lives on it); ``BackendState`` is the frozen snapshot of it
that ``channel.backends()`` hands to users.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

import grpc

from .picker import Node
from .target import Address

ChannelT = TypeVar("ChannelT")

_Connectivity = grpc.ChannelConnectivity


class Health(StrEnum):
    """A backend's grpc.health.v1 status as the balancer uses it (gRFC A17).

    A ``str`` enum: ``state.health == "SERVING"`` works as well as
    ``state.health is Health.SERVING``.
    """

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
    # health_checker="grpc": the backend channel checks (C-core's client-side
    # health checking), and tells only through its connectivity: READY means
    # serving; not READY may be unreachable or not serving, it cannot say which.
    CHANNEL = "CHANNEL"

    @property
    def may_serve(self) -> bool:
        return self in _MAY_SERVE


_MAY_SERVE = frozenset({Health.DISABLED, Health.SERVING, Health.UNIMPLEMENTED, Health.CHANNEL})


@dataclass(frozen=True, slots=True)
class BackendState:
    """One backend of a channel, as it stands at the moment of asking.

    ``eligible`` is what decides whether new calls may go there: the address
    is in the current set (not ``draining``), its connection is ``READY`` and
    its health allows serving. Calls already running are counted in
    ``in_flight`` whatever the backend's state.
    """

    address: str
    """``"10.0.0.7:50051"`` (``"[::1]:50051"`` for IPv6)."""
    in_flight: int
    """RPCs sent there that have not ended yet."""
    connectivity: grpc.ChannelConnectivity
    """The state of the backend's own connection."""
    health: Health
    """What its grpc.health.v1 Watch says (``DISABLED`` when checking is off,
    ``CHANNEL`` when its backend channel checks: ``connectivity`` READY means serving)."""
    draining: bool
    """It left the address set; its running calls go on to their end."""
    eligible: bool
    """It takes new calls now."""
    penalty: float
    """Recent failures, counted as extra calls in flight (0 when it answers well)."""
    ejected: bool
    """Outlier detection (gRFC A50) has taken it out for a while."""
    weight: float
    """Its weight now: the static weight, times its slow-start factor while it ramps."""
    reported_others: int
    """Other clients' RPCs on it, by its last load report (server_load=True; else 0)."""


class Backend(Node, Generic[ChannelT]):
    """One backend address, its in-flight count and its backend channel."""

    __slots__ = (
        "address",
        "calls_failed",
        "calls_succeeded",
        "channel",
        "connectivity",
        "drain_deadline",
        "ejected_at",
        "ejections",
        "eligible_since",
        "failure_streak",
        "health",
        "key",
        "last_error",
        "load_reports_stale",
        "others",
        "penalty",
        "penalty_at",
        "released",
        "removed",
        "static_weight",
        "unreachable_since",
        "warned_failing",
        "warned_no_reports",
        "warned_unimplemented",
        "was_ready",
    )

    def __init__(self, address: Address, health: Health, weight: float = 1.0) -> None:
        super().__init__()
        self.address = address
        # Its weight as configured; ``weight`` (the picker's) ramps up to it.
        self.static_weight = self.weight = weight
        self.key = str(address)
        self.connectivity = _Connectivity.IDLE
        self.health = health
        self.removed = False
        # RPCs released so far: with in_flight, every RPC ever sent here.
        self.released = 0
        self.drain_deadline: float | None = None
        # The backend's own grpc channel, opened by the front end.
        self.channel: ChannelT | None = None
        # Each new connection is watched anew; say it has no health service once.
        self.warned_unimplemented = False
        # Other clients' RPCs on it, from its load reports (server_load.py).
        self.others = 0
        self.load_reports_stale = False
        self.warned_no_reports = False
        # For operators' logs: the last error seen on it (a failed call, a
        # broken Watch), whether it has been READY, and since when a backend
        # that was READY is unreachable (None: it is not).
        self.last_error: str | None = None
        self.was_ready = False
        self.unreachable_since: float | None = None
        # The failure penalty (see failures.py), as of penalty_at.
        self.penalty = 0.0
        self.penalty_at = 0.0
        # Failures in a row: the longer, the slower its penalty fades.
        self.failure_streak = 0
        self.warned_failing = False
        # Outlier detection (see outlier.py): this interval's call results,
        # when it was ejected (None: it is not), and its ejection multiplier.
        self.calls_succeeded = 0
        self.calls_failed = 0
        # When it last became eligible (slow start asks who is warm).
        self.eligible_since = 0.0
        self.ejected_at: float | None = None
        self.ejections = 0

    @property
    def eligible(self) -> bool:
        return (
            not self.removed
            and self.connectivity is _Connectivity.READY
            and self.health.may_serve
            and self.ejected_at is None
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
        if self.ejected_at is not None:
            return "EJECTED"
        return "READY"

    def state(self, penalty: float) -> BackendState:
        """The public view, with the penalty as it stands now (it decays)."""
        return BackendState(
            address=self.key,
            in_flight=self.in_flight,
            connectivity=self.connectivity,
            health=self.health,
            draining=self.removed,
            eligible=self.eligible,
            penalty=round(penalty, 3),
            ejected=self.ejected_at is not None,
            weight=self.weight,
            reported_others=self.others,
        )

    def __repr__(self) -> str:
        return f"Backend({self.key}, in_flight={self.in_flight}, {self.problem()})"
