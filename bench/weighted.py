"""Weights and slow start end to end: grpc_leastconn against grpcio's round_robin.

Three in-process backends (examples/server.py) on 127.0.0.1, reused by every
run; all streams are ``Join`` server streams opened on ONE client channel
that last until the benchmark cancels them (``duration_ms=0``, one frame at
once and the next a minute later, a timeout of 120 s). Each stream is read by
its own thread, so its first frame (which names the backend) and its end are
seen at once and nothing is left unread. Two scenarios:

spread  The backends are weighted 1:2:4 (b0, b1, b2). 70 streams are opened
        0.05 s apart (0.03 s with --quick). From the first open until all 70
        are live, the server-side live streams of each backend
        (``servicer.live_streams``) are sampled every 0.2 s. Per sample, the
        live streams per unit of weight, live / weight, and their spread
        (max - min) / mean over the backends: 0 when the streams follow the
        weights. Reported per policy: the final live streams per backend
        (ideal 10 / 20 / 40), live / weight, the final spread, and the max
        spread over the samples with at least 7 live streams (before that a
        single stream moves the ratio a lot). Target, for
        leastconn_weighted only: every backend within +-1 of 10 / 20 / 40
        in every run. The weights are the backends' capacities: the other
        policies are judged against the same 1:2:4.

        leastconn_weighted    grpc_leastconn.insecure_channel(weights=1:2:4)
        leastconn_unweighted  the same without weights: what a user gets
                              without the feature
        grpc_round_robin      grpc.insecure_channel("ipv4:a,b,c") with
                              round_robin (it has no weights)

join    Three equal backends; 30 streams are opened 0.05 s apart (10 each).
        The peers must be warm for slow start to apply (eligible for a whole
        window, see grpc_leastconn/_core/slowstart.py), so once the channel's
        backends are all usable the benchmark waits one window + 0.3 s, for
        every policy alike. Then the victim (b0 in run 1, b1 in run 2, ...)
        is taken down: by default its streams are cancelled by the client
        first, as a drain before a restart would (--end-streams stop lets
        the server's stop end them instead: they fail UNAVAILABLE and
        grpc_leastconn's failure penalty then holds the victim back too).
        Its server is stopped and started again on the same port. t=0 is
        the moment the channel can use it again: grpc_leastconn shows it
        ``eligible`` in ``channel.backends()`` (polled every 10 ms);
        round_robin answers a Ping from it (Pings every 10 ms; they are unary
        and leave no count behind); "back after" is the time from the start
        of the take-down to t=0 (grpc_leastconn waits for the backend's
        health Watch to answer again, about a second). Channels use a 100 ms
        initial reconnect backoff so the reconnection is quick. From t=0 one
        new stream is opened every 0.1 s for window + 2 s (--window, default
        4 s; --quick 2 s + 1 s), each recorded with its backend and its
        time. Reported
        per policy: the victim's share of the new streams opened in the
        first 1 s, the first half of the window, the second half and after
        the window (1/3 is a fair share); how many new streams were opened
        until the victim held as many as its least loaded peer (counting
        the peers' 10), and when; and for slow start the victim's weight as
        ``channel.backends()`` shows it right after each open, next to what
        the README's formula gives (Envoy's, max(10 %, t / window), rounded
        up to a step of 5 %). Right after: the channel brings a ramp up to
        date when a pick or a call's end finds it due (every 0.1 s at most),
        not when ``backends()`` is asked, so read before an open it shows
        the weight of the previous pick; after the open, the one this pick
        used.

        leastconn_no_slow_start  grpc_leastconn.insecure_channel(slow_start=None)
        leastconn_slow_start     ... slow_start=SlowStart(window)
        grpc_round_robin         as above

Expected: without slow start the victim takes every new stream until level
(a burst: 10 streams in 1 s); with slow start it starts at 10 % of its
weight and ramps (with a linear ramp and a steady pace it becomes level
near the end of the window); round_robin gives it 1/3 of the new streams
and it never becomes level.

Each run goes through both scenarios; within a scenario the three policies
run one after the other, their order rotating from run to run. --runs N
(default 3) repetitions; medians over runs are reported with the runs.

Run:  python bench/weighted.py [--runs 3] [--window 4] [--quick]
      [--scenarios spread,join] [--end-streams cancel|stop]
A default run takes about 2.5 minutes (spread ~5 s, join ~12 s per policy and
run); --quick about 25 s.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from _common import load_average, print_machine, print_summary, setup_paths, table

setup_paths()

# C-core logs the servers' GOAWAY at INFO when a backend stops; keep the output readable.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import conference_pb2  # noqa: E402
import conference_pb2_grpc  # noqa: E402
import grpc  # noqa: E402
import server as example_server  # noqa: E402

import grpc_leastconn  # noqa: E402

N_BACKENDS = 3
WEIGHTS = (1.0, 2.0, 4.0)
SPREAD_STREAMS = 70
IDEAL = (10, 20, 40)
TOLERANCE = 1
SAMPLE_S = 0.2
MIN_LIVE_FOR_MAX = 7
JOIN_STREAMS = 30
JOIN_GAP_S = 0.05
PACE_S = 0.1
# The peers are warm (eligible for a window) this long before the victim stops.
WARM_MARGIN_S = 0.3
# A ramping weight moves in steps of 1/STEPS of the static weight (README).
STEPS = 20
QUIET_FRAME_INTERVAL_MS = 60_000
STREAM_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 15.0
# Reconnection, then the health Watch's own backoff (about a second).
REJOIN_TIMEOUT_S = 20.0
SETTLE_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 15.0
CLOSE_TIMEOUT_S = 10.0
PING_TIMEOUT_S = 2.0
POLL_S = 0.01
# A restarted backend is reconnected within about a second, not grpcio's 1 s+ backoff.
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100)]
ROUND_ROBIN_OPTIONS = [
    ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
    # A fresh channel must not inherit a subchannel (and its backoff) from the previous run.
    ("grpc.use_local_subchannel_pool", 1),
    *FAST_RECONNECT,
]
SPREAD_POLICIES = ("leastconn_weighted", "leastconn_unweighted", "grpc_round_robin")
JOIN_POLICIES = ("leastconn_no_slow_start", "leastconn_slow_start", "grpc_round_robin")
SCENARIOS = ("spread", "join")


@dataclass(frozen=True)
class Timings:
    spread_gap_s: float
    window_s: float
    after_s: float


DEFAULT_TIMINGS = Timings(spread_gap_s=0.05, window_s=4.0, after_s=2.0)
QUICK_TIMINGS = Timings(spread_gap_s=0.03, window_s=2.0, after_s=1.0)


# -- waiting, bounded ------------------------------------------------------------------


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``predicate`` every POLL_S until it holds; the monotonic time it was seen.

    Bounded by the deadline and by a loop count. Raises RuntimeError naming ``what``.
    """
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / POLL_S) + 2):
        if predicate():
            return time.monotonic()
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    raise RuntimeError(f"{what}: not within {timeout:g} s")


