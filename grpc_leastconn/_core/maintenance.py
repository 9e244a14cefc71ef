"""Maintenance planner: when to resolve the target again, and when drains time out.

Pure: no threads, no tasks, no sleeping. Each front end has one timer (a
thread, or a task) that asks ``step()`` what is due, carries it out (closes
the backend channels whose drain timed out, starts a resolution off the
timer so that a silent DNS server cannot delay drain deadlines) and sleeps
for the ``wait`` it returns or until woken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic

import grpc

from .backend import Backend, ChannelT
from .backoff import ResolutionSchedule
from .balancer import Balancer, log
from .counts import Counts
from .resolver import Resolution, ResolutionError
from .seams import ResolverLike
from .settings import Settings


@dataclass(slots=True)
class Step(Generic[ChannelT]):
    """What the timer does now."""

    # Start a re-resolution (its answer goes to resolved() or failed()).
    resolve: bool = False
    # Backends whose drain timed out: close their channels, cancelling their RPCs.
    expired: list[Backend[ChannelT]] = field(default_factory=list)
    # Seconds to sleep before the next step, unless woken; None: until woken.
    wait: float | None = None


def resolve_initial(resolver: ResolverLike) -> Resolution:
    """The first resolution: a target that names no address is a bad argument."""
    try:
        return resolver.resolve()
    except ResolutionError as exc:
        raise ValueError(str(exc)) from None


def resolve_again(resolver: ResolverLike, target: str) -> Resolution | None:
    """A re-resolution; None when it failed (logged): the last good set stays."""
    try:
        return resolver.resolve()
    except ResolutionError as exc:
        log.warning("re-resolution of %r failed, keeping the last good backends: %s", target, exc)
    except Exception:
        # Backing off as from any failure, rather than asking again at once.
        log.exception("re-resolution of %r failed", target)
    return None


class MaintenancePlan:
    """Re-resolution and drain deadlines of one channel, for its timer to follow."""

    def __init__(self, schedule: ResolutionSchedule | None, counts: Counts | None = None) -> None:
        # None: the target names IP literals only, and is never resolved again.
        self._schedule = schedule
        self._counts = Counts() if counts is None else counts
        self.resolving = False

    @classmethod
    def for_target(
        cls, settings: Settings, first: Resolution, clock: Any, counts: Counts | None = None
    ) -> MaintenancePlan:
        if not settings.target.needs_dns:
            return cls(None, counts)
        schedule = ResolutionSchedule(
            settings.resolve_min_interval,
            settings.resolve_max_interval,
            clock=clock,
            rng=settings.rng,
        )
        schedule.resolved(first.ttl)
        return cls(schedule, counts)

    @property
    def needed(self) -> bool:
        """Whether the channel needs a timer at all (drains follow re-resolutions)."""
        return self._schedule is not None

    def step(self, balancer: Balancer[ChannelT]) -> Step[ChannelT]:
        schedule = self._schedule
        step: Step[ChannelT] = Step(expired=balancer.expired_drains())
        if schedule is not None and not self.resolving and schedule.seconds_until_due() <= 0:
            self.resolving = step.resolve = True
        next_drain = balancer.next_drain_deadline()
        if next_drain is not None:
            step.wait = max(0.0, next_drain - balancer.clock())
        if schedule is not None and not self.resolving:
            # While a resolution runs, its end wakes the timer instead.
            due = schedule.seconds_until_due()
            step.wait = due if step.wait is None else min(step.wait, due)
        return step

    def connectivity_changed(self, state: grpc.ChannelConnectivity) -> bool:
        """A backend channel's new state; True when the timer should wake now.

        A failed connection may mean the backend is gone for good: ask DNS
        again soon, rate-limited to once per resolve_min_interval.
        """
        if self._schedule is None or state is not grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            return False
        self._schedule.request_early()
        return True

    def finished(self, resolution: Resolution | None) -> None:
        """The resolution that ``step`` started has ended (None: it failed)."""
        self.resolving = False
        if resolution is None:
            self._counts.resolution_failures += 1
        else:
            self._counts.resolutions += 1
        if self._schedule is None:
            return
        if resolution is None:
            self._schedule.failed()
        else:
            self._schedule.resolved(resolution.ttl)
