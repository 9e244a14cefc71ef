"""How evenly each policy spreads long-lived streams: the seed scenario, end to end.

Four in-process backends (examples/server.py) on 127.0.0.1. On ONE client channel,
40 ``Join`` server streams are opened 0.1 s apart; half last 10 s and half 1 s:

  alternating  10, 1, 10, 1, ... s
  shuffled     the same 20 + 20 durations shuffled with random.Random(seed + run),
               so run k of every policy sees the same order

Each stream is read to its end by its own thread, so it ends at its natural time.
From the first open until every stream has ended, the live streams of each backend
are read on the server side (``servicer.live_streams``) every 0.25 s. Per sample,
spread = max - min over the four backends; only samples with at least 4 live
streams in total count. A run reports its mean and max spread; a (policy, pattern)
reports the median over runs of the mean spread and the worst max spread.
The mean is also split at the last open: while streams are still being opened the
balancer can correct the spread; afterwards streams only end, and the spread
depends on where the long ones were put, which no policy can change any more.
"floor" is the mean spread of a perfect placement: 1 whenever the total is not a
multiple of four, else 0.

Targets for the grpc_leastconn policies: median mean spread <= 1.0 and worst
max spread <= 3; for the seed scenario (alternating) with the default tie-break
(youngest), median mean spread <= 0.7.

Policies, all measured in the same invocation, interleaved run by run:

  leastconn_round_robin  grpc_leastconn.insecure_channel(tie_break="round_robin")
  leastconn_youngest     ... tie_break="youngest"
  leastconn_random       ... tie_break="random"
  grpc_round_robin       grpc.insecure_channel("ipv4:a,b,c,d") with round_robin
  grpc_pick_first        the same with pick_first

Run:  python bench/balance.py [--runs 3] [--policies a,b] [--patterns alternating] [--quick]
A full run takes about 15 s per (policy, pattern, run): 2.5 minutes per run of all.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from _common import parse_list, print_machine, print_summary, setup_paths, table

setup_paths()

# C-core logs the servers' GOAWAY at INFO when the backends stop; keep the output readable.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import conference_pb2  # noqa: E402
import conference_pb2_grpc  # noqa: E402
import grpc  # noqa: E402
import server as example_server  # noqa: E402

import grpc_leastconn  # noqa: E402

N_BACKENDS = 4
N_STREAMS = 40
LONG_MS = 10_000
SHORT_MS = 1_000
OPEN_GAP_S = 0.1
SAMPLE_EVERY_S = 0.25
FRAME_INTERVAL_MS = 100
MIN_TOTAL = 4
TARGET_MEAN = 1.0
TARGET_MAX = 3
# The seed scenario with the default tie-break is held to a tighter bound.
TARGET_DEFAULT_MEAN = 0.7
DEFAULT_POLICY = "leastconn_youngest"
SEED_PATTERN = "alternating"

LEASTCONN = {
    "leastconn_round_robin": "round_robin",
    "leastconn_youngest": "youngest",
    "leastconn_random": "random",
}
GRPC = {"grpc_round_robin": "round_robin", "grpc_pick_first": "pick_first"}
POLICIES = (*LEASTCONN, *GRPC)
PATTERNS = ("alternating", "shuffled")
# Times (unscaled seconds after the first open) at which one leastconn run
# prints its connection table next to the servers' own counts.
TABLE_AT_S = (1.0, 4.0, 8.0, 12.0)


def durations_ms(pattern: str, seed: int) -> list[int]:
    base = [LONG_MS if i % 2 == 0 else SHORT_MS for i in range(N_STREAMS)]
    if pattern == "shuffled":
        random.Random(seed).shuffle(base)
    return base


# -- channels -----------------------------------------------------------------------


def make_channel(policy: str, addresses: list[str], seed: int) -> grpc.Channel:
    if policy in LEASTCONN:
        return grpc_leastconn.insecure_channel(
            addresses, tie_break=LEASTCONN[policy], rng=random.Random(seed)
        )
    config = json.dumps({"loadBalancingConfig": [{GRPC[policy]: {}}]})
    return grpc.insecure_channel(
        "ipv4:" + ",".join(addresses), options=[("grpc.service_config", config)]
    )


def wait_until_balanced(policy: str, channel: grpc.Channel, names: set[str]) -> None:
    """Return once every backend the policy can use would take the next stream."""
    deadline = time.monotonic() + 15
    grpc.channel_ready_future(channel).result(timeout=15)
    if policy in LEASTCONN:
        # Only READY, healthy backends are eligible; connecting ones would
        # simply be skipped by the first picks and skew the start.
        while not all(state.eligible for state in channel.backends()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"backends not all eligible: {channel.backends()}")
            time.sleep(0.01)
    elif policy == "grpc_round_robin":
        # grpcio reports READY as soon as one connection is; round_robin only
        # rotates over the connected ones.
        ping = conference_pb2_grpc.ConferenceStub(channel).Ping
        seen: set[str] = set()
        while seen != names:
            if time.monotonic() > deadline:
                raise RuntimeError(f"round_robin reached only {sorted(seen)}")
            seen.add(ping(conference_pb2.PingRequest(), timeout=5).backend)


# -- one run ------------------------------------------------------------------------


@dataclass
class Stream:
    duration_ms: int
    backend: str | None = None
    error: str | None = None


@dataclass
class Run:
    policy: str
    pattern: str
    seed: int
    spreads: list[int]
    # Live streams in total at each of those samples.
    totals: list[int]
    # Of those spreads, how many were sampled before the last stream opened.
    while_opening: int
    samples: int
    streams: list[Stream]
    elapsed_s: float
    tables: list[tuple[float, dict[str, int], dict[str, int]]] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.spreads) if self.spreads else float("nan")

    @property
    def max(self) -> int:
        return max(self.spreads, default=0)

    @property
    def floor(self) -> float:
        """The lowest mean spread any placement could reach with these totals.

        Four backends cannot be level when the total is not a multiple of four.
        """
        if not self.totals:
            return float("nan")
        return statistics.fmean(1 if t % N_BACKENDS else 0 for t in self.totals)

    @property
    def mean_opening(self) -> float:
        head = self.spreads[: self.while_opening]
        return statistics.fmean(head) if head else float("nan")

    @property
    def mean_draining(self) -> float:
        tail = self.spreads[self.while_opening :]
        return statistics.fmean(tail) if tail else float("nan")

    @property
    def errors(self) -> list[str]:
        return [s.error for s in self.streams if s.error]


@dataclass
class Plan:
    """One run's schedule, scaled: what every client front end opens, and when."""

    streams: list[Stream]
    gap_s: float
    every_s: float
    frame_ms: int
    # Sample indices at which the connection table is printed.
    table_at: set[int]
    limit_s: float

    def request(self, index: int) -> Any:
        return conference_pb2.JoinRequest(
            session_id=str(index),
            duration_ms=self.streams[index].duration_ms,
            frame_interval_ms=self.frame_ms,
        )


