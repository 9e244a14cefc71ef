"""How a pick chooses: which picker keeps the order, and two random choices.

The one cost (weighted.py) is kept by the O(1) bucket picker while every
backend weighs the same and every call costs one, by the O(1) stepped
picker for weights of small whole ratios, else by a heap over backends.

Two random choices: the pick when loads come from reports many clients share.

With local counts every client sees only its own calls, and the lowest
cost is the right answer. With server-reported load (server_load) every
client reads the same report, so between two reports they all see the
same backend lowest and all send it their next calls: a herd, corrected
only by the next report. Mitzenmacher ("How useful is old information?",
IEEE TPDS 2000) shows that with stale loads taking the least loaded of
two backends chosen at random beats taking the least loaded of all;
Envoy's least request picks the better of two random hosts for the same
reason (``choice_count`` 2). Here: two distinct eligible backends drawn
uniformly, the one of lower cost (the picker's, so weights, call costs,
penalties and reports all count) takes the call, a tie goes to the first
drawn (random). O(1) per pick; the picker still keeps every count.
"""

from __future__ import annotations

import random
from typing import Protocol

from .picker import LeastConnPicker, Node, Picker, TieBreak
from .stepped import SteppedPicker
from .weighted import WeightedPicker


def make_picker(
    tie_break: TieBreak,
    rng: random.Random | None,
    *,
    weighted: bool,
    fractional_costs: bool,
    slow_start: bool,
    stepped: bool,
) -> Picker:
    """The picker for these settings: ``stepped`` when weights have small whole ratios."""
    if fractional_costs or slow_start or (weighted and not stepped):
        return WeightedPicker(tie_break, rng)
    if weighted:
        return SteppedPicker(tie_break, rng)
    return LeastConnPicker(tie_break, rng)


class Charging(Protocol):
    """What two choices needs of a picker: its cost order and a chosen pick."""

    def cost(self, node: Node) -> float: ...

    def charge(self, node: Node, cost: int) -> None: ...


class TwoChoices:
    """The eligible nodes, sampled two at a time; the picker counts the choice."""

    def __init__(self, picker: Charging, rng: random.Random) -> None:
        self._picker = picker
        self._random = rng.random
        self._members: list[Node] = []
        self._index: dict[Node, int] = {}

    def add(self, node: Node) -> None:
        if node not in self._index:
            self._index[node] = len(self._members)
            self._members.append(node)

    def remove(self, node: Node) -> None:
        index = self._index.pop(node, None)
        if index is None:
            return
        last = self._members.pop()
        if last is not node:
            self._members[index] = last
            self._index[last] = index

    def pick(self, cost: int) -> Node | None:
        """The better of two eligible nodes drawn at random, now carrying one more RPC."""
        members = self._members
        n = len(members)
        if n < 2:
            if not n:
                return None
            node = members[0]
        else:
            rand = self._random
            i = int(rand() * n)
            j = int(rand() * (n - 1))
            if j >= i:
                j += 1
            first, second = members[i], members[j]
            cost_of = self._picker.cost
            node = first if cost_of(first) <= cost_of(second) else second
        self._picker.charge(node, cost)
        return node

    def check_invariants(self, eligible: list[Node]) -> None:
        assert sorted(map(id, self._members)) == sorted(map(id, eligible))
        for index, node in enumerate(self._members):
            assert self._index[node] == index