# -- streams ---------------------------------------------------------------------------


@dataclass(eq=False)
class Stream:
    opened: float
    call: Any
    backend: str | None = None
    error: str | None = None
    started: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


def read(stream: Stream) -> None:
    try:
        for frame in stream.call:
            if stream.backend is None:
                stream.backend = frame.backend
                stream.started.set()
    except grpc.RpcError as exc:
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        stream.error = code.name if code is not None else type(exc).__name__
    except Exception as exc:
        stream.error = repr(exc)
    finally:
        stream.started.set()
        stream.ended.set()


class Streams:
    """Long Join streams on one channel, each read by its own thread."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._join = conference_pb2_grpc.ConferenceStub(channel).Join  # type: ignore[no-untyped-call]
        self.all: list[Stream] = []

    def open(self) -> Stream:
        request = conference_pb2.JoinRequest(
            session_id=str(len(self.all)), duration_ms=0, frame_interval_ms=QUIET_FRAME_INTERVAL_MS
        )
        opened = time.monotonic()
        stream = Stream(opened, self._join(request, timeout=STREAM_TIMEOUT_S))
        stream.thread = threading.Thread(target=read, args=(stream,), daemon=True)
        stream.thread.start()
        self.all.append(stream)
        return stream

    @staticmethod
    def wait_started(streams: Sequence[Stream], timeout: float) -> None:
        """Until every stream has named its backend (or ended)."""
        deadline = time.monotonic() + timeout
        for stream in streams:
            if not stream.started.wait(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"a stream did not start within {timeout:g} s")
        failed = [s.error for s in streams if s.backend is None]
        if failed:
            raise RuntimeError(f"{len(failed)} streams failed before their first frame: {failed}")

    @staticmethod
    def wait_ended(streams: Sequence[Stream], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for stream in streams:
            if not stream.ended.wait(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"a stream did not end within {timeout:g} s")

    def on(self, address: str) -> list[Stream]:
        return [s for s in self.all if s.backend == address and not s.ended.is_set()]

    def close(self) -> None:
        """Cancel every stream and wait (bounded) for its reader."""
        for stream in self.all:
            stream.call.cancel()
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        for stream in self.all:
            if stream.thread is not None:
                stream.thread.join(max(0.0, deadline - time.monotonic()))
        alive = sum(1 for s in self.all if s.thread is not None and s.thread.is_alive())
        if alive:
            raise RuntimeError(f"{alive} stream readers did not end")


# -- channels --------------------------------------------------------------------------


def open_policy(policy: str, addresses: Sequence[str], window_s: float) -> grpc.Channel:
    if policy == "grpc_round_robin":
        return grpc.insecure_channel("ipv4:" + ",".join(addresses), options=ROUND_ROBIN_OPTIONS)
    if policy == "leastconn_weighted":
        weights = dict(zip(addresses, WEIGHTS, strict=True))
        return grpc_leastconn.insecure_channel(list(addresses), weights=weights)
    if policy == "leastconn_unweighted":
        return grpc_leastconn.insecure_channel(list(addresses))
    if policy == "leastconn_no_slow_start":
        return grpc_leastconn.insecure_channel(
            list(addresses), slow_start=None, options=FAST_RECONNECT
        )
    if policy == "leastconn_slow_start":
        return grpc_leastconn.insecure_channel(
            list(addresses),
            slow_start=grpc_leastconn.SlowStart(window=window_s),
            options=FAST_RECONNECT,
        )
    raise ValueError(policy)


def state_of(channel: grpc.Channel, address: str) -> grpc_leastconn.BackendState:
    assert isinstance(channel, grpc_leastconn.LeastConnChannel)
    (state,) = [s for s in channel.backends() if s.address == address and not s.draining]
    return state


def warm(channel: grpc.Channel, addresses: Sequence[str]) -> float:
    """Until every backend can take calls; the monotonic time it was seen.

    grpc_leastconn: every backend eligible. round_robin: every backend has
    answered a Ping (grpcio is READY once one connection is).
    """
    grpc.channel_ready_future(channel).result(timeout=READY_TIMEOUT_S)
    if isinstance(channel, grpc_leastconn.LeastConnChannel):
        lc = channel
        return wait_for(
            lambda: len(s := lc.backends()) == len(addresses) and all(x.eligible for x in s),
            READY_TIMEOUT_S,
            "backends all eligible",
        )
    seen: set[str] = set()
    ping = conference_pb2_grpc.ConferenceStub(channel).Ping  # type: ignore[no-untyped-call]
    deadline = time.monotonic() + READY_TIMEOUT_S
    for _ in range(int(READY_TIMEOUT_S / POLL_S)):
        seen.add(ping(conference_pb2.PingRequest(), timeout=PING_TIMEOUT_S).backend)
        if seen >= set(addresses):
            return time.monotonic()
        if time.monotonic() > deadline:
            break
        time.sleep(POLL_S)
    raise RuntimeError(f"round_robin reached only {sorted(seen)}")


def rejoined(channel: grpc.Channel, address: str) -> float:
    """Until the channel uses ``address`` again; the monotonic time it was seen (t=0)."""
    if isinstance(channel, grpc_leastconn.LeastConnChannel):
        return wait_for(
            lambda: state_of(channel, address).eligible, REJOIN_TIMEOUT_S, f"{address} eligible"
        )
    ping = conference_pb2_grpc.ConferenceStub(channel).Ping  # type: ignore[no-untyped-call]
    deadline = time.monotonic() + REJOIN_TIMEOUT_S
    for _ in range(int(REJOIN_TIMEOUT_S / POLL_S)):
        try:
            backend = ping(conference_pb2.PingRequest(), timeout=PING_TIMEOUT_S).backend
        except grpc.RpcError:
            backend = None
        if backend == address:
            return time.monotonic()
        if time.monotonic() > deadline:
            break
        time.sleep(POLL_S)
    raise RuntimeError(f"round_robin did not reach {address} within {REJOIN_TIMEOUT_S:g} s")


def check_idle(backends: Sequence[Any]) -> None:
    for backend in backends:
        # The next run starts from empty backends.
        if not backend.servicer.wait_until(lambda s: s.live == 0, timeout=IDLE_TIMEOUT_S):
            raise RuntimeError(f"{backend.address} still has {backend.servicer.live} live")


def live_streams(backends: Sequence[Any]) -> list[int]:
    return [b.servicer.live_streams for b in backends]


# -- scenario 1: weighted spread -------------------------------------------------------


def spread_of(live: Sequence[int]) -> float | None:
    """(max - min) / mean of live / weight over the backends; None with nothing live."""
    per = [n / w for n, w in zip(live, WEIGHTS, strict=True)]
    mean = statistics.fmean(per)
    return None if mean == 0 else (max(per) - min(per)) / mean


@dataclass
class SpreadRun:
    policy: str
    run: int
    final: list[int]
    samples: list[list[int]]
    client_in_flight: list[int] | None
    placed: list[int]
    elapsed_s: float

    @property
    def per_weight(self) -> list[float]:
        return [n / w for n, w in zip(self.final, WEIGHTS, strict=True)]

    @property
    def final_spread(self) -> float:
        value = spread_of(self.final)
        return math.nan if value is None else value

    @property
    def max_spread(self) -> float:
        values = [spread_of(s) for s in self.samples if sum(s) >= MIN_LIVE_FOR_MAX]
        return max((v for v in values if v is not None), default=math.nan)

    @property
    def mean_spread(self) -> float:
        values = [spread_of(s) for s in self.samples if sum(s) >= MIN_LIVE_FOR_MAX]
        kept = [v for v in values if v is not None]
        return statistics.fmean(kept) if kept else math.nan

    @property
    def within(self) -> bool:
        return all(abs(n - i) <= TOLERANCE for n, i in zip(self.final, IDEAL, strict=True))


def run_spread(policy: str, run: int, backends: list[Any], timings: Timings) -> SpreadRun:
    addresses = [b.address for b in backends]
    channel = open_policy(policy, addresses, timings.window_s)
    streams = Streams(channel)
    samples: list[list[int]] = []
    client: list[int] | None = None
    try:
        warm(channel, addresses)
        t0 = time.monotonic() + 0.02
        gap = timings.spread_gap_s
        deadline = t0 + SPREAD_STREAMS * gap + SETTLE_TIMEOUT_S
        opened = k = 0
        max_steps = SPREAD_STREAMS + int((deadline - t0) / SAMPLE_S) + 2
        for _ in range(max_steps):
            next_open = t0 + opened * gap if opened < SPREAD_STREAMS else math.inf
            next_sample = t0 + k * SAMPLE_S
            if next_open < next_sample:
                sleep_until(next_open)
                streams.open()
                opened += 1
                continue
            sleep_until(next_sample)
            samples.append(live_streams(backends))
            k += 1
            if opened == SPREAD_STREAMS and sum(samples[-1]) == SPREAD_STREAMS:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{policy}: live streams {samples[-1]} after the deadline")
        else:
            raise RuntimeError(f"{policy}: the schedule ran out with {samples[-1]} live")
        elapsed = time.monotonic() - t0
        Streams.wait_started(streams.all, SETTLE_TIMEOUT_S)
        placed = [sum(1 for s in streams.all if s.backend == a) for a in addresses]
        if isinstance(channel, grpc_leastconn.LeastConnChannel):
            client = [state_of(channel, a).in_flight for a in addresses]
    finally:
        try:
            streams.close()
        finally:
            channel.close()
    check_idle(backends)
    return SpreadRun(policy, run, samples[-1], samples, client, placed, elapsed)


# -- scenario 2: a backend rejoins -----------------------------------------------------


@dataclass
class JoinRun:
    policy: str
    run: int
    victim: int
    window_s: float
    after_s: float
    rejoin_s: float
    # The victim's state at t=0 (grpc_leastconn only).
    weight0: float | None
    penalty0: float | None
    before: list[int]
    initial: list[int]
    # (seconds after t=0, backend index) of every new stream, in open order.
    new: list[tuple[float, int]]
    # (seconds after t=0, the victim's weight right after the open); slow start only.
    weights: list[tuple[float, float]]
    final: list[int]
    victim_errors: list[str]
    other_errors: list[str]

    def share(self, lo: float, hi: float) -> float | None:
        picked = [b for t, b in self.new if lo <= t < hi]
        return sum(1 for b in picked if b == self.victim) / len(picked) if picked else None

    @property
    def windows(self) -> dict[str, tuple[float, float]]:
        w = self.window_s
        return {
            "first_1s": (0.0, 1.0),
            "first_half": (0.0, w / 2),
            "second_half": (w / 2, w),
            "after": (w, math.inf),
        }

    @property
    def level(self) -> tuple[int, float] | None:
        """(new streams opened, seconds after t=0) when the victim held as many as a peer."""
        counts = list(self.initial)
        for n, (t, b) in enumerate(self.new, start=1):
            counts[b] += 1
            peers = [c for i, c in enumerate(counts) if i != self.victim]
            if counts[self.victim] >= min(peers):
                return n, t
        return None


def expected_weight(config: grpc_leastconn.SlowStart, seconds: float) -> float:
    """The README's slow-start factor, rounded up to a step of 5 %."""
    return min(1.0, math.ceil(config.factor(seconds) * STEPS - 1e-9) / STEPS)


