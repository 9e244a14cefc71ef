"""Pure tests of slow start, static weights and call costs: config, settings, balancer."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import grpc
import pytest
from seams import (
    MIN_CALL_COST,
    UNIT,
    Address,
    Backend,
    Balancer,
    Seams,
    Settings,
    Weights,
    check_call_costs,
    check_slow_start,
    check_weights,
    make_balancer,
    make_settings,
    parse_target,
)

from grpc_leastconn import SlowStart

TARGET = "ipv4:10.0.0.1:50051,10.0.0.2:50051,10.0.0.3:50051"
A1 = Address("10.0.0.1", 50051)
A2 = Address("10.0.0.2", 50051)
A3 = Address("10.0.0.3", 50051)
A4 = Address("10.0.0.4", 50051)
T0 = 500.0
WINDOW = 10.0
# A ramping weight may be rounded up to a step of this share of the static
# weight (so that ramping backends share a few weights); the moments at
# which the formula gives a whole number of steps are checked exactly.
STEP = 0.05

READY = grpc.ChannelConnectivity.READY
TRANSIENT_FAILURE = grpc.ChannelConnectivity.TRANSIENT_FAILURE


def envoy_factor(
    seconds: float, window: float, aggression: float = 1.0, min_weight_percent: float = 10.0
) -> float:
    """Envoy's slow-start factor, written out anew (its code counts in milliseconds)."""
    if seconds >= window:
        return 1.0
    ramp = float((max(seconds, 0.001) / window) ** (1 / aggression))
    return min(1.0, max(min_weight_percent / 100, ramp))


# -- SlowStart ------------------------------------------------------------------


@pytest.mark.parametrize("aggression", [1.0, 2.0])
@pytest.mark.parametrize("min_weight_percent", [10.0, 1.0, 50.0])
@pytest.mark.parametrize("seconds", [0.0, 0.5, 1.0, 2.0, 5.0, 9.99, 10.0, 10.01, 60.0])
def test_factor_is_envoys(aggression: float, min_weight_percent: float, seconds: float) -> None:
    config = SlowStart(window=WINDOW, aggression=aggression, min_weight_percent=min_weight_percent)
    assert config.factor(seconds) == pytest.approx(
        envoy_factor(seconds, WINDOW, aggression, min_weight_percent), rel=1e-12
    )


def test_factor_at_the_landmarks() -> None:
    linear = SlowStart(window=WINDOW)
    assert linear.factor(0) == 0.1  # the 10 % floor
    assert linear.factor(1) == 0.1
    assert linear.factor(5) == 0.5
    assert linear.factor(9.999) == pytest.approx(0.9999)
    assert linear.factor(WINDOW) == 1.0
    assert linear.factor(1e9) == 1.0
    faster = SlowStart(window=WINDOW, aggression=2.0, min_weight_percent=1.0)
    assert faster.factor(0) == pytest.approx(math.sqrt(0.001 / WINDOW))  # max(t, 1 ms)
    assert faster.factor(2.5) == pytest.approx(0.5)
    assert faster.factor(5) == pytest.approx(math.sqrt(0.5))
    assert faster.factor(5) > linear.factor(5)
    assert SlowStart(window=WINDOW, min_weight_percent=30).factor(2) == pytest.approx(0.3)
    assert SlowStart(window=WINDOW, min_weight_percent=100).factor(0) == 1.0


def test_factor_rises_with_time_up_to_one() -> None:
    for config in (SlowStart(window=WINDOW), SlowStart(window=30, aggression=3.0)):
        factors = [config.factor(t / 10) for t in range(0, 400)]
        assert factors == sorted(factors)
        assert all(0 < f <= 1.0 for f in factors)
        assert factors[-1] == 1.0


def test_a_window_under_a_second_never_gives_more_than_the_full_weight() -> None:
    assert SlowStart(window=0.5).factor(0.1) <= 1.0


@pytest.mark.parametrize("field", ["window", "aggression", "min_weight_percent"])
@pytest.mark.parametrize("value", ["1", True, None, [1]], ids=repr)
def test_slow_start_fields_must_be_numbers(field: str, value: object) -> None:
    arguments: dict[str, Any] = {"window": 10.0, field: value}
    with pytest.raises(TypeError, match=rf"^SlowStart\.{field} must be a number"):
        SlowStart(**arguments)