def make_plan(pattern: str, seed: int, scale: float, show_table: bool) -> Plan:
    plan = durations_ms(pattern, seed)
    every = SAMPLE_EVERY_S * scale
    return Plan(
        streams=[Stream(int(d * scale)) for d in plan],
        gap_s=OPEN_GAP_S * scale,
        every_s=every,
        frame_ms=max(10, int(FRAME_INTERVAL_MS * scale)),
        table_at={round(t * scale / every) for t in TABLE_AT_S} if show_table else set(),
        limit_s=(max(plan) / 1000 + N_STREAMS * OPEN_GAP_S) * scale + 30,
    )


def timeline(plan: Plan, t0: float) -> Iterator[tuple[float, int | None, int | None]]:
    """(when, stream to open, sample to take): every open, then samples without end.

    Ties go to the sample: it sees the state just before the open.
    """
    opened = k = 0
    while True:
        next_open = t0 + opened * plan.gap_s if opened < N_STREAMS else float("inf")
        next_sample = t0 + k * plan.every_s
        if next_sample <= next_open:
            yield next_sample, None, k
            k += 1
        else:
            yield next_open, opened, None
            opened += 1


class Sampler:
    """The server-side live streams of each backend, turned into spreads."""

    def __init__(
        self, plan: Plan, backends: list[Any], client_table: Callable[[], dict[str, int]] | None
    ) -> None:
        self._plan = plan
        self._backends = backends
        self._client_table = client_table
        self.spreads: list[int] = []
        self.totals: list[int] = []
        self.while_opening = 0
        self.samples = 0
        self.tables: list[tuple[float, dict[str, int], dict[str, int]]] = []

    def sample(self, k: int, opened: int) -> None:
        live = [b.servicer.live_streams for b in self._backends]
        self.samples += 1
        if sum(live) >= MIN_TOTAL:
            self.spreads.append(max(live) - min(live))
            self.totals.append(sum(live))
            if opened < N_STREAMS:
                self.while_opening = len(self.spreads)
        if k in self._plan.table_at and self._client_table is not None:
            server = dict(zip((b.address for b in self._backends), live, strict=True))
            self.tables.append((k * self._plan.every_s, server, self._client_table()))

    def run(self, policy: str, pattern: str, seed: int, elapsed_s: float) -> Run:
        return Run(
            policy,
            pattern,
            seed,
            self.spreads,
            self.totals,
            self.while_opening,
            self.samples,
            self._plan.streams,
            elapsed_s,
            self.tables,
        )


