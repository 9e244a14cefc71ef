"""Pure tests of the weighted picker against a brute-force oracle (and the bucket picker).

The oracle keeps every node's state apart from the picker and applies the
tie rule both pickers share when weights are equal and calls cost one: each
node carries a tie key, given from one counter (one step per assignment)
whenever its cost changes or it enters the picker; a pick gives ``-counter``
for "youngest" and ``+counter`` for "round_robin", every other change
``+counter``. The choice is the lowest ``(cost, tie key)``; for "random", any
node of the lowest cost.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from seams import (
    TIE_BREAKS,
    UNIT,
    Address,
    LeastConnPicker,
    Node,
    Seams,
    SteppedPicker,
    WeightedPicker,
    make_balancer,
    make_settings,
)

AnyPicker = LeastConnPicker | WeightedPicker
CALL_COSTS = (UNIT, 100, 2500)
SEEDS = (1, 2, 3)
OPERATIONS = 2500
NODES = 7
TARGET_124 = "ipv4:10.0.0.1:1,10.0.0.2:1,10.0.0.4:1"


@dataclass
class Expected:
    """What the oracle knows of one node."""

    in_flight: int = 0
    units: int = 0
    extra: int = 0
    weight: float = 1.0
    eligible: bool = False
    tie: int = 0


class Oracle:
    """Brute force: every node's state, and the choice by a full scan."""

    def __init__(self, n: int, tie_break: str, *, counts_units: bool) -> None:
        self.tie_break = tie_break
        # The bucket picker counts calls, not milli-calls: its units stay 0.
        self.counts_units = counts_units
        self.nodes = [Expected() for _ in range(n)]
        self._counter = 0

    def _tie(self, picked: bool = False) -> int:
        self._counter += 1
        return -self._counter if picked and self.tie_break == "youngest" else self._counter

    def cost(self, i: int) -> float:
        node = self.nodes[i]
        load = node.units if self.counts_units else node.in_flight * UNIT
        return (load + (node.extra + 1) * UNIT) / node.weight

    def eligible(self) -> list[int]:
        return [i for i, node in enumerate(self.nodes) if node.eligible]

    def cheapest(self) -> list[int]:
        """The eligible nodes of the lowest cost."""
        eligible = self.eligible()
        if not eligible:
            return []
        lowest = min(self.cost(i) for i in eligible)
        return [i for i in eligible if self.cost(i) == lowest]

    def choice(self) -> int:
        """The exact choice of round_robin and youngest: the lowest (cost, tie)."""
        return min(self.eligible(), key=lambda i: (self.cost(i), self.nodes[i].tie))

    def picked(self, i: int, cost: int) -> None:
        node = self.nodes[i]
        node.in_flight += 1
        node.units += cost
        node.tie = self._tie(picked=True)

    def released(self, i: int, cost: int) -> None:
        node = self.nodes[i]
        node.in_flight -= 1
        node.units -= cost
        node.tie = self._tie()

    def added(self, i: int) -> None:
        node = self.nodes[i]
        if not node.eligible:
            node.eligible = True
            node.tie = self._tie()

    def removed(self, i: int) -> None:
        self.nodes[i].eligible = False

    def extra_set(self, i: int, extra: int) -> None:
        node = self.nodes[i]
        if extra != node.extra:
            node.extra = extra
            node.tie = self._tie()

    def weight_set(self, i: int, weight: float) -> None:
        node = self.nodes[i]
        if weight != node.weight:
            node.weight = weight
            node.tie = self._tie()


def _call_cost(rng: random.Random) -> int:
    # Mostly whole calls, so that costs tie often.
    return UNIT if rng.random() < 0.6 else rng.choice(CALL_COSTS)


def _random_weight(rng: random.Random) -> float:
    # Mostly a few round values, so that costs tie across weights too
    # ((1 + 1) / 2 == 1 / 1); sometimes any value, so that they do not.
    if rng.random() < 0.7:
        return rng.choice((0.5, 1.0, 2.0, 3.0, 4.0))
    return rng.uniform(0.1, 5.0)


# The stepped picker's weights (small whole ratios) and their steps, worked
# out by hand: M = lcm(1, 2, 3, 4) = 12, step = M / weight.
STEPS = {0.5: 24, 1.0: 12, 2.0: 6, 3.0: 4, 4.0: 3}


