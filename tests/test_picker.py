"""Pure tests of the least-connection picker: exactness, ties, O(1) structure."""

from __future__ import annotations

import random

import pytest
from seams import LeastConnPicker, Node


def _nodes(n: int) -> list[Node]:
    return [Node() for _ in range(n)]


def _filled(
    n: int, tie_break: str = "round_robin", seed: int = 0
) -> tuple[LeastConnPicker, list[Node]]:
    picker = LeastConnPicker(tie_break, random.Random(seed))  # type: ignore[arg-type]
    nodes = _nodes(n)
    for node in nodes:
        picker.add(node)
    return picker, nodes


def test_empty_picker_picks_nothing() -> None:
    picker = LeastConnPicker()
    assert picker.pick() is None


def test_round_robin_rotates_among_ties() -> None:
    picker, nodes = _filled(4)
    order = []
    for _ in range(8):
        node = picker.pick()
        assert node is not None
        order.append(nodes.index(node))
        picker.release(node)
    assert order == [0, 1, 2, 3, 0, 1, 2, 3]


@pytest.mark.parametrize("tie_break", ["round_robin", "random", "youngest"])
def test_pick_always_takes_a_least_loaded_node(tie_break: str) -> None:
    picker, nodes = _filled(5, tie_break)
    rng = random.Random(7)
    held: list[Node] = []
    for _ in range(5000):
        if held and rng.random() < 0.45:
            picker.release(held.pop(rng.randrange(len(held))))
        else:
            lowest = min(node.in_flight for node in nodes)
            node = picker.pick()
            assert node is not None
            assert node.in_flight == lowest + 1
            held.append(node)
        picker.check_invariants()
    for node in held:
        picker.release(node)
    assert all(node.in_flight == 0 for node in nodes)


def test_seed_example_goes_to_a_tied_minimum() -> None:
    # S1: 5, S2: 2, S3: 3, S4: 2 -> the new request goes to S2 or S4.
    picker = LeastConnPicker()
    nodes = _nodes(4)
    for node, count in zip(nodes, (5, 2, 3, 2), strict=True):
        node.in_flight = count
        picker.add(node)
    first, second = picker.pick(), picker.pick()
    assert {id(first), id(second)} == {id(nodes[1]), id(nodes[3])}
    assert [node.in_flight for node in nodes] == [5, 3, 3, 3]


def test_random_tie_break_is_driven_by_the_injected_rng() -> None:
    def sequence(seed: int) -> list[int]:
        picker, nodes = _filled(6, "random", seed)
        out = []
        for _ in range(30):
            node = picker.pick()
            assert node is not None
            out.append(nodes.index(node))
            picker.release(node)
        return out

    assert sequence(1) == sequence(1)
    assert sequence(1) != sequence(2)
    assert set(sequence(3)) == set(range(6))


def test_random_tie_break_is_exact_least_connection() -> None:
    picker, nodes = _filled(3, "random", 5)
    picked = [picker.pick() for _ in range(3)]
    assert {id(p) for p in picked} == {id(n) for n in nodes}
    picker.check_invariants()


def test_removed_node_keeps_its_count_and_returns_at_it() -> None:
    picker, nodes = _filled(2)
    first = picker.pick()
    assert first is nodes[0]
    picker.remove(first)
    # Only nodes[1] is eligible now, even when it is busier.
    for _ in range(3):
        assert picker.pick() is nodes[1]
    picker.release(first)  # an RPC of an ineligible node still ends
    assert first.in_flight == 0
    picker.add(first)
    picker.check_invariants()
    assert picker.pick() is first


def test_removing_the_last_lowest_node_finds_the_next_occupied_bucket() -> None:
    picker, nodes = _filled(3)
    a, b, c = nodes
    for node, count in ((b, 2), (c, 4)):
        picker.remove(node)
        node.in_flight = count
        picker.add(node)
    picker.remove(a)
    picker.check_invariants()
    assert picker.pick() is b


def test_release_below_zero_is_refused() -> None:
    picker, nodes = _filled(1)
    with pytest.raises(RuntimeError):
        picker.release(nodes[0])
    assert nodes[0].in_flight == 0


def test_bad_tie_break_is_rejected() -> None:
    with pytest.raises(ValueError, match="tie_break"):
        LeastConnPicker("fastest")  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [4, 10_000])
def test_pick_touches_no_other_node(n: int) -> None:
    """O(1): a pick or release changes only the picked node's bucket links."""
    picker, _ = _filled(n)
    picked = [picker.pick() for _ in range(n // 2)]
    assert len({id(p) for p in picked}) == n // 2
    picker.check_invariants()
    assert len(picker._buckets) == 2


def test_youngest_prefers_the_most_recently_picked_among_ties() -> None:
    picker, nodes = _filled(4, "youngest")
    a, b, c, d = (picker.pick() for _ in range(4))
    assert [a, b, c, d] == nodes
    # All at 1: the tie goes to the backend picked last.
    assert picker.pick() is nodes[3]
    picker.release(nodes[3])
    # Released backends queue behind the ones that arrived by a pick.
    picker.release(nodes[0])
    assert picker.pick() is nodes[0]
    picker.check_invariants()


def test_youngest_rotates_when_calls_do_not_overlap() -> None:
    picker, nodes = _filled(3, "youngest")
    order = []
    for _ in range(6):
        node = picker.pick()
        assert node is not None
        order.append(nodes.index(node))
        picker.release(node)
    assert order == [0, 1, 2, 0, 1, 2]
