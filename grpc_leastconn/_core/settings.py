"""Channel settings shared by both front ends, validated once at construction.

The tuning keywords every factory takes are declared once, in ``Tuning``;
the factories accept them as ``**tuning: Unpack[Tuning]``. Bad input fails
here, before anything connects, with a message that names the bad part
(ValueError for a bad value, TypeError for a wrong type).
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import grpc

from .backend import Health
from .backend_options import Option, with_reconnecting_policy
from .failures import DEFAULT_FAILURE_CODES, check_failure_codes
from .outlier import OutlierDetection
from .picker import TIE_BREAKS, TieBreak
from .server_load import report_messages
from .slowstart import SlowStart, check_slow_start
from .target import Target, parse_target
from .weighted import UNIT
from .weights import Weights, check_call_costs, check_weights

Options = Sequence[Option] | None

# Measured better than round_robin on every pattern tried (docs/benchmarks.md).
DEFAULT_TIE_BREAK: TieBreak = "youngest"
# "" asks about the whole server (grpc.health.v1 convention).
DEFAULT_HEALTH_CHECK_SERVICE = ""
# Who checks health: "watch", our own grpc.health.v1 Watch per backend (it
# tells why a backend is out), or "grpc", C-core's client-side health
# checking inside each backend channel (no Python thread or task per
# backend for it; READY then means serving).
HealthChecker = Literal["watch", "grpc"]
HEALTH_CHECKERS: tuple[HealthChecker, ...] = ("watch", "grpc")
DEFAULT_HEALTH_CHECKER: HealthChecker = "watch"
DEFAULT_RESOLVE_MIN_INTERVAL = 1.0
DEFAULT_RESOLVE_MAX_INTERVAL = 30.0
# Long enough for typical streams to end by themselves after a backend
# leaves DNS (a rolling update); after it, remaining RPCs are cancelled.
DEFAULT_DRAIN_TIMEOUT = 600.0


class Tuning(TypedDict, total=False):
    """The balancing keywords of every factory, sync and asyncio (see the README)."""

    tie_break: TieBreak
    """Among backends with the same count: "round_robin", "youngest" or "random"."""
    health_check_service: str | None
    """grpc.health.v1 service watched on every backend; "" the whole server, None off."""
    health_checker: HealthChecker
    """Who checks it: "watch" (our Watch stream, says why) or "grpc" (C-core's, in each
    backend channel: no thread or task per backend). Ignored with health checking off."""
    resolve_min_interval: float
    """Seconds: DNS is asked again at most this often."""
    resolve_max_interval: float
    """Seconds: DNS is asked again at least this often."""
    drain_timeout: float | None
    """Seconds a backend that left DNS may keep its calls; None for no limit."""
    rng: random.Random | None
    """Randomness of the "random" tie-break, of backoff jitter and of A50 enforcement."""
    failure_codes: Collection[grpc.StatusCode]
    """Status codes that count as the backend's failure (failures.py)."""
    failure_penalty: bool
    """Count each failure as a fading extra call in flight (default True)."""
    outlier_detection: OutlierDetection | None
    """gRFC A50 outlier detection; None (default): off."""
    weights: Mapping[str, float] | None
    """Static weights by backend "host:port" of the target (default 1 each)."""
    slow_start: float | SlowStart | None
    """Ramp up a backend that joins a running channel over this many seconds."""
    call_costs: Mapping[str, float] | None
    """What one call of a method ("/pkg.Service/Method") adds to the load (default 1)."""
    meter_provider: Any
    """OpenTelemetry MeterProvider for metrics; None: the global one; False: none."""
    server_load: bool
    """Add other clients' calls, as the backends report them (ORCA), to the load."""


_TUNING_KEYWORDS = frozenset(Tuning.__annotations__)


@dataclass(frozen=True, slots=True)
class Settings:
    target: Target
    credentials: grpc.ChannelCredentials | None
    options: tuple[Option, ...]
    compression: grpc.Compression | None
    tie_break: TieBreak
    rng: random.Random | None
    health_check_service: str | None
    health_checker: HealthChecker
    resolve_min_interval: float
    resolve_max_interval: float
    drain_timeout: float | None
    failure_codes: frozenset[grpc.StatusCode]
    failure_penalty: bool
    outlier_detection: OutlierDetection | None
    weights: Weights
    slow_start: SlowStart | None
    # Milli-calls per call, by full method name (absent: UNIT).
    call_costs: Mapping[str, int]
    meter_provider: object
    server_load: bool

    @property
    def weighted(self) -> bool:
        """Whether picks need the weighted picker (else the O(1) bucket picker serves)."""
        return self.weights.uneven or self.slow_start is not None or bool(self.call_costs)

    def call_cost(self, method: str) -> int:
        """What one call of ``method`` adds to its backend's load, in milli-calls."""
        return self.call_costs.get(method, UNIT)

    @property
    def health_checking(self) -> bool:
        return self.health_check_service is not None

    @property
    def watches_health(self) -> bool:
        """Whether each backend gets our own grpc.health.v1 Watch stream."""
        return self.health_checking and self.health_checker == "watch"

    @property
    def channel_health_service(self) -> str | None:
        """The service C-core's health checking asks about in each backend channel
        (health_checker="grpc"); None: the backend channels do not check."""
        return self.health_check_service if self.health_checker == "grpc" else None

    @property
    def initial_health(self) -> Health:
        """A new backend's health, until (with a Watch) its first answer."""
        if not self.health_checking:
            return Health.DISABLED
        return Health.PENDING if self.health_checker == "watch" else Health.CHANNEL