@dataclass(frozen=True)
class Flavour:
    name: str
    make: Callable[..., AnyPicker]  # (tie_break, rng)
    weights: bool  # random weights, set_weight among the operations
    costs: bool  # call costs other than one
    stepped: bool  # static weights of STEPS, each node's step set by hand
    min_ties: int  # picks among tied nodes a run makes at least (ties across
    # unequal weights need exactly equal costs, so they are fewer)

    def __str__(self) -> str:
        return self.name


FLAVOURS = (
    Flavour("weighted", WeightedPicker, weights=True, costs=True, stepped=False, min_ties=8),
    Flavour(
        "weighted-equal", WeightedPicker, weights=False, costs=True, stepped=False, min_ties=60
    ),
    Flavour("leastconn", LeastConnPicker, weights=False, costs=False, stepped=False, min_ties=200),
    Flavour("stepped", SteppedPicker, weights=False, costs=False, stepped=True, min_ties=60),
)


def _check_state(
    picker: AnyPicker, nodes: list[Node], oracle: Oracle, *, structure: bool = True
) -> None:
    for node, expected in zip(nodes, oracle.nodes, strict=True):
        assert node.in_flight == expected.in_flight
        assert node.units == (expected.units if oracle.counts_units else 0)
        assert node.extra == expected.extra
        assert node.weight == expected.weight
        assert node.in_picker == expected.eligible
    eligible = [nodes[i] for i in oracle.eligible()]
    if structure:
        picker.check_invariants(eligible)
    assert picker.size == len(eligible)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tie_break", TIE_BREAKS)
@pytest.mark.parametrize("flavour", FLAVOURS, ids=str)
def test_every_operation_agrees_with_a_brute_force_oracle(
    flavour: Flavour, tie_break: str, seed: int
) -> None:
    rng = random.Random(seed)
    picker = flavour.make(tie_break, random.Random(seed + 1000))
    oracle = Oracle(NODES, tie_break, counts_units=flavour.costs)
    nodes = [Node() for _ in range(NODES)]
    for i, node in enumerate(nodes):
        if flavour.weights:
            weight = _random_weight(rng)
            picker.set_weight(node, weight)
            oracle.weight_set(i, weight)
        elif flavour.stepped:
            weight = rng.choice(list(STEPS))
            node.weight, node.step = weight, STEPS[weight]
            oracle.weight_set(i, weight)
        if rng.random() < 0.8:
            picker.add(node)
            oracle.added(i)
    held: list[tuple[int, int]] = []
    tied_picks = 0
    tie_winners: Counter[int] = Counter()
    refused = nones = 0
    for step in range(OPERATIONS):
        roll = rng.random()
        # Calls: releases grow likelier with the calls held, so that loads
        # stay low and ties are frequent.
        if roll < 0.72 and not (held and rng.random() < len(held) / (len(held) + 2 * NODES)):
            cost = _call_cost(rng) if flavour.costs else UNIT
            cheapest = oracle.cheapest()
            exact = oracle.choice() if cheapest else None
            picked = picker.pick(cost)
            if not cheapest:
                assert picked is None
                nones += 1
            else:
                assert picked is not None
                i = nodes.index(picked)
                assert i in cheapest
                if tie_break != "random":
                    assert i == exact
                if len(cheapest) > 1:
                    tied_picks += 1
                    tie_winners[i] += 1
                oracle.picked(i, cost)
                held.append((i, cost))
        elif roll < 0.72:
            i, cost = held.pop(rng.randrange(len(held)))
            picker.release(nodes[i], cost)
            oracle.released(i, cost)
        elif roll < 0.723:
            # A blackout: nothing is eligible for a while.
            for i in range(NODES):
                picker.remove(nodes[i])
                oracle.removed(i)
        elif roll < 0.82:
            i = rng.randrange(NODES)
            # Sometimes a no-op: adding a member, removing a non-member.
            if rng.random() < 0.6:
                picker.add(nodes[i])
                oracle.added(i)
            else:
                picker.remove(nodes[i])
                oracle.removed(i)
        elif roll < 0.90:
            i, extra = rng.randrange(NODES), rng.randrange(6)
            picker.set_extra(nodes[i], extra)
            oracle.extra_set(i, extra)
        elif roll < 0.96 and not flavour.stepped:
            i = rng.randrange(NODES)
            # Equal weights: a no-op, which must not move the node among ties.
            weight = _random_weight(rng) if flavour.weights else 1.0
            picker.set_weight(nodes[i], weight)
            oracle.weight_set(i, weight)
        else:
            idle = [i for i in range(NODES) if oracle.nodes[i].in_flight == 0]
            if idle:
                i = rng.choice(idle)
                with pytest.raises(RuntimeError, match="released more"):
                    picker.release(nodes[i], rng.choice(CALL_COSTS))
                refused += 1
        # The stepped picker's check walks every bucket: not after every step.
        _check_state(picker, nodes, oracle, structure=not flavour.stepped or step % 5 == 0)
    # The run went through what it is meant to check.
    assert tied_picks >= flavour.min_ties, tied_picks
    assert refused >= 10 and nones >= 10 and held, (refused, nones, len(held))
    if tie_break == "random" and not (flavour.weights or flavour.stepped):
        # Every node won some tie.
        assert set(tie_winners) == set(range(NODES)), tie_winners
    for i, cost in held:
        picker.release(nodes[i], cost)
        oracle.released(i, cost)
    _check_state(picker, nodes, oracle)
    assert all(node.in_flight == 0 and node.units == 0 for node in nodes)


