"""Cost of one pick + release in grpc_leastconn's balancer, from 4 to 10,000 backends.

No network: the Balancer is driven directly (every backend READY, health checking
off), for each tie_break, in two patterns:

  immediate  pick, then release it at once: every backend idle, all of them tied
  steady     64 RPCs in flight, held in a ring; each step releases the oldest and
             picks a new one (with 4 backends they hold ~16 each, with 10,000 at
             most 1)

With weights (cost = (load + 1) / weight), two fleets: weights drawn at
random from a few machine sizes (0.5, 1, 2, 3, 4: whole ratios, so the
stepped picker serves, O(1)), and arbitrary weights, each backend its own
(the heap of the weighted picker, O(log n)).

As a contrast, a naive O(n) least-connection pick over a list of counts
(``counts.index(min(counts))``, the fastest full scan in pure Python) runs the
same patterns. Each cell is timed over a batch of operations with
time.perf_counter_ns and the garbage collector paused (as timeit does); cells
are interleaved, in an order rotated each repeat, and each reported figure is a
median over repeats. The ratio cost(10,000)/cost(4) is the median of the
per-repeat ratios, so both sides of each ratio saw the same machine load.
Costs are net of the bare loop (``for _ in range(n): pass``).

Run:  python bench/pick_scaling.py [--repeats 15] [--batch-ms 40] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections.abc import Callable
from typing import Any, Protocol

from _common import print_machine, print_summary, seams, setup_paths, table

setup_paths()

import grpc  # noqa: E402

SEAMS = seams()
Address, Balancer, TIE_BREAKS = SEAMS.Address, SEAMS.Balancer, SEAMS.TIE_BREAKS

SIZES = (4, 100, 1_000, 10_000)
IN_FLIGHT = 64
TARGET_RATIO = 1.5
# Weighted picks at 10,000 backends: at most twice their cost at 4, and at
# most twice the equal-weight pick at 4.
WEIGHTED_TARGET = 2.0
PATTERNS = ("immediate", "steady")


class Pickable(Protocol):
    def pick(self) -> Any: ...

    def release(self, backend: Any) -> Any: ...


# Weights per backend: drawn at random from a few machine sizes (the usual
# fleet), or arbitrary numbers (each backend its own weight).
SIZES_MENU = (0.5, 1.0, 2.0, 3.0, 4.0)


def leastconn(n: int, tie_break: str, weights: str | None = None) -> Balancer[None]:
    """A balancer over ``n`` READY backends; ``weights``: None, "random sizes" or "arbitrary"."""
    rng = random.Random(1)
    addresses = [Address(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 443) for i in range(n)]
    weight = {
        address: rng.uniform(0.5, 4.0) if weights == "arbitrary" else rng.choice(SIZES_MENU)
        for address in addresses
    }
    # As the channel does: steps for weights of small whole ratios (machine
    # sizes), the heap for any others (arbitrary).
    steps = SEAMS.steps_for(set(weight.values()))
    balancer: Balancer[None] = Balancer(
        "bench",
        tie_break=tie_break,
        rng=random.Random(1),
        health_checking=False,
        weighted=weights is not None,
        weight_of=weight.__getitem__,
        step_of=None if steps is None else (lambda address: steps[weight[address]]),
    )
    for backend in balancer.set_addresses(addresses).added:
        balancer.set_connectivity(backend, grpc.ChannelConnectivity.READY)
    assert balancer.has_eligible
    return balancer


class NaiveScan:
    """Least connection by scanning every count on each pick: O(n)."""

    def __init__(self, n: int) -> None:
        self.counts = [0] * n

    def pick(self) -> int:
        counts = self.counts
        i = counts.index(min(counts))
        counts[i] += 1
        return i

    def release(self, i: int) -> None:
        self.counts[i] -= 1


class Cell:
    """One (implementation, size, pattern): its state persists across batches."""

    def __init__(self, impl: str, n: int, pattern: str, make: Callable[[], Pickable]) -> None:
        self.impl, self.n, self.pattern = impl, n, pattern
        self.target = make()
        self.ring = [self.target.pick() for _ in range(IN_FLIGHT)] if pattern == "steady" else []
        self.ops = 0
        self.samples: list[float] = []

    def run(self, ops: int) -> int:
        """Nanoseconds for ``ops`` operations (one operation = one pick + one release)."""
        pick, release = self.target.pick, self.target.release
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            if self.pattern == "immediate":
                loop = range(ops)
                start = time.perf_counter_ns()
                for _ in loop:
                    release(pick())
                return time.perf_counter_ns() - start
            ring = self.ring
            # Slots in ring order: the oldest pick is always the next slot.
            slots = list(range(IN_FLIGHT)) * (ops // IN_FLIGHT)
            start = time.perf_counter_ns()
            for j in slots:
                release(ring[j])
                ring[j] = pick()
            return time.perf_counter_ns() - start
        finally:
            if gc_was_enabled:
                gc.enable()


def bare_loop_ns(ops: int) -> float:
    loop = range(ops)
    start = time.perf_counter_ns()
    for _ in loop:
        pass
    return (time.perf_counter_ns() - start) / ops


def calibrate(cell: Cell, batch_s: float) -> int:
    ops = IN_FLIGHT
    while True:
        elapsed = cell.run(ops) / 1e9
        if elapsed >= batch_s / 4 or ops >= 1 << 24:
            wanted = int(ops * batch_s / max(elapsed, 1e-9))
            return max(IN_FLIGHT, wanted // IN_FLIGHT * IN_FLIGHT)
        ops *= 4


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15, help="timed batches per cell (default 15)")
    ap.add_argument("--batch-ms", type=float, default=40.0, help="length of one batch")
    ap.add_argument("--quick", action="store_true", help="short smoke run")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.batch_ms = 3, 5.0
    if args.repeats < 1 or args.batch_ms <= 0:
        ap.error("need --repeats >= 1 and --batch-ms > 0")
    info = print_machine("pick_scaling: ns per pick + release, by number of backends")

    impls: dict[str, Callable[[int], Pickable]] = {
        f"leastconn {tb}": (lambda n, tb=tb: leastconn(n, tb)) for tb in TIE_BREAKS
    }
    for weights in ("random sizes", "arbitrary"):
        impls[f"weighted youngest ({weights})"] = lambda n, w=weights: leastconn(n, "youngest", w)
    impls["naive scan"] = NaiveScan
    cells = [
        Cell(impl, n, pattern, lambda make=make, n=n: make(n))
        for impl, make in impls.items()
        for pattern in PATTERNS
        for n in SIZES
    ]
    for cell in cells:
        cell.ops = calibrate(cell, args.batch_ms / 1000)

    loop_ns: list[float] = []
    for rep in range(args.repeats):
        shift = rep * len(cells) // args.repeats
        for cell in cells[shift:] + cells[:shift]:
            cell.samples.append(cell.run(cell.ops) / cell.ops)
        loop_ns.append(bare_loop_ns(1_000_000))
    loop = statistics.median(loop_ns)

    def net(cell: Cell) -> list[float]:
        return [max(s - loop, 0.0) for s in cell.samples]

    by_key = {(c.impl, c.pattern, c.n): c for c in cells}
    summary: dict[str, Any] = {}
    worst_ratio = 0.0
    worst_weighted = 0.0
    weighted_vs_equal = 0.0
    for pattern in PATTERNS:
        equal_at_4 = statistics.median(net(by_key["leastconn youngest", pattern, SIZES[0]]))
        rows = []
        for impl in impls:
            costs = [statistics.median(net(by_key[impl, pattern, n])) for n in SIZES]
            small, big = net(by_key[impl, pattern, SIZES[0]]), net(by_key[impl, pattern, SIZES[-1]])
            ratio = statistics.median(b / s for b, s in zip(big, small, strict=True))
            if impl.startswith("leastconn"):
                worst_ratio = max(worst_ratio, ratio)
            elif impl == "weighted youngest (random sizes)":
                # The target's case; arbitrary weights are reported, O(log n).
                worst_weighted = max(worst_weighted, ratio)
                weighted_vs_equal = max(weighted_vs_equal, costs[-1] / equal_at_4)
            rows.append([impl, *(f"{c:,.0f}" for c in costs), f"{ratio:.2f}"])
            summary.setdefault(pattern, {})[impl] = {
                "ns_per_op": {str(n): round(c, 1) for n, c in zip(SIZES, costs, strict=True)},
                "ratio_10000_4": round(ratio, 3),
            }
        title = {
            "immediate": "pick then release at once",
            "steady": f"{IN_FLIGHT} in flight, release oldest + pick",
        }[pattern]
        print(f"\n{pattern}: {title}; ns per pick + release (median of {args.repeats})")
        print(table(["implementation", *(f"n={n:,}" for n in SIZES), "10,000 / 4"], rows))

    met = worst_ratio <= TARGET_RATIO
    weighted_met = max(worst_weighted, weighted_vs_equal) <= WEIGHTED_TARGET
    print(f"\nbare loop: {loop:.1f} ns per iteration, subtracted above")
    print(
        f"worst leastconn ratio cost(10,000)/cost(4): {worst_ratio:.2f}; "
        f"target <= {TARGET_RATIO}: {'met' if met else 'MISSED'}"
    )
    print(
        f"weighted, random sizes {SIZES_MENU}: worst cost(10,000)/cost(4) {worst_weighted:.2f}, "
        f"worst cost(10,000) / equal-weight cost(4) {weighted_vs_equal:.2f}; "
        f"target <= {WEIGHTED_TARGET} for both: {'met' if weighted_met else 'MISSED'}"
    )
    print_summary(
        {
            "bench": "pick_scaling",
            "quick": args.quick,
            "repeats": args.repeats,
            "in_flight": IN_FLIGHT,
            "loop_ns": round(loop, 1),
            "results": summary,
            "worst_leastconn_ratio": round(worst_ratio, 3),
            "target_ratio": TARGET_RATIO,
            "target_met": met,
            "worst_weighted_ratio": round(worst_weighted, 3),
            "worst_weighted_vs_equal_at_4": round(weighted_vs_equal, 3),
            "weighted_target": WEIGHTED_TARGET,
            "weighted_target_met": weighted_met,
            "load_avg": info["load_avg"],
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