def check_idle(backends: list[Any]) -> None:
    for backend in backends:
        # The next run starts from empty backends.
        if not backend.servicer.wait_until(lambda s: s.live == 0, timeout=15):
            raise RuntimeError(f"{backend.address} still has {backend.servicer.live} live")


def consume(call: Any, stream: Stream, done: threading.Semaphore) -> None:
    try:
        for frame in call:
            if stream.backend is None:
                stream.backend = frame.backend
    except grpc.RpcError as exc:
        stream.error = f"{exc.code().name}: {exc.details()}"
    finally:
        done.release()


def run_once(
    policy: str,
    pattern: str,
    seed: int,
    backends: list[Any],
    scale: float,
    show_table: bool,
) -> Run:
    addresses = [b.address for b in backends]
    names = [b.servicer.name for b in backends]
    plan = make_plan(pattern, seed, scale, show_table)
    channel = make_channel(policy, addresses, seed)
    calls: list[Any] = []
    threads: list[threading.Thread] = []
    done = threading.Semaphore(0)
    finished = 0
    sampler = Sampler(plan, backends, getattr(channel, "connection_table", None))
    try:
        wait_until_balanced(policy, channel, set(names))
        join = conference_pb2_grpc.ConferenceStub(channel).Join
        t0 = time.monotonic() + 0.05
        for when, index, k in timeline(plan, t0):
            time.sleep(max(0.0, when - time.monotonic()))
            if index is not None:
                call = join(plan.request(index), timeout=plan.limit_s)
                calls.append(call)
                thread = threading.Thread(
                    target=consume, args=(call, plan.streams[index], done), daemon=True
                )
                thread.start()
                threads.append(thread)
                continue
            assert k is not None
            sampler.sample(k, len(calls))
            while done.acquire(blocking=False):
                finished += 1
            if finished == N_STREAMS:
                break
            if time.monotonic() - t0 > plan.limit_s:
                raise RuntimeError(f"streams still open after {plan.limit_s:.0f} s")
        elapsed = time.monotonic() - t0
    finally:
        for call in calls:
            call.cancel()
        for thread in threads:
            thread.join(5)
        channel.close()
        check_idle(backends)
    return sampler.run(policy, pattern, seed, elapsed)


# -- reporting ----------------------------------------------------------------------


def placement(run: Run, names: list[str], duration_ms: int) -> list[int]:
    picked = [s.backend for s in run.streams if s.duration_ms == duration_ms]
    return [picked.count(name) for name in names]


def print_run(run: Run, index: int, runs: int, names: list[str], scale: float) -> None:
    longs = placement(run, names, int(LONG_MS * scale))
    print(
        f"   run {index + 1}/{runs} {run.pattern:<11} {run.policy:<22} "
        f"mean spread {run.mean:4.2f} (opening {run.mean_opening:4.2f}, "
        f"draining {run.mean_draining:4.2f})  max {run.max:2d}  "
        f"long streams per backend {longs}"
        + (f"  ERRORS {len(run.errors)}: {run.errors[0]}" if run.errors else ""),
        flush=True,
    )
    if run.tables:
        print_tables(run)


def print_tables(run: Run) -> None:
    print(f"   connection table of one {run.policy} run ({run.pattern}), client vs server:")
    for t, server_live, client_table in run.tables:
        print(f"     t={t:5.2f}s client {json.dumps(client_table)}")
        print(f"             server {json.dumps(server_live)}")


