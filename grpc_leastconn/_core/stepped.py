"""Stepped picker: the one cost for weights of small whole ratios, still O(1).

Real fleets mix a few sizes (1:2:4 machines, a canary at 0.1). For such
weights ``(load + 1) / weight`` is, up to one common factor, a whole
number: with weights ``a_i / b_i`` in lowest terms and ``M`` the least
common multiple of the ``a_i``, a backend's cost times ``M`` is
``(load + 1) * step`` with ``step = M * b_i / a_i``. So the bucket picker
(picker.py) serves unchanged but for the arithmetic: buckets indexed by that
whole cost, a pick moving its backend ``step`` buckets up, a release
``step`` down. Equal costs share a bucket, so ties follow the tie-break
rule exactly as with equal weights, and a pick or release still touches one
backend. When the lowest bucket empties, the next occupied one is at most
the largest step away. weights.py decides when steps are small enough
(``MAX_STEP``); other weights use the weighted picker (weighted.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from .picker import LeastConnPicker, Node

# Steps up to this keep the walk to the next occupied bucket short (and
# the bucket list within a few thousand entries).
MAX_STEP: Final = 64


class SteppedPicker(LeastConnPicker):
    """Exact weighted least-load choice for weights of small whole ratios, in O(1)."""

    def _level(self, node: Node) -> int:
        return (node.in_flight + node.extra + 1) * node.step

    def pick(self, cost: int = 1000) -> Node | None:
        """The eligible node of lowest cost, now counting one more RPC."""
        if not self.size:
            return None
        lowest = self._lowest
        bucket = self._buckets[lowest]
        node = bucket.take()
        node.in_flight += 1
        self._bucket(lowest + node.step).add_picked(node)
        if bucket.size == 0:
            self._lowest = self._next_occupied(lowest + 1)
        return node

    def release(self, node: Node, cost: int = 1000) -> None:
        """Count one RPC of this node as ended; counts never go below zero."""
        count = node.in_flight
        if count <= 0:
            raise RuntimeError("released more RPCs than were picked")
        if node.in_picker:
            level = self._level(node)
            node.in_flight = count - 1
            buckets = self._buckets
            buckets[level].remove(node)
            level -= node.step
            buckets[level].add(node)
            if level < self._lowest:
                self._lowest = level
        else:
            node.in_flight = count - 1

    def set_weight(self, node: Node, weight: float) -> None:
        raise NotImplementedError("stepped weights are static (slow start uses weighted.py)")

    def check_invariants(self, eligible: Sequence[Node] | None = None) -> None:
        """Assert the bucket structure is consistent (for tests)."""
        super().check_invariants(eligible)
        for node in eligible or ():
            assert 1 <= node.step <= MAX_STEP, node
