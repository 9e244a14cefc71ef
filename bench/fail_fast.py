"""A backend that fails fast must not attract traffic: grpc_leastconn against round_robin.

Four backends (examples/server.py's ``start_backend``), all SERVING on
grpc.health.v1 throughout. The client sends ``Ping(delay_ms=5)`` (--delay-ms) from 8
threads, each in a closed loop, through ONE channel over ``ipv4:a,b,c,d``:

  grpc_leastconn  grpc_leastconn.insecure_channel, default settings (failure
                  penalty on, outlier detection off)
  round_robin     grpc.insecure_channel with the service config
                  {"loadBalancingConfig": [{"round_robin": {}}]}

Both are warmed first: grpc_leastconn until every backend is eligible,
round_robin until all four backends have answered. Every call is recorded:
its start and end (time.perf_counter), the backend that served it (the reply
names it) or failed it (the injected abort's details, "<address>: injected
<CODE>"), and whether it succeeded.

Scenarios, each with a fresh channel and every backend answering normally at
the start. At the onset t0 (2 s after the load starts) one backend begins to
fail through ``ConferenceServicer.fail_calls`` while its health service keeps
saying SERVING:

  unavailable  every call answered at once with UNAVAILABLE
  internal     every call answered at once with INTERNAL
  half         every second call answered at once with UNAVAILABLE (every=2)

Reported, for calls that STARTED in the window t0+2 s .. t0+6 s: the failed
share (failed / started) and each backend's share of the calls. Target for
grpc_leastconn in unavailable and internal: failed share <= 2 % (round_robin
is expected near 25 %); judged on the median over runs, the worst run shown
next to it. "half" has no target (round_robin is expected near 12.5 %).

Recovery, grpc_leastconn in "unavailable" only: at t1, the end of the window,
the backend answers normally again (``fail_calls(None)``). Reported: the time
from t1 until its first successful call returns, and until its share of the
calls started in the sliding 1 s window [t - 1 s, t) (evaluated every 50 ms
from t1 on) reaches 80 % of a fair share (20 %): it is re-admitted. A window
that still reaches back before t1 holds calls the backend did not get while
it failed, so the criterion is then harder to meet, never easier; the share
in the first whole second after t1 is shown too. Target: re-admitted <= 30 s;
the wait is bounded (40 s) and a miss is reported instead.

Each run goes through the scenarios in order; within a scenario the two
policies run one after the other, the order alternating from scenario to
scenario and from run to run, so neither always comes first. The failing
backend rotates with the run (run 1: b0, run 2: b1, ...), so no address
position is favoured. --runs N (default 3) repetitions; the median per
scenario and policy is reported with the worst run.

Why one subprocess for the backends: the four servers' handlers and the
client's 8 threads would otherwise share one GIL. The failure penalty fades
in wall-clock time, so the failing backend's trial calls come at a roughly
fixed rate per second, while a client slowed by GIL contention sends fewer
calls in total: in-process backends would inflate grpc_leastconn's failed
share and measure the interpreter as much as the balancer. So all four run
in ONE subprocess (this script with --serve), which applies ``fail_calls``
on commands sent as JSON lines on its stdin and acknowledges each on its
stdout; the onset t0 is taken when the acknowledgement arrives (the backend
fails from slightly before), t1 when the restore command is sent (the backend
answers normally from slightly after). The 2-CPU machine still shares its
cores between both processes; the calls per second are reported for that,
with the successful ones (ok/s) next to them: a failed call returns at once,
without the 5 ms, so a policy that sends calls to the failing backend runs
its closed loop faster and its calls/s alone would flatter it.

--delay-ms sets the Ping's time on the backend (default 5). The failing
backend's trial calls come at a rate per second set by the penalty's decay
and the peers' load, not by the call rate, so the failed share grows with
the call's duration: try --delay-ms 50.

Run:  python bench/fail_fast.py [--runs 3] [--delay-ms 5] [--quick]
A default run takes about 3 minutes: 3 runs x 3 scenarios x 2 policies x
8 s of load, plus the recovery and set-up; --quick (one run, onset 1 s,
window t0+1 s .. t0+3 s, recovery bound 15 s) about 30 s.
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import os
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from _common import ServerProcess as BenchServer
from _common import (
    load_average,
    print_machine,
    print_summary,
    setup_paths,
    table,
)

setup_paths()
# C-core logs the servers' GOAWAY at INFO when the benchmark ends; keep the output readable.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import conference_pb2  # noqa: E402
import conference_pb2_grpc  # noqa: E402
import grpc  # noqa: E402

import grpc_leastconn  # noqa: E402

POLICIES = ("grpc_leastconn", "round_robin")
# name -> (injected code, every how many calls)
SCENARIOS: dict[str, tuple[grpc.StatusCode, int]] = {
    "unavailable": (grpc.StatusCode.UNAVAILABLE, 1),
    "internal": (grpc.StatusCode.INTERNAL, 1),
    "half": (grpc.StatusCode.UNAVAILABLE, 2),
}
TARGET_SCENARIOS = ("unavailable", "internal")
RECOVERY_SCENARIO = "unavailable"
TARGET_FAILED_SHARE = 0.02
N_BACKENDS = 4
THREADS = 8
DEFAULT_DELAY_MS = 5
FAIR_SHARE = 1 / N_BACKENDS
READMIT_SHARE = 0.8 * FAIR_SHARE
TARGET_READMIT_S = 30.0
# The sliding window of the re-admission, its step, and the fewest calls it
# must hold to count (a nearly empty window says nothing).
SLIDE_S = 1.0
SLIDE_STEP_S = 0.05
SLIDE_MIN_CALLS = 20
ROUND_ROBIN_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
# Bounds on every wait.
CALL_TIMEOUT_S = 5.0
READY_TIMEOUT_S = 15.0
SERVER_START_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 5.0
JOIN_TIMEOUT_S = CALL_TIMEOUT_S + 5.0
MAX_WARM_PINGS = 400
# How often the main thread samples the failing backend's penalty in the window.
SAMPLE_S = 0.1


@dataclass(frozen=True)
class Timings:
    onset_s: float  # load start -> t0
    window: tuple[float, float]  # measured window, seconds after t0
    recovery_bound_s: float  # the longest wait for re-admission after t1


DEFAULT_TIMINGS = Timings(onset_s=2.0, window=(2.0, 6.0), recovery_bound_s=40.0)
QUICK_TIMINGS = Timings(onset_s=1.0, window=(1.0, 3.0), recovery_bound_s=15.0)


# -- the backends (run in a subprocess: python bench/fail_fast.py --serve) -------------


def serve() -> int:
    import server as example_server

    def stop(*_: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    backends: list[Any] = []
    try:
        for _ in range(N_BACKENDS):
            # No :authority bookkeeping: the registered-method fast path, less server CPU.
            backends.append(example_server.start_backend(observe_authority=False))
        print(json.dumps({"addresses": [b.address for b in backends]}), flush=True)
        # One command per line; EOF on stdin: the benchmark is gone, however it died.
        for line in sys.stdin:
            try:
                command = json.loads(line)
                code = None if command["code"] is None else grpc.StatusCode[command["code"]]
                backends[command["backend"]].servicer.fail_calls(code, every=command["every"])
                answer: dict[str, Any] = {"ok": True}
            except Exception as exc:
                answer = {"ok": False, "error": repr(exc)}
            print(json.dumps(answer), flush=True)
    finally:
        example_server.stop_backends(backends, timeout=5)
    return 0


class ServerProcess(BenchServer):
    """The backends' process; stop() ends that process only, by its PID."""

    def __init__(self) -> None:
        super().__init__(__file__, timeout=SERVER_START_TIMEOUT_S)
        self.addresses: list[str] = self.ready["addresses"]
        if len(self.addresses) != N_BACKENDS:
            self.stop()
            raise RuntimeError(f"the benchmark server reported {self.ready}")

    def fail_calls(self, backend: int, code: grpc.StatusCode | None, every: int = 1) -> None:
        """``fail_calls`` on one backend; returns once the server has applied it."""
        assert self.proc.stdin is not None
        command = {"backend": backend, "code": None if code is None else code.name, "every": every}
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.read_line(COMMAND_TIMEOUT_S)
        if not line:
            raise RuntimeError(f"the benchmark server did not answer {command} in time")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise RuntimeError(f"the benchmark server refused {command}: {answer}")


