"""Pure tests of the failure penalty, through a real Balancer with a fake clock.

A failure counts as one more call in flight on its backend; each success
leaves SUCCESS_FACTOR of the count, it decays with time constant DECAY_S, is capped at CAP and is
forgotten below FORGET.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Collection
from typing import Any

import grpc
import pytest
from seams import (
    CALLER_CODES,
    CAP,
    DECAY_S,
    DEFAULT_FAILURE_CODES,
    FORGET,
    MAX_DECAY_S,
    REFRESH_S,
    STREAK_DOUBLING,
    SUCCESS_FACTOR,
    WARN_AT,
    Address,
    Backend,
    Balancer,
    check_failure_codes,
    make_settings,
)

TARGET = "dns:///svc.test:50051"
T0 = 500.0

Code = grpc.StatusCode
OK = Code.OK
UNAVAILABLE = Code.UNAVAILABLE
READY = grpc.ChannelConnectivity.READY


def decay_after(streak: int) -> float:
    """The decay time constant after ``streak`` failures in a row."""
    return min(MAX_DECAY_S, DECAY_S * 2 ** (streak / STREAK_DOUBLING))


def by_name(codes: Collection[grpc.StatusCode]) -> list[grpc.StatusCode]:
    return sorted(codes, key=lambda code: code.name)


# Codes that are neither the backend's failure (by default) nor the caller's doing.
APPLICATION_CODES = by_name(set(Code) - DEFAULT_FAILURE_CODES - CALLER_CODES)


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ready(
    n: int = 4, *, failure_codes: Collection[grpc.StatusCode] | None = None
) -> tuple[Balancer[object], list[Backend[object]], FakeClock]:
    clock = FakeClock()
    extra: dict[str, Any] = {} if failure_codes is None else {"failure_codes": failure_codes}
    balancer: Balancer[object] = Balancer(TARGET, clock=clock, health_checking=False, **extra)
    balancer.set_addresses([Address(f"10.0.0.{i + 1}", 50051) for i in range(n)])
    for backend in balancer.backends:
        balancer.set_connectivity(backend, READY)
        assert backend.eligible
    balancer.check_invariants()
    return balancer, balancer.backends, clock


def call(
    balancer: Balancer[object],
    backend: Backend[object],
    code: grpc.StatusCode | None,
    times: int = 1,
) -> None:
    """``times`` calls that go to ``backend`` (the others excluded) and end with ``code``."""
    others = [b for b in balancer.backends if b is not backend]
    for _ in range(times):
        assert balancer.pick_excluding(others) is backend
        balancer.release(backend, code)
    balancer.check_invariants()


def penalty(balancer: Balancer[object], backend: Backend[object]) -> float:
    [state] = [s for s in balancer.states() if s.address == backend.key]
    return state.penalty


def hold(balancer: Balancer[object], n: int) -> list[Backend[object]]:
    """``n`` picks, kept running."""
    picked = []
    for _ in range(n):
        backend = balancer.pick()
        assert backend is not None
        picked.append(backend)
    return picked


def logged(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "grpc_leastconn"]


# -- what a failure does ------------------------------------------------------------------


def test_a_failure_adds_one_to_the_penalty_and_to_the_load_the_picker_sees() -> None:
    balancer, [bad, *others], _ = ready()
    call(balancer, bad, UNAVAILABLE)
    assert penalty(balancer, bad) == 1.0
    assert bad.extra == 1
    assert all(penalty(balancer, b) == 0.0 and b.extra == 0 for b in others)
    # With every other backend at the same load, it comes last.
    assert set(hold(balancer, 3)) == set(others)
    balancer.check_invariants()


def test_penalties_accumulate() -> None:
    balancer, [bad, *others], _ = ready()
    call(balancer, bad, UNAVAILABLE, 3)
    assert penalty(balancer, bad) == 3.0
    assert bad.extra == 3
    # It is as busy as three calls in flight: the others take nine first.
    first = hold(balancer, 9)
    assert bad not in first
    assert Counter(first) == dict.fromkeys(others, 3)
    balancer.check_invariants()


@pytest.mark.parametrize("code", by_name(DEFAULT_FAILURE_CODES))
def test_every_default_failure_code_counts(code: grpc.StatusCode) -> None:
    balancer, [bad, *_], _ = ready()
    call(balancer, bad, code)
    assert penalty(balancer, bad) == 1.0


def test_the_penalty_is_capped() -> None:
    balancer, [bad, *_], _ = ready()
    call(balancer, bad, UNAVAILABLE, int(CAP) + 50)
    assert bad.penalty == CAP
    assert penalty(balancer, bad) == CAP
    assert bad.extra == int(CAP)


def test_a_success_shrinks_the_penalty_by_success_factor() -> None:
    assert 0 < SUCCESS_FACTOR < 1
    balancer, [bad, *_], _ = ready()
    call(balancer, bad, UNAVAILABLE, 3)
    call(balancer, bad, OK)
    assert bad.penalty == pytest.approx(3 * SUCCESS_FACTOR)
    assert bad.extra == int(3 * SUCCESS_FACTOR)
    call(balancer, bad, OK)
    assert bad.penalty == pytest.approx(3 * SUCCESS_FACTOR**2)
    assert penalty(balancer, bad) == pytest.approx(3 * SUCCESS_FACTOR**2, abs=1e-3)
    assert bad.extra == int(3 * SUCCESS_FACTOR**2)
    # Successes alone bring a penalty of 3 under one call's worth, then to 0.
    for _ in range(20):
        call(balancer, bad, OK)
    assert bad.extra == 0
    assert bad.penalty == 0.0


def test_the_penalty_decays_with_time_constant_decay_s() -> None:
    balancer, [bad, *_], clock = ready()
    call(balancer, bad, UNAVAILABLE, 3)
    # Three failures in a row: it fades a little slower than DECAY_S.
    decay = DECAY_S * 2 ** (3 / STREAK_DOUBLING)
    for t in (0.25, 0.5, 1.0, 2.0):
        clock.now = T0 + t
        assert penalty(balancer, bad) == pytest.approx(3 * math.exp(-t / decay), abs=1e-3)
    # A success shrinks what is left at that moment, and ends the streak.
    call(balancer, bad, OK)
    left = 3 * math.exp(-2 / decay) * SUCCESS_FACTOR
    assert penalty(balancer, bad) == pytest.approx(left, abs=1e-3)
    # A failure adds 1 to what is left.
    clock.now += 0.5
    call(balancer, bad, UNAVAILABLE)
    assert penalty(balancer, bad) == pytest.approx(left * math.exp(-0.5 / DECAY_S) + 1, abs=1e-3)


def test_below_forget_successes_make_it_exactly_zero() -> None:
    balancer, [bad, *_], _ = ready()
    call(balancer, bad, UNAVAILABLE)
    expected = 1.0
    while expected * SUCCESS_FACTOR >= FORGET:
        expected *= SUCCESS_FACTOR
        call(balancer, bad, OK)
        assert bad.penalty == pytest.approx(expected)
        assert bad.penalty >= FORGET
    call(balancer, bad, OK)  # below FORGET
    assert bad.penalty == 0.0
    assert penalty(balancer, bad) == 0.0
    # Forgotten, not residual: the next failure starts from nothing.
    call(balancer, bad, UNAVAILABLE)
    assert bad.penalty == 1.0


def test_below_forget_decay_makes_it_exactly_zero() -> None:
    balancer, [bad, *others], clock = ready()
    call(balancer, bad, UNAVAILABLE)
    decay = decay_after(1)
    forgotten_after = decay * math.log(1.0 / FORGET)
    clock.now = T0 + forgotten_after - 0.2
    balancer.refresh(clock.now)
    assert bad.penalty == pytest.approx(FORGET * math.exp(0.2 / decay))
    assert bad.penalty_at == clock.now
    clock.now = T0 + forgotten_after + 0.01  # at least REFRESH_S later
    balancer.refresh(clock.now)
    assert bad.penalty == 0.0
    assert penalty(balancer, bad) == 0.0
    assert bad.extra == 0
    balancer.check_invariants()
    # No longer penalized: it takes its turn as the others do.
    assert set(hold(balancer, 4)) == {bad, *others}
    for backend in balancer.backends:
        balancer.release(backend, OK)
    call(balancer, bad, UNAVAILABLE)
    assert bad.penalty == 1.0


# -- which codes count ------------------------------------------------------------------


@pytest.mark.parametrize("code", APPLICATION_CODES, ids=lambda code: code.name)
def test_application_answers_count_as_successes(code: grpc.StatusCode) -> None:
    balancer, [bad, *_], _ = ready()
    call(balancer, bad, UNAVAILABLE, 2)
    call(balancer, bad, code)
    assert bad.penalty == pytest.approx(2 * SUCCESS_FACTOR)
    call(balancer, bad, code)
    assert bad.penalty == pytest.approx(2 * SUCCESS_FACTOR**2)
    assert bad.extra == int(2 * SUCCESS_FACTOR**2)


@pytest.mark.parametrize("code", [Code.CANCELLED, Code.DEADLINE_EXCEEDED, None], ids=str)
def test_caller_codes_and_no_code_change_nothing(code: grpc.StatusCode | None) -> None:
    balancer, [bad, other, *_], _ = ready()
    call(balancer, bad, UNAVAILABLE, 2)
    call(balancer, bad, code, 3)
    assert penalty(balancer, bad) == 2.0
    assert bad.extra == 2
    # Nor do they start a penalty.
    call(balancer, other, code, 3)
    assert penalty(balancer, other) == 0.0


def test_empty_failure_codes_disable_the_penalty() -> None:
    balancer, backends, _ = ready(failure_codes=frozenset())
    bad = backends[0]
    call(balancer, bad, UNAVAILABLE, 10)
    call(balancer, bad, Code.INTERNAL, 10)
    assert bad.penalty == 0.0
    assert penalty(balancer, bad) == 0.0
    assert bad.extra == 0
    assert set(hold(balancer, 4)) == set(backends)


def test_a_custom_failure_set_counts_only_its_codes() -> None:
    balancer, [bad, other, *_], _ = ready(failure_codes={Code.NOT_FOUND})
    call(balancer, bad, Code.NOT_FOUND, 2)
    assert penalty(balancer, bad) == 2.0
    # UNAVAILABLE is not in the set: like any answer outside it, a success.
    call(balancer, bad, UNAVAILABLE)
    assert bad.penalty == pytest.approx(2 * SUCCESS_FACTOR)
    call(balancer, bad, Code.INTERNAL)
    assert bad.penalty == pytest.approx(2 * SUCCESS_FACTOR**2)
    # And a code of the default set, alone, starts no penalty.
    call(balancer, other, UNAVAILABLE, 5)
    assert other.penalty == 0.0


# -- keeping penalties up to date -------------------------------------------------------


def test_release_refreshes_lazily_once_refresh_s_passed() -> None:
    balancer, [bad, other, *_], clock = ready()
    call(balancer, bad, UNAVAILABLE, 2)
    assert (bad.penalty, bad.penalty_at, bad.extra) == (2.0, T0, 2)
    clock.now = T0 + REFRESH_S / 2
    call(balancer, other, OK)
    assert (bad.penalty, bad.penalty_at) == (2.0, T0)  # not yet
    clock.now = T0 + 0.8
    call(balancer, other, OK)  # due: every penalty is brought up to date
    assert bad.penalty_at == T0 + 0.8
    assert bad.penalty == pytest.approx(2 * math.exp(-0.8 / decay_after(2)))
    assert bad.extra == 0  # 0.997: the picker no longer sees it
    # The next refresh is REFRESH_S later.
    clock.now = T0 + 0.8 + REFRESH_S / 2
    call(balancer, other, OK)
    assert bad.penalty_at == T0 + 0.8
    clock.now = T0 + 0.8 + REFRESH_S
    call(balancer, other, OK)
    assert bad.penalty_at == T0 + 0.8 + REFRESH_S


def test_a_pick_refreshes_a_due_penalty_first() -> None:
    balancer, [bad, *others], clock = ready()
    call(balancer, bad, UNAVAILABLE, 2)
    running = hold(balancer, 3)  # one call on each of the others: load 1 < 2
    assert set(running) == set(others)
    clock.now = T0 + 5  # the penalty is long gone, but nobody refreshed
    assert bad.extra == 2
    # A pick brings the penalty up to date first (under long streams no call
    # ends to do it), so the backend is back at its true load of 0.
    assert balancer.pick() is bad
    assert bad.extra == 0
    assert bad.penalty == 0.0
    assert bad.extra == 0
    balancer.check_invariants()


def test_a_penalized_only_backend_is_still_picked() -> None:
    balancer, [only], clock = ready(1)
    call(balancer, only, UNAVAILABLE, 5)
    assert balancer.pick() is only  # a penalty is load, not ineligibility
    balancer.release(only, None)
    clock.now = T0 + 10
    assert balancer.pick_fresh() is only
    assert only.penalty == 0.0
    balancer.release(only, OK)
    balancer.check_invariants()


# -- fairness -----------------------------------------------------------------------------


def test_backends_failing_alike_keep_equal_penalties_and_share_the_calls() -> None:
    balancer, backends, _ = ready()
    picks: Counter[Backend[object]] = Counter()
    for round_ in range(200):
        for _ in range(4):
            backend = balancer.pick()
            assert backend is not None
            picks[backend] += 1
            balancer.release(backend, UNAVAILABLE)
        penalties = {penalty(balancer, b) for b in backends}
        assert penalties == {min(CAP, round_ + 1.0)}, round_
    assert picks == dict.fromkeys(backends, 200)
    balancer.check_invariants()


def test_backends_failing_alike_share_the_calls_as_time_passes() -> None:
    balancer, backends, clock = ready()
    picks: Counter[Backend[object]] = Counter()
    for _ in range(2000):
        backend = balancer.pick()
        assert backend is not None
        picks[backend] += 1
        balancer.release(backend, UNAVAILABLE)
        clock.now += 0.01
        values = [penalty(balancer, b) for b in backends]
        assert max(values) - min(values) < 2.5  # the picker sees floor(penalty), refreshed
    balancer.check_invariants()
    assert all(picks[b] >= 0.2 * 2000 for b in backends), picks


def test_a_background_error_rate_like_the_peers_keeps_a_small_penalty() -> None:
    balancer, backends, clock = ready()
    picks: Counter[Backend[object]] = Counter()
    small = observed = 0
    # Round by round, one call per backend each (100 calls a second); every
    # backend fails every 10th of its calls.
    for _ in range(500):
        for _ in range(4):
            backend = balancer.pick()
            assert backend is not None
            picks[backend] += 1
            balancer.release(backend, UNAVAILABLE if picks[backend] % 10 == 0 else OK)
            clock.now += 0.01
        for backend in backends:
            observed += 1
            small += penalty(balancer, backend) < 1
            assert penalty(balancer, backend) < 2
    balancer.check_invariants()
    assert small >= 0.9 * observed, (small, observed)
    assert all(0.23 * 2000 <= picks[b] <= 0.27 * 2000 for b in backends), picks


# -- logs ---------------------------------------------------------------------------------


def test_warning_once_at_warn_at_and_info_when_forgotten(caplog: pytest.LogCaptureFixture) -> None:
    balancer, [bad, other, *_], clock = ready()
    caplog.set_level(logging.DEBUG, logger="grpc_leastconn")
    caplog.clear()
    call(balancer, bad, UNAVAILABLE, int(WARN_AT) - 1)
    assert logged(caplog) == []
    call(balancer, bad, Code.INTERNAL)
    warning = (
        logging.WARNING,
        f"backend {bad.key} of {TARGET!r} is failing calls (last: INTERNAL): it takes fewer "
        "new calls until it answers again",
    )
    assert logged(caplog) == [warning]
    call(balancer, bad, UNAVAILABLE, 10)
    assert logged(caplog) == [warning]  # not repeated
    clock.now = T0 + 3  # 13 in a row fade slowly: about 3.8 left
    call(balancer, other, OK)
    assert bad.penalty == pytest.approx(13 * math.exp(-3 / decay_after(13)))
    assert logged(caplog) == [warning]
    clock.now = T0 + 15
    call(balancer, other, OK)
    assert bad.penalty == 0.0
    assert logged(caplog) == [
        warning,
        (logging.INFO, f"backend {bad.key} of {TARGET!r} answers again"),
    ]
    # Warned anew when it fails again.
    call(balancer, bad, UNAVAILABLE, int(WARN_AT))
    assert [level for level, _ in logged(caplog)] == [
        logging.WARNING,
        logging.INFO,
        logging.WARNING,
    ]


def test_nothing_is_logged_for_a_single_failure(caplog: pytest.LogCaptureFixture) -> None:
    balancer, [bad, other, *_], clock = ready()
    caplog.set_level(logging.DEBUG, logger="grpc_leastconn")
    caplog.clear()
    call(balancer, bad, UNAVAILABLE)
    assert bad.penalty == 1.0
    clock.now = T0 + 10
    call(balancer, other, OK)
    assert bad.penalty == 0.0
    assert logged(caplog) == []


# -- removal ------------------------------------------------------------------------------


def test_removing_the_address_forgets_its_penalty(caplog: pytest.LogCaptureFixture) -> None:
    balancer, [bad, *others], clock = ready()
    call(balancer, bad, UNAVAILABLE, int(WARN_AT))
    assert balancer.pick_excluding(others) is bad  # running: it drains
    caplog.set_level(logging.INFO, logger="grpc_leastconn")
    caplog.clear()
    balancer.set_addresses([b.address for b in others])
    assert bad.penalty == 0.0
    [state] = [s for s in balancer.states() if s.address == bad.key]
    assert state.draining
    assert state.penalty == 0.0
    balancer.release(bad, UNAVAILABLE)  # a removed backend is not judged
    assert bad.penalty == 0.0
    clock.now = T0 + 10
    balancer.refresh(clock.now)
    assert not any("answers again" in message for _, message in logged(caplog))
    balancer.check_invariants()
    # Back in the address set: a new backend, with no penalty.
    [fresh] = balancer.set_addresses([bad.address, *(b.address for b in others)]).added
    balancer.set_connectivity(fresh, READY)
    assert fresh is not bad
    assert fresh.penalty == 0.0
    assert fresh.extra == 0
    balancer.check_invariants()


# -- validation ---------------------------------------------------------------------------


def test_check_failure_codes_accepts_status_code_collections() -> None:
    assert check_failure_codes([UNAVAILABLE, Code.NOT_FOUND]) == {UNAVAILABLE, Code.NOT_FOUND}
    assert check_failure_codes(()) == frozenset()
    assert check_failure_codes(DEFAULT_FAILURE_CODES) == DEFAULT_FAILURE_CODES
    assert isinstance(check_failure_codes({UNAVAILABLE}), frozenset)


TYPE_ERRORS: list[tuple[object, str]] = [
    ("UNAVAILABLE", "failure_codes must be a collection of grpc.StatusCode, not str"),
    (b"UNAVAILABLE", "failure_codes must be a collection of grpc.StatusCode, not bytes"),
    (UNAVAILABLE, "failure_codes must be a collection of grpc.StatusCode, not StatusCode"),
    (14, "failure_codes must be a collection of grpc.StatusCode, not int"),
    (["UNAVAILABLE"], "failure_codes: 'UNAVAILABLE' is not a grpc.StatusCode"),
    ([UNAVAILABLE, 14], "failure_codes: 14 is not a grpc.StatusCode"),
]
VALUE_ERRORS = [OK, Code.CANCELLED, Code.DEADLINE_EXCEEDED]


@pytest.mark.parametrize(("codes", "message"), TYPE_ERRORS)
def test_check_failure_codes_type_errors(codes: object, message: str) -> None:
    with pytest.raises(TypeError) as raised:
        check_failure_codes(codes)
    assert str(raised.value) == message


@pytest.mark.parametrize("code", VALUE_ERRORS, ids=lambda code: code.name)
def test_check_failure_codes_refuses_the_callers_codes(code: grpc.StatusCode) -> None:
    with pytest.raises(ValueError, match=f"failure_codes: {code.name} is never the backend's"):
        check_failure_codes([UNAVAILABLE, code])


def settings_with(**tuning: object) -> Any:
    return make_settings("insecure_channel", "10.0.0.1:50051", None, None, None, tuning)  # type: ignore[arg-type]


@pytest.mark.parametrize(("codes", "message"), TYPE_ERRORS)
def test_factories_raise_the_same_type_errors(codes: object, message: str) -> None:
    with pytest.raises(TypeError) as raised:
        settings_with(failure_codes=codes)
    assert str(raised.value) == message


@pytest.mark.parametrize("code", VALUE_ERRORS, ids=lambda code: code.name)
def test_factories_raise_the_same_value_errors(code: grpc.StatusCode) -> None:
    with pytest.raises(ValueError, match=f"failure_codes: {code.name} is never the backend's"):
        settings_with(failure_codes={code})


def test_factories_default_and_custom_failure_codes() -> None:
    assert settings_with().failure_codes == DEFAULT_FAILURE_CODES
    assert settings_with(failure_codes=[Code.NOT_FOUND]).failure_codes == {Code.NOT_FOUND}
    assert settings_with(failure_codes=()).failure_codes == frozenset()


def test_failure_penalty_false_turns_the_penalty_off() -> None:
    clock = FakeClock()
    balancer: Balancer[object] = Balancer(
        TARGET, clock=clock, health_checking=False, failure_penalty=False
    )
    balancer.set_addresses([Address(f"10.0.0.{i + 1}", 50051) for i in range(4)])
    for backend in balancer.backends:
        balancer.set_connectivity(backend, READY)
    bad = balancer.backends[0]
    call(balancer, bad, UNAVAILABLE, 10)
    assert (bad.penalty, bad.extra) == (0.0, 0)
    assert bad.calls_failed == 10  # still counted, for outlier detection
    assert set(hold(balancer, 4)) == set(balancer.backends)


@pytest.mark.parametrize("value", [1, "yes", None])
def test_factories_want_a_bool_for_failure_penalty(value: object) -> None:
    with pytest.raises(TypeError, match="failure_penalty must be True or False"):
        settings_with(failure_penalty=value)
    assert settings_with().failure_penalty is True
    assert settings_with(failure_penalty=False).failure_penalty is False


def test_a_long_run_of_failures_fades_more_slowly_up_to_max_decay_s() -> None:
    balancer, [bad, *_], clock = ready()
    call(balancer, bad, UNAVAILABLE, 60)
    start = penalty(balancer, bad)
    clock.now += 1.0
    # 60 in a row: the slowest decay, MAX_DECAY_S.
    assert penalty(balancer, bad) == pytest.approx(start * math.exp(-1 / MAX_DECAY_S), abs=1e-3)
    assert MAX_DECAY_S > DECAY_S
    call(balancer, bad, OK)
    left = penalty(balancer, bad)
    clock.now += 1.0
    # One success: back to the quick decay.
    assert penalty(balancer, bad) == pytest.approx(left * math.exp(-1 / DECAY_S), abs=1e-3)