@pytest.mark.parametrize("field", ["window", "aggression", "min_weight_percent"])
@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5, math.nan, math.inf, -math.inf], ids=repr)
def test_slow_start_fields_must_be_positive_and_finite(field: str, value: float) -> None:
    arguments: dict[str, Any] = {"window": 10.0, field: value}
    with pytest.raises(ValueError, match=rf"^SlowStart\.{field} must be finite and > 0"):
        SlowStart(**arguments)


def test_min_weight_percent_is_at_most_a_hundred() -> None:
    with pytest.raises(ValueError, match=r"^SlowStart\.min_weight_percent must be at most 100"):
        SlowStart(window=1.0, min_weight_percent=100.5)
    assert SlowStart(window=1.0, min_weight_percent=100).min_weight_percent == 100
    # ints are numbers too
    assert SlowStart(window=3, aggression=2, min_weight_percent=5).factor(3) == 1.0


def test_check_slow_start_takes_none_a_window_or_a_slow_start() -> None:
    assert check_slow_start(None) is None
    assert check_slow_start(5) == SlowStart(window=5.0)
    assert isinstance(check_slow_start(5).window, float)  # type: ignore[union-attr]
    assert check_slow_start(2.5) == SlowStart(window=2.5)
    config = SlowStart(window=7, aggression=1.5, min_weight_percent=20)
    assert check_slow_start(config) is config


@pytest.mark.parametrize("value", ["10", True, False, [10], {"window": 10}, b"1"], ids=repr)
def test_check_slow_start_refuses_other_types(value: object) -> None:
    with pytest.raises(TypeError, match=r"^slow_start must be a window in seconds"):
        check_slow_start(value)


@pytest.mark.parametrize("value", [0, -1, math.nan, math.inf])
def test_check_slow_start_refuses_a_bad_window(value: float) -> None:
    with pytest.raises(ValueError, match=r"^SlowStart\.window"):
        check_slow_start(value)


# -- slow start through a balancer ---------------------------------------------


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


STATIC = {A1: 1.0, A2: 2.0, A3: 4.0, A4: 3.0}


def ramping(
    weight_of: Callable[[Address], float] = STATIC.__getitem__,
    addresses: tuple[Address, ...] = (A1, A2, A3),
) -> tuple[Balancer[object], FakeClock]:
    """A balancer whose backends all became READY at T0, the channel's start."""
    clock = FakeClock()
    balancer: Balancer[object] = Balancer(
        TARGET,
        health_checking=False,
        clock=clock,
        weighted=True,
        weight_of=weight_of,
        slow_start=SlowStart(window=WINDOW),
    )
    for backend in balancer.set_addresses(addresses).added:
        assert balancer.set_connectivity(backend, READY)
    return balancer, clock


def weights(balancer: Balancer[object]) -> dict[str, float]:
    return {state.address: state.weight for state in balancer.states()}


def static(*addresses: Address) -> dict[str, float]:
    return {str(address): STATIC[address] for address in addresses}


def at(balancer: Balancer[object], clock: FakeClock, now: float) -> dict[str, float]:
    """The weights once the balancer has caught up with ``now``."""
    clock.now = now
    balancer.refresh(now)
    balancer.check_invariants()
    return weights(balancer)


def assert_ramped(weight: float, full: float, seconds: float) -> None:
    """``weight`` is ``full`` times the factor ``seconds`` after joining, give or take a step.

    Exactly so where the factor is a whole number of steps; elsewhere it may
    be rounded up, by less than one step.
    """
    factor = envoy_factor(seconds, WINDOW)
    exact = round(factor / STEP, 9).is_integer()
    if exact:
        assert weight == pytest.approx(full * factor, rel=1e-9), (seconds, weight)
    else:
        assert full * factor * (1 - 1e-9) <= weight <= full * min(1.0, factor + STEP) * (1 + 1e-9)


def restart(balancer: Balancer[object], address: Address) -> Backend[object]:
    """The backend's connection fails and is READY again at once."""
    backend = next(b for b in balancer.backends if b.address == address)
    assert balancer.set_connectivity(backend, TRANSIENT_FAILURE)
    assert weights(balancer)[str(address)] == STATIC[address]  # not ramping while away
    assert balancer.set_connectivity(backend, READY)
    return backend


