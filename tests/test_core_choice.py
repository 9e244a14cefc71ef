"""Pure tests of two random choices (the pick for server-reported loads)."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import grpc
import pytest
from seams import Address, Backend, Balancer, Health, Seams, make_balancer, make_settings

READY = grpc.ChannelConnectivity.READY
TRANSIENT_FAILURE = grpc.ChannelConnectivity.TRANSIENT_FAILURE
ADDRESSES = tuple(Address(f"10.0.0.{i}", 50051) for i in range(1, 5))
T0 = 100.0


def ready(
    addresses: tuple[Address, ...] = ADDRESSES, seed: int = 7, **kwargs: Any
) -> tuple[Balancer[object], list[Backend[object]]]:
    balancer: Balancer[object] = Balancer(
        "t", health_checking=False, rng=random.Random(seed), clock=lambda: T0, **kwargs
    )
    backends = balancer.set_addresses(addresses).added
    for backend in backends:
        assert balancer.set_connectivity(backend, READY)
    return balancer, backends


def load(balancer: Balancer[object], backend: Backend[object], calls: int) -> None:
    """Put ``calls`` RPCs on ``backend`` alone, whatever the choice rule."""
    others = [b for b in balancer.backends if b is not backend]
    for _ in range(calls):
        assert balancer.pick_excluding(others) is backend


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"weighted": True, "weight_of": lambda a: 1.0 + a.host.endswith("1")}],
    ids=["buckets", "heap"],
)
def test_the_lowest_backend_takes_half_the_calls_of_four_and_the_highest_none(
    kwargs: dict[str, Any],
) -> None:
    balancer, backends = ready(two_choices=True, **kwargs)
    low, high = backends[0], backends[-1]
    for backend, calls in zip(backends, (0, 20, 20, 40), strict=True):
        load(balancer, backend, calls)
    taken: Counter[Backend[object]] = Counter()
    for _ in range(6000):
        picked = balancer.pick(1000)
        assert picked is not None
        taken[picked] += 1
        balancer.release(picked, None, 1000)
        balancer.check_invariants()
    # Drawn with any of the other three: 3 of the 6 pairs hold it.
    assert 0.46 < taken[low] / 6000 < 0.54, taken
    # Never drawn with a cheaper one only: the highest of all never wins.
    assert taken[high] == 0, taken
    assert [b.in_flight for b in backends] == [0, 20, 20, 40]


def test_equal_costs_are_split_evenly() -> None:
    balancer, backends = ready(two_choices=True)
    taken: Counter[Backend[object]] = Counter()
    for _ in range(4000):
        picked = balancer.pick(1000)
        assert picked is not None
        taken[picked] += 1
        balancer.release(picked, None, 1000)
    assert all(900 < taken[b] < 1100 for b in backends), taken


def test_without_two_choices_the_lowest_takes_every_call() -> None:
    balancer, backends = ready(two_choices=False)
    low = backends[0]
    for backend in backends[1:]:
        load(balancer, backend, 5)
    for _ in range(5):
        assert balancer.pick(1000) is low


def test_server_load_chooses_from_two_unless_told_otherwise() -> None:
    def share_of_low(**kwargs: Any) -> float:
        balancer, backends = ready(**kwargs)
        for backend in backends[1:]:
            load(balancer, backend, 50)
        picks = [balancer.pick(1000) for _ in range(40)]
        return picks.count(backends[0]) / len(picks)

    assert share_of_low() == 1.0
    assert share_of_low(server_load=True) < 0.8
    assert share_of_low(server_load=True, two_choices=False) == 1.0


def test_counts_stay_exact_through_membership_changes() -> None:
    rng = random.Random(3)
    balancer, backends = ready(two_choices=True, seed=11)
    in_flight: list[Backend[object]] = []
    for step in range(3000):
        action = rng.random()
        if action < 0.5:
            picked = balancer.pick(1000)
            if picked is not None:
                assert picked.eligible
                in_flight.append(picked)
        elif action < 0.85 and in_flight:
            balancer.release(in_flight.pop(rng.randrange(len(in_flight))), None, 1000)
        else:
            backend = rng.choice(backends)
            state = TRANSIENT_FAILURE if backend.eligible else READY
            balancer.set_connectivity(backend, state)
        if step % 50 == 0:
            balancer.check_invariants()
            counted = Counter(in_flight)
            assert all(b.in_flight == counted[b] for b in backends)
    balancer.check_invariants()


def test_a_repick_never_returns_an_excluded_backend() -> None:
    balancer, backends = ready(two_choices=True)
    excluded = backends[:3]
    for _ in range(50):
        picked = balancer.pick_excluding(excluded)
        assert picked is backends[3]
    balancer.check_invariants()


def test_one_eligible_backend_takes_every_call_and_none_gives_none() -> None:
    balancer, backends = ready(ADDRESSES[:1], two_choices=True)
    assert [balancer.pick(1000) for _ in range(3)] == [backends[0]] * 3
    balancer.set_connectivity(backends[0], TRANSIENT_FAILURE)
    assert balancer.pick(1000) is None


def test_the_seam_reaches_the_balancer_of_a_channel() -> None:
    settings = make_settings("insecure_channel", [str(a) for a in ADDRESSES], None, None, None, {})

    def share_of_low(two_choices: bool | None) -> float:
        balancer: Balancer[object] = make_balancer(settings, Seams(two_choices=two_choices))
        backends = balancer.set_addresses(ADDRESSES).added
        for backend in backends:
            balancer.set_connectivity(backend, READY)
            balancer.set_health(backend, Health.SERVING)
        for backend in backends[1:]:
            load(balancer, backend, 50)
        picks = [balancer.pick(1000) for _ in range(40)]
        return picks.count(backends[0]) / len(picks)

    # Local counts by default: the lowest; the seam switches to two choices.
    assert share_of_low(None) == 1.0
    assert share_of_low(False) == 1.0
    assert share_of_low(True) < 0.8
