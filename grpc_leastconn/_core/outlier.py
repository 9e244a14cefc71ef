"""Outlier detection, gRFC A50: eject backends whose calls fail far more than their peers'.

The standard tool next to the failure penalty, opt-in, configured with
A50's field names and defaults (``OutlierDetection``). Every ``interval``
the call results each backend gathered since the last sweep are judged by
the configured algorithms:

- success rate: eject a backend whose success rate is below
  ``mean - stdev * stdev_factor / 1000`` of the backends with at least
  ``request_volume`` calls, when at least ``minimum_hosts`` have that many;
- failure percentage: eject a backend with at least ``request_volume``
  calls of which ``threshold`` % or more failed, when the channel has at
  least ``minimum_hosts`` backends.

An ejected backend keeps its connection and takes no new calls (its running
calls go on); it returns once ``base_ejection_time * multiplier`` (at most
``max(base_ejection_time, max_ejection_time)``) has passed, the multiplier
growing by one per ejection and shrinking by one per sweep it spends
unejected. Ejections stop once ``max_ejection_percent`` of the backends are
ejected, as in Envoy and grpc-go, but one backend may always be ejected (A50:
"will eject at least one address regardless of the value"), so a small
service is protected too.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .backend import Backend

log = logging.getLogger("grpc_leastconn")


def _check(owner: str, name: str, value: object, *, kind: type, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, kind if kind is int else (int, float)):
        wanted = "a whole number" if kind is int else "a number of seconds"
        raise TypeError(f"{owner}.{name} must be {wanted}, not {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        bound = f">= {low:g}" if high == math.inf else f"in {low:g}..{high:g}"
        raise ValueError(f"{owner}.{name} must be {bound}; got {value!r}")


@dataclass(frozen=True, slots=True)
class SuccessRateEjection:
    """A50 ``success_rate_ejection``: eject statistical outliers of the success rate."""

    stdev_factor: int = 1900
    """The threshold is ``mean - stdev * stdev_factor / 1000``."""
    enforcement_percentage: int = 100
    """% chance that a detected outlier is ejected."""
    minimum_hosts: int = 5
    """Backends with enough calls needed for the algorithm to run."""
    request_volume: int = 100
    """Calls in one interval for a backend to be judged."""

    def __post_init__(self) -> None:
        owner = "SuccessRateEjection"
        _check(owner, "stdev_factor", self.stdev_factor, kind=int, low=0, high=math.inf)
        _check(
            owner, "enforcement_percentage", self.enforcement_percentage, kind=int, low=0, high=100
        )
        _check(owner, "minimum_hosts", self.minimum_hosts, kind=int, low=0, high=math.inf)
        _check(owner, "request_volume", self.request_volume, kind=int, low=0, high=math.inf)


@dataclass(frozen=True, slots=True)
class FailurePercentageEjection:
    """A50 ``failure_percentage_ejection``: eject backends failing ``threshold`` % or more."""

    threshold: int = 85
    """Failure percentage at or above which a backend is ejected."""
    enforcement_percentage: int = 100
    """% chance that a backend over the threshold is ejected."""
    minimum_hosts: int = 5
    """Backends the channel needs for the algorithm to run."""
    request_volume: int = 50
    """Calls in one interval for a backend to be judged."""

    def __post_init__(self) -> None:
        owner = "FailurePercentageEjection"
        _check(owner, "threshold", self.threshold, kind=int, low=0, high=100)
        _check(
            owner, "enforcement_percentage", self.enforcement_percentage, kind=int, low=0, high=100
        )
        _check(owner, "minimum_hosts", self.minimum_hosts, kind=int, low=0, high=math.inf)
        _check(owner, "request_volume", self.request_volume, kind=int, low=0, high=math.inf)


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """A50 ``OutlierDetectionLoadBalancingConfig``, durations in seconds.

    Each algorithm runs only when configured; with neither, nothing is ejected.
    """

    interval: float = 10.0
    """Seconds between sweeps."""
    base_ejection_time: float = 30.0
    """Seconds an ejection lasts, times the backend's ejection multiplier."""
    max_ejection_time: float | None = None
    """At most this long (None: 300 s or base_ejection_time, whichever is larger)."""
    max_ejection_percent: int = 10
    """% of the backends that may be ejected at once (one always may)."""
    success_rate_ejection: SuccessRateEjection | None = None
    failure_percentage_ejection: FailurePercentageEjection | None = None

    def __post_init__(self) -> None:
        owner = "OutlierDetection"
        _check(owner, "interval", self.interval, kind=float, low=0.001, high=math.inf)
        _check(
            owner, "base_ejection_time", self.base_ejection_time, kind=float, low=0, high=math.inf
        )
        if self.max_ejection_time is not None:
            _check(
                owner, "max_ejection_time", self.max_ejection_time, kind=float, low=0, high=math.inf
            )
        _check(owner, "max_ejection_percent", self.max_ejection_percent, kind=int, low=0, high=100)
        for name, kind in (
            ("success_rate_ejection", SuccessRateEjection),
            ("failure_percentage_ejection", FailurePercentageEjection),
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise TypeError(
                    f"{owner}.{name} must be a {kind.__name__} or None, not {type(value).__name__}"
                )

    @property
    def longest_ejection(self) -> float:
        limit = 300.0 if self.max_ejection_time is None else self.max_ejection_time
        return max(self.base_ejection_time, limit)


class OutlierDetector:
    """Runs A50's sweeps over one channel's backends."""

    __slots__ = ("_ejected", "_rng", "_target", "config", "next_sweep")

    def __init__(
        self, config: OutlierDetection, *, target: str, rng: random.Random, now: float
    ) -> None:
        self.config = config
        self._target = target
        self._rng = rng
        self.next_sweep = now + config.interval
        # Ejected backends, counted at each sweep's start and kept up to date.
        self._ejected = 0

    def sweep(self, backends: Sequence[Backend[Any]], now: float) -> list[Backend[Any]]:
        """One interval's judgement (A50's timer); the backends whose ejection changed."""
        self.next_sweep = now + self.config.interval
        results: dict[Backend[Any], tuple[int, int]] = {}
        self._ejected = sum(1 for b in backends if b.ejected_at is not None)
        for backend in backends:
            # A50: swap the call counter's buckets; the inactive one is judged.
            results[backend] = (backend.calls_succeeded, backend.calls_failed)
            backend.calls_succeeded = backend.calls_failed = 0
        changed: list[Backend[Any]] = []
        config = self.config
        if config.success_rate_ejection is not None:
            self._success_rate(config.success_rate_ejection, results, now, changed)
        if config.failure_percentage_ejection is not None:
            self._failure_percentage(config.failure_percentage_ejection, results, now, changed)
        for backend in backends:
            if backend.ejected_at is None:
                backend.ejections = max(0, backend.ejections - 1)
            elif now > backend.ejected_at + min(
                config.base_ejection_time * backend.ejections, config.longest_ejection
            ):
                backend.ejected_at = None
                changed.append(backend)
                log.info(
                    "backend %s of %r returns after its ejection (outlier detection)",
                    backend.key,
                    self._target,
                )
        return changed

    def _success_rate(
        self,
        rule: SuccessRateEjection,
        results: dict[Backend[Any], tuple[int, int]],
        now: float,
        changed: list[Backend[Any]],
    ) -> None:
        judged = {
            b: ok / (ok + bad)
            for b, (ok, bad) in results.items()
            if ok + bad >= rule.request_volume
        }
        if len(judged) < rule.minimum_hosts or not judged:
            return
        rates = list(judged.values())
        mean = statistics.fmean(rates)
        threshold = mean - statistics.pstdev(rates, mean) * rule.stdev_factor / 1000
        for backend, rate in judged.items():
            if not self._may_eject(len(results)):
                return
            if rate < threshold and self._enforced(rule.enforcement_percentage):
                self._eject(
                    backend,
                    now,
                    changed,
                    f"success rate {rate:.2f} below {threshold:.2f} (mean {mean:.2f})",
                )

    def _failure_percentage(
        self,
        rule: FailurePercentageEjection,
        results: dict[Backend[Any], tuple[int, int]],
        now: float,
        changed: list[Backend[Any]],
    ) -> None:
        if len(results) < rule.minimum_hosts:
            return
        for backend, (ok, bad) in results.items():
            if not self._may_eject(len(results)):
                return
            if ok + bad < rule.request_volume or ok + bad == 0:
                continue
            percent = 100 * bad / (ok + bad)
            if percent >= rule.threshold and self._enforced(rule.enforcement_percentage):
                self._eject(backend, now, changed, f"{percent:.0f} % of {ok + bad} calls failed")

    def _may_eject(self, hosts: int) -> bool:
        ejected = self._ejected
        return ejected == 0 or ejected * 100 < self.config.max_ejection_percent * hosts

    def _enforced(self, percentage: int) -> bool:
        return self._rng.randrange(100) < percentage

    def _eject(
        self, backend: Backend[Any], now: float, changed: list[Backend[Any]], reason: str
    ) -> None:
        if backend.ejected_at is not None:
            return
        backend.ejected_at = now
        backend.ejections += 1
        self._ejected += 1
        changed.append(backend)
        seconds = min(
            self.config.base_ejection_time * backend.ejections, self.config.longest_ejection
        )
        log.warning(
            "backend %s of %r ejected for %g s (outlier detection): %s",
            backend.key,
            self._target,
            seconds,
            reason,
        )