def test_backends_ready_at_the_start_do_not_ramp() -> None:
    balancer, clock = ramping()
    assert weights(balancer) == static(A1, A2, A3)
    for seconds in (0.05, 0.5, 1, 5, 9.95, 10, 10.5, 30):
        assert at(balancer, clock, T0 + seconds) == static(A1, A2, A3)
    # Their static weights decide: 1:2:4.
    for _ in range(70):
        assert balancer.pick(UNIT) is not None
    assert [b.in_flight for b in balancer.backends] == [10, 20, 40]


def test_a_backend_back_from_a_failure_ramps_up_over_the_window() -> None:
    balancer, clock = ramping()
    at(balancer, clock, T0 + WINDOW + 1)
    back_at = clock.now
    restart(balancer, A3)
    # Right after: the 10 % floor of its static weight; the others unchanged.
    assert weights(balancer) == {**static(A1, A2), str(A3): pytest.approx(0.4)}
    previous = 0.0
    for seconds in (0.5, 1, 2, 3.3, 5, 6.25, 7.5, 9.5, 9.9):
        now = at(balancer, clock, back_at + seconds)
        assert {k: v for k, v in now.items() if k != str(A3)} == static(A1, A2)
        assert_ramped(now[str(A3)], 4.0, seconds)
        assert now[str(A3)] >= previous
        previous = now[str(A3)]
        if seconds <= 9.5:
            assert previous < 4.0
    assert at(balancer, clock, back_at + WINDOW) == static(A1, A2, A3)
    assert at(balancer, clock, back_at + 3 * WINDOW) == static(A1, A2, A3)


def test_releases_bring_the_ramp_up_to_date_without_refresh() -> None:
    balancer, clock = ramping()
    at(balancer, clock, T0 + WINDOW + 1)
    back_at = clock.now
    backend = restart(balancer, A1)
    assert backend.weight == pytest.approx(0.1)
    clock.now = back_at + 5
    picked = balancer.pick(UNIT)
    assert picked is not None
    balancer.release(picked, None, UNIT)
    assert backend.weight == pytest.approx(0.5)
    clock.now = back_at + WINDOW + 0.5
    picked = balancer.pick(UNIT)
    assert picked is not None
    balancer.release(picked, None, UNIT)
    assert backend.weight == 1.0
    balancer.check_invariants()


def test_picks_alone_bring_the_ramp_up_to_date() -> None:
    # Long streams: nothing ends for the whole window, yet the ramp must move,
    # or the newcomer stays at its floor and never takes its share.
    balancer, clock = ramping()
    at(balancer, clock, T0 + WINDOW + 1)
    back_at = clock.now
    backend = restart(balancer, A1)
    assert backend.weight == pytest.approx(0.1)
    seen = []
    for seconds in (1, 2.5, 5, 7.5, WINDOW + 0.1):
        clock.now = back_at + seconds
        assert balancer.pick(UNIT) is not None
        seen.append(backend.weight)
        assert_ramped(backend.weight, 1.0, seconds)
    assert seen == sorted(seen) and seen[-1] == 1.0, seen
    assert backend.released == 0
    balancer.check_invariants()


def test_states_show_the_ramp_now_without_any_call() -> None:
    balancer, clock = ramping()
    at(balancer, clock, T0 + WINDOW + 1)
    back_at = clock.now
    restart(balancer, A1)
    clock.now = back_at + 5
    # Neither a pick nor a release since the rejoin: the view itself catches up.
    assert weights(balancer)[str(A1)] == pytest.approx(0.5)
    clock.now = back_at + WINDOW
    assert weights(balancer)[str(A1)] == 1.0


def share_of_picks(
    balancer: Balancer[object], in_flight: int = 30, cycles: int = 600
) -> Counter[str]:
    """Picks per backend over pick/release cycles with ``in_flight`` calls running."""
    held: list[Backend[object]] = []
    counts: Counter[str] = Counter()
    for step in range(in_flight + cycles):
        if step >= in_flight:
            balancer.release(held.pop(0), grpc.StatusCode.OK, UNIT)
        backend = balancer.pick(UNIT)
        assert backend is not None
        held.append(backend)
        if step >= in_flight:
            counts[backend.key] += 1
    for backend in held:
        balancer.release(backend, grpc.StatusCode.OK, UNIT)
    balancer.check_invariants()
    return counts


