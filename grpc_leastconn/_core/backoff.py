"""Backoff and re-resolution timing: pure arithmetic, clock and randomness injected."""

from __future__ import annotations

import random
import time
from collections.abc import Callable


class Backoff:
    """Exponential backoff with jitter, as gRPC's connection backoff.

    gRPC (doc/connection-backoff.md): initial 1 s, multiplier 1.6, jitter
    ±20 %; our ceiling is lower than its 120 s so a backend that returns is
    noticed within seconds.
    """

    def __init__(
        self,
        *,
        initial: float = 1.0,
        multiplier: float = 1.6,
        jitter: float = 0.2,
        maximum: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self.initial = initial
        self.multiplier = multiplier
        self.jitter = jitter
        self.maximum = maximum
        self._rng = rng if rng is not None else random.Random()

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        base = min(self.initial * self.multiplier ** min(attempt, 64), self.maximum)
        return base * (1.0 + self._rng.uniform(-self.jitter, self.jitter))


class ResolutionSchedule:
    """When to resolve a DNS target next.

    After an answer: when its TTL runs out, clamped to [min_interval,
    max_interval] (no TTL: max_interval). After a failure: back off from
    min_interval up to max_interval. Early requests (a backend failed) are
    honoured at most once per min_interval, so a flapping backend cannot turn
    into a flood of queries.
    """

    def __init__(
        self,
        min_interval: float,
        max_interval: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.min_interval = min_interval
        self.max_interval = max_interval
        self._clock = clock
        now = clock()
        self._last = now
        self._due = now + max_interval
        self._failures = Backoff(initial=min_interval, maximum=max_interval, rng=rng)
        self._failed_attempts = 0

    def resolved(self, ttl: float | None) -> None:
        now = self._clock()
        interval = self.max_interval if ttl is None else ttl
        self._last = now
        self._due = now + min(max(interval, self.min_interval), self.max_interval)
        self._failed_attempts = 0

    def failed(self) -> None:
        now = self._clock()
        self._last = now
        # Jitter must not break the bounds: never sooner than min_interval,
        # never later than max_interval.
        delay = self._failures.delay(self._failed_attempts)
        self._due = now + min(max(delay, self.min_interval), self.max_interval)
        self._failed_attempts += 1

    def request_early(self) -> None:
        self._due = min(self._due, max(self._clock(), self._last + self.min_interval))

    def seconds_until_due(self) -> float:
        return max(0.0, self._due - self._clock())