# -- targeted cases ------------------------------------------------------------


@pytest.mark.parametrize("stepped", [False, True], ids=["weighted", "stepped"])
@pytest.mark.parametrize("tie_break", TIE_BREAKS)
def test_weights_one_two_four_take_calls_in_that_proportion(tie_break: str, stepped: bool) -> None:
    picker: AnyPicker = (SteppedPicker if stepped else WeightedPicker)(
        tie_break,  # type: ignore[arg-type]
        random.Random(3),
    )
    nodes = [Node() for _ in range(3)]
    for node, weight in zip(nodes, (1.0, 2.0, 4.0), strict=True):
        if stepped:
            node.weight, node.step = weight, {1.0: 4, 2.0: 2, 4.0: 1}[weight]
        else:
            picker.set_weight(node, weight)
        picker.add(node)
    for k in range(1, 11):
        for _ in range(7):
            assert picker.pick() is not None
        # After 7k picks each node of weight w holds w * k calls: the three
        # costs (w * k + 1) / w are k + 1/w, and the next three picks tie at
        # k + 1 (D'Hondt's seats for votes 1, 2, 4).
        assert [node.in_flight for node in nodes] == [k, 2 * k, 4 * k]
        picker.check_invariants(nodes)
    # The bucket pickers count calls only.
    units = [0, 0, 0] if stepped else [10 * UNIT, 20 * UNIT, 40 * UNIT]
    assert [node.units for node in nodes] == units


def test_ten_calls_of_a_tenth_cost_what_one_whole_call_costs() -> None:
    picker = WeightedPicker("round_robin")
    light, heavy = Node(), Node()
    picker.add(light)
    for _ in range(10):
        assert picker.pick(100) is light
    picker.add(heavy)
    assert picker.pick(UNIT) is heavy
    assert light.units == heavy.units == UNIT
    assert (light.in_flight, heavy.in_flight) == (10, 1)
    assert WeightedPicker.cost(light) == WeightedPicker.cost(heavy) == 2 * UNIT
    # Tied: the one that reached this cost first goes first (round_robin) ...
    assert picker.pick(100) is light
    # ... and a tenth heavier than its peer, it lets the next call go there.
    assert picker.pick(100) is heavy
    assert WeightedPicker.cost(light) == WeightedPicker.cost(heavy) == 2100
    # Two tenths lighter than its peer: it takes the next call.
    picker.release(light, 100)
    picker.release(light, 100)
    assert picker.pick(100) is light
    picker.check_invariants([light, heavy])


def test_a_cost_of_a_tenth_is_counted_exactly_however_many_come_and_go() -> None:
    picker = WeightedPicker("youngest")
    node = Node()
    picker.add(node)
    rng = random.Random(5)
    held = 0
    for _ in range(20_000):
        if held and rng.random() < 0.5:
            picker.release(node, 100)
            held -= 1
        else:
            picker.pick(100)
            held += 1
    assert node.units == 100 * held and node.in_flight == held
    for _ in range(held):
        picker.release(node, 100)
    assert node.units == 0 and node.in_flight == 0
    assert WeightedPicker.cost(node) == UNIT