def run_join(
    policy: str, run: int, backends: list[Any], victim: int, timings: Timings, end_streams: str
) -> JoinRun:
    """One rejoin; ``backends[victim]`` is replaced by the restarted backend."""
    addresses = [b.address for b in backends]
    address = addresses[victim]
    channel = open_policy(policy, addresses, timings.window_s)
    leastconn = isinstance(channel, grpc_leastconn.LeastConnChannel)
    streams = Streams(channel)
    new: list[Stream] = []
    weights: list[tuple[float, float]] = []
    weight0 = penalty0 = None
    try:
        ready = warm(channel, addresses)
        start = time.monotonic()
        for i in range(JOIN_STREAMS):
            sleep_until(start + i * JOIN_GAP_S)
            streams.open()
        Streams.wait_started(streams.all, SETTLE_TIMEOUT_S)
        wait_for(
            lambda: sum(live_streams(backends)) == JOIN_STREAMS,
            SETTLE_TIMEOUT_S,
            f"{JOIN_STREAMS} live streams",
        )
        before = live_streams(backends)
        # The peers are warm for a whole window (slow start applies only then).
        sleep_until(ready + timings.window_s + WARM_MARGIN_S)

        stopped = time.monotonic()
        doomed = streams.on(address)
        if end_streams == "cancel":
            for stream in doomed:
                stream.call.cancel()
            Streams.wait_ended(doomed, SETTLE_TIMEOUT_S)
            if leastconn:
                wait_for(
                    lambda: state_of(channel, address).in_flight == 0,
                    SETTLE_TIMEOUT_S,
                    f"{address} in_flight 0",
                )
        old = backends[victim]
        if end_streams == "cancel" and not old.servicer.wait_until(
            lambda s: s.live == 0, SETTLE_TIMEOUT_S
        ):
            raise RuntimeError(f"{address} kept {old.servicer.live} live after the cancel")
        old.stop(None, timeout=CLOSE_TIMEOUT_S)
        Streams.wait_ended(doomed, SETTLE_TIMEOUT_S)
        if leastconn:
            wait_for(
                lambda: not state_of(channel, address).eligible,
                SETTLE_TIMEOUT_S,
                f"{address} not eligible",
            )
        backends[victim] = example_server.start_backend("127.0.0.1", old.port)
        t0 = rejoined(channel, address)
        if leastconn:
            state = state_of(channel, address)
            weight0, penalty0 = state.weight, state.penalty
        initial = live_streams(backends)

        n_new = round((timings.window_s + timings.after_s) / PACE_S)
        ramping = policy == "leastconn_slow_start"
        for i in range(n_new):
            sleep_until(t0 + i * PACE_S)
            new.append(streams.open())
            if ramping:
                # Right after the open: the pick brought the ramp up to date first.
                weights.append((new[-1].opened - t0, state_of(channel, address).weight))
        Streams.wait_started(new, SETTLE_TIMEOUT_S)
        expected_total = sum(initial) + n_new
        wait_for(
            lambda: sum(live_streams(backends)) == expected_total,
            SETTLE_TIMEOUT_S,
            f"{expected_total} live streams",
        )
        final = live_streams(backends)
        victim_errors = sorted({s.error or "OK" for s in doomed})
        gone = {id(s) for s in doomed}
        other_errors = [
            s.error or "OK" for s in streams.all if id(s) not in gone and s.ended.is_set()
        ]
    finally:
        try:
            streams.close()
        finally:
            channel.close()
    check_idle(backends)
    index = {a: i for i, a in enumerate(addresses)}
    return JoinRun(
        policy=policy,
        run=run,
        victim=victim,
        window_s=timings.window_s,
        after_s=timings.after_s,
        rejoin_s=t0 - stopped,
        weight0=weight0,
        penalty0=penalty0,
        before=before,
        initial=initial,
        new=[(s.opened - t0, index[s.backend or ""]) for s in new],
        weights=weights,
        final=final,
        victim_errors=victim_errors,
        other_errors=other_errors,
    )