def report(
    runs: list[Run], policies: list[str], patterns: list[str], graded: Iterable[str]
) -> tuple[dict[str, dict[str, Any]], bool]:
    """Print the results table; per policy and pattern the figures, and whether all met.

    Only the ``graded`` policies are held to the targets; the others are references.
    """
    graded = set(graded)
    rows = []
    results: dict[str, dict[str, Any]] = {}
    all_met = True
    for policy in policies:
        for pattern in patterns:
            mine = [x for x in runs if x.policy == policy and x.pattern == pattern]
            med = statistics.median(x.mean for x in mine)
            worst = max(x.max for x in mine)
            errors = sum(len(x.errors) for x in mine)
            if policy in graded:
                met = med <= TARGET_MEAN and worst <= TARGET_MAX
                all_met = all_met and met
                verdict = "met" if met else "MISSED"
            else:
                verdict = "-"
            rows.append(
                [
                    policy,
                    pattern,
                    " ".join(f"{x.mean:.2f}" for x in mine),
                    f"{med:.2f}",
                    f"{statistics.median(x.floor for x in mine):.2f}",
                    f"{statistics.median(x.mean_opening for x in mine):.2f}",
                    f"{statistics.median(x.mean_draining for x in mine):.2f}",
                    worst,
                    statistics.median(x.samples for x in mine),
                    errors,
                    verdict,
                ]
            )
            results.setdefault(policy, {})[pattern] = {
                "mean_spread_per_run": [round(x.mean, 3) for x in mine],
                "median_mean_spread": round(med, 3),
                "median_floor": round(statistics.median(x.floor for x in mine), 3),
                "median_mean_spread_opening": round(
                    statistics.median(x.mean_opening for x in mine), 3
                ),
                "median_mean_spread_draining": round(
                    statistics.median(x.mean_draining for x in mine), 3
                ),
                "worst_max_spread": worst,
                "errors": errors,
            }
    print()
    print(
        table(
            [
                "policy",
                "pattern",
                "mean spread per run",
                "median",
                "floor",
                "opening",
                "draining",
                "worst max",
                "samples",
                "errors",
                f"target <= {TARGET_MEAN:g} / <= {TARGET_MAX}",
            ],
            rows,
        )
    )
    seed = results.get(DEFAULT_POLICY, {}).get(SEED_PATTERN)
    if seed is not None:
        met = (
            seed["median_mean_spread"] <= TARGET_DEFAULT_MEAN
            and seed["worst_max_spread"] <= TARGET_MAX
        )
        all_met = all_met and met
        print(
            f"default tie-break ({DEFAULT_POLICY}), {SEED_PATTERN}: median mean spread "
            f"{seed['median_mean_spread']:.2f} <= {TARGET_DEFAULT_MEAN:g}, worst "
            f"{seed['worst_max_spread']} <= {TARGET_MAX}: {'met' if met else 'MISSED'}"
        )
    return results, all_met


def parse_args(description: str, policies: tuple[str, ...], default: tuple[str, ...]) -> Any:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--runs", type=int, default=3, help="runs per (policy, pattern) (default 3)")
    ap.add_argument(
        "--policies",
        type=lambda v: parse_list(v, policies, "policy"),
        default=list(default),
        help=f"comma-separated subset of {','.join(policies)}",
    )
    ap.add_argument(
        "--patterns",
        type=lambda v: parse_list(v, PATTERNS, "pattern"),
        default=list(PATTERNS),
        help=f"comma-separated subset of {','.join(PATTERNS)}",
    )
    ap.add_argument("--seed", type=int, default=1, help="shuffle seed of run 0 (default 1)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every duration and gap")
    ap.add_argument("--quick", action="store_true", help="one run at --scale 0.2")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.scale = 1, 0.2
    if args.runs < 1 or not 0 < args.scale <= 10:
        ap.error("need --runs >= 1 and 0 < --scale <= 10")
    return args


def print_plan(args: Any) -> None:
    n_runs = args.runs * len(args.policies) * len(args.patterns)
    per_run = (LONG_MS / 1000 + N_STREAMS * OPEN_GAP_S) * args.scale + 1
    print(f"   {n_runs} runs of ~{per_run:.0f} s: ~{n_runs * per_run / 60:.1f} min", flush=True)


def summary(args: Any, results: dict[str, Any], all_met: bool, load_avg: list[float]) -> Any:
    return {
        "quick": args.quick,
        "runs": args.runs,
        "scale": args.scale,
        "seed": args.seed,
        "results": results,
        "target_median_mean_spread": TARGET_MEAN,
        "target_worst_max_spread": TARGET_MAX,
        "leastconn_targets_met": all_met,
        "load_avg": load_avg,
    }


def main() -> int:
    args = parse_args(__doc__.splitlines()[0], POLICIES, POLICIES)
    info = print_machine("balance: spread of live streams over 4 backends, one client channel")
    print_plan(args)
    backends = [example_server.start_backend("127.0.0.1", 0) for _ in range(N_BACKENDS)]
    names = [b.servicer.name for b in backends]
    print(f"   backends: {', '.join(names)}")
    runs: list[Run] = []
    shown_table = False
    try:
        for r in range(args.runs):
            for pattern in args.patterns:
                for policy in args.policies:
                    show = not shown_table and policy in LEASTCONN
                    run = run_once(policy, pattern, args.seed + r, backends, args.scale, show)
                    shown_table = shown_table or bool(run.tables)
                    runs.append(run)
                    print_run(run, r, args.runs, names, args.scale)
    finally:
        example_server.stop_backends(backends, grace=None, timeout=10)

    results, all_met = report(runs, args.policies, args.patterns, LEASTCONN)
    print_summary({"bench": "balance", **summary(args, results, all_met, info["load_avg"])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
