"""Weighted picker: the lowest ``(load + 1) / weight`` among eligible backends.

The one cost every signal feeds, for backends of unequal size (Envoy's
weighted least request with bias 1.0; HAProxy's leastconn with weights):

    cost = (load + 1) / weight
    load = the call costs of its RPCs in flight (1 each unless call_costs
           says otherwise) + extra (the failure penalty)
    weight = static weight x slow-start factor

Loads are kept in whole milli-calls (``UNIT`` = one call), so counts stay
exact however many calls of cost 0.1 come and go. With all weights equal,
unit costs and no slow start the balancer uses the bucket picker instead
(picker.py): same answers, O(1).

Eligible backends sit in a binary heap of entries ``[cost, tie, node]``
(C ``heapq``): O(log n) per pick, release and change. A change of a
backend's cost pushes a new entry and voids the old one in place
(``entry[2] = None``); void entries are dropped when they reach the top,
and the heap is rebuilt once they make up half of it, so it stays within
about twice the number of eligible backends.

Ties: ``tie`` orders entries of equal cost, as the bucket picker's rules do:

- round_robin: the order in which backends reached their cost (longest
  waiting first);
- youngest: backends just picked first (most recent first), then the
  others in arrival order;
- random: exponential clocks, one race per cost: an entry's tie is the
  tie last picked at its cost plus an exponential variate. The entries
  still waiting at a cost have, by memorylessness, i.i.d. exponential
  residuals, so each pick is uniform among the tied (a plain random number
  per entry would favour the newest: the others are what lost before).
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Sequence
from typing import Any, Final

from .picker import TIE_BREAKS, Node, TieBreak

UNIT: Final = 1000
# Void entries allowed beyond the live ones before a rebuild.
_SLACK: Final = 64


class WeightedPicker:
    """Exact weighted least-load choice in O(log n); same interface as LeastConnPicker."""

    def __init__(self, tie_break: TieBreak = "round_robin", rng: random.Random | None = None):
        if tie_break not in TIE_BREAKS:
            raise ValueError(f"tie_break must be one of {TIE_BREAKS}, not {tie_break!r}")
        self.tie_break = tie_break
        self._heap: list[list[Any]] = []
        self._void = 0
        self.size = 0
        counter = itertools.count()
        self._next = counter.__next__
        # Youngest's picked ties count down from zero, every other tie up.
        below = itertools.count(-1, -1).__next__
        # Random: cost -> the tie last picked at that cost (see the docstring).
        self._race: dict[float, float] | None = None
        self._expovariate = (rng or random.Random()).expovariate
        ties: dict[str, tuple[Callable[[float], float], Callable[[float], float]]] = {
            "round_robin": (lambda _: self._next(), lambda _: self._next()),
            "youngest": (lambda _: below(), lambda _: self._next()),
            "random": (self._raced, self._raced),
        }
        if tie_break == "random":
            self._race = {}
        # The tie, at its new cost, of a backend just picked, and of one that
        # arrived otherwise.
        self._picked_tie, self._arrived_tie = ties[tie_break]

    def _raced(self, cost: float) -> float:
        assert self._race is not None
        return self._race.get(cost, 0.0) + self._expovariate(1.0)

    @staticmethod
    def cost(node: Node) -> float:
        return (node.units + (node.extra + 1) * UNIT) / node.weight

    def charge(self, node: Node, cost: int = UNIT) -> None:
        """Count one more RPC of ``cost`` on an eligible node the caller chose (choice.py)."""
        self.remove(node)
        node.in_flight += 1
        node.units += cost
        self.add(node)

    def _enter(self, node: Node, tie: Callable[[float], float]) -> list[Any]:
        cost = (node.units + (node.extra + 1) * UNIT) / node.weight
        node.entry = entry = [cost, tie(cost), node]
        return entry

    def _void_entry(self, node: Node) -> None:
        entry = node.entry
        if entry is not None:
            entry[2] = None
            node.entry = None
            self._void += 1

    def add(self, node: Node) -> None:
        """Make a node eligible, at the load it already has."""
        if node.in_picker:
            return
        node.in_picker = True
        self.size += 1
        heapq.heappush(self._heap, self._enter(node, self._arrived_tie))

    def remove(self, node: Node) -> None:
        """Make a node ineligible; its load stays on the node."""
        if not node.in_picker:
            return
        node.in_picker = False
        self.size -= 1
        self._void_entry(node)
        self._compact()

    def pick(self, cost: int = UNIT) -> Node | None:
        """The eligible node with the lowest cost, now carrying one more RPC of ``cost``."""
        heap = self._heap
        while heap:
            top = heap[0]
            node: Node | None = top[2]
            if node is None:
                heapq.heappop(heap)
                self._void -= 1
                continue
            if self._race is not None:
                self._race[top[0]] = top[1]
            node.in_flight += 1
            node.units = units = node.units + cost
            # _enter, inline: this is every pick.
            new_cost = (units + (node.extra + 1) * UNIT) / node.weight
            node.entry = entry = [new_cost, self._picked_tie(new_cost), node]
            heapq.heapreplace(heap, entry)
            return node
        return None

    def release(self, node: Node, cost: int = UNIT) -> None:
        """Count one RPC of ``cost`` on this node as ended; counts never go below zero."""
        if node.in_flight <= 0 or node.units < cost:
            raise RuntimeError("released more RPCs than were picked")
        node.in_flight -= 1
        node.units = units = node.units - cost
        old = node.entry
        if old is not None:
            # _void_entry and _enter, inline: this is every release.
            old[2] = None
            new_cost = (units + (node.extra + 1) * UNIT) / node.weight
            node.entry = entry = [new_cost, self._arrived_tie(new_cost), node]
            heapq.heappush(self._heap, entry)
            self._void += 1
            if self._void > self.size + _SLACK:
                self._compact()

    def set_extra(self, node: Node, extra: int) -> None:
        """Give the node ``extra`` load beyond its RPCs in flight (whole calls, >= 0)."""
        if extra != node.extra:
            node.extra = extra
            self._moved(node)

    def set_weight(self, node: Node, weight: float) -> None:
        """The node's effective weight (> 0) changed."""
        if weight != node.weight:
            node.weight = weight
            self._moved(node)

    def _moved(self, node: Node) -> None:
        if node.in_picker:
            self._void_entry(node)
            heapq.heappush(self._heap, self._enter(node, self._arrived_tie))
            self._compact()

    def _compact(self) -> None:
        """Drop void entries once they outnumber the live ones (amortized O(1))."""
        if self._void > self.size + _SLACK:
            self._heap = [entry for entry in self._heap if entry[2] is not None]
            heapq.heapify(self._heap)
            self._void = 0
            if self._race is not None:
                # Races at costs nobody holds any more are over.
                live = {entry[0] for entry in self._heap}
                self._race = {cost: tie for cost, tie in self._race.items() if cost in live}

    def check_invariants(self, eligible: Sequence[Node] | None = None) -> None:
        """Assert the heap is consistent (for tests)."""
        live = [entry for entry in self._heap if entry[2] is not None]
        assert len(live) == self.size, (len(live), self.size)
        assert len(self._heap) - len(live) == self._void, (len(self._heap), self._void)
        for entry in live:
            node = entry[2]
            assert node.entry is entry and node.in_picker, node
            assert entry[0] == self.cost(node), (entry[0], self.cost(node))
        if eligible is not None:
            assert {id(e[2]) for e in live} == {id(n) for n in eligible}
        for node in eligible or ():
            assert node.in_flight >= 0 and node.units >= 0 and node.extra >= 0, node
