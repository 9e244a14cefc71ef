"""Discrete-event study of tie-break rules for exact least-connection balancing.

Seed scenario: 4 backends; 40 server-streaming RPCs opened 100 ms apart on one client, half
lasting 10 s and half 1 s. Pattern A alternates 10,1,10,1,...; pattern B is a seeded shuffle of
the same durations. Every new stream goes to a backend with the fewest live streams; the rules
differ only in which of the tied backends wins. Metric: live streams per backend sampled every
250 ms; spread = max - min, over samples with at least 4 live streams in total.

Run:  python bench/simulate_tiebreak.py [--seeds 20] [--paired-seeds 400]

Output:
  1. per rule x jitter: mean spread (median / worst over --seeds seeds) and worst max spread;
  2. paired difference of mean spread against round_robin over --paired-seeds seeds, +- 2
     standard errors (same seeds => same durations and jitter for every rule);
  3. the same paired difference for other backend counts, as a robustness check.
Rules marked * are not least-connection tie-breaks but reference points.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

# Integer microseconds: with floats, 0.1 * i + 1.0 == 0.1 * (i + 10) holds for some i and not
# others, which would silently decide the end-vs-pick races this study is about.
MS = 1_000
SEC = 1_000_000

N_BACKENDS = 4
N_STREAMS = 40
OPEN_GAP = 100 * MS
LONG = 10 * SEC
SHORT = 1 * SEC
SAMPLE_EVERY = 250 * MS
MIN_TOTAL = 4


class Balancer(Protocol):
    def pick(self, sid: int, now: int) -> int: ...
    def release(self, idx: int, sid: int) -> None: ...
    def counts(self) -> list[int]: ...


# --------------------------------------------------------------------------------------------
# Reference: full scan. Slow but obviously correct for every rule, so the tables measure the
# rules themselves and the bucketed structures further down can be checked against it.


@dataclass
class Backend:
    idx: int
    live: dict[int, int] = field(default_factory=dict)  # stream id -> start time
    entered: int = 0  # sequence number of the last change of live count
    last_pick: int = -1
    last_release: int = -1


class Scan:
    def __init__(
        self, n: int, choose: Choose, rng: random.Random, ends: dict[int, int] | None = None
    ) -> None:
        self.backends = [Backend(i) for i in range(n)]
        self.choose = choose
        self.rng = rng
        self.ends = ends or {}
        self.seq = 0
        self.rr_next = 0

    def pick(self, sid: int, now: int) -> int:
        b = self.choose(self)
        b.live[sid] = now
        self.seq += 1
        b.entered = b.last_pick = self.seq
        return b.idx

    def release(self, idx: int, sid: int) -> None:
        b = self.backends[idx]
        del b.live[sid]
        self.seq += 1
        b.entered = b.last_release = self.seq

    def counts(self) -> list[int]:
        return [len(b.live) for b in self.backends]

    def tied(self) -> list[Backend]:
        low = min(len(b.live) for b in self.backends)
        return [b for b in self.backends if len(b.live) == low]


Choose = Callable[[Scan], Backend]


def prefer(key: Callable[[Backend], float]) -> Choose:
    # Leftover ties go FIFO, so a rule with nothing to say (e.g. all tied backends empty)
    # degrades to rotation rather than to "lowest index", which would bias backend 0.
    def choose(lb: Scan) -> Backend:
        return max(lb.tied(), key=lambda b: (key(b), -b.entered, -b.idx))

    return choose


def _mean_start(b: Backend) -> float:
    # Ages all grow at the same rate, so ordering by mean start time is ordering by mean age,
    # and it never changes while the backend keeps its count: that is what makes it bucketable.
    return statistics.fmean(b.live.values()) if b.live else -math.inf


def _random_tied(lb: Scan) -> Backend:
    return lb.rng.choice(lb.tied())


def _oracle(lb: Scan) -> Backend:
    # Clairvoyant and greedy: only shows how much a tie-break could gain from knowing durations.
    def next_end(b: Backend) -> float:
        return min((lb.ends[s] for s in b.live), default=math.inf)

    return min(lb.tied(), key=lambda b: (next_end(b), b.entered, b.idx))


def _p2c(lb: Scan) -> Backend:
    a, b = lb.rng.sample(lb.backends, 2)
    return b if len(b.live) < len(a.live) else a


def _plain_rr(lb: Scan) -> Backend:
    b = lb.backends[lb.rr_next]
    lb.rr_next = (lb.rr_next + 1) % len(lb.backends)
    return b


# --------------------------------------------------------------------------------------------
# Bucketed structures: backends grouped by live count, plus the current minimum count. A pick
# moves one backend up one bucket and a release moves one down, so the minimum only ever moves
# by one and never needs a search.


class DequeBuckets:
    """O(1) pick and release: each bucket is an insertion-ordered set; the front is picked.

    Where a backend is inserted when it enters a bucket is the whole tie-break rule:
      back on pick and on release   -> FIFO  (== round_robin)
      front on pick and on release  -> LIFO  (== lifo)
      front on pick, back on release -> pick_front: the backend picked most recently is tried
                                        first, and one that just released waits its turn.
    """

    def __init__(self, n: int, pick_to_front: bool, release_to_front: bool) -> None:
        self.pick_to_front = pick_to_front
        self.release_to_front = release_to_front
        self.count = [0] * n
        self.buckets: dict[int, OrderedDict[int, None]] = {0: OrderedDict.fromkeys(range(n))}
        self.low = 0

    def _move(self, idx: int, to: int, front: bool) -> None:
        old = self.buckets[self.count[idx]]
        del old[idx]
        if not old:
            del self.buckets[self.count[idx]]
        bucket = self.buckets.setdefault(to, OrderedDict())
        bucket[idx] = None
        if front:
            bucket.move_to_end(idx, last=False)
        self.count[idx] = to

    def pick(self, sid: int, now: int) -> int:
        idx = next(iter(self.buckets[self.low]))
        self._move(idx, self.low + 1, self.pick_to_front)
        if self.low not in self.buckets:
            self.low += 1
        return idx

    def release(self, idx: int, sid: int) -> None:
        to = self.count[idx] - 1
        self._move(idx, to, self.release_to_front)
        self.low = min(self.low, to)

    def counts(self) -> list[int]:
        return list(self.count)


class HeapBuckets:
    """young_mean in O(log bucket size): per bucket, a max-heap on the sum of start times.

    Within one bucket every backend has the same count, so the sum orders them exactly like the
    mean, and neither changes until the backend leaves the bucket. Entries are invalidated
    lazily by a per-backend version; a heap is compacted when stale entries dominate it.
    """

    def __init__(self, n: int) -> None:
        self.count = [0] * n
        self.start_sum = [0] * n
        self.version = [0] * n
        self.starts: dict[int, int] = {}
        self.heaps: dict[int, list[tuple[int, int, int, int]]] = {
            0: [(0, 0, i, 0) for i in range(n)]
        }
        self.size = {0: n}
        self.low = 0
        self.seq = 0

    def _enter(self, idx: int) -> None:
        c = self.count[idx]
        self.seq += 1
        self.version[idx] += 1
        heap = self.heaps.setdefault(c, [])
        heapq.heappush(heap, (-self.start_sum[idx], self.seq, idx, self.version[idx]))
        self.size[c] = self.size.get(c, 0) + 1
        if len(heap) > 2 * self.size[c] + 8:
            heap[:] = [e for e in heap if e[3] == self.version[e[2]]]
            heapq.heapify(heap)

    def pick(self, sid: int, now: int) -> int:
        heap = self.heaps[self.low]
        while heap[0][3] != self.version[heap[0][2]]:
            heapq.heappop(heap)
        idx = heapq.heappop(heap)[2]
        self.size[self.low] -= 1
        self.starts[sid] = now
        self.start_sum[idx] += now
        self.count[idx] += 1
        self._enter(idx)
        if self.size[self.low] == 0:
            self.low += 1
        return idx

    def release(self, idx: int, sid: int) -> None:
        self.size[self.count[idx]] -= 1
        self.start_sum[idx] -= self.starts.pop(sid)
        self.count[idx] -= 1
        self._enter(idx)
        self.low = min(self.low, self.count[idx])

    def counts(self) -> list[int]:
        return list(self.count)


# --------------------------------------------------------------------------------------------

Factory = Callable[[int, random.Random, dict[int, int]], Balancer]


def scan(choose: Choose) -> Factory:
    return lambda n, rng, ends: Scan(n, choose, rng, ends)


RULES: dict[str, Factory] = {
    "round_robin": scan(prefer(lambda b: 0)),
    "random": scan(_random_tied),
    "lifo": scan(prefer(lambda b: b.entered)),
    "young_pick": scan(prefer(lambda b: b.last_pick)),
    "pick_front": lambda n, rng, ends: DequeBuckets(n, True, False),
    "young_mean": scan(prefer(_mean_start)),
    "old_pick": scan(prefer(lambda b: -b.last_pick)),
    "old_mean": scan(prefer(lambda b: -_mean_start(b))),
    "recent_release": scan(prefer(lambda b: b.last_release)),
    "oracle*": scan(_oracle),
    "plain_rr*": scan(_plain_rr),
    "p2c*": scan(_p2c),
}

# Each bucketed structure must reproduce its reference rule pick for pick.
EQUIVALENT: list[tuple[str, Factory]] = [
    ("round_robin", lambda n, rng, ends: DequeBuckets(n, False, False)),
    ("lifo", lambda n, rng, ends: DequeBuckets(n, True, True)),
    ("young_mean", lambda n, rng, ends: HeapBuckets(n)),
]


@dataclass(frozen=True)
class Jitter:
    name: str
    dur: int  # added to each stream's duration, uniform in [0, dur]
    open: int  # added to each stream's open time, uniform in [0, open]
    ends_first: bool  # order of an end and a pick at exactly the same instant


# Without jitter every short stream ends at the very instant a later stream opens, so the
# outcome hinges on an arbitrary event order: both orders are shown. Duration jitter alone can
# only delay ends, so it always lands the end after the coincident pick (dur-only columns track
# "J0 pick<end"); jittering open times as well makes that race a coin flip, as on a real client.
# The magnitude matters little as long as it stays well under the 100 ms open gap.
JITTERS = [
    Jitter("J0 end<pick", 0, 0, True),
    Jitter("J0 pick<end", 0, 0, False),
    Jitter("dur 5ms", 5 * MS, 0, True),
    Jitter("dur 20ms", 20 * MS, 0, True),
    Jitter("dur+open 5ms", 5 * MS, 5 * MS, True),
    Jitter("dur+open 20ms", 20 * MS, 20 * MS, True),
]


def durations(pattern: str, seed: int) -> list[int]:
    base = [LONG if i % 2 == 0 else SHORT for i in range(N_STREAMS)]
    if pattern == "B":
        random.Random(seed).shuffle(base)
    return base


@dataclass
class Run:
    mean: float
    max: int
    placement: list[int]


def simulate(
    factory: Factory, pattern: str, jitter: Jitter, seed: int, n_backends: int = N_BACKENDS
) -> Run:
    # Independent generators per purpose: for a given seed every rule sees the same durations
    # and the same jitter, so rule-vs-rule differences are paired rather than sampling noise.
    jrng = random.Random(f"jitter/{seed}/{jitter.dur}/{jitter.open}")
    events: list[tuple[int, int, int, int]] = []  # (time, order, kind 0=open 1=end, stream)
    end_order, open_order = (0, 1) if jitter.ends_first else (1, 0)
    ends: dict[int, int] = {}
    for sid, dur in enumerate(durations(pattern, seed)):
        start = sid * OPEN_GAP + jrng.randint(0, jitter.open)
        ends[sid] = start + dur + jrng.randint(0, jitter.dur)
        events.append((start, open_order, 0, sid))
        events.append((ends[sid], end_order, 1, sid))
    events.sort()

    lb = factory(n_backends, random.Random(f"rule/{seed}"), ends)
    where: dict[int, int] = {}
    spreads: list[int] = []
    i = 0
    t = 0
    while t <= events[-1][0]:
        while i < len(events) and events[i][0] <= t:
            when, _, kind, sid = events[i]
            if kind == 0:
                where[sid] = lb.pick(sid, when)
            else:
                lb.release(where[sid], sid)
            i += 1
        counts = lb.counts()
        if sum(counts) >= MIN_TOTAL:
            spreads.append(max(counts) - min(counts))
        t += SAMPLE_EVERY
    return Run(statistics.fmean(spreads), max(spreads), [where[s] for s in range(N_STREAMS)])


def self_check(seeds: range) -> int:
    n = 0
    for name, bucketed in EQUIVALENT:
        for nb in (2, 3, 4, 5, 8):
            for pattern in "AB":
                for j in JITTERS:
                    for s in seeds:
                        ref = simulate(RULES[name], pattern, j, s, nb).placement
                        got = simulate(bucketed, pattern, j, s, nb).placement
                        assert ref == got, (name, nb, pattern, j.name, s)
                        n += 1
    return n


def paired(diffs: list[float]) -> str:
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    return f"{statistics.fmean(diffs):+.3f}±{2 * se:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20, help="seeds for table 1")
    ap.add_argument("--paired-seeds", type=int, default=400, help="seeds for tables 2 and 3")
    args = ap.parse_args()
    if args.seeds < 1 or args.paired_seeds < 4:
        ap.error("need --seeds >= 1 and --paired-seeds >= 4")
    t0 = time.perf_counter()
    n_seeds = max(args.seeds, args.paired_seeds)
    seeds = range(1, n_seeds + 1)

    checked = self_check(range(1, 11))
    print(f"bucketed FIFO / LIFO / young_mean structures match the full scan on {checked} runs")

    runs = {
        (name, p, j.name): [simulate(f, p, j, s) for s in seeds]
        for name, f in RULES.items()
        for p in "AB"
        for j in JITTERS
    }
    w = 15
    head = f"{'rule':<15}" + "".join(f"{j.name:>{w}}" for j in JITTERS)

    for p in "AB":
        print(f"\n[1] pattern {p}: mean spread median/worst over {args.seeds} seeds, worst max")
        print(head)
        for name in RULES:
            cells = []
            for j in JITTERS:
                rs = runs[name, p, j.name][: args.seeds]
                means = [r.mean for r in rs]
                mid = f"{statistics.median(means):.2f}/{max(means):.2f}"
                cells.append(f"{mid} {max(r.max for r in rs):>2}")
            print(f"{name:<15}" + "".join(f"{c:>{w}}" for c in cells))

    for p in "AB":
        print(
            f"\n[2] pattern {p}: mean spread minus round_robin's, paired over "
            f"{args.paired_seeds} seeds (+- 2 SE); negative = better"
        )
        print(head)
        base = {j.name: runs["round_robin", p, j.name][: args.paired_seeds] for j in JITTERS}
        row = "".join(f"{statistics.fmean(r.mean for r in base[j.name]):>{w}.3f}" for j in JITTERS)
        print(f"{'(rr absolute)':<15}{row}")
        for name in RULES:
            if name == "round_robin":
                continue
            cells = []
            for j in JITTERS:
                rs = runs[name, p, j.name][: args.paired_seeds]
                cells.append(
                    paired([r.mean - b.mean for r, b in zip(rs, base[j.name], strict=True)])
                )
            print(f"{name:<15}" + "".join(f"{c:>{w}}" for c in cells))

    j = JITTERS[-1]
    sizes = (2, 3, 4, 5, 6, 8)
    robust = ["random", "lifo", "young_pick", "pick_front", "young_mean", "recent_release"]
    rseeds = range(1, args.paired_seeds // 2 + 1)
    for p in "AB":
        print(
            f"\n[3] pattern {p}, {j.name}, by backend count: minus round_robin, paired over "
            f"{len(rseeds)} seeds"
        )
        print(f"{'backends':<15}" + "".join(f"{nb:>{w}}" for nb in sizes))
        base_by = {
            nb: [simulate(RULES["round_robin"], p, j, s, nb) for s in rseeds] for nb in sizes
        }
        row = "".join(f"{statistics.fmean(r.mean for r in base_by[nb]):>{w}.3f}" for nb in sizes)
        print(f"{'(rr absolute)':<15}{row}")
        for name in robust:
            cells = []
            for nb in sizes:
                rs = [simulate(RULES[name], p, j, s, nb) for s in rseeds]
                cells.append(
                    paired([r.mean - b.mean for r, b in zip(rs, base_by[nb], strict=True)])
                )
            print(f"{name:<15}" + "".join(f"{c:>{w}}" for c in cells))

    print(f"\n({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