# -- the client ------------------------------------------------------------------------

# start, end (perf_counter seconds), backend index (-1: unknown), succeeded
Record = tuple[float, float, int, bool]
UNKNOWN = -1


def _start(record: Record) -> float:
    return record[0]


class Load:
    """THREADS client threads calling in a closed loop until stopped; every call recorded.

    Each thread appends to its own list, and its calls follow one another, so
    every list is sorted by start time.
    """

    def __init__(
        self, call: Callable[..., Any], addresses: Sequence[str], limit_s: float, delay_ms: int
    ) -> None:
        self._call = call
        self._delay_ms = delay_ms
        self._index = {address: i for i, address in enumerate(addresses)}
        self.records: list[list[Record]] = [[] for _ in range(THREADS)]
        # Failures that are not the injected ones (code name -> count).
        self.other_failures: Counter[str] = Counter()
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self.started = time.perf_counter()
        self._deadline = self.started + limit_s
        self.stopped_at = self._deadline
        self._threads = [
            threading.Thread(target=self._work, args=(i,), name=f"client-{i}", daemon=True)
            for i in range(THREADS)
        ]
        for thread in self._threads:
            thread.start()

    def _failed_backend(self, error: grpc.RpcError) -> int:
        details = getattr(error, "details", None)
        text = str(details() or "") if callable(details) else ""
        name, sep, _ = text.partition(": injected ")
        if sep and name in self._index:
            return self._index[name]
        code = getattr(error, "code", None)
        self.other_failures[code().name if callable(code) else type(error).__name__] += 1
        return UNKNOWN

    def _work(self, i: int) -> None:
        out, call, index = self.records[i], self._call, self._index
        request = conference_pb2.PingRequest(delay_ms=self._delay_ms)
        clock, stop, deadline = time.perf_counter, self._stop, self._deadline
        try:
            # Bounded: the stop event, and the deadline if the benchmark never sets it.
            while not stop.is_set() and clock() < deadline:
                start = clock()
                try:
                    reply = call(request, timeout=CALL_TIMEOUT_S)
                except grpc.RpcError as error:
                    out.append((start, clock(), self._failed_backend(error), False))
                else:
                    out.append((start, clock(), index.get(reply.backend, UNKNOWN), True))
        except Exception as exc:
            self.errors.append(exc)

    def share_recent(self, backend: int, lo: float, hi: float) -> tuple[float, int]:
        """Share of ``backend`` in the calls started in [lo, hi) and recorded so far."""
        mine = total = 0
        for records in self.records:
            n = len(records)  # the list grows meanwhile; read up to here
            first = bisect.bisect_left(records, lo, 0, n, key=_start)
            for record in records[first:n]:
                if record[0] >= hi:
                    break
                total += 1
                mine += record[2] == backend
        return (mine / total if total else 0.0), total

    def close(self) -> list[Record]:
        """Stop the threads, wait for them; all records sorted by start."""
        if not self._stop.is_set():
            self.stopped_at = time.perf_counter()
            self._stop.set()
        for thread in self._threads:
            thread.join(JOIN_TIMEOUT_S)
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            raise RuntimeError(f"client threads did not end: {alive}")
        if self.errors:
            raise RuntimeError(f"a client thread failed: {self.errors[0]!r}") from self.errors[0]
        return sorted((r for records in self.records for r in records), key=_start)


