"""Slow start: a backend that joins a running channel takes its share gradually.

Without it, least-connection sends a joining backend every new call until
its count catches up with its peers' (with long streams: every new stream,
for as long as that takes), which a backend with cold caches may not bear.
As in Envoy (and HAProxy's ``slowstart``), its weight ramps up over
``window`` seconds::

    factor = max(min_weight_percent / 100, time_factor ** (1 / aggression))
    time_factor = max(seconds since it became eligible, 0.001) / window

The factor moves in steps of 5 %. A backend ramps whenever it becomes
eligible while a warm peer takes calls (one eligible for at least the
window): a new address, a reconnection after a failure, the end of an
ejection. With no warm peer (the channel itself starting, or every backend
back at once) it takes its full weight at once, as in Envoy when every
endpoint is new: there is nobody to spare it. The decision is made when it
joins, so a backend's weight never drops while it stays eligible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from .backend import Backend

# How often ramping weights are brought up to date.
REFRESH_S: Final = 0.1
# A ramping weight moves in steps of 1/STEPS of the backend's weight.
STEPS: Final = 20


@dataclass(frozen=True, slots=True)
class SlowStart:
    """Envoy's ``slow_start_config``: window, aggression and minimum weight."""

    window: float
    """Seconds a joining backend's weight takes to reach its full value."""
    aggression: float = 1.0
    """The ramp's curve: 1.0 linear, higher is faster at first."""
    min_weight_percent: float = 10.0
    """The least share of its weight a ramping backend gets (Envoy's 10 %)."""

    def __post_init__(self) -> None:
        for name, value, low in (
            ("window", self.window, 0.0),
            ("aggression", self.aggression, 0.0),
            ("min_weight_percent", self.min_weight_percent, 0.0),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"SlowStart.{name} must be a number, not {type(value).__name__}")
            if not math.isfinite(value) or value <= low:
                raise ValueError(f"SlowStart.{name} must be finite and > {low:g}; got {value!r}")
        if self.min_weight_percent > 100:
            raise ValueError(
                f"SlowStart.min_weight_percent must be at most 100; got {self.min_weight_percent!r}"
            )

    def factor(self, seconds: float) -> float:
        """The share of its weight a backend eligible for ``seconds`` gets (1.0 once done)."""
        if seconds >= self.window:
            return 1.0
        # Envoy counts in milliseconds: max(elapsed, 1 ms) / window.
        time_factor = max(seconds, 0.001) / self.window
        ramp: float = time_factor ** (1 / self.aggression)
        return min(1.0, max(self.min_weight_percent / 100, ramp))


def _stepped(factor: float) -> float:
    """The factor rounded up to a step of 5 %: a weight changes 20 times a ramp at most.

    Each change moves the backend in the picker's heap: steps bound them.
    """
    return min(1.0, math.ceil(factor * STEPS - 1e-9) / STEPS)


def check_slow_start(value: object) -> SlowStart | None:
    """The ``slow_start`` setting: None (off), a window in seconds, or a SlowStart."""
    if value is None or isinstance(value, SlowStart):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            "slow_start must be a window in seconds, a grpc_leastconn.SlowStart or None, "
            f"not {type(value).__name__}"
        )
    return SlowStart(window=float(value))


class Ramps:
    """The backends of one channel whose weight is ramping up."""

    __slots__ = ("_clock", "_config", "_set_weight", "ramping", "refresh_at")

    def __init__(
        self,
        config: SlowStart,
        *,
        clock: Callable[[], float],
        set_weight: Callable[[Backend[Any], float], None],
    ) -> None:
        self._config = config
        self._clock = clock
        self._set_weight = set_weight
        # Ramping backends -> when they became eligible.
        self.ramping: dict[Backend[Any], float] = {}
        self.refresh_at = math.inf

    def joined(self, backend: Backend[Any], eligible: Iterable[Backend[Any]], now: float) -> None:
        """The backend became eligible: it ramps from here if a warm peer takes calls."""
        window = self._config.window
        if any(peer is not backend and now - peer.eligible_since >= window for peer in eligible):
            self.ramping[backend] = now
            self.refresh(now)

    def left(self, backend: Backend[Any]) -> None:
        """The backend is no longer eligible: it will ramp again when it returns."""
        if self.ramping.pop(backend, None) is not None:
            self._set_weight(backend, backend.static_weight)

    def refresh(self, now: float) -> None:
        """Bring every ramping weight up to date (every REFRESH_S while any ramps)."""
        config = self._config
        ramping = self.ramping
        for backend, since in list(ramping.items()):
            seconds = now - since
            if seconds >= config.window:
                del ramping[backend]
            self._set_weight(backend, backend.static_weight * _stepped(config.factor(seconds)))
        self.refresh_at = now + REFRESH_S if ramping else math.inf
