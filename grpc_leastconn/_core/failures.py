"""Failure penalty: a backend that fails fast must not look idle.

A backend that answers every call at once with an error always has the
fewest calls in flight, so a least-loaded picker would send it most of the
traffic (the Google SRE book's "Least-Loaded Round Robin" trap; Linkerd
counts a failure as a penalty latency for the same reason). Here each
failure counts as one more call in flight on its backend, a count that
fades: it decays with a time constant of ``DECAY_S`` while no call lands
there (up to ``MAX_DECAY_S`` for a long run of failures, so a backend that
keeps failing its trial calls is tried less and less often), and every
success takes ``1 - SUCCESS_FACTOR`` of it away. The
picker sees ``floor(penalty)`` as the backend's ``extra`` load, in the one
cost every signal feeds.

- A backend failing every call gains +1 per failure and stops being picked
  within a few calls; it gets a trial call whenever its penalty has decayed
  below its peers' load, so it returns within seconds once it answers
  again (each success shrinks what is left).
- A backend failing part of its calls keeps a penalty near its peers'
  load (every other call failing: about 1-2 % of the calls where round
  robin gives it 25 %), so few of the calls fail.
- A backend with the same background error rate as its peers keeps about
  the penalty they keep, near zero for a few per cent, so it is treated as
  they are.
- Which codes are the backend's failure is a setting (``failure_codes``).
  Codes the caller causes never count: CANCELLED and DEADLINE_EXCEEDED, and
  calls the channel re-picked because they never left this process.
  Application answers (INVALID_ARGUMENT, NOT_FOUND, ...) are successes: the
  backend did its job.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection
from typing import Any, Final

import grpc

from .backend import Backend

log = logging.getLogger("grpc_leastconn")

_Code = grpc.StatusCode

# The backend's own failures: it is down or overloaded (UNAVAILABLE,
# RESOURCE_EXHAUSTED), or broken (INTERNAL, UNKNOWN: a handler that raised,
# DATA_LOSS). Everything else a server answers is the application's answer.
DEFAULT_FAILURE_CODES: Final = frozenset(
    {
        _Code.UNAVAILABLE,
        _Code.RESOURCE_EXHAUSTED,
        _Code.INTERNAL,
        _Code.UNKNOWN,
        _Code.DATA_LOSS,
    }
)
# The caller's doing, never the backend's: refused as failure codes.
CALLER_CODES: Final = frozenset({_Code.OK, _Code.CANCELLED, _Code.DEADLINE_EXCEEDED})

# Seconds for a penalty to fall to 1/e while no call lands on its backend,
# doubling with every STREAK_DOUBLING failures in a row, up to MAX_DECAY_S.
DECAY_S: Final = 1.0
MAX_DECAY_S: Final = 4.0
STREAK_DOUBLING: Final = 10
# What a success leaves of the penalty: 0.8 forgets a failure within about
# a dozen good calls, yet keeps a half-failing backend visibly busier.
SUCCESS_FACTOR: Final = 0.8
# A bound, so a backend returns within MAX_DECAY_S * ln(CAP) seconds (about
# 18 s) even when its peers are idle and it has had no trial call.
CAP: Final = 100.0
# Below this a penalty is forgotten.
FORGET: Final = 0.1
# A penalty this high means consecutive failures: worth a WARNING, once.
WARN_AT: Final = 3.0
# How often penalties are brought up to date while some backend has one.
REFRESH_S: Final = 0.1


class FailurePenalty:
    """The penalties of one channel's backends, and when to bring them up to date."""

    __slots__ = ("_clock", "_set_extra", "_target", "codes", "penalized", "refresh_at")

    def __init__(
        self,
        codes: Collection[grpc.StatusCode],
        *,
        target: str,
        clock: Callable[[], float],
        set_extra: Callable[[Backend[Any]], None],
    ) -> None:
        self.codes = frozenset(codes)
        self._target = target
        self._clock = clock
        self._set_extra = set_extra
        # Backends with a penalty, and when to decay them next.
        self.penalized: dict[Backend[Any], None] = {}
        self.refresh_at = math.inf

    def failed(self, backend: Backend[Any], code: grpc.StatusCode) -> None:
        now = self._clock()
        # Decayed at the pace of the streak so far, which this failure extends.
        penalty = min(CAP, decayed_penalty(backend, now) + 1.0)
        backend.failure_streak += 1
        self._store(backend, penalty, now)
        if penalty >= WARN_AT and not backend.warned_failing:
            backend.warned_failing = True
            log.warning(
                "backend %s of %r is failing calls (last: %s): it takes fewer new calls "
                "until it answers again",
                backend.key,
                self._target,
                code.name,
            )

    def succeeded(self, backend: Backend[Any]) -> None:
        """Only for a backend with a penalty (the caller checks: this is the hot path)."""
        now = self._clock()
        penalty = decayed_penalty(backend, now) * SUCCESS_FACTOR
        backend.failure_streak = 0
        self._store(backend, penalty, now)

    def refresh(self, now: float) -> None:
        """Decay every penalty to ``now``; called at most every REFRESH_S."""
        for backend in list(self.penalized):
            self._store(backend, decayed_penalty(backend, now), now)
        self.refresh_at = now + REFRESH_S if self.penalized else math.inf

    def forget(self, backend: Backend[Any]) -> None:
        """The backend is gone: drop its penalty without logging."""
        self.penalized.pop(backend, None)
        backend.penalty = 0.0

    def _store(self, backend: Backend[Any], penalty: float, now: float) -> None:
        if penalty < FORGET:
            penalty = 0.0
            backend.failure_streak = 0
            if backend in self.penalized:
                del self.penalized[backend]
                if backend.warned_failing:
                    backend.warned_failing = False
                    log.info("backend %s of %r answers again", backend.key, self._target)
        elif backend not in self.penalized:
            self.penalized[backend] = None
            self.refresh_at = min(self.refresh_at, now + REFRESH_S)
        backend.penalty = penalty
        backend.penalty_at = now
        self._set_extra(backend)


def decayed_penalty(backend: Backend[Any], now: float) -> float:
    """The backend's penalty as it stands at ``now``."""
    penalty = backend.penalty
    if not penalty:
        return 0.0
    decay = min(MAX_DECAY_S, DECAY_S * 2 ** (backend.failure_streak / STREAK_DOUBLING))
    return penalty * math.exp(-(now - backend.penalty_at) / decay)


def check_failure_codes(codes: object) -> frozenset[grpc.StatusCode]:
    """The ``failure_codes`` setting: grpc.StatusCode members, none of the caller's."""
    if isinstance(codes, (str, bytes)) or not isinstance(codes, Collection):
        raise TypeError(
            f"failure_codes must be a collection of grpc.StatusCode, not {type(codes).__name__}"
        )
    for code in codes:
        if not isinstance(code, grpc.StatusCode):
            raise TypeError(f"failure_codes: {code!r} is not a grpc.StatusCode")
        if code in CALLER_CODES:
            raise ValueError(
                f"failure_codes: {code.name} is never the backend's failure "
                "(OK, CANCELLED and DEADLINE_EXCEEDED come from the caller)"
            )
    return frozenset(codes)
