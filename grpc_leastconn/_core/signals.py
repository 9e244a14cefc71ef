"""Signals: what the balancer learns from how calls end, and from time passing.

The failure penalty (failures.py), outlier detection (outlier.py) and slow
start (slowstart.py) feed the one cost or eligibility. This module holds
the three of them for one balancer: it judges each call's status, knows
when time-driven work is next due (a penalty to decay, a sweep to run, a
ramp to advance) and does it when asked. It never touches the picker's
membership itself: ``refresh`` returns the backends whose eligibility may
have changed, for the balancer to place.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Iterable
from typing import Any

import grpc

from .backend import Backend
from .counts import Counts
from .failures import CALLER_CODES, FailurePenalty
from .outlier import OutlierDetection, OutlierDetector
from .picker import Picker
from .server_load import ServerLoad
from .slowstart import Ramps, SlowStart


class Signals:
    """The failure penalty, outlier detection and slow start of one balancer."""

    def __init__(
        self,
        target: str,
        *,
        picker: Picker,
        clock: Callable[[], float],
        rng: random.Random | None,
        counts: Counts,
        failure_codes: Collection[grpc.StatusCode],
        failure_penalty: bool,
        outlier_detection: OutlierDetection | None,
        slow_start: SlowStart | None,
        server_load: bool = False,
    ) -> None:
        self.failure_codes = frozenset(failure_codes)
        self._counts = counts
        self._picker = picker
        self.penalty = (
            FailurePenalty(failure_codes, target=target, clock=clock, set_extra=self._set_extra)
            if failure_penalty and failure_codes
            else None
        )
        self.load = (
            ServerLoad(target=target, clock=clock, set_extra=self._set_extra)
            if server_load
            else None
        )
        self._detector = (
            OutlierDetector(
                outlier_detection,
                target=target,
                rng=rng if rng is not None else random.Random(),
                now=clock(),
            )
            if outlier_detection is not None
            and (
                outlier_detection.success_rate_ejection is not None
                or outlier_detection.failure_percentage_ejection is not None
            )
            else None
        )
        self._ramps = (
            None
            if slow_start is None
            else Ramps(slow_start, clock=clock, set_weight=picker.set_weight)
        )
        # When refresh() has work next (inf: nothing changes with time alone).
        self.due = math.inf
        self._update_due()

    def _set_extra(self, backend: Backend[Any]) -> None:
        """The extra load the picker sees: the failure penalty and other clients' RPCs."""
        self._picker.set_extra(backend, int(backend.penalty) + backend.others)

    def _update_due(self) -> None:
        penalty, detector, ramps, load = self.penalty, self._detector, self._ramps, self.load
        self.due = min(
            math.inf if penalty is None else penalty.refresh_at,
            math.inf if detector is None else detector.next_sweep,
            math.inf if ramps is None else ramps.refresh_at,
            math.inf if load is None else load.refresh_at,
        )

    # -- how calls end ----------------------------------------------------------

    def succeeded(self, backend: Backend[Any]) -> None:
        """A success of a backend with a penalty (the caller checks: the hot path)."""
        if self.penalty is not None:
            self.penalty.succeeded(backend)
            self.due = min(self.due, self.penalty.refresh_at)

    def judge(self, backend: Backend[Any], code: grpc.StatusCode) -> None:
        """What a call that ended with ``code`` (not OK) says about its backend."""
        if code in CALLER_CODES:
            return
        if code in self.failure_codes:
            backend.calls_failed += 1
            if self.penalty is not None:
                self.penalty.failed(backend, code)
                self.due = min(self.due, self.penalty.refresh_at)
        else:
            # An application's answer (NOT_FOUND, ...): the backend did its job.
            backend.calls_succeeded += 1
            if backend.penalty:
                self.succeeded(backend)

    # -- eligibility --------------------------------------------------------------

    def joined(self, backend: Backend[Any], eligible: Iterable[Backend[Any]], now: float) -> None:
        """The backend became eligible: slow start may ramp its weight from here."""
        backend.eligible_since = now
        if self._ramps is not None:
            self._ramps.joined(backend, eligible, now)
            self.due = min(self.due, self._ramps.refresh_at)

    def left(self, backend: Backend[Any]) -> None:
        """The backend is no longer eligible."""
        if self._ramps is not None:
            self._ramps.left(backend)

    def forget(self, backend: Backend[Any]) -> None:
        """The backend left the address set (or the channel closed)."""
        if self.penalty is not None:
            self.penalty.forget(backend)
        if self.load is not None:
            self.load.forget(backend)
        self.left(backend)

    def reported(self, backend: Backend[Any], in_flight: float) -> None:
        """The backend reported ``in_flight`` RPCs (all clients'), now."""
        if self.load is not None:
            self.load.reported(backend, in_flight, backend.in_flight)
            self.due = min(self.due, self.load.refresh_at)

    # -- time -----------------------------------------------------------------------

    def refresh(
        self, now: float, backends: list[Backend[Any]], eligible: Iterable[Backend[Any]]
    ) -> list[Backend[Any]]:
        """Decay penalties, run a due A50 sweep, advance ramps.

        Returns the backends whose ejection changed: the balancer places them.
        """
        penalty, detector, ramps = self.penalty, self._detector, self._ramps
        if penalty is not None and now >= penalty.refresh_at:
            penalty.refresh(now)
        changed: list[Backend[Any]] = []
        if detector is not None and now >= detector.next_sweep:
            changed = detector.sweep(backends, now)
            self._counts.ejections += sum(1 for b in changed if b.ejected_at is not None)
        if ramps is not None and now >= ramps.refresh_at:
            ramps.refresh(now)
        if self.load is not None and now >= self.load.refresh_at:
            self.load.refresh(now)
        self._update_due()
        return changed