# -- output ----------------------------------------------------------------------------


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def fmt_list(values: Sequence[float]) -> str:
    return "/".join(f"{v:g}" for v in values)


def median_or_none(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def rounded(x: float | None, digits: int = 3) -> float | None:
    return None if x is None or math.isnan(x) else round(x, digits)


def print_spread_run(r: SpreadRun, runs: int) -> None:
    line = (
        f"   run {r.run + 1}/{runs} spread {r.policy:<24} live {fmt_list(r.final):<9} "
        f"live/weight {fmt_list([round(x, 1) for x in r.per_weight]):<15} "
        f"spread final {r.final_spread:.2f} max {r.max_spread:.2f}  ({r.elapsed_s:.1f} s)"
    )
    if r.client_in_flight is not None and r.client_in_flight != r.final:
        line += f"  CLIENT in_flight {r.client_in_flight} != server"
    if r.placed != r.final:
        line += f"  first frames {r.placed} != server"
    print(line, flush=True)


def print_join_run(r: JoinRun, runs: int) -> None:
    level = r.level
    shares = " | ".join(f"{name} {pct(r.share(lo, hi))}" for name, (lo, hi) in r.windows.items())
    state = "" if r.weight0 is None else f", weight {r.weight0:.2f} penalty {r.penalty0:.2f}"
    print(
        f"   run {r.run + 1}/{runs} join   {r.policy:<24} victim b{r.victim} back after "
        f"{r.rejoin_s:.2f} s{state}; new streams {len(r.new)}, victim share {shares}; "
        + (f"level after {level[0]} new streams ({level[1]:.1f} s)" if level else "never level")
        + f"; live {fmt_list(r.final)}"
        + ("" if not r.other_errors else f"  ERRORS {r.other_errors}"),
        flush=True,
    )


def report_spread(runs: list[SpreadRun], policies: Sequence[str]) -> tuple[dict[str, Any], Any]:
    rows = []
    results: dict[str, Any] = {}
    target: dict[str, Any] | None = None
    for policy in policies:
        mine = [r for r in runs if r.policy == policy]
        if not mine:
            continue
        med = statistics.median(r.final_spread for r in mine)
        middle = sorted(mine, key=lambda r: r.final_spread)[len(mine) // 2]
        verdict = "-"
        if policy == "leastconn_weighted":
            met = all(r.within for r in mine)
            verdict = "met" if met else "MISSED"
            target = {
                "what": f"leastconn_weighted: final live per backend within +-{TOLERANCE} "
                f"of {list(IDEAL)} in every run",
                "met": met,
                "runs": [r.within for r in mine],
            }
        rows.append(
            [
                policy,
                " ".join(fmt_list(r.final) for r in mine),
                fmt_list([round(x, 1) for x in middle.per_weight]),
                f"{med:.2f}",
                f"{statistics.median(r.mean_spread for r in mine):.2f}",
                f"{max(r.max_spread for r in mine):.2f}",
                verdict,
            ]
        )
        results[policy] = {
            "final_live_runs": [r.final for r in mine],
            "final_live_per_weight_runs": [[round(x, 2) for x in r.per_weight] for r in mine],
            "final_spread_runs": [rounded(r.final_spread) for r in mine],
            "final_spread_median": rounded(med),
            "mean_spread_runs": [rounded(r.mean_spread) for r in mine],
            "max_spread_runs": [rounded(r.max_spread) for r in mine],
            "max_spread_worst": rounded(max(r.max_spread for r in mine)),
            "client_in_flight_runs": [r.client_in_flight for r in mine],
            "client_matches_server": all(
                r.client_in_flight is None or r.client_in_flight == r.final for r in mine
            ),
            "samples_runs": [len(r.samples) for r in mine],
        }
    print()
    print(
        f"spread: {SPREAD_STREAMS} streams over weights {fmt_list(WEIGHTS)}, ideal "
        f"{fmt_list(IDEAL)}; spread = (max - min) / mean of live / weight "
        f"(mean and max over samples with >= {MIN_LIVE_FOR_MAX} live)"
    )
    print(
        table(
            [
                "policy",
                "final live per run",
                "live/weight (median run)",
                "final spread",
                "mean spread",
                "worst max spread",
                f"+-{TOLERANCE} of {fmt_list(IDEAL)}",
            ],
            rows,
        )
    )
    return results, target


def weight_grid(window_s: float, after_s: float) -> list[float]:
    return [round(i * window_s / 8, 3) for i in range(9)] + [window_s + after_s / 2]


def weight_at(weights: Sequence[tuple[float, float]], t: float) -> float | None:
    """The weight read just before the first open at or after ``t``."""
    for seen, weight in weights:
        if seen >= t - 1e-6:
            return weight
    return None


def report_join(runs: list[JoinRun], policies: Sequence[str], timings: Timings) -> dict[str, Any]:
    rows = []
    results: dict[str, Any] = {}
    w = timings.window_s
    config = grpc_leastconn.SlowStart(window=w)
    for policy in policies:
        mine = [r for r in runs if r.policy == policy]
        if not mine:
            continue
        shares = {
            name: [r.share(lo, hi) for r in mine] for name, (lo, hi) in mine[0].windows.items()
        }
        levels = [r.level for r in mine]
        weight0 = median_or_none([r.weight0 for r in mine])
        rows.append(
            [
                policy,
                f"{statistics.median(r.rejoin_s for r in mine):.2f} s",
                "-" if weight0 is None else f"{weight0:.2f}",
                *(pct(median_or_none(v)) for v in shares.values()),
                " ".join("never" if x is None else str(x[0]) for x in levels),
                " ".join("-" if x is None else f"{x[1]:.1f}" for x in levels),
            ]
        )
        entry: dict[str, Any] = {
            "victim_runs": [r.victim for r in mine],
            "rejoin_s_runs": [round(r.rejoin_s, 3) for r in mine],
            "weight_at_t0_runs": [r.weight0 for r in mine],
            "penalty_at_t0_runs": [rounded(r.penalty0) for r in mine],
            "live_before_stop_runs": [r.before for r in mine],
            "live_at_t0_runs": [r.initial for r in mine],
            "new_streams_runs": [len(r.new) for r in mine],
            **{f"victim_share_{n}_median": rounded(median_or_none(v)) for n, v in shares.items()},
            **{f"victim_share_{n}_runs": [rounded(x) for x in v] for n, v in shares.items()},
            "new_streams_until_level_runs": [None if x is None else x[0] for x in levels],
            "level_at_s_runs": [None if x is None else round(x[1], 3) for x in levels],
            "final_live_runs": [r.final for r in mine],
            "victim_stream_endings": sorted({e for r in mine for e in r.victim_errors}),
            "other_stream_errors": [e for r in mine for e in r.other_errors],
        }
        if any(r.weights for r in mine):
            entry["weight_over_time_runs"] = [
                [[round(t, 2), x] for t, x in r.weights] for r in mine
            ]
            deviations = [abs(x - expected_weight(config, t)) for r in mine for t, x in r.weights]
            entry["weight_max_deviation_from_formula"] = rounded(max(deviations, default=0.0))
            entry["weight_monotonic_runs"] = [
                all(a[1] <= b[1] for a, b in zip(r.weights, r.weights[1:], strict=False))
                for r in mine
            ]
            entry["full_weight_at_s_runs"] = [
                next((round(t, 2) for t, x in r.weights if x >= 1.0), None) for r in mine
            ]
        results[policy] = entry
    print()
    print(
        f"join: 3 equal backends, 10 streams each; one restarts; then one new stream every "
        f"{PACE_S:g} s for {w:g} + {timings.after_s:g} s (slow-start window {w:g} s). "
        "Victim's share of the new streams (fair: 33 %), medians over runs:"
    )
    print(
        table(
            [
                "policy",
                "back after",
                "weight at t=0",
                "first 1 s",
                f"0-{w / 2:g} s",
                f"{w / 2:g}-{w:g} s",
                f"after {w:g} s",
                "new streams until level",
                "level at s",
            ],
            rows,
        )
    )
    ramps = [r for r in runs if r.policy == "leastconn_slow_start" and r.weights]
    if ramps:
        print()
        print(
            "leastconn_slow_start: the victim's weight in channel.backends() right after "
            "the first open at or after t"
        )
        grid = weight_grid(w, timings.after_s)
        table_rows = []
        for t in grid:
            seen = [weight_at(r.weights, t) for r in ramps]
            table_rows.append(
                [
                    f"{t:g} s",
                    *("-" if x is None else f"{x:.2f}" for x in seen),
                    f"{expected_weight(config, t):.2f}",
                ]
            )
        print(
            table(
                ["t", *(f"run {r.run + 1}" for r in ramps), "formula (5 % steps)"],
                table_rows,
            )
        )
    return results


# -- main ------------------------------------------------------------------------------


def parse_args() -> Any:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="repetitions (default 3)")
    ap.add_argument(
        "--window",
        type=float,
        default=None,
        help=f"slow-start window in seconds (default {DEFAULT_TIMINGS.window_s:g}; "
        f"--quick {QUICK_TIMINGS.window_s:g})",
    )
    ap.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}",
    )
    ap.add_argument(
        "--end-streams",
        choices=("cancel", "stop"),
        default="cancel",
        help="how the victim's streams end: cancelled by the client before the stop "
        "(default), or by the server's stop",
    )
    ap.add_argument("--quick", action="store_true", help="one run with shorter windows")
    args = ap.parse_args()
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not args.scenarios or any(s not in SCENARIOS for s in args.scenarios):
        ap.error(f"--scenarios: choose from {','.join(SCENARIOS)}")
    timings = QUICK_TIMINGS if args.quick else DEFAULT_TIMINGS
    if args.quick:
        args.runs = 1
    if args.window is not None:
        timings = Timings(timings.spread_gap_s, args.window, timings.after_s)
    if args.runs < 1 or not 0.5 <= timings.window_s <= 30:
        ap.error("need --runs >= 1 and --window in 0.5..30")
    args.timings = timings
    return args


