"""Pure tests of gRFC A50 outlier detection: the sweep's algorithms, and the balancer's use of it.

The algorithm tests call ``OutlierDetector.sweep`` on ``Backend`` records
whose call counts they set, at times they choose; the balancer tests drive a
real ``Balancer`` with a fake clock, through ``pick``/``release`` (the lazy
path) or ``refresh``.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from typing import Any

import grpc
import pytest
from seams import (
    Address,
    Backend,
    BackendState,
    Balancer,
    FailurePercentageEjection,
    Health,
    OutlierDetection,
    OutlierDetector,
    SuccessRateEjection,
)

TARGET = "dns:///svc.test:50051"
T0 = 500.0

Code = grpc.StatusCode
OK = Code.OK
UNAVAILABLE = Code.UNAVAILABLE
READY = grpc.ChannelConnectivity.READY

# Failure percentage that judges any backend with a call, whatever the fleet size.
EAGER_FAILURES = FailurePercentageEjection(minimum_hosts=1, request_volume=1)


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def addresses(n: int) -> list[Address]:
    return [Address(f"10.0.{i // 250}.{i % 250 + 1}", 50051) for i in range(n)]


def fleet(n: int) -> list[Backend[object]]:
    """Bare backend records for the algorithm tests."""
    return [Backend(address, Health.DISABLED) for address in addresses(n)]


def detector(config: OutlierDetection, *, seed: int = 0, now: float = T0) -> OutlierDetector:
    return OutlierDetector(config, target=TARGET, rng=random.Random(seed), now=now)


def results(backend: Backend[Any], succeeded: int, failed: int) -> None:
    backend.calls_succeeded = succeeded
    backend.calls_failed = failed


def rates(backends: Sequence[Backend[Any]], success_rates: Sequence[float], volume: int) -> None:
    for backend, rate in zip(backends, success_rates, strict=True):
        succeeded = round(rate * volume)
        results(backend, succeeded, volume - succeeded)


def ejected(backends: Sequence[Backend[Any]]) -> list[int]:
    """Indices of the ejected backends."""
    return [i for i, backend in enumerate(backends) if backend.ejected_at is not None]


def balancer_with(
    n: int, config: OutlierDetection, *, seed: int = 0, clock: FakeClock | None = None
) -> tuple[Balancer[object], list[Backend[object]], FakeClock]:
    clock = clock if clock is not None else FakeClock()
    balancer: Balancer[object] = Balancer(
        TARGET,
        clock=clock,
        outlier_detection=config,
        rng=random.Random(seed),
        health_checking=False,
    )
    balancer.set_addresses(addresses(n))
    for backend in balancer.backends:
        balancer.set_connectivity(backend, READY)
        assert backend.eligible
    balancer.check_invariants()
    return balancer, balancer.backends, clock


def call(
    balancer: Balancer[object], backend: Backend[object], code: grpc.StatusCode, times: int = 1
) -> None:
    """``times`` calls that go to ``backend`` (the others excluded) and end with ``code``."""
    others = [b for b in balancer.backends if b is not backend]
    for _ in range(times):
        assert balancer.pick_excluding(others) is backend
        balancer.release(backend, code)


def state_of(balancer: Balancer[object], backend: Backend[object]) -> BackendState:
    [state] = [s for s in balancer.states() if s.address == backend.key]
    return state


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "grpc_leastconn" and r.levelno == level
    ]


# -- configuration ----------------------------------------------------------------


def test_defaults_are_a50s() -> None:
    config = OutlierDetection()
    assert config.interval == 10.0
    assert config.base_ejection_time == 30.0
    assert config.max_ejection_time is None
    assert config.longest_ejection == 300.0
    assert config.max_ejection_percent == 10
    assert config.success_rate_ejection is None
    assert config.failure_percentage_ejection is None
    success_rate = SuccessRateEjection()
    assert success_rate.stdev_factor == 1900
    assert success_rate.enforcement_percentage == 100
    assert success_rate.minimum_hosts == 5
    assert success_rate.request_volume == 100
    failure_percentage = FailurePercentageEjection()
    assert failure_percentage.threshold == 85
    assert failure_percentage.enforcement_percentage == 100
    assert failure_percentage.minimum_hosts == 5
    assert failure_percentage.request_volume == 50


@pytest.mark.parametrize(
    ("base", "maximum", "longest"),
    [(30.0, None, 300.0), (400.0, None, 400.0), (30.0, 70.0, 70.0), (30.0, 10.0, 30.0)],
)
def test_longest_ejection_is_max_of_base_and_max_ejection_time(
    base: float, maximum: float | None, longest: float
) -> None:
    config = OutlierDetection(base_ejection_time=base, max_ejection_time=maximum)
    assert config.longest_ejection == longest


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (OutlierDetection, {"interval": "10"}, "OutlierDetection.interval"),
        (OutlierDetection, {"interval": True}, "OutlierDetection.interval"),
        (OutlierDetection, {"base_ejection_time": "30s"}, "OutlierDetection.base_ejection_time"),
        (OutlierDetection, {"max_ejection_time": "300"}, "OutlierDetection.max_ejection_time"),
        (OutlierDetection, {"max_ejection_percent": True}, "OutlierDetection.max_ejection_percent"),
        (OutlierDetection, {"max_ejection_percent": 10.0}, "OutlierDetection.max_ejection_percent"),
        (
            OutlierDetection,
            {"success_rate_ejection": FailurePercentageEjection()},
            "OutlierDetection.success_rate_ejection",
        ),
        (
            OutlierDetection,
            {"failure_percentage_ejection": {"threshold": 85}},
            "OutlierDetection.failure_percentage_ejection",
        ),
        (SuccessRateEjection, {"stdev_factor": 1.9}, "SuccessRateEjection.stdev_factor"),
        (SuccessRateEjection, {"minimum_hosts": True}, "SuccessRateEjection.minimum_hosts"),
        (SuccessRateEjection, {"request_volume": "100"}, "SuccessRateEjection.request_volume"),
        (
            SuccessRateEjection,
            {"enforcement_percentage": False},
            "SuccessRateEjection.enforcement_percentage",
        ),
        (FailurePercentageEjection, {"threshold": 85.0}, "FailurePercentageEjection.threshold"),
        (FailurePercentageEjection, {"threshold": True}, "FailurePercentageEjection.threshold"),
        (
            FailurePercentageEjection,
            {"minimum_hosts": None},
            "FailurePercentageEjection.minimum_hosts",
        ),
    ],
)
def test_wrong_types_raise_type_error_naming_class_and_field(
    cls: type, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(TypeError, match=message.replace(".", r"\.")):
        cls(**kwargs)


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (OutlierDetection, {"interval": 0}, "OutlierDetection.interval"),
        (OutlierDetection, {"interval": -1.0}, "OutlierDetection.interval"),
        (OutlierDetection, {"interval": math.nan}, "OutlierDetection.interval"),
        (OutlierDetection, {"base_ejection_time": -1}, "OutlierDetection.base_ejection_time"),
        (OutlierDetection, {"max_ejection_time": -0.5}, "OutlierDetection.max_ejection_time"),
        (OutlierDetection, {"max_ejection_percent": 101}, "OutlierDetection.max_ejection_percent"),
        (OutlierDetection, {"max_ejection_percent": -1}, "OutlierDetection.max_ejection_percent"),
        (SuccessRateEjection, {"stdev_factor": -1}, "SuccessRateEjection.stdev_factor"),
        (
            SuccessRateEjection,
            {"enforcement_percentage": 101},
            "SuccessRateEjection.enforcement_percentage",
        ),
        (SuccessRateEjection, {"minimum_hosts": -1}, "SuccessRateEjection.minimum_hosts"),
        (SuccessRateEjection, {"request_volume": -1}, "SuccessRateEjection.request_volume"),
        (FailurePercentageEjection, {"threshold": 101}, "FailurePercentageEjection.threshold"),
        (FailurePercentageEjection, {"threshold": -1}, "FailurePercentageEjection.threshold"),
        (
            FailurePercentageEjection,
            {"enforcement_percentage": 200},
            "FailurePercentageEjection.enforcement_percentage",
        ),
        (
            FailurePercentageEjection,
            {"request_volume": -5},
            "FailurePercentageEjection.request_volume",
        ),
    ],
)
def test_out_of_range_values_raise_value_error_naming_class_and_field(
    cls: type, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        cls(**kwargs)


def test_boundary_values_are_accepted() -> None:
    config = OutlierDetection(
        interval=0.001,
        base_ejection_time=0,
        max_ejection_time=0,
        max_ejection_percent=100,
        success_rate_ejection=SuccessRateEjection(
            stdev_factor=0, enforcement_percentage=0, minimum_hosts=0, request_volume=0
        ),
        failure_percentage_ejection=FailurePercentageEjection(
            threshold=100, enforcement_percentage=100, minimum_hosts=0, request_volume=0
        ),
    )
    assert config.interval == 0.001
    assert config.longest_ejection == 0


# -- success rate -------------------------------------------------------------------


# Hand-computed: mean and population standard deviation of the judged rates,
# threshold = mean - stdev * stdev_factor / 1000.
SUCCESS_RATE_CASES = [
    # mean 0.9; stdev sqrt((4 * 0.1**2 + 0.4**2) / 5) = 0.2; 0.9 - 0.2 * 1.9 = 0.52 > 0.5.
    pytest.param([1.0, 1.0, 1.0, 1.0, 0.5], 1900, 0.9, 0.2, 0.52, [4], id="one-outlier"),
    # The same, 2.1 standard deviations: 0.9 - 0.42 = 0.48 < 0.5: not an outlier.
    pytest.param([1.0, 1.0, 1.0, 1.0, 0.5], 2100, 0.9, 0.2, 0.48, [], id="within-2.1-stdev"),
    # mean 0.8; stdev sqrt((3 * 0.2**2 + 2 * 0.3**2) / 5) = sqrt(0.06); threshold 0.3346.
    pytest.param(
        [1.0, 1.0, 1.0, 0.5, 0.5], 1900, 0.8, math.sqrt(0.06), 0.3346, [], id="two-low-not-below"
    ),
    # The same with 1 standard deviation: threshold 0.8 - 0.2449 = 0.5551, both below.
    pytest.param(
        [1.0, 1.0, 1.0, 0.5, 0.5], 1000, 0.8, math.sqrt(0.06), 0.5551, [3, 4], id="two-below"
    ),
    # All equal: stdev 0, threshold == mean, nobody strictly below it.
    pytest.param([0.5] * 5, 1900, 0.5, 0.0, 0.5, [], id="all-equal"),
]


@pytest.mark.parametrize(
    ("success_rates", "stdev_factor", "mean", "stdev", "threshold", "expected"),
    SUCCESS_RATE_CASES,
)
def test_success_rate_ejects_those_below_mean_minus_stdev_factor_stdevs(
    success_rates: list[float],
    stdev_factor: int,
    mean: float,
    stdev: float,
    threshold: float,
    expected: list[int],
) -> None:
    # The hand computation, checked against the rates it describes.
    assert sum(success_rates) / len(success_rates) == pytest.approx(mean)
    variance = sum((r - mean) ** 2 for r in success_rates) / len(success_rates)
    assert math.sqrt(variance) == pytest.approx(stdev)
    assert mean - stdev * stdev_factor / 1000 == pytest.approx(threshold, abs=1e-4)
    assert expected == [i for i, r in enumerate(success_rates) if r < threshold]

    config = OutlierDetection(
        max_ejection_percent=100,
        success_rate_ejection=SuccessRateEjection(stdev_factor=stdev_factor),
    )
    backends = fleet(len(success_rates))
    rates(backends, success_rates, volume=200)
    changed = detector(config).sweep(backends, T0 + 10)
    assert ejected(backends) == expected
    assert changed == [backends[i] for i in expected]
    for i in expected:
        assert backends[i].ejected_at == T0 + 10
        assert backends[i].ejections == 1


def test_success_rate_logs_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    config = OutlierDetection(success_rate_ejection=SuccessRateEjection())
    backends = fleet(5)
    rates(backends, [1.0, 1.0, 1.0, 1.0, 0.5], volume=200)
    with caplog.at_level(logging.INFO, logger="grpc_leastconn"):
        detector(config).sweep(backends, T0)
    assert messages(caplog, logging.WARNING) == [
        f"backend {backends[4].key} of {TARGET!r} ejected for 30 s (outlier detection): "
        "success rate 0.50 below 0.52 (mean 0.90)"
    ]


def test_success_rate_neither_judges_nor_counts_low_volume_backends() -> None:
    config = OutlierDetection(
        max_ejection_percent=100, success_rate_ejection=SuccessRateEjection(request_volume=100)
    )
    backends = fleet(6)
    rates(backends[:5], [1.0, 1.0, 1.0, 1.0, 0.5], volume=100)
    # All its 99 calls failed, but 99 < request_volume: not judged, and not
    # in the mean (with it, the mean would be 0.75 and the threshold 0.024,
    # sparing the 0.5 backend and ejecting this one).
    results(backends[5], 0, 99)
    detector(config).sweep(backends, T0)
    assert ejected(backends) == [4]


def test_success_rate_judges_a_backend_at_exactly_request_volume() -> None:
    config = OutlierDetection(
        max_ejection_percent=100, success_rate_ejection=SuccessRateEjection(request_volume=100)
    )
    backends = fleet(6)
    rates(backends[:5], [1.0] * 5, volume=100)
    results(backends[5], 0, 100)
    # mean 5/6, stdev sqrt(5) / 6 = 0.3727, threshold 0.8333 - 0.7081 = 0.125 > 0.
    detector(config).sweep(backends, T0)
    assert ejected(backends) == [5]


@pytest.mark.parametrize(("minimum_hosts", "expected"), [(5, []), (4, [3])])
def test_success_rate_minimum_hosts_counts_only_backends_with_enough_volume(
    minimum_hosts: int, expected: list[int]
) -> None:
    config = OutlierDetection(
        max_ejection_percent=100,
        success_rate_ejection=SuccessRateEjection(
            stdev_factor=1000, minimum_hosts=minimum_hosts, request_volume=100
        ),
    )
    backends = fleet(6)
    # Four judged: mean 0.8125, stdev 0.3248, threshold 0.4877 > 0.25.
    rates(backends[:4], [1.0, 1.0, 1.0, 0.25], volume=100)
    # Six backends in all, but these two have too few calls to count as hosts.
    rates(backends[4:], [1.0, 1.0], volume=99)
    detector(config).sweep(backends, T0)
    assert ejected(backends) == expected


# -- failure percentage -------------------------------------------------------------


@pytest.mark.parametrize(
    ("failed", "calls", "ejects"),
    [(85, 100, True), (84, 100, False), (17, 20, True), (16, 20, False), (100, 100, True)],
)
def test_failure_percentage_ejects_at_the_threshold_not_below(
    failed: int, calls: int, ejects: bool
) -> None:
    config = OutlierDetection(
        failure_percentage_ejection=FailurePercentageEjection(threshold=85, request_volume=20)
    )
    backends = fleet(5)
    results(backends[0], calls - failed, failed)
    for backend in backends[1:]:
        results(backend, calls, 0)
    detector(config).sweep(backends, T0)
    assert ejected(backends) == ([0] if ejects else [])


def test_failure_percentage_logs_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    config = OutlierDetection(failure_percentage_ejection=FailurePercentageEjection())
    backends = fleet(5)
    results(backends[2], 10, 90)
    with caplog.at_level(logging.INFO, logger="grpc_leastconn"):
        detector(config).sweep(backends, T0)
    assert messages(caplog, logging.WARNING) == [
        f"backend {backends[2].key} of {TARGET!r} ejected for 30 s (outlier detection): "
        "90 % of 100 calls failed"
    ]


@pytest.mark.parametrize(("calls", "ejects"), [(49, False), (50, True)])
def test_failure_percentage_skips_backends_below_request_volume(calls: int, ejects: bool) -> None:
    config = OutlierDetection(failure_percentage_ejection=FailurePercentageEjection())
    backends = fleet(5)
    results(backends[1], 0, calls)
    detector(config).sweep(backends, T0)
    assert ejected(backends) == ([1] if ejects else [])


@pytest.mark.parametrize(("n", "ejects"), [(4, False), (5, True)])
def test_failure_percentage_minimum_hosts_counts_every_backend(n: int, ejects: bool) -> None:
    config = OutlierDetection(
        failure_percentage_ejection=FailurePercentageEjection(minimum_hosts=5)
    )
    backends = fleet(n)
    # Only one backend has any calls; the others still count as hosts.
    results(backends[0], 0, 100)
    detector(config).sweep(backends, T0)
    assert ejected(backends) == ([0] if ejects else [])


def test_failure_percentage_with_request_volume_0_skips_backends_without_calls() -> None:
    config = OutlierDetection(
        max_ejection_percent=100,
        failure_percentage_ejection=FailurePercentageEjection(threshold=0, request_volume=0),
    )
    backends = fleet(5)
    results(backends[3], 1, 0)
    detector(config).sweep(backends, T0)
    assert ejected(backends) == [3]


# -- enforcement_percentage -----------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["success_rate", "failure_percentage"])
@pytest.mark.parametrize(("enforcement", "ejects"), [(0, False), (100, True)])
def test_enforcement_0_never_ejects_and_100_always_does(
    algorithm: str, enforcement: int, ejects: bool
) -> None:
    if algorithm == "success_rate":
        config = OutlierDetection(
            success_rate_ejection=SuccessRateEjection(enforcement_percentage=enforcement)
        )
    else:
        config = OutlierDetection(
            failure_percentage_ejection=FailurePercentageEjection(
                enforcement_percentage=enforcement
            )
        )
    for seed in range(20):
        backends = fleet(5)
        rates(backends, [1.0, 1.0, 1.0, 1.0, 0.0], volume=200)
        detector(config, seed=seed).sweep(backends, T0)
        assert ejected(backends) == ([4] if ejects else []), seed


def test_enforcement_between_uses_the_injected_rng() -> None:
    config = OutlierDetection(
        max_ejection_percent=100,
        failure_percentage_ejection=FailurePercentageEjection(
            enforcement_percentage=50, minimum_hosts=1, request_volume=1
        ),
    )
    seed = 7
    draws = random.Random(seed)
    expected = [i for i in range(20) if draws.randrange(100) < 50]
    assert 0 < len(expected) < 20  # the seed must exercise both outcomes
    outcomes = []
    for _ in range(2):
        balancer, backends, clock = balancer_with(20, config, seed=seed)
        for backend in backends:
            results(backend, 0, 10)
        clock.now += config.interval
        balancer.refresh(clock.now)
        balancer.check_invariants()
        outcomes.append(ejected(backends))
    assert outcomes == [expected, expected]


def test_success_rate_enforcement_draws_once_per_outlier() -> None:
    config = OutlierDetection(success_rate_ejection=SuccessRateEjection(enforcement_percentage=30))
    seen = set()
    for seed in range(40):
        backends = fleet(5)
        rates(backends, [1.0, 1.0, 1.0, 1.0, 0.5], volume=200)
        detector(config, seed=seed).sweep(backends, T0)
        expected = [4] if random.Random(seed).randrange(100) < 30 else []
        assert ejected(backends) == expected, seed
        seen.add(bool(expected))
    assert seen == {True, False}


# -- max_ejection_percent ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "percent", "failing", "expected"),
    [
        (4, 10, 2, 1),  # 10 % of 4 is less than one backend: one may still go
        (20, 10, 5, 2),
        (20, 25, 10, 5),
        (5, 0, 3, 1),
        (5, 100, 5, 5),
    ],
)
def test_max_ejection_percent_limits_ejections_but_one_always_may_go(
    n: int, percent: int, failing: int, expected: int
) -> None:
    config = OutlierDetection(
        max_ejection_percent=percent, failure_percentage_ejection=EAGER_FAILURES
    )
    backends = fleet(n)
    for backend in backends[:failing]:
        results(backend, 0, 100)
    detector(config).sweep(backends, T0)
    assert ejected(backends) == list(range(expected))


def test_backends_still_ejected_count_against_max_ejection_percent() -> None:
    config = OutlierDetection(max_ejection_percent=10, failure_percentage_ejection=EAGER_FAILURES)
    backends = fleet(4)
    sweeps = detector(config)
    results(backends[0], 0, 100)
    sweeps.sweep(backends, T0)
    assert ejected(backends) == [0]
    results(backends[1], 0, 100)
    sweeps.sweep(backends, T0 + 10)
    assert ejected(backends) == [0]
    assert backends[1].ejections == 0


@pytest.mark.parametrize(("with_success_rate", "expected"), [(True, [5]), (False, [0])])
def test_success_rate_ejections_count_against_failure_percentage(
    with_success_rate: bool, expected: list[int]
) -> None:
    success_rate = SuccessRateEjection(request_volume=100)
    config = OutlierDetection(
        max_ejection_percent=10,
        success_rate_ejection=success_rate if with_success_rate else None,
        failure_percentage_ejection=FailurePercentageEjection(request_volume=50),
    )
    backends = fleet(6)
    # Too few calls for the success rate, enough for the failure percentage.
    results(backends[0], 0, 60)
    # Judged by success rate: mean 0.8, stdev 0.4, threshold 0.8 - 0.76 = 0.04 > 0.
    rates(backends[1:], [1.0, 1.0, 1.0, 1.0, 0.0], volume=200)
    detector(config).sweep(backends, T0)
    # Success rate runs first; its ejection spends the one that 10 % allows.
    assert ejected(backends) == expected


def test_an_ejected_backend_is_not_ejected_again() -> None:
    config = OutlierDetection(max_ejection_percent=100, failure_percentage_ejection=EAGER_FAILURES)
    backends = fleet(2)
    sweeps = detector(config)
    results(backends[0], 0, 10)
    assert sweeps.sweep(backends, T0) == [backends[0]]
    # Its running calls failed too: it stays ejected, the multiplier unchanged.
    results(backends[0], 0, 10)
    assert sweeps.sweep(backends, T0 + 10) == []
    assert backends[0].ejected_at == T0
    assert backends[0].ejections == 1
    assert ejected(backends) == [0]


# -- ejection time and the multiplier -------------------------------------------------


def test_ejection_time_grows_with_the_multiplier_up_to_the_cap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = OutlierDetection(
        base_ejection_time=30, max_ejection_time=70, failure_percentage_ejection=EAGER_FAILURES
    )
    [backend] = backends = fleet(1)
    sweeps = detector(config)
    caplog.set_level(logging.INFO, logger="grpc_leastconn")
    now = T0
    for multiplier, lasts in [(1, 30.0), (2, 60.0), (3, 70.0), (4, 70.0)]:
        results(backend, 0, 10)
        assert sweeps.sweep(backends, now) == [backend]
        assert backend.ejected_at == now
        assert backend.ejections == multiplier
        assert messages(caplog, logging.WARNING)[-1].startswith(
            f"backend {backend.key} of {TARGET!r} ejected for {lasts:g} s"
        )
        # Exactly at the end of the ejection it is still out ...
        assert sweeps.sweep(backends, now + lasts) == []
        assert backend.ejected_at == now
        assert backend.ejections == multiplier  # not reduced while ejected
        # ... and back strictly after it, the multiplier kept for now.
        assert sweeps.sweep(backends, now + lasts + 0.001) == [backend]
        assert backend.ejected_at is None
        assert backend.ejections == multiplier
        now += lasts + 1
    assert len(messages(caplog, logging.INFO)) == 4


def test_multiplier_falls_by_one_per_sweep_while_not_ejected() -> None:
    config = OutlierDetection(base_ejection_time=10, failure_percentage_ejection=EAGER_FAILURES)
    [backend] = backends = fleet(1)
    sweeps = detector(config)
    now = T0
    for _ in range(3):  # three ejections, each right after the last one ended
        results(backend, 0, 10)
        sweeps.sweep(backends, now)
        now += 1000
        sweeps.sweep(backends, now)
        assert backend.ejected_at is None
    assert backend.ejections == 3
    for expected in [2, 1]:
        now += 10
        sweeps.sweep(backends, now)
        assert backend.ejections == expected
    # Multiplier 1 + 1: this ejection lasts 2 * base, not 4 * base.
    results(backend, 0, 10)
    now += 10
    sweeps.sweep(backends, now)
    assert backend.ejections == 2
    assert sweeps.sweep(backends, now + 20) == []
    assert sweeps.sweep(backends, now + 20.001) == [backend]
    now += 20.001
    for expected in [1, 0, 0]:
        now += 10
        sweeps.sweep(backends, now)
        assert backend.ejections == expected


def test_sweep_judges_the_calls_since_the_last_sweep() -> None:
    config = OutlierDetection(failure_percentage_ejection=EAGER_FAILURES)
    backends = fleet(3)
    results(backends[0], 3, 4)
    results(backends[1], 5, 0)
    sweeps = detector(config, now=T0)
    assert sweeps.next_sweep == T0 + 10
    sweeps.sweep(backends, T0 + 12)
    assert sweeps.next_sweep == T0 + 22
    for backend in backends:
        assert (backend.calls_succeeded, backend.calls_failed) == (0, 0)


def test_with_neither_algorithm_nothing_is_ejected() -> None:
    backends = fleet(5)
    sweeps = detector(OutlierDetection(max_ejection_percent=100))
    for i in range(10):
        for backend in backends:
            results(backend, 0, 1000)
        assert sweeps.sweep(backends, T0 + 10 * i) == []
    assert ejected(backends) == []


# -- through the balancer ---------------------------------------------------------------


def test_what_a_call_counts_for_outlier_detection() -> None:
    balancer, [backend, *_], _ = balancer_with(
        2, OutlierDetection(failure_percentage_ejection=FailurePercentageEjection())
    )
    call(balancer, backend, OK, 2)
    assert (backend.calls_succeeded, backend.calls_failed) == (2, 0)
    for code in (Code.UNAVAILABLE, Code.INTERNAL, Code.UNKNOWN):
        call(balancer, backend, code)
    assert (backend.calls_succeeded, backend.calls_failed) == (2, 3)
    # The application's answers are the backend doing its job.
    for code in (Code.NOT_FOUND, Code.INVALID_ARGUMENT):
        call(balancer, backend, code)
    assert (backend.calls_succeeded, backend.calls_failed) == (4, 3)
    # The caller's doing, or nothing known: not counted.
    for ignored in (Code.CANCELLED, Code.DEADLINE_EXCEEDED, None):
        assert balancer.pick_excluding(balancer.backends[1:]) is backend
        balancer.release(backend, ignored)
    assert (backend.calls_succeeded, backend.calls_failed) == (4, 3)


def test_an_ejected_backend_takes_no_calls_keeps_its_connection_and_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = OutlierDetection(
        interval=10, base_ejection_time=30, failure_percentage_ejection=EAGER_FAILURES
    )
    balancer, backends, clock = balancer_with(5, config)
    bad = backends[2]
    caplog.set_level(logging.INFO, logger="grpc_leastconn")
    call(balancer, bad, UNAVAILABLE, 5)
    for backend in backends:
        if backend is not bad:
            call(balancer, backend, OK, 5)
    clock.now = T0 + 10
    balancer.refresh(clock.now)
    balancer.check_invariants()
    assert ejected(backends) == [2]
    assert not bad.eligible
    assert bad.connectivity is READY
    assert bad.problem() == "EJECTED"
    state = state_of(balancer, bad)
    assert state.ejected and not state.eligible
    assert state.connectivity is READY
    assert [s.ejected for s in balancer.states()] == [False, False, True, False, False]
    warnings = messages(caplog, logging.WARNING)
    assert [m for m in warnings if "outlier detection" in m] == [
        f"backend {bad.key} of {TARGET!r} ejected for 30 s (outlier detection): "
        "100 % of 5 calls failed"
    ]
    # No new call goes there, not even when it would be the least loaded.
    held = [balancer.pick() for _ in range(40)]
    assert bad not in held
    assert {b for b in held if b is not None} == {b for b in backends if b is not bad}
    for picked in held:
        assert picked is not None
        balancer.release(picked, OK)
    assert balancer.pick_excluding([b for b in backends if b is not bad]) is None
    # Sweeps at 20, 30, 40 = ejected_at + 30 keep it out; 50 brings it back.
    for now in (T0 + 20, T0 + 30, T0 + 40):
        clock.now = now
        balancer.refresh(now)
        assert not bad.eligible, now
    assert not any("returns after its ejection" in m for m in messages(caplog, logging.INFO))
    clock.now = T0 + 50
    balancer.refresh(clock.now)
    balancer.check_invariants()
    assert bad.eligible
    assert not state_of(balancer, bad).ejected
    assert messages(caplog, logging.INFO)[-1] == (
        f"backend {bad.key} of {TARGET!r} returns after its ejection (outlier detection)"
    )
    assert balancer.pick_excluding([b for b in backends if b is not bad]) is bad


def test_an_ejected_backends_running_calls_go_on() -> None:
    config = OutlierDetection(failure_percentage_ejection=EAGER_FAILURES)
    balancer, backends, clock = balancer_with(5, config)
    bad = backends[0]
    call(balancer, bad, UNAVAILABLE, 3)
    assert balancer.pick_excluding(backends[1:]) is bad  # running across the sweep
    clock.now = T0 + 10
    balancer.refresh(clock.now)
    assert bad.ejected_at == T0 + 10
    assert bad.in_flight == 1
    assert state_of(balancer, bad).in_flight == 1
    balancer.release(bad, OK)
    balancer.check_invariants()
    assert bad.in_flight == 0
    assert not bad.eligible
    assert bad.calls_succeeded == 1  # judged at the next sweep


def test_the_lazy_path_sweeps_on_the_first_pick_once_the_interval_passed() -> None:
    config = OutlierDetection(interval=10, failure_percentage_ejection=EAGER_FAILURES)
    balancer, backends, clock = balancer_with(5, config)
    bad, good = backends[0], backends[1]
    call(balancer, bad, UNAVAILABLE, 4)
    clock.now = T0 + 9.999
    call(balancer, good, OK)
    assert bad.eligible
    assert (bad.calls_succeeded, bad.calls_failed) == (0, 4)
    clock.now = T0 + 10
    call(balancer, good, OK)  # its pick runs the sweep; its release is the first counted
    balancer.check_invariants()
    assert bad.ejected_at == T0 + 10
    assert not bad.eligible
    assert (bad.calls_failed, good.calls_succeeded) == (0, 1)
    # The next sweep is one interval after this one.
    call(balancer, good, OK)
    clock.now = T0 + 19.999
    call(balancer, good, OK)
    assert good.calls_succeeded == 3
    clock.now = T0 + 20
    call(balancer, good, OK)
    assert good.calls_succeeded == 1
    balancer.check_invariants()


def test_refresh_sweeps_only_when_the_interval_passed() -> None:
    config = OutlierDetection(interval=10, failure_percentage_ejection=EAGER_FAILURES)
    balancer, backends, clock = balancer_with(5, config)
    results(backends[3], 0, 10)
    balancer.refresh(T0 + 9.5)
    assert ejected(backends) == []
    assert backends[3].calls_failed == 10
    clock.now = T0 + 10
    balancer.refresh(clock.now)
    balancer.check_invariants()
    assert ejected(backends) == [3]
    assert backends[3].calls_failed == 0


def test_picks_run_a_due_sweep_first() -> None:
    config = OutlierDetection(
        interval=10, base_ejection_time=5, failure_percentage_ejection=EAGER_FAILURES
    )
    balancer, [only], clock = balancer_with(1, config)
    call(balancer, only, UNAVAILABLE, 2)
    clock.now = T0 + 10
    assert balancer.pick_fresh() is None  # the sweep ejects the only backend
    assert only.ejected_at == T0 + 10
    clock.now = T0 + 20
    # A pick runs a due sweep first too: the ejection has ended.
    assert balancer.pick() is only
    balancer.check_invariants()


def test_a_balancer_with_neither_algorithm_never_ejects() -> None:
    config = OutlierDetection(max_ejection_percent=100, interval=1)
    balancer, backends, clock = balancer_with(5, config)
    for step in range(1, 30):
        for backend in backends:
            call(balancer, backend, UNAVAILABLE, 20)
        clock.now = T0 + step
        balancer.refresh(clock.now)
    balancer.check_invariants()
    assert ejected(backends) == []
    assert all(backend.eligible for backend in backends)
    assert not any(state.ejected for state in balancer.states())


def test_a_readded_address_starts_unejected() -> None:
    config = OutlierDetection(failure_percentage_ejection=EAGER_FAILURES)
    balancer, backends, clock = balancer_with(5, config)
    call(balancer, backends[0], UNAVAILABLE, 3)
    clock.now = T0 + 10
    balancer.refresh(clock.now)
    assert not backends[0].eligible
    every = [b.address for b in backends]
    balancer.set_addresses(every[1:])
    change = balancer.set_addresses(every)
    [fresh] = change.added
    balancer.set_connectivity(fresh, READY)
    balancer.check_invariants()
    assert fresh.eligible
    assert fresh.ejections == 0


@pytest.mark.parametrize(
    ("penalty", "codes", "ejects"),
    [(False, None, True), (True, None, True), (True, frozenset({Code.INTERNAL}), False)],
)
def test_outlier_detection_judges_the_failure_codes_with_or_without_penalty(
    penalty: bool, codes: frozenset[grpc.StatusCode] | None, ejects: bool
) -> None:
    clock = FakeClock()
    extra: dict[str, Any] = {} if codes is None else {"failure_codes": codes}
    balancer: Balancer[object] = Balancer(
        TARGET,
        clock=clock,
        health_checking=False,
        failure_penalty=penalty,
        outlier_detection=OutlierDetection(failure_percentage_ejection=EAGER_FAILURES),
        **extra,
    )
    balancer.set_addresses(addresses(5))
    backends = balancer.backends
    for backend in backends:
        balancer.set_connectivity(backend, READY)
    call(balancer, backends[0], UNAVAILABLE, 10)
    assert (backends[0].penalty > 0) is (penalty and codes is None)
    clock.now = T0 + 10
    balancer.refresh(clock.now)
    balancer.check_invariants()
    assert ejected(backends) == ([0] if ejects else [])
