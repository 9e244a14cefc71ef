"""Picker: exact least-connection choice in O(1) per pick and per release.

A backend's load is its RPCs in flight plus an ``extra`` whole number that
other signals set (the failure penalty: a backend failing fast counts as
busier than it is). Eligible backends sit in buckets indexed by their load,
and the index of the lowest non-empty bucket is tracked. A pick takes a
backend from that bucket and moves it one bucket up; a release moves it one
bucket down; a change of ``extra`` moves it as far as that changes. None of
them touches any other backend, so the cost does not grow with the number
of backends (a full scan, as in Envoy's FULL_SCAN mode, is O(n) per pick; the
answer is the same).

Counts live on the nodes, not in the picker, so a backend that leaves the
eligible set (unhealthy, draining) keeps counting its in-flight RPCs down and
re-enters at its true load.

Not thread-safe: the balancer's owner serializes calls.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from typing import Any, Final, Literal, Protocol

TieBreak = Literal["round_robin", "random", "youngest"]
TIE_BREAKS: Final = ("round_robin", "random", "youngest")


class Node:
    """A pickable backend. The picker links it into one bucket at a time."""

    __slots__ = (
        "_next",
        "_prev",
        "_slot",
        "entry",
        "extra",
        "in_flight",
        "in_picker",
        "step",
        "units",
        "weight",
    )

    def __init__(self) -> None:
        self.in_flight = 0
        # Load beyond this channel's RPCs (see set_extra). The node sits in the
        # bucket of in_flight + extra, its load.
        self.extra = 0
        self.in_picker = False
        # For the weighted picker (weighted.py): the call costs in flight, in
        # milli-calls, the effective weight, and the node's live heap entry.
        self.units = 0
        self.weight = 1.0
        self.entry: list[Any] | None = None
        # For the stepped picker (stepped.py): buckets per call, by weight.
        self.step = 1
        self._prev: Node = self
        self._next: Node = self
        self._slot = -1


class _Bucket(Protocol):
    size: int

    def first(self) -> Node:
        """The backend ``take`` would return (a random bucket: any of them)."""
        ...

    def add(self, node: Node) -> None: ...

    def add_picked(self, node: Node) -> None: ...

    def remove(self, node: Node) -> None: ...

    def take(self) -> Node:
        """Remove and return the backend this bucket's tie-break chooses."""
        ...


class _FifoBucket:
    """Tied backends in the order they reached this count.

    Choosing the longest-waiting one rotates among ties: a backend picked
    from the lowest bucket comes back behind the others once its RPC ends.
    A circular doubly linked list keeps add, remove and take O(1).
    """

    __slots__ = ("_sentinel", "size")

    def __init__(self) -> None:
        self._sentinel = Node()
        self.size = 0

    def add(self, node: Node) -> None:
        sentinel = self._sentinel
        tail = sentinel._prev
        node._prev = tail
        node._next = sentinel
        tail._next = node
        sentinel._prev = node
        self.size += 1

    add_picked = add

    def first(self) -> Node:
        return self._sentinel._next

    def remove(self, node: Node) -> None:
        node._prev._next = node._next
        node._next._prev = node._prev
        self.size -= 1

    def take(self) -> Node:
        # remove() of the head, inline: this is every pick.
        sentinel = self._sentinel
        node = sentinel._next
        following = node._next
        sentinel._next = following
        following._prev = sentinel
        self.size -= 1
        return node


class _YoungestFirstBucket(_FifoBucket):
    """Tied backends, the most recently picked first.

    A backend that just took a new stream holds the youngest streams, the
    likeliest to be short and to end soon, so the next tie goes there too and
    counts stay level. Plain rotation can fall into step with a periodic mix
    of durations and pile the long streams onto the same backends; see
    docs/benchmarks.md for the measurement. Released backends still queue at
    the back, oldest first.
    """

    __slots__ = ()

    def add_picked(self, node: Node) -> None:
        sentinel = self._sentinel
        head = sentinel._next
        node._prev = sentinel
        node._next = head
        head._prev = node
        sentinel._next = node
        self.size += 1


class _RandomBucket:
    """Tied backends in an array: uniform choice, swap-with-last removal."""

    __slots__ = ("_nodes", "_random", "size")

    def __init__(self, rng: random.Random) -> None:
        self._nodes: list[Node] = []
        self._random = rng.random
        self.size = 0

    def add(self, node: Node) -> None:
        node._slot = len(self._nodes)
        self._nodes.append(node)
        self.size += 1

    add_picked = add

    def first(self) -> Node:
        return self._nodes[0]

    def remove(self, node: Node) -> None:
        nodes = self._nodes
        last = nodes.pop()
        if last is not node:
            nodes[node._slot] = last
            last._slot = node._slot
        self.size -= 1

    def take(self) -> Node:
        nodes = self._nodes
        node = nodes[int(self._random() * len(nodes))]
        self.remove(node)
        return node


class Picker(Protocol):
    """What the balancer asks of a picker: this module's, or weighted.py's.

    The bucket picker here serves when every backend weighs the same and
    every call costs one; it ignores ``cost`` and weights.
    """

    size: int

    def add(self, node: Node) -> None: ...

    def remove(self, node: Node) -> None: ...

    def pick(self, cost: int = ...) -> Node | None: ...

    def release(self, node: Node, cost: int = ...) -> None: ...

    def set_extra(self, node: Node, extra: int) -> None: ...

    def set_weight(self, node: Node, weight: float) -> None: ...

    def cost(self, node: Node) -> float: ...

    def charge(self, node: Node, cost: int) -> None: ...

    def check_invariants(self, eligible: Sequence[Node] | None = None) -> None: ...


