"""Picker: exact least-connection choice in O(1) per pick and per release.

Eligible backends sit in buckets indexed by their in-flight count, and the
index of the lowest non-empty bucket is tracked. A pick takes a backend from
that bucket and moves it one bucket up; a release moves it one bucket down.
Neither touches any other backend, so the cost does not grow with the number
of backends (a full scan, as in Envoy's FULL_SCAN mode, is O(n) per pick; the
answer is the same).

Counts live on the nodes, not in the picker, so a backend that leaves the
eligible set (unhealthy, draining) keeps counting its in-flight RPCs down and
re-enters at its true count.

Not thread-safe: the balancer's owner serializes calls.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from typing import Final, Literal, Protocol

TieBreak = Literal["round_robin", "random", "youngest"]
TIE_BREAKS: Final = ("round_robin", "random", "youngest")


class Node:
    """A pickable backend. The picker links it into one bucket at a time."""

    __slots__ = ("_next", "_prev", "_slot", "in_flight", "in_picker")

    def __init__(self) -> None:
        self.in_flight = 0
        self.in_picker = False
        self._prev: Node = self
        self._next: Node = self
        self._slot = -1


class _Bucket(Protocol):
    size: int

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

    def add(self, node: Node) -> None:
        """Make a node eligible, at the count it already has."""
        if node.in_picker:
            return
        self._bucket(node.in_flight).add(node)
        node.in_picker = True
        if self.size == 0 or node.in_flight < self._lowest:
            self._lowest = node.in_flight
        self.size += 1

    def remove(self, node: Node) -> None:
        """Make a node ineligible; its count stays on the node."""
        if not node.in_picker:
            return
        bucket = self._buckets[node.in_flight]
        bucket.remove(node)
        node.in_picker = False
        self.size -= 1
        if bucket.size == 0 and node.in_flight == self._lowest and self.size:
            # Rare (membership changes only): walk up to the next occupied
            # bucket, bounded by the highest in-flight count.
            lowest = self._lowest
            while self._buckets[lowest].size == 0:
                lowest += 1
            self._lowest = lowest

    def pick(self) -> Node | None:
        """The eligible node with the fewest in-flight RPCs, now counted +1."""
        if not self.size:
            return None
        lowest = self._lowest
        buckets = self._buckets
        bucket = buckets[lowest]
        node = bucket.take()
        node.in_flight = count = lowest + 1
        # The hot path, so the bucket is looked up inline while it exists.
        (buckets[count] if count < len(buckets) else self._bucket(count)).add_picked(node)
        if bucket.size == 0:
            # The node just moved to lowest + 1, so that bucket is occupied.
            self._lowest = count
        return node

    def release(self, node: Node) -> None:
        """Count one RPC of this node as ended; counts never go below zero."""
        count = node.in_flight
        if count <= 0:
            raise RuntimeError("released more RPCs than were picked")
        node.in_flight = count - 1
        if node.in_picker:
            buckets = self._buckets
            buckets[count].remove(node)
            buckets[count - 1].add(node)
            if count - 1 < self._lowest:
                self._lowest = count - 1

    def check_invariants(self, eligible: Sequence[Node] | None = None) -> None:
        """Assert the bucket structure is consistent (for tests).

        Given the nodes that should be eligible, also assert that each sits in
        the bucket of its count and that the lowest bucket is their minimum.
        """
        total = sum(bucket.size for bucket in self._buckets)
        assert total == self.size, (total, self.size)
        if self.size:
            assert self._buckets[self._lowest].size > 0, "lowest bucket is empty"
            assert all(bucket.size == 0 for bucket in self._buckets[: self._lowest])
        if eligible is None:
            return
        assert self.size == len(eligible), (self.size, len(eligible))
        for count, bucket in enumerate(self._buckets):
            members = [node for node in eligible if node.in_flight == count]
            assert bucket.size == len(members), (count, bucket.size, members)
        assert all(node.in_picker and node.in_flight >= 0 for node in eligible)
        if eligible:
            assert self._lowest == min(node.in_flight for node in eligible)