def open_policy(policy: str, addresses: Sequence[str]) -> grpc.Channel:
    target = "ipv4:" + ",".join(addresses)
    if policy == "grpc_leastconn":
        return grpc_leastconn.insecure_channel(target)
    return grpc.insecure_channel(target, options=[("grpc.service_config", ROUND_ROBIN_CONFIG)])


def warm(channel: grpc.Channel, ping: Callable[..., Any], addresses: Sequence[str]) -> None:
    """Until every backend can take calls: eligible (grpc_leastconn), answered (round_robin)."""
    grpc.channel_ready_future(channel).result(timeout=READY_TIMEOUT_S)
    if isinstance(channel, grpc_leastconn.LeastConnChannel):
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not (
            len(states := channel.backends()) == N_BACKENDS and all(s.eligible for s in states)
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"grpc_leastconn: backends not all eligible: {states}")
            time.sleep(0.01)
        return
    seen: set[str] = set()
    request = conference_pb2.PingRequest()
    for _ in range(MAX_WARM_PINGS):
        seen.add(ping(request, timeout=CALL_TIMEOUT_S).backend)
        if len(seen) == N_BACKENDS:
            return
    raise RuntimeError(
        f"round_robin: only {sorted(seen)} of {addresses} answered {MAX_WARM_PINGS} warm-up pings"
    )


