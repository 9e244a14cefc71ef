"""Pure tests of the maintenance plan: re-resolution timing, backoff and drain deadlines.

A fake clock drives everything: no timers run, nothing sleeps, no DNS is asked.
"""

from __future__ import annotations

import logging
import random
import re

import grpc
import pytest
from seams import (
    Address,
    Backend,
    Backoff,
    Balancer,
    MaintenancePlan,
    Resolution,
    ResolutionError,
    ResolutionSchedule,
    Seams,
    Settings,
    Step,
    make_balancer,
    make_settings,
    parse_target,
    resolve_again,
    resolve_initial,
)

DNS_TARGET = "dns:///svc.test:50051"
A1 = Address("10.0.0.1", 50051, "svc.test:50051")
A2 = Address("10.0.0.2", 50051, "svc.test:50051")
T0 = 1000.0
MIN = 2.0
MAX = 20.0
SEED = 7


class FakeClock:
    """``() -> float`` seconds that move only when a test moves them."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def dns_settings(
    *,
    min_interval: float = MIN,
    max_interval: float = MAX,
    drain_timeout: float | None = None,
    seed: int = SEED,
    target: str = DNS_TARGET,
) -> Settings:
    return make_settings(
        "insecure_channel",
        target,
        None,
        None,
        None,
        {
            "resolve_min_interval": min_interval,
            "resolve_max_interval": max_interval,
            "drain_timeout": drain_timeout,
            "health_check_service": None,
            "rng": random.Random(seed),
        },
    )


def dns_plan(
    clock: FakeClock, ttl: float | None = None, settings: Settings | None = None
) -> MaintenancePlan:
    settings = settings if settings is not None else dns_settings()
    return MaintenancePlan.for_target(settings, Resolution((A1, A2), ttl), clock)


def idle_balancer(clock: FakeClock) -> Balancer[object]:
    return Balancer(DNS_TARGET, clock=clock, health_checking=False)


def first_delay_bounds(
    attempt: int, initial: float = MIN, maximum: float = MAX
) -> tuple[float, float]:
    base = min(initial * 1.6**attempt, maximum)
    return base * 0.8, base * 1.2


def resolve_now(plan: MaintenancePlan, balancer: Balancer[object], clock: FakeClock) -> None:
    """Move the clock to the due resolution and have step() start it."""
    wait = plan.step(balancer).wait
    assert wait is not None
    clock.now += wait + 1e-6
    step = plan.step(balancer)
    assert step.resolve
    assert plan.resolving


def draining_backend(
    balancer: Balancer[object], address: Address = A1
) -> tuple[Backend[object], Backend[object]]:
    """Two READY backends; the one at ``address`` picked, then removed: it drains."""
    balancer.set_addresses([A1, A2])
    for backend in balancer.backends:
        assert balancer.set_connectivity(backend, grpc.ChannelConnectivity.READY)
    picked = balancer.pick()
    assert picked is not None
    assert picked.address == address
    other = next(b for b in balancer.backends if b is not picked)
    change = balancer.set_addresses([other.address])
    assert change.to_close == []
    assert change.added == []
    assert picked.removed
    return picked, other


# -- targets that need no timer ---------------------------------------------


def test_literal_only_target_needs_no_timer() -> None:
    clock = FakeClock()
    settings = make_settings(
        "insecure_channel", "ipv4:10.0.0.1:50051,10.0.0.2:50051", None, None, None, {}
    )
    plan = MaintenancePlan.for_target(settings, Resolution((A1, A2), ttl=1.0), clock)
    balancer = idle_balancer(clock)
    assert not plan.needed
    for advance in (0.0, 1.0, MAX, 10_000.0):
        clock.now += advance
        step = plan.step(balancer)
        assert step == Step(resolve=False, expired=[], wait=None)
    assert not plan.resolving
    assert plan.connectivity_changed(grpc.ChannelConnectivity.TRANSIENT_FAILURE) is False
    plan.finished(None)
    plan.finished(Resolution((A1,), ttl=1.0))
    clock.now += 10_000.0
    assert not plan.step(balancer).resolve


def test_dns_target_needs_a_timer() -> None:
    clock = FakeClock()
    assert parse_target(DNS_TARGET).needs_dns
    plan = dns_plan(clock)
    assert plan.needed
    assert not plan.resolving


# -- resolving again when the TTL runs out -----------------------------------


@pytest.mark.parametrize(
    ("ttl", "expected"),
    [(0.5, MIN), (0.0, MIN), (MIN, MIN), (7.0, 7.0), (MAX, MAX), (100.0, MAX), (None, MAX)],
)
def test_next_resolution_is_the_ttl_clamped_to_the_intervals(
    ttl: float | None, expected: float
) -> None:
    clock = FakeClock()
    plan = dns_plan(clock, ttl)
    balancer = idle_balancer(clock)
    step = plan.step(balancer)
    assert not step.resolve
    assert step.expired == []
    assert step.wait == pytest.approx(expected)
    clock.now = T0 + expected - 0.001
    step = plan.step(balancer)
    assert not step.resolve
    assert step.wait == pytest.approx(0.001)
    clock.now = T0 + expected
    step = plan.step(balancer)
    assert step.resolve
    assert plan.resolving


def test_schedule_alone_clamps_each_answer_from_the_time_it_came() -> None:
    clock = FakeClock()
    schedule = ResolutionSchedule(MIN, MAX, clock=clock, rng=random.Random(SEED))
    # Before any answer: the longest interval.
    assert schedule.seconds_until_due() == pytest.approx(MAX)
    clock.now += 3.0
    schedule.resolved(5.0)
    assert schedule.seconds_until_due() == pytest.approx(5.0)
    clock.now += 1.0
    schedule.resolved(0.1)
    assert schedule.seconds_until_due() == pytest.approx(MIN)
    clock.now += 100.0
    assert schedule.seconds_until_due() == 0.0


def test_no_second_resolution_while_one_runs() -> None:
    clock = FakeClock()
    plan = dns_plan(clock, ttl=5.0)
    balancer = idle_balancer(clock)
    clock.now = T0 + 5.0
    assert plan.step(balancer).resolve
    # The resolution is still running: no other starts, and its end (not a
    # timeout) wakes the timer, so with no drains there is nothing to wait for.
    for advance in (0.0, 5.0, 1_000.0):
        clock.now += advance
        step = plan.step(balancer)
        assert not step.resolve
        assert step.wait is None
    plan.finished(Resolution((A1, A2), ttl=9.0))
    assert not plan.resolving
    step = plan.step(balancer)
    assert not step.resolve
    assert step.wait == pytest.approx(9.0)


def test_wait_while_resolving_covers_only_drains() -> None:
    clock = FakeClock()
    settings = dns_settings(drain_timeout=30.0, max_interval=MAX)
    plan = dns_plan(clock, ttl=5.0, settings=settings)
    balancer: Balancer[object] = make_balancer(settings, Seams(clock=clock))
    clock.now = T0 + 5.0
    assert plan.step(balancer).resolve
    draining_backend(balancer)  # its deadline: T0 + 5 + 30
    clock.now += 4.0
    step = plan.step(balancer)
    assert not step.resolve
    assert step.wait == pytest.approx(26.0)
    plan.finished(Resolution((A2,), ttl=10.0))
    step = plan.step(balancer)
    assert step.wait == pytest.approx(10.0)


# -- failures back off, answers reset ----------------------------------------


def failure_waits(plan: MaintenancePlan, clock: FakeClock, count: int) -> list[float]:
    balancer = idle_balancer(clock)
    waits = []
    for _ in range(count):
        resolve_now(plan, balancer, clock)
        plan.finished(None)
        assert not plan.resolving
        wait = plan.step(balancer).wait
        assert wait is not None
        waits.append(wait)
    return waits


def test_failures_back_off_exponentially_from_min_interval_up_to_max() -> None:
    clock = FakeClock()
    waits = failure_waits(dns_plan(clock), clock, 12)
    for attempt, wait in enumerate(waits):
        low, high = first_delay_bounds(attempt)
        assert low <= wait <= high, (attempt, wait)
    # 2 * 1.6**5 > 20: from there on the ceiling holds, jitter only below it.
    assert all(MAX * 0.8 <= wait <= MAX for wait in waits[5:])
    # Never sooner than min_interval, never later than max_interval.
    assert all(MIN <= wait <= MAX for wait in waits)
    # Jitter is there, and comes from the settings' rng.
    bases = [min(MIN * 1.6**attempt, MAX) for attempt in range(12)]
    assert any(wait != pytest.approx(base) for wait, base in zip(waits, bases, strict=True))
    reference = Backoff(initial=MIN, maximum=MAX, rng=random.Random(SEED))
    expected = [min(max(reference.delay(a), MIN), MAX) for a in range(12)]
    assert waits == pytest.approx(expected)


def test_backoff_jitter_follows_the_seed() -> None:
    def waits(seed: int) -> list[float]:
        clock = FakeClock()
        return failure_waits(dns_plan(clock, settings=dns_settings(seed=seed)), clock, 6)

    assert waits(1) == waits(1)
    assert waits(1) != waits(2)


def test_an_answer_resets_the_backoff() -> None:
    clock = FakeClock()
    plan = dns_plan(clock)
    balancer = idle_balancer(clock)
    waits = failure_waits(plan, clock, 5)
    low, _ = first_delay_bounds(4)
    assert waits[-1] >= low
    resolve_now(plan, balancer, clock)
    plan.finished(Resolution((A1,), ttl=5.0))
    assert plan.step(balancer).wait == pytest.approx(5.0)
    resolve_now(plan, balancer, clock)
    plan.finished(None)
    wait = plan.step(balancer).wait
    assert wait is not None
    low, high = first_delay_bounds(0)
    assert low <= wait <= high


# -- a failing backend brings the next resolution forward ---------------------


def test_transient_failure_brings_resolution_forward_but_not_before_min_interval() -> None:
    clock = FakeClock()
    plan = dns_plan(clock, ttl=None)
    balancer = idle_balancer(clock)
    clock.now = T0 + 0.5
    assert plan.connectivity_changed(grpc.ChannelConnectivity.TRANSIENT_FAILURE) is True
    step = plan.step(balancer)
    assert not step.resolve
    assert step.wait == pytest.approx(MIN - 0.5)
    clock.now = T0 + MIN - 0.001
    assert not plan.step(balancer).resolve
    clock.now = T0 + MIN
    assert plan.step(balancer).resolve


def test_transient_failure_long_after_the_last_resolution_resolves_at_once() -> None:
    clock = FakeClock()
    plan = dns_plan(clock, ttl=None)
    balancer = idle_balancer(clock)
    clock.now = T0 + 5.0
    assert plan.step(balancer).wait == pytest.approx(MAX - 5.0)
    assert plan.connectivity_changed(grpc.ChannelConnectivity.TRANSIENT_FAILURE) is True
    step = plan.step(balancer)
    assert step.resolve


def test_early_request_never_postpones_a_sooner_resolution() -> None:
    clock = FakeClock()
    plan = dns_plan(clock, ttl=3.0)
    balancer = idle_balancer(clock)
    clock.now = T0 + 1.0
    assert plan.connectivity_changed(grpc.ChannelConnectivity.TRANSIENT_FAILURE)
    assert plan.step(balancer).wait == pytest.approx(1.0)


@pytest.mark.parametrize(
    "state",
    [
        grpc.ChannelConnectivity.IDLE,
        grpc.ChannelConnectivity.CONNECTING,
        grpc.ChannelConnectivity.READY,
        grpc.ChannelConnectivity.SHUTDOWN,
    ],
)
def test_other_connectivity_states_change_nothing(state: grpc.ChannelConnectivity) -> None:
    clock = FakeClock()
    plan = dns_plan(clock, ttl=None)
    balancer = idle_balancer(clock)
    clock.now = T0 + 5.0
    assert plan.connectivity_changed(state) is False
    step = plan.step(balancer)
    assert not step.resolve
    assert step.wait == pytest.approx(MAX - 5.0)


# -- drain deadlines ----------------------------------------------------------


def drain_setup(clock: FakeClock) -> tuple[MaintenancePlan, Balancer[object]]:
    settings = dns_settings(drain_timeout=30.0, max_interval=100.0)
    balancer: Balancer[object] = make_balancer(settings, Seams(clock=clock))
    plan = MaintenancePlan.for_target(settings, Resolution((A1, A2), ttl=None), clock)
    return plan, balancer


def test_step_waits_for_the_drain_deadline_then_expires_the_backend(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="grpc_leastconn")
    clock = FakeClock()
    plan, balancer = drain_setup(clock)
    drained, _ = draining_backend(balancer)
    assert drained.drain_deadline == pytest.approx(T0 + 30.0)
    assert balancer.next_drain_deadline() == pytest.approx(T0 + 30.0)
    step = plan.step(balancer)
    assert step.expired == []
    assert step.wait == pytest.approx(30.0)
    clock.now = T0 + 10.0
    assert plan.step(balancer).wait == pytest.approx(20.0)
    clock.now = T0 + 30.0 - 0.001
    assert plan.step(balancer).expired == []
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)
    clock.now = T0 + 30.0
    step = plan.step(balancer)
    assert step.expired == [drained]
    assert not step.resolve
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert drained.key in message
    assert "drain timeout" in message
    assert "cancelling 1 RPCs" in message
    # Expired once; afterwards only the resolution is waited for.
    step = plan.step(balancer)
    assert step.expired == []
    assert step.wait == pytest.approx(70.0)
    assert balancer.next_drain_deadline() is None
    assert all(not state.draining for state in balancer.states())
    # The cancelled RPC's release does not ask for a second close.
    assert balancer.release(drained) is False
    assert drained.in_flight == 0


def test_backend_drained_before_its_deadline_no_longer_expires(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="grpc_leastconn")
    clock = FakeClock()
    plan, balancer = drain_setup(clock)
    drained, other = draining_backend(balancer)
    assert plan.step(balancer).wait == pytest.approx(30.0)
    clock.now = T0 + 5.0
    assert balancer.release(drained) is True
    assert balancer.next_drain_deadline() is None
    assert plan.step(balancer).wait == pytest.approx(95.0)
    clock.now = T0 + 31.0
    step = plan.step(balancer)
    assert step.expired == []
    clock.now = T0 + 200.0
    step = plan.step(balancer)
    assert step.expired == []
    assert step.resolve
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)
    # Releasing a backend of the current set is never a close.
    assert balancer.pick() is other
    assert balancer.release(other) is False


def test_without_drain_timeout_a_drain_never_expires() -> None:
    clock = FakeClock()
    settings = dns_settings(drain_timeout=None, max_interval=100.0)
    balancer: Balancer[object] = make_balancer(settings, Seams(clock=clock))
    plan = MaintenancePlan.for_target(settings, Resolution((A1, A2)), clock)
    drained, _ = draining_backend(balancer)
    assert drained.drain_deadline is None
    assert balancer.next_drain_deadline() is None
    assert plan.step(balancer).wait == pytest.approx(100.0)
    clock.now = T0 + 1e6
    assert plan.step(balancer).expired == []
    assert [s.address for s in balancer.states() if s.draining] == [drained.key]


# -- resolving -----------------------------------------------------------------


class FixedResolver:
    def __init__(self, resolution: Resolution) -> None:
        self.resolution = resolution
        self.calls = 0

    def resolve(self) -> Resolution:
        self.calls += 1
        return self.resolution


class FailingResolver:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def resolve(self) -> Resolution:
        raise self.error


def test_resolve_initial_returns_the_answer() -> None:
    resolution = Resolution((A1,), ttl=3.0)
    resolver = FixedResolver(resolution)
    assert resolve_initial(resolver) is resolution
    assert resolver.calls == 1


def test_resolve_initial_turns_a_resolution_error_into_value_error() -> None:
    error = ResolutionError("cannot resolve 'svc.test:50051': NXDOMAIN")
    with pytest.raises(ValueError, match=re.escape(str(error))) as info:
        resolve_initial(FailingResolver(error))
    assert not isinstance(info.value, ResolutionError)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_resolve_initial_lets_other_errors_through() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        resolve_initial(FailingResolver(RuntimeError("boom")))


def test_resolve_again_returns_the_answer() -> None:
    resolution = Resolution((A2,), ttl=None)
    assert resolve_again(FixedResolver(resolution), DNS_TARGET) is resolution


def test_resolve_again_logs_a_resolution_error_and_returns_none(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="grpc_leastconn")
    error = ResolutionError("svc.test: NXDOMAIN")
    assert resolve_again(FailingResolver(error), DNS_TARGET) is None
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.name == "grpc_leastconn"
    assert DNS_TARGET in record.getMessage()
    assert "svc.test: NXDOMAIN" in record.getMessage()
    assert "keeping the last good backends" in record.getMessage()
    assert record.exc_info is None


def test_resolve_again_logs_an_unexpected_error_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="grpc_leastconn")
    assert resolve_again(FailingResolver(KeyError("surprise")), DNS_TARGET) is None
    [record] = caplog.records
    assert record.levelno >= logging.WARNING
    assert DNS_TARGET in record.getMessage()
    assert record.exc_info is not None
    assert record.exc_info[0] is KeyError
    assert "Traceback" in caplog.text
    assert "surprise" in caplog.text