def test_a_ramping_backend_takes_fewer_calls_than_its_peers() -> None:
    even = {A1: 2.0, A2: 2.0, A3: 2.0}
    balancer, clock = ramping(even.__getitem__)
    at(balancer, clock, T0 + WINDOW + 1)
    back_at = clock.now
    restart(balancer, A2)
    ramp, peers = str(A2), (str(A1), str(A3))
    shares = []
    for seconds in (0, 2, 5, 8):
        at(balancer, clock, back_at + seconds)
        counts = share_of_picks(balancer)
        assert all(counts[ramp] < counts[peer] for peer in peers), (seconds, counts)
        shares.append(counts[ramp])
        if seconds == 0:
            # At a tenth of its weight, about a tenth of a peer's share.
            assert counts[ramp] <= 0.15 * min(counts[peer] for peer in peers), counts
    assert shares == sorted(shares) and shares[0] < shares[-1] / 3, shares
    # Once the window is over, it takes its full share again.
    at(balancer, clock, back_at + WINDOW)
    counts = share_of_picks(balancer)
    assert all(abs(counts[ramp] - counts[peer]) <= 0.1 * counts[peer] for peer in peers), counts


def test_a_new_address_joining_an_established_channel_ramps() -> None:
    balancer, clock = ramping()
    at(balancer, clock, T0 + WINDOW + 1)
    joined_at = clock.now
    [added] = balancer.set_addresses([A1, A2, A3, A4]).added
    assert added.address == A4 and added.static_weight == 3.0
    assert weights(balancer)[str(A4)] == 3.0  # not eligible yet: not ramping
    assert balancer.set_connectivity(added, READY)
    assert weights(balancer) == {**static(A1, A2, A3), str(A4): pytest.approx(0.3)}
    for seconds in (1, 4, 7.5):
        assert_ramped(at(balancer, clock, joined_at + seconds)[str(A4)], 3.0, seconds)
    assert at(balancer, clock, joined_at + WINDOW) == static(A1, A2, A3, A4)


def test_a_ramp_cut_short_by_a_failure_starts_again() -> None:
    balancer, clock = ramping()
    at(balancer, clock, T0 + WINDOW + 1)
    restart(balancer, A2)
    at(balancer, clock, clock.now + 6)
    assert weights(balancer)[str(A2)] == pytest.approx(1.2)
    again_at = clock.now
    restart(balancer, A2)  # back at its static weight while away (checked there)
    assert weights(balancer)[str(A2)] == pytest.approx(0.2)
    assert at(balancer, clock, again_at + 5)[str(A2)] == pytest.approx(1.0)
    assert at(balancer, clock, again_at + WINDOW)[str(A2)] == 2.0


def test_when_every_backend_comes_back_at_once_none_ramps() -> None:
    balancer, clock = ramping()
    at(balancer, clock, T0 + WINDOW + 1)
    for backend in balancer.backends:
        balancer.set_connectivity(backend, TRANSIENT_FAILURE)
    for backend in balancer.backends:
        balancer.set_connectivity(backend, READY)
    assert weights(balancer) == static(A1, A2, A3)
    assert at(balancer, clock, clock.now + 3) == static(A1, A2, A3)


def test_a_backend_keeps_its_weight_while_it_stays_ready() -> None:
    balancer, clock = ramping(addresses=(A1,))
    [late] = balancer.set_addresses([A1, A2]).added
    clock.now = T0 + 5  # A2 connects 5 s after A1
    assert balancer.set_connectivity(late, READY)
    seen = [weights(balancer)[str(A2)]]
    for seconds in (6, 9.9, 10.05, 10.2, 12, 16):
        seen.append(at(balancer, clock, T0 + seconds)[str(A2)])
    assert seen == sorted(seen), seen  # [2.0, 2.0, 2.0, 2.0, 1.04, 1.4, 2.0]