def make_settings(
    factory: str,
    target: str | Sequence[str],
    credentials: grpc.ChannelCredentials | None,
    options: Options,
    compression: grpc.Compression | None,
    tuning: Tuning,
) -> Settings:
    """Validate a factory's arguments; ``factory`` names it in errors."""
    unknown = sorted(set(tuning) - _TUNING_KEYWORDS)
    if unknown:
        raise TypeError(f"{factory}() got an unexpected keyword argument {unknown[0]!r}")
    parsed = parse_target(target)
    tie_break = tuning.get("tie_break", DEFAULT_TIE_BREAK)
    if not isinstance(tie_break, str):
        raise TypeError(f"tie_break must be a str, not {type(tie_break).__name__}")
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be one of {', '.join(TIE_BREAKS)}; got {tie_break!r}")
    rng = tuning.get("rng")
    if rng is not None and not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random, not {type(rng).__name__}")
    if compression is not None and not isinstance(compression, grpc.Compression):
        raise TypeError(f"compression must be a grpc.Compression, not {type(compression).__name__}")
    health_check_service = tuning.get("health_check_service", DEFAULT_HEALTH_CHECK_SERVICE)
    if health_check_service is not None and not isinstance(health_check_service, str):
        raise TypeError(
            "health_check_service must be a str ('' = whole server) or None (off), "
            f"not {type(health_check_service).__name__}"
        )
    health_checker = tuning.get("health_checker", DEFAULT_HEALTH_CHECKER)
    if not isinstance(health_checker, str):
        raise TypeError(f"health_checker must be a str, not {type(health_checker).__name__}")
    if health_checker not in HEALTH_CHECKERS:
        raise ValueError(
            f"health_checker must be one of {', '.join(map(repr, HEALTH_CHECKERS))}; "
            f"got {health_checker!r}"
        )
    min_interval = _seconds(
        "resolve_min_interval",
        tuning.get("resolve_min_interval", DEFAULT_RESOLVE_MIN_INTERVAL),
        positive=True,
    )
    max_interval = _seconds(
        "resolve_max_interval",
        tuning.get("resolve_max_interval", DEFAULT_RESOLVE_MAX_INTERVAL),
        positive=True,
    )
    if max_interval < min_interval:
        raise ValueError(
            f"resolve_max_interval ({max_interval:g}) is below "
            f"resolve_min_interval ({min_interval:g})"
        )
    drain_timeout = tuning.get("drain_timeout", DEFAULT_DRAIN_TIMEOUT)
    drain = None if drain_timeout is None else _seconds("drain_timeout", drain_timeout)
    outlier_detection = tuning.get("outlier_detection")
    if outlier_detection is not None and not isinstance(outlier_detection, OutlierDetection):
        raise TypeError(
            "outlier_detection must be a grpc_leastconn.OutlierDetection or None, "
            f"not {type(outlier_detection).__name__}"
        )
    failure_codes = check_failure_codes(tuning.get("failure_codes", DEFAULT_FAILURE_CODES))
    if outlier_detection is not None and not failure_codes:
        raise ValueError(
            "outlier_detection needs failure_codes: with none, no call counts as failed "
            "(turn the penalty alone off with failure_penalty=False)"
        )
    return Settings(
        target=parsed,
        credentials=credentials,
        options=_check_options(options),
        compression=compression,
        tie_break=tie_break,
        rng=rng,
        health_check_service=health_check_service,
        health_checker=health_checker,
        resolve_min_interval=min_interval,
        resolve_max_interval=max_interval,
        drain_timeout=drain,
        failure_codes=failure_codes,
        failure_penalty=_flag("failure_penalty", tuning.get("failure_penalty", True)),
        outlier_detection=outlier_detection,
        weights=check_weights(tuning.get("weights"), parsed),
        slow_start=check_slow_start(tuning.get("slow_start")),
        call_costs=check_call_costs(tuning.get("call_costs")),
        meter_provider=check_meter_provider(tuning.get("meter_provider")),
        server_load=_server_load(tuning.get("server_load", False)),
    )


def check_credentials(credentials: object) -> None:
    """A secure channel's credentials (None is refused: that is an insecure channel)."""
    if not isinstance(credentials, grpc.ChannelCredentials):
        raise TypeError(
            f"credentials must be grpc.ChannelCredentials, not {type(credentials).__name__}"
        )


def _seconds(name: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    seconds = float(value)
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0 or (positive and seconds == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {bound}; got {value!r}")
    return seconds


def check_meter_provider(value: object) -> object:
    """The ``meter_provider`` setting: None (global), False (off), or a MeterProvider."""
    if value is None or value is False:
        return value
    if not callable(getattr(value, "get_meter", None)):
        raise TypeError(
            "meter_provider must be an OpenTelemetry MeterProvider, None (the global "
            f"one) or False (no metrics), not {type(value).__name__}"
        )
    return value


def _server_load(value: object) -> bool:
    """The ``server_load`` setting; on, it needs the ORCA messages (the orca extra)."""
    if _flag("server_load", value):
        report_messages()
    return bool(value)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {type(value).__name__}")
    return value


def _check_options(options: object) -> tuple[Option, ...]:
    if options is None:
        return ()
    if not isinstance(options, (list, tuple)):
        raise TypeError(
            f"options must be a list of (name, value) pairs, not {type(options).__name__}"
        )
    for option in options:
        if not (isinstance(option, tuple) and len(option) == 2 and isinstance(option[0], str)):
            raise TypeError(f"each option must be a (str, value) pair; got {option!r}")
        with_reconnecting_policy(option)  # a malformed service config fails now
    return tuple(options)