class LeastConnPicker:
    def __init__(self, tie_break: TieBreak = "round_robin", rng: random.Random | None = None):
        if tie_break not in TIE_BREAKS:
            raise ValueError(f"tie_break must be one of {TIE_BREAKS}, not {tie_break!r}")
        self.tie_break = tie_break
        self._rng = rng if rng is not None else random.Random()
        self._new_bucket: Callable[[], _Bucket]
        if tie_break == "round_robin":
            self._new_bucket = _FifoBucket
        elif tie_break == "youngest":
            self._new_bucket = _YoungestFirstBucket
        else:
            self._new_bucket = functools.partial(_RandomBucket, self._rng)
        self._buckets: list[_Bucket] = []
        self._lowest = 0
        self.size = 0

    def _bucket(self, count: int) -> _Bucket:
        buckets = self._buckets
        while len(buckets) <= count:
            buckets.append(self._new_bucket())
        return buckets[count]

    def _level(self, node: Node) -> int:
        """The bucket of a node: its load (stepped.py scales it by a weight's step)."""
        return node.in_flight + node.extra

    def add(self, node: Node) -> None:
        """Make a node eligible, at the load it already has."""
        if node.in_picker:
            return
        level = self._level(node)
        self._bucket(level).add(node)
        node.in_picker = True
        if self.size == 0 or level < self._lowest:
            self._lowest = level
        self.size += 1

    def remove(self, node: Node) -> None:
        """Make a node ineligible; its count stays on the node."""
        if not node.in_picker:
            return
        level = self._level(node)
        bucket = self._buckets[level]
        bucket.remove(node)
        node.in_picker = False
        self.size -= 1
        if bucket.size == 0 and level == self._lowest and self.size:
            self._lowest = self._next_occupied(level)

    def _next_occupied(self, level: int) -> int:
        # Rare (membership and extra changes only): walk up to the next
        # occupied bucket, bounded by the highest load.
        buckets = self._buckets
        while buckets[level].size == 0:
            level += 1
        return level

    def set_extra(self, node: Node, extra: int) -> None:
        """Give the node ``extra`` load beyond its RPCs in flight (a whole number >= 0)."""
        if extra == node.extra:
            return
        old = self._level(node)
        node.extra = extra
        if not node.in_picker:
            return
        new = self._level(node)
        bucket = self._buckets[old]
        bucket.remove(node)
        self._bucket(new).add(node)
        if new < self._lowest:
            self._lowest = new
        elif old == self._lowest and bucket.size == 0:
            self._lowest = self._next_occupied(old)

    def pick(self, cost: int = 1000) -> Node | None:
        """The eligible node with the lowest load, now counting one more RPC.

        Every RPC costs one here (``cost`` is for the weighted picker's sake).
        """
        if not self.size:
            return None
        lowest = self._lowest
        buckets = self._buckets
        bucket = buckets[lowest]
        node = bucket.take()
        node.in_flight += 1
        level = lowest + 1
        # The hot path, so the bucket is looked up inline while it exists.
        (buckets[level] if level < len(buckets) else self._bucket(level)).add_picked(node)
        if bucket.size == 0:
            # The node just moved to lowest + 1, so that bucket is occupied.
            self._lowest = level
        return node

    def release(self, node: Node, cost: int = 1000) -> None:
        """Count one RPC of this node as ended; counts never go below zero."""
        count = node.in_flight
        if count <= 0:
            raise RuntimeError("released more RPCs than were picked")
        node.in_flight = count - 1
        if node.in_picker:
            level = count - 1 + node.extra
            buckets = self._buckets
            buckets[level + 1].remove(node)
            buckets[level].add(node)
            if level < self._lowest:
                self._lowest = level

    def set_weight(self, node: Node, weight: float) -> None:
        """Record the node's weight; with this picker every weight is equal (see Picker)."""
        node.weight = weight

    def cost(self, node: Node) -> float:
        """The order this picker keeps: a node of lower cost is picked first."""
        return self._level(node)

    def charge(self, node: Node, cost: int = 1000) -> None:
        """Count one more RPC on an eligible node the caller chose (choice.py)."""
        self.remove(node)
        node.in_flight += 1
        self.add(node)

    @property
    def lowest(self) -> int:
        """The lowest load of an eligible node (while some node is eligible)."""
        return self._lowest

    def front(self) -> tuple[int, Node, int]:
        """The lowest load, the node the next pick takes, and how many are tied there.

        Only while some node is eligible.
        """
        bucket = self._buckets[self._lowest]
        return self._lowest, bucket.first(), bucket.size

    def check_invariants(self, eligible: Sequence[Node] | None = None) -> None:
        """Assert the bucket structure is consistent (for tests).

        Given the nodes that should be eligible, also assert that each sits in
        the bucket of its load and that the lowest bucket is their minimum.
        """
        total = sum(bucket.size for bucket in self._buckets)
        assert total == self.size, (total, self.size)
        if self.size:
            assert self._buckets[self._lowest].size > 0, "lowest bucket is empty"
            assert all(bucket.size == 0 for bucket in self._buckets[: self._lowest])
        if eligible is None:
            return
        assert self.size == len(eligible), (self.size, len(eligible))
        for level, bucket in enumerate(self._buckets):
            members = [node for node in eligible if self._level(node) == level]
            assert bucket.size == len(members), (level, bucket.size, members)
        for node in eligible:
            assert node.in_picker and node.in_flight >= 0 and node.extra >= 0, node
        if eligible:
            assert self._lowest == min(self._level(node) for node in eligible)