def test_heap_stays_within_twice_the_backends_after_many_changes() -> None:
    rng = random.Random(11)
    picker = WeightedPicker("youngest", random.Random(12))
    nodes = [Node() for _ in range(40)]
    for node in nodes:
        picker.set_weight(node, _random_weight(rng))
        picker.add(node)
    held: list[tuple[Node, int]] = []
    most_void = 0
    for _ in range(100_000):
        roll = rng.random()
        if roll < 0.4:
            cost = rng.choice(CALL_COSTS)
            picked = picker.pick(cost)
            if picked is not None:
                held.append((picked, cost))
        elif roll < 0.75:
            if held:
                node, cost = held.pop(rng.randrange(len(held)))
                picker.release(node, cost)
        elif roll < 0.85:
            picker.set_extra(rng.choice(nodes), rng.randrange(4))
        elif roll < 0.93:
            picker.set_weight(rng.choice(nodes), _random_weight(rng))
        else:
            node = rng.choice(nodes)
            # Mostly members: the set shrinks and grows without emptying.
            if node.in_picker and picker.size > 5:
                picker.remove(node)
            else:
                picker.add(node)
        # The bound is on the heap's length, which nothing public shows:
        # check_invariants proves void entries are counted, not how many
        # there may be. So this one test reads the private list.
        length = len(picker._heap)
        assert length <= 2 * picker.size + 64 + 1, (length, picker.size)
        most_void = max(most_void, length - picker.size)
    # The bound was reached for, and the picker still agrees with itself.
    assert most_void >= 60, most_void
    picker.check_invariants([node for node in nodes if node.in_picker])


@pytest.mark.parametrize("weight", [1.0, 2.5])
@pytest.mark.parametrize("tie_break", ["round_robin", "youngest"])
def test_equal_weights_choose_as_the_bucket_picker_does(tie_break: str, weight: float) -> None:
    rng = random.Random(21)
    buckets = LeastConnPicker(tie_break)  # type: ignore[arg-type]
    heap = WeightedPicker(tie_break)  # type: ignore[arg-type]
    left = [Node() for _ in range(9)]
    right = [Node() for _ in range(9)]
    for a, b in zip(left, right, strict=True):
        heap.set_weight(b, weight)
        buckets.add(a)
        heap.add(b)
    held: list[int] = []
    for _ in range(5000):
        roll = rng.random()
        if roll < 0.45:
            a_picked, b_picked = buckets.pick(), heap.pick()
            if a_picked is None:
                assert b_picked is None
                continue
            assert b_picked is not None
            assert left.index(a_picked) == right.index(b_picked)
            held.append(left.index(a_picked))
        elif roll < 0.8:
            if held:
                i = held.pop(rng.randrange(len(held)))
                buckets.release(left[i])
                heap.release(right[i])
        elif roll < 0.9:
            i, extra = rng.randrange(9), rng.randrange(4)
            buckets.set_extra(left[i], extra)
            heap.set_extra(right[i], extra)
        else:
            i = rng.randrange(9)
            if left[i].in_picker:
                buckets.remove(left[i])
                heap.remove(right[i])
            else:
                buckets.add(left[i])
                heap.add(right[i])
        assert [n.in_flight for n in left] == [n.in_flight for n in right]
    buckets.check_invariants([n for n in left if n.in_picker])
    heap.check_invariants([n for n in right if n.in_picker])


def test_a_node_out_of_the_picker_keeps_its_load_and_returns_at_it() -> None:
    picker = WeightedPicker("round_robin")
    a, b = Node(), Node()
    picker.add(a)
    picker.add(b)
    assert picker.pick(2500) is a
    picker.remove(a)
    picker.set_extra(a, 2)
    picker.set_weight(a, 4.0)
    assert picker.pick(UNIT) is b and picker.pick(UNIT) is b
    picker.release(a, 2500)  # a call of an ineligible node still ends
    assert (a.in_flight, a.units) == (0, 0)
    picker.add(a)
    # a: (0 + 3000) / 4 = 750, below b's (2000 + 1000) / 1.
    assert WeightedPicker.cost(a) == 750
    assert picker.pick(UNIT) is a
    picker.check_invariants([a, b])