def test_settings_weights_are_the_static_weights_the_ramp_multiplies() -> None:
    clock = FakeClock()
    settings = settings_with(
        weights={"10.0.0.2:50051": 3, "10.0.0.3:50051": 0.5},
        slow_start=10,
        health_check_service=None,
    )
    assert settings.weighted
    balancer: Balancer[object] = make_balancer(settings, Seams(clock=clock))
    for backend in balancer.set_addresses([A1, A2, A3]).added:
        balancer.set_connectivity(backend, READY)
        assert backend.eligible
    expected = {str(A1): 1.0, str(A2): 3.0, str(A3): 0.5}
    assert weights(balancer) == expected
    assert at(balancer, clock, T0 + WINDOW + 1) == expected
    back_at = clock.now
    restart_with = next(b for b in balancer.backends if b.address == A2)
    balancer.set_connectivity(restart_with, TRANSIENT_FAILURE)
    balancer.set_connectivity(restart_with, READY)
    assert weights(balancer)[str(A2)] == pytest.approx(0.3)
    assert at(balancer, clock, back_at + 5)[str(A2)] == pytest.approx(1.5)
    assert at(balancer, clock, back_at + WINDOW) == expected


# -- weights and call costs: validation ------------------------------------------


def settings_with(target: str = TARGET, **tuning: Any) -> Settings:
    # Any: the tests pass what the TypedDict would refuse.
    arguments: Any = tuning
    return make_settings("insecure_channel", target, None, None, None, arguments)


def test_a_weight_key_must_name_a_backend_of_the_target() -> None:
    with pytest.raises(ValueError, match=r"weights key '10\.0\.0\.9:50051' is not a backend"):
        settings_with(weights={"10.0.0.9:50051": 2})
    with pytest.raises(ValueError, match=r"weights key '10\.0\.0\.1:1'"):
        settings_with(weights={"10.0.0.1:1": 2})  # right host, wrong port
    with pytest.raises(ValueError, match="weights key 'nonsense:x'"):
        settings_with(weights={"nonsense:x": 2})


def test_weight_keys_must_be_str_and_weights_a_mapping() -> None:
    with pytest.raises(TypeError, match="weights: key 1 must be a 'host:port' str"):
        settings_with(weights={1: 2.0})
    with pytest.raises(TypeError, match=r"^weights must be a mapping"):
        settings_with(weights=[("10.0.0.1:50051", 2.0)])


@pytest.mark.parametrize(
    ("weight", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        ("2", TypeError),
        (True, TypeError),
        (None, TypeError),
    ],
    ids=repr,
)
def test_a_weight_must_be_a_positive_finite_number(weight: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"^weights\['10\.0\.0\.2:50051'\] must be"):
        settings_with(weights={"10.0.0.1:50051": 2, "10.0.0.2:50051": weight})


def test_a_host_name_weighs_every_address_it_resolves_to() -> None:
    named = check_weights({"svc.test:50051": 3}, parse_target("dns:///svc.test:50051"))
    assert named.uneven is False  # one name, one weight: nothing to balance by
    for ip in ("10.0.0.1", "10.0.0.2", "2001:db8::1"):
        assert named.of(Address(ip, 50051, authority="svc.test:50051")) == 3.0
    # Names compare as the target writes them: case and default port.
    upper = check_weights({"SVC.Test": 2.5}, parse_target("svc.test"))
    assert upper.of(Address("10.0.0.1", 443, authority="svc.test")) == 2.5
    mixed = check_weights({"a.test:1": 2}, parse_target(["a.test:1", "b.test:1", "10.0.0.7:1"]))
    assert mixed.uneven is True
    assert mixed.of(Address("10.0.0.1", 1, authority="a.test:1")) == 2.0
    assert mixed.of(Address("10.0.0.2", 1, authority="b.test:1")) == 1.0
    assert mixed.of(Address("10.0.0.7", 1)) == 1.0


def test_an_address_key_weighs_that_address_only() -> None:
    weights = check_weights({"10.0.0.2:50051": 4}, parse_target(TARGET))
    assert weights.of(A2) == 4.0
    assert weights.of(A1) == weights.of(A3) == 1.0
    v6 = check_weights({"[2001:db8::1]:5": 2}, parse_target("ipv6:[2001:db8::1]:5,[::1]:5"))
    assert v6.of(Address("2001:db8::1", 5)) == 2.0
    assert v6.of(Address("::1", 5)) == 1.0