def penalty_of(channel: grpc.Channel, address: str) -> float | None:
    if not isinstance(channel, grpc_leastconn.LeastConnChannel):
        return None
    for state in channel.backends():
        if state.address == address:
            return state.penalty
    return None


def sleep_until(when: float) -> None:
    time.sleep(max(0.0, when - time.perf_counter()))


# -- one trial: a scenario, a policy -----------------------------------------------------


@dataclass
class Trial:
    scenario: str
    policy: str
    run: int
    failing: int
    calls: int  # started in the window
    failed_share: float
    shares: list[float]  # per backend, of the calls started in the window
    unknown_share: float  # calls no backend could be told for (their failures)
    calls_per_s: float  # started in the window, per second
    ok_per_s: float  # of those, the successful ones
    penalty_mean: float | None = None
    penalty_max: float | None = None
    first_ok_s: float | None = None  # recovery: t1 -> first successful call returned
    readmit_s: float | None = None  # recovery: t1 -> share reached READMIT_SHARE
    recovery_bound_s: float | None = None
    first_second_share: float | None = None  # recovery: its share in t1 .. t1+1 s
    other_failures: dict[str, int] = field(default_factory=dict)


def window_stats(
    records: Sequence[Record], lo: float, hi: float
) -> tuple[int, float, list[float], float]:
    """Calls started in [lo, hi): count, failed share, per-backend shares, unknown share."""
    starts = [r[0] for r in records]
    chosen = records[bisect.bisect_left(starts, lo) : bisect.bisect_left(starts, hi)]
    total = len(chosen)
    if total == 0:
        raise RuntimeError("no call started in the measured window")
    by_backend = Counter(r[2] for r in chosen)
    failed = sum(1 for r in chosen if not r[3])
    shares = [by_backend[i] / total for i in range(N_BACKENDS)]
    return total, failed / total, shares, by_backend[UNKNOWN] / total


def recovery_times(
    records: Sequence[Record], backend: int, t1: float, until: float
) -> tuple[float | None, float | None, float | None]:
    """From t1: the first successful call's return, re-admission (see the docstring).

    And the backend's share of the calls started in the first second after t1.
    """
    first_ok = min((r[1] for r in records if r[3] and r[2] == backend and r[0] >= t1), default=None)
    starts = [r[0] for r in records]
    # mine[k]: calls of `backend` among the first k records.
    mine = [0]
    for r in records:
        mine.append(mine[-1] + (r[2] == backend))
    readmit = None
    step = 1
    # Bounded: the grid ends at `until`.
    while (t := t1 + step * SLIDE_STEP_S) <= until:
        lo, hi = bisect.bisect_left(starts, t - SLIDE_S), bisect.bisect_left(starts, t)
        if hi - lo >= SLIDE_MIN_CALLS and (mine[hi] - mine[lo]) / (hi - lo) >= READMIT_SHARE:
            readmit = t - t1
            break
        step += 1
    lo, hi = bisect.bisect_left(starts, t1), bisect.bisect_left(starts, t1 + SLIDE_S)
    first_second = (mine[hi] - mine[lo]) / (hi - lo) if hi > lo and until >= t1 + SLIDE_S else None
    return (None if first_ok is None else first_ok - t1), readmit, first_second