def rotated(policies: Sequence[str], run: int) -> list[str]:
    k = run % len(policies)
    return [*policies[k:], *policies[:k]]


def main() -> int:
    args = parse_args()
    timings: Timings = args.timings
    # Stopping a backend is deliberate; grpc_leastconn's WARNINGs would drown the tables.
    logging.getLogger("grpc_leastconn").setLevel(logging.ERROR)
    # SIGTERM must unwind through the finally below, or the servers would outlive the table.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    info = print_machine("weighted: weights 1:2:4 and slow start, one client channel, 3 backends")
    per_spread = SPREAD_STREAMS * timings.spread_gap_s + 1.5
    per_join = 2 * timings.window_s + timings.after_s + 2.5
    total = (
        args.runs
        * 3
        * (("spread" in args.scenarios) * per_spread + ("join" in args.scenarios) * per_join)
    )
    print(
        f"   {args.runs} run(s) of {', '.join(args.scenarios)}; window {timings.window_s:g} s, "
        f"then {timings.after_s:g} s; victim's streams end by {args.end_streams}; "
        f"~{total / 60:.1f} min",
        flush=True,
    )
    started = time.monotonic()
    backends = [example_server.start_backend("127.0.0.1", 0) for _ in range(N_BACKENDS)]
    print("   backends: " + ", ".join(f"b{i} {b.address}" for i, b in enumerate(backends)))
    spread_runs: list[SpreadRun] = []
    join_runs: list[JoinRun] = []
    try:
        for run in range(args.runs):
            if "spread" in args.scenarios:
                for policy in rotated(SPREAD_POLICIES, run):
                    spread_runs.append(run_spread(policy, run, backends, timings))
                    print_spread_run(spread_runs[-1], args.runs)
            if "join" in args.scenarios:
                for policy in rotated(JOIN_POLICIES, run):
                    victim = run % N_BACKENDS
                    join_runs.append(
                        run_join(policy, run, backends, victim, timings, args.end_streams)
                    )
                    print_join_run(join_runs[-1], args.runs)
    finally:
        example_server.stop_backends(backends, grace=None, timeout=10)

    summary: dict[str, Any] = {
        "bench": "weighted",
        "quick": args.quick,
        "runs": args.runs,
        "window_s": timings.window_s,
        "after_window_s": timings.after_s,
        "spread_gap_s": timings.spread_gap_s,
        "pace_s": PACE_S,
        "end_streams": args.end_streams,
    }
    targets: dict[str, Any] = {}
    if spread_runs:
        summary["spread"], target = report_spread(spread_runs, SPREAD_POLICIES)
        if target is not None:
            targets["weighted_live_within_1"] = target
            print(f"target, {target['what']}: {'met' if target['met'] else 'MISSED'}")
    if join_runs:
        summary["join"] = report_join(join_runs, JOIN_POLICIES, timings)
    if targets:
        summary["targets"] = targets
    elapsed = time.monotonic() - started
    print(f"\n   took {elapsed:.0f} s")
    summary["elapsed_s"] = round(elapsed, 1)
    summary["load_avg_before"] = info["load_avg"]
    summary["load_avg_after"] = load_average()
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