@pytest.mark.parametrize(
    ("given", "uneven"),
    [
        (None, False),
        ({}, False),
        ({"10.0.0.1:50051": 1}, False),
        ({"10.0.0.1:50051": 2, "10.0.0.2:50051": 2, "10.0.0.3:50051": 2}, False),
        ({"10.0.0.1:50051": 1.0, "10.0.0.2:50051": 1, "10.0.0.3:50051": 1}, False),
        ({"10.0.0.1:50051": 2, "10.0.0.2:50051": 2}, True),  # the third weighs 1
        ({"10.0.0.3:50051": 0.5}, True),
    ],
    ids=repr,
)
def test_only_unequal_weights_are_uneven(given: Mapping[str, float] | None, uneven: bool) -> None:
    settings = settings_with(weights=given)
    assert isinstance(settings.weights, Weights)
    assert settings.weights.uneven is uneven
    assert settings.weighted is uneven


@pytest.mark.parametrize("method", ["Ping", "/a", "//x", "/a/b/c", "/x.Y/", "x.Y/Z", "", "/"])
def test_a_call_cost_needs_a_full_method_name(method: str) -> None:
    with pytest.raises(ValueError, match="is not a full method name"):
        settings_with(call_costs={method: 0.5})


@pytest.mark.parametrize(
    ("cost", "error", "message"),
    [
        (0, ValueError, "must be a positive finite"),
        (-0.5, ValueError, "must be a positive finite"),
        (math.nan, ValueError, "must be a positive finite"),
        (math.inf, ValueError, "must be a positive finite"),
        (0.0009, ValueError, "must be at least 0.001"),
        (1e-9, ValueError, "must be at least 0.001"),
        ("1", TypeError, "must be a number"),
        (True, TypeError, "must be a number"),
        (None, TypeError, "must be a number"),
    ],
    ids=repr,
)
def test_a_call_cost_must_be_a_number_of_at_least_a_thousandth(
    cost: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=rf"^call_costs\['/x\.Y/Z'\] {message}"):
        settings_with(call_costs={"/x.Y/Z": cost})


def test_call_costs_keys_must_be_str_and_costs_a_mapping() -> None:
    with pytest.raises(TypeError, match="call_costs: key 1 must be a full method name str"):
        check_call_costs({1: 1.0})
    with pytest.raises(TypeError, match=r"^call_costs must be a mapping"):
        check_call_costs([("/x.Y/Z", 1.0)])
    assert check_call_costs(None) == {}


def test_call_costs_are_kept_in_milli_calls() -> None:
    assert MIN_CALL_COST * UNIT == 1
    assert check_call_costs({"/x.Y/Z": 0.001, "/x.Y/W": 0.1, "/x.Y/V": 2.5, "/x.Y/U": 3}) == {
        "/x.Y/Z": 1,
        "/x.Y/W": 100,
        "/x.Y/V": 2500,
        "/x.Y/U": 3000,
    }
    default = settings_with()
    assert default.call_cost("/x.Y/Z") == UNIT == 1000
    costly = settings_with(call_costs={"/x.Y/Z": 0.1, "/x.Y/W": 2.5})
    assert costly.call_cost("/x.Y/Z") == 100
    assert costly.call_cost("/x.Y/W") == 2500
    assert costly.call_cost("/x.Y/Other") == UNIT
    assert costly.call_cost("/x.Y/z") == UNIT  # method names are case-sensitive


@pytest.mark.parametrize(
    ("tuning", "weighted"),
    [
        ({}, False),
        ({"weights": {"10.0.0.1:50051": 3, "10.0.0.2:50051": 3, "10.0.0.3:50051": 3}}, False),
        ({"weights": {"10.0.0.1:50051": 3}}, True),
        ({"slow_start": 5}, True),
        ({"slow_start": SlowStart(window=1)}, True),
        ({"slow_start": None}, False),
        ({"call_costs": {"/x.Y/Z": 0.1}}, True),
        ({"call_costs": {}}, False),
        ({"call_costs": None}, False),
    ],
    ids=repr,
)
def test_settings_are_weighted_exactly_for_weights_slow_start_or_call_costs(
    tuning: dict[str, Any], weighted: bool
) -> None:
    assert settings_with(**tuning).weighted is weighted