def run_trial(
    server: ServerProcess,
    scenario: str,
    policy: str,
    run: int,
    failing: int,
    timings: Timings,
    delay_ms: int,
) -> Trial:
    code, every = SCENARIOS[scenario]
    addresses = server.addresses
    recovery = policy == "grpc_leastconn" and scenario == RECOVERY_SCENARIO
    limit_s = timings.onset_s + timings.window[1] + 5.0
    if recovery:
        limit_s += timings.recovery_bound_s
    channel = open_policy(policy, addresses)
    load: Load | None = None
    records: list[Record] = []
    penalties: list[float] = []
    lo = hi = 0.0
    t1: float | None = None
    readmitted_online = False
    try:
        ping = conference_pb2_grpc.ConferenceStub(channel).Ping  # type: ignore[no-untyped-call]
        warm(channel, ping, addresses)
        load = Load(ping, addresses, limit_s, delay_ms)
        sleep_until(load.started + timings.onset_s)
        server.fail_calls(failing, code, every)
        t0 = time.perf_counter()
        lo, hi = t0 + timings.window[0], t0 + timings.window[1]
        sleep_until(lo)
        # Bounded: one sample per SAMPLE_S until the window's end.
        while (now := time.perf_counter()) < hi:
            penalty = penalty_of(channel, addresses[failing])
            if penalty is not None:
                penalties.append(penalty)
            time.sleep(min(SAMPLE_S, max(0.0, hi - now)))
        if recovery:
            t1 = time.perf_counter()
            server.fail_calls(failing, None)
            bound = t1 + timings.recovery_bound_s
            # Bounded by `bound`; a rough online check of the criterion, only to
            # end the load early. The reported time is computed afterwards over
            # every record; the load goes on a little for that.
            while (now := time.perf_counter()) < bound:
                time.sleep(SAMPLE_S)
                window_hi = now - 0.25  # calls started before this have almost all returned
                if window_hi <= t1:
                    continue
                share, n = load.share_recent(failing, window_hi - SLIDE_S, window_hi)
                if n >= SLIDE_MIN_CALLS and share >= READMIT_SHARE:
                    readmitted_online = True
                    break
            if readmitted_online:
                # Complete records for the check afterwards and the first second after t1.
                sleep_until(max(time.perf_counter() + 1.0, t1 + SLIDE_S + 0.5))
    finally:
        try:
            if load is not None:
                records = load.close()
        finally:
            try:
                channel.close()
            finally:
                server.fail_calls(failing, None)
    assert load is not None
    calls, failed_share, shares, unknown_share = window_stats(records, lo, hi)
    trial = Trial(
        scenario=scenario,
        policy=policy,
        run=run,
        failing=failing,
        calls=calls,
        failed_share=failed_share,
        shares=shares,
        unknown_share=unknown_share,
        calls_per_s=calls / (hi - lo),
        ok_per_s=calls * (1 - failed_share) / (hi - lo),
        other_failures=dict(load.other_failures),
    )
    if penalties:
        trial.penalty_mean = statistics.fmean(penalties)
        trial.penalty_max = max(penalties)
    if recovery and t1 is not None:
        trial.recovery_bound_s = timings.recovery_bound_s
        trial.first_ok_s, trial.readmit_s, trial.first_second_share = recovery_times(
            records, failing, t1, min(load.stopped_at, t1 + timings.recovery_bound_s)
        )
    return trial


# -- output ----------------------------------------------------------------------------


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def seconds(x: float | None) -> str:
    return "miss" if x is None else f"{x:.2f} s"


def print_trial(trial: Trial, runs: int) -> None:
    shares = " ".join(
        f"b{i}{'*' if i == trial.failing else ' '}{100 * s:5.1f}"
        for i, s in enumerate(trial.shares)
    )
    line = (
        f"   run {trial.run + 1}/{runs} {trial.scenario:<11} {trial.policy:<14} "
        f"failed {pct(trial.failed_share):>7}  shares % {shares}  "
        f"{trial.calls_per_s:5.0f} calls/s {trial.ok_per_s:5.0f} ok/s"
    )
    if trial.penalty_mean is not None and trial.penalty_max is not None:
        line += f"  penalty mean {trial.penalty_mean:.2f} max {trial.penalty_max:.2f}"
    if trial.recovery_bound_s is not None:
        line += (
            f"\n      recovery: first success after {seconds(trial.first_ok_s)}, "
            f"re-admitted after {seconds(trial.readmit_s)}; share in the first second "
            + ("-" if trial.first_second_share is None else pct(trial.first_second_share))
        )
    if trial.other_failures:
        line += f"\n      other failures (no backend named): {trial.other_failures}"
    print(line, flush=True)