def test_an_empty_weighted_picker_picks_nothing_even_with_void_entries() -> None:
    picker = WeightedPicker("youngest")
    node = Node()
    picker.add(node)
    picker.set_extra(node, 1)  # one void entry
    picker.remove(node)
    assert picker.size == 0
    assert picker.pick() is None
    picker.check_invariants([])


def _repeats(make: Callable[[str, random.Random], AnyPicker], seed: int) -> float:
    """How often a serial client's call goes where the previous one went."""
    picker = make("random", random.Random(seed))
    for _ in range(3):
        picker.add(Node())
    previous, same, calls = None, 0, 3000
    for _ in range(calls):
        node = picker.pick(UNIT)
        assert node is not None
        same += node is previous
        previous = node
        picker.release(node, UNIT)
    return same / calls


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(LeastConnPicker, id="leastconn"),
        # With a fresh random number per entry, a node just released won the
        # next tie about 98 % of the time: the others' numbers had lost before.
        pytest.param(WeightedPicker, id="weighted"),
        pytest.param(SteppedPicker, id="stepped"),
    ],
)
def test_random_tie_break_is_uniform_among_tied_backends(
    make: Callable[[str, random.Random], AnyPicker],
) -> None:
    # Three idle backends, one call at a time: each pick is a three-way tie,
    # so it repeats the previous backend one time in three.
    for seed in (1, 2):
        assert 0.28 < _repeats(make, seed) < 0.39


@pytest.mark.parametrize("make", [WeightedPicker, SteppedPicker])
def test_an_unknown_tie_break_is_refused_by_name(
    make: Callable[[str, random.Random], AnyPicker],
) -> None:
    with pytest.raises(ValueError, match="tie_break must be one of"):
        make("fastest", random.Random(1))


def test_random_ties_across_costs_and_weights_are_uniform() -> None:
    # Two nodes of weight 2 holding one call each tie with two idle nodes of
    # weight 1: (1 + 1) / 2 == (0 + 1) / 1. Each of the four is picked first
    # a quarter of the time.
    firsts: Counter[int] = Counter()
    again = 0
    for seed in range(2000):
        picker = WeightedPicker("random", random.Random(seed))
        nodes = [Node() for _ in range(4)]
        for node in nodes[:2]:
            picker.set_weight(node, 2.0)
        for node in nodes:
            picker.add(node)
        for _ in range(2):  # the heavy ones take one call each
            picked = picker.pick(UNIT)
            assert picked is not None and picked.weight == 2.0
        assert len({WeightedPicker.cost(node) for node in nodes}) == 1
        first = picker.pick(UNIT)
        assert first is not None
        firsts[nodes.index(first)] += 1
        # Back at the tied cost, the first has no better chance than the others.
        picker.release(first, UNIT)
        again += picker.pick(UNIT) is first
    assert all(400 < firsts[i] < 600 for i in range(4)), firsts
    assert 400 < again < 600, again


@pytest.mark.parametrize("tie_break", TIE_BREAKS)
def test_settings_weights_one_two_four_split_calls_through_a_balancer(tie_break: str) -> None:
    # Whichever picker the balancer chooses for these weights, the split is exact.
    tuning: Any = {
        "weights": {"10.0.0.1:1": 1, "10.0.0.2:1": 2, "10.0.0.4:1": 4},
        "tie_break": tie_break,
        "health_check_service": None,
    }
    settings = make_settings("insecure_channel", TARGET_124, None, None, None, tuning)
    assert settings.weighted
    balancer = make_balancer(settings, Seams())
    addresses = [Address(f"10.0.0.{i}", 1) for i in (1, 2, 4)]
    for backend in balancer.set_addresses(addresses).added:
        balancer.set_connectivity(backend, grpc.ChannelConnectivity.READY)
    for k in range(1, 11):
        for _ in range(7):
            assert balancer.pick(UNIT) is not None
        assert [b.in_flight for b in balancer.backends] == [k, 2 * k, 4 * k]
        balancer.check_invariants()
    assert [state.weight for state in balancer.states()] == [1.0, 2.0, 4.0]