def worst_time(values: Sequence[float | None]) -> float | None:
    return None if any(v is None for v in values) else max(v for v in values if v is not None)


def median_time(values: Sequence[float | None]) -> float | None:
    # A miss counts as longer than any time.
    ordered = sorted(values, key=lambda v: float("inf") if v is None else v)
    n = len(ordered)
    if n % 2 or ordered[n // 2] is None or ordered[n // 2 - 1] is None:
        return ordered[n // 2]
    low, high = ordered[n // 2 - 1], ordered[n // 2]
    assert low is not None and high is not None
    return (low + high) / 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="repetitions (default 3)")
    ap.add_argument(
        "--delay-ms",
        type=int,
        default=DEFAULT_DELAY_MS,
        help=f"each Ping's time on the backend (default {DEFAULT_DELAY_MS})",
    )
    ap.add_argument("--quick", action="store_true", help="one short run")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve()
    timings = DEFAULT_TIMINGS
    if args.quick:
        args.runs, timings = 1, QUICK_TIMINGS
    if args.runs < 1 or not 0 <= args.delay_ms <= 1000:
        ap.error("need --runs >= 1 and --delay-ms in 0..1000")
    # The failures are deliberate; grpc_leastconn's WARNINGs would drown the tables.
    logging.getLogger("grpc_leastconn").setLevel(logging.ERROR)

    info = print_machine(
        f"fail_fast: one of {N_BACKENDS} backends fails fast, {THREADS} client threads, "
        f"Ping delay {args.delay_ms} ms"
    )
    print(
        f"   onset t0 {timings.onset_s:g} s after the load starts; window t0+"
        f"{timings.window[0]:g} s .. t0+{timings.window[1]:g} s; {args.runs} run(s); "
        "* marks the failing backend",
        flush=True,
    )
    # SIGTERM must unwind through the finally below, or the server would outlive us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    server = ServerProcess()
    trials: list[Trial] = []
    try:
        print(
            "   backends (pid "
            f"{server.proc.pid}): "
            + ", ".join(f"b{i} {a}" for i, a in enumerate(server.addresses)),
            flush=True,
        )
        for run in range(args.runs):
            failing = run % N_BACKENDS
            for s, scenario in enumerate(SCENARIOS):
                order = POLICIES if (run + s) % 2 == 0 else POLICIES[::-1]
                for policy in order:
                    trials.append(
                        run_trial(server, scenario, policy, run, failing, timings, args.delay_ms)
                    )
                    print_trial(trials[-1], args.runs)
    finally:
        server.stop()

    rows = []
    results: dict[str, dict[str, Any]] = {}
    verdicts: dict[str, bool] = {}
    for scenario in SCENARIOS:
        results[scenario] = {}
        for policy in POLICIES:
            mine = [t for t in trials if t.scenario == scenario and t.policy == policy]
            failed = [t.failed_share for t in mine]
            failing_share = [t.shares[t.failing] for t in mine]
            healthy = [s for t in mine for i, s in enumerate(t.shares) if i != t.failing]
            med = statistics.median(failed)
            target = ""
            if policy == "grpc_leastconn" and scenario in TARGET_SCENARIOS:
                verdicts[scenario] = med <= TARGET_FAILED_SHARE
                target = f"<= {pct(TARGET_FAILED_SHARE)}: " + (
                    "met" if verdicts[scenario] else "MISSED"
                )
                if verdicts[scenario] and max(failed) > TARGET_FAILED_SHARE:
                    target += " (worst run over)"
            rows.append(
                [
                    f"{scenario} {policy}",
                    pct(med),
                    pct(max(failed)),
                    pct(statistics.median(failing_share)),
                    f"{pct(min(healthy))} .. {pct(max(healthy))}",
                    f"{statistics.median(t.calls_per_s for t in mine):.0f}",
                    f"{statistics.median(t.ok_per_s for t in mine):.0f}",
                    target,
                ]
            )
            results[scenario][policy] = {
                "failed_share_median": round(med, 5),
                "failed_share_worst": round(max(failed), 5),
                "failed_share_runs": [round(x, 5) for x in failed],
                "failing_backend_share_median": round(statistics.median(failing_share), 5),
                "healthy_backend_share_min": round(min(healthy), 5),
                "healthy_backend_share_max": round(max(healthy), 5),
                "shares_runs": [[round(x, 5) for x in t.shares] for t in mine],
                "failing_backend_runs": [t.failing for t in mine],
                "calls_per_s_median": round(statistics.median(t.calls_per_s for t in mine)),
                "ok_per_s_median": round(statistics.median(t.ok_per_s for t in mine)),
                "calls_in_window_runs": [t.calls for t in mine],
            }
            if policy == "grpc_leastconn":
                results[scenario][policy]["penalty_mean_runs"] = [
                    None if t.penalty_mean is None else round(t.penalty_mean, 3) for t in mine
                ]
    print()
    print(
        table(
            [
                "scenario / policy",
                "failed (median)",
                "worst",
                "failing backend share",
                "healthy backends",
                "calls/s",
                "ok/s",
                "target",
            ],
            rows,
        )
    )

    recov = [t for t in trials if t.recovery_bound_s is not None]
    first_ok = [t.first_ok_s for t in recov]
    readmit = [t.readmit_s for t in recov]
    worst_readmit = worst_time(readmit)
    readmit_met = worst_readmit is not None and worst_readmit <= TARGET_READMIT_S
    bound = timings.recovery_bound_s
    print(
        f"\nrecovery (grpc_leastconn, {RECOVERY_SCENARIO}, backend answers again at t1; "
        f"re-admitted: share of a sliding {SLIDE_S:g} s window >= {pct(READMIT_SHARE)}, "
        f"waited at most {bound:g} s):"
    )
    print(
        table(
            ["time from t1", "median", "worst", "runs"],
            [
                [
                    "first successful call",
                    seconds(median_time(first_ok)),
                    seconds(worst_time(first_ok)),
                    ", ".join(seconds(x) for x in first_ok),
                ],
                [
                    "re-admitted",
                    seconds(median_time(readmit)),
                    seconds(worst_readmit),
                    ", ".join(seconds(x) for x in readmit),
                ],
            ],
        )
    )
    print(
        f"re-admitted <= {TARGET_READMIT_S:g} s in every run: {'met' if readmit_met else 'MISSED'}"
    )
    for scenario in TARGET_SCENARIOS:
        print(
            f"failed share, grpc_leastconn, {scenario}: "
            f"{pct(results[scenario]['grpc_leastconn']['failed_share_median'])} (median) "
            f"<= {pct(TARGET_FAILED_SHARE)}: {'met' if verdicts[scenario] else 'MISSED'}"
        )
    print_summary(
        {
            "bench": "fail_fast",
            "quick": args.quick,
            "runs": args.runs,
            "onset_s": timings.onset_s,
            "window_after_t0_s": list(timings.window),
            "threads": THREADS,
            "delay_ms": args.delay_ms,
            "results": results,
            "recovery": {
                "first_ok_s_runs": [None if x is None else round(x, 3) for x in first_ok],
                "readmit_s_runs": [None if x is None else round(x, 3) for x in readmit],
                "first_second_share_runs": [
                    None if t.first_second_share is None else round(t.first_second_share, 4)
                    for t in recov
                ],
                "readmit_s_median": (None if (m := median_time(readmit)) is None else round(m, 3)),
                "readmit_s_worst": None if worst_readmit is None else round(worst_readmit, 3),
                "bound_s": bound,
            },
            "target_failed_share": TARGET_FAILED_SHARE,
            "target_readmit_s": TARGET_READMIT_S,
            "targets_met": {
                **{f"failed_share_{s}": verdicts[s] for s in TARGET_SCENARIOS},
                "readmit": readmit_met,
            },
            "other_failures": dict(
                sum((Counter(t.other_failures) for t in trials), Counter[str]())
            ),
            "load_avg_before": info["load_avg"],
            "load_avg_after": load_average(),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
