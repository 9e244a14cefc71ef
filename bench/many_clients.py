"""Many client processes, one channel each: does server_load level the backends they share?

Four backends in this process (examples/server.py's ``start_backend``, each with
``load_reporter=grpc_leastconn.LoadReporter()`` at its default interval, 1 s) on
127.0.0.1. N client processes (this script with --client; N = 8 and 16) each open
ONE channel of the policy under test, wait until it can use every backend (all
eligible; round_robin: all four answered a Ping; server_load in the extra variant:
backend 0's report shows the extra streams), say so on stdout and wait for a
start time shared by all. From then on each opens ``Join`` server streams at
random times: a Poisson process of RATE_PER_CLIENT streams/s per client during
WINDOW_S, each stream's duration drawn from a mix, half short (uniform 2-5 s),
half long (uniform 8-16 s), frames every 500 ms. Every stream is read to its end
by its own thread. The schedule is drawn with random.Random(seed, run, N, client),
so every policy sees the same one. At 1 stream/s per client and a mean duration
of 7.75 s, about 62 streams are live with 8 clients and 124 with 16 once the
longest have had time to pile up (from 16 s on). Long streams are 8-16 s, not
10-30 s, so that one pass over every cell stays near 12 minutes.

Variants:

  plain  only the N clients
  extra  before the clients start, a plain grpcio process (--hold, pick_first on
         backend 0) opens 1.5 x N streams on backend 0 (12 with 8 clients, 24 with
         16) and holds them for the whole run. They are load on backend 0 and
         count in the balance; only server_load can see them.

Policies, one run each per (variant, N), interleaved (the order rotates with the
run):

  grpc_round_robin              grpc.insecure_channel("ipv4:a,b,c,d"), round_robin
  leastconn_local               grpc_leastconn.insecure_channel(addresses): each
                                channel counts only its own streams
  leastconn_server_load         server_load=True: own streams + the others the
                                backends report; the better of two random backends
  leastconn_server_load_lowest  the same reports, but the exact lowest backend
                                (Seams(two_choices=False)): the alternative two
                                random choices is meant to beat when every client
                                reads the same, up to 1 s old, reports

Measured: from the shared start until every client stream has ended, this
process reads ``servicer.live_streams`` of each backend every 0.2 s. For each
sample with at least 8 live streams in total, ratio = max / mean over the four
backends. Per cell: the mean ratio over those samples, its p95 and max, the mean
spread (max - min); "floor" is the mean ratio a perfect placement would reach on
the same totals (whole streams; in the extra variant backend 0 cannot hold fewer
than the held streams, so with few live streams the floor itself is far above
1.2). The mean is also split by phase: ramp (before the longest stream could have
ended: live streams still pile up), steady (up to the end of the opening window)
and drain (no more opens, streams only end).

The figure judged is the steady phase's mean ratio (target <= 1.2 for
leastconn_server_load, in both variants and with 8 and 16 clients): a service
runs in its steady phase. The ramp and the drain exist because every client of
the run starts and stops at once; in them a placement has little to work with
(in the drain no stream opens at all) and, in the extra variant, the held
streams alone keep the floor of the whole run near 1.5. The whole-run mean is
reported beside it.

Per pick (each client stream), from every client's own record of when its
streams opened and ended and where they went: "excess" is how many more streams
the chosen backend held at that moment than the least loaded one, "on lowest" the
share of picks that went to a least loaded backend; "view err" (grpc_leastconn
only) the mean |what the channel believed - what was true| per backend just
before the pick (``channel.backends()``: in_flight + reported_others). With
server_load that error is the staleness of the shared reports.

The hot path (in this process): 1 backend with the reporter; closed-loop unary
``Ping`` from 4 threads, in interleaved blocks of 2 s: raw grpcio, grpc_leastconn
with local counts, grpc_leastconn with server_load=True (which also reads every
call's trailers). Reported: calls/s (median of the rounds), wall us per call at
that throughput (1e6 / calls/s: the process is CPU bound), what server_load adds
per call and server_load/local calls/s, both as medians of per-round values.

Run:  python bench/many_clients.py [--runs 1] [--clients 8,16] [--quick]
      python bench/many_clients.py --hot-path-only
A default run (1 run per cell: 2 variants x 2 client counts x 4 policies, about
42 s each, then the hot path, about 40 s) takes about 12 minutes; --quick (4
clients, every time scaled by 0.2, a short hot path) about 1.5 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue
import random
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from _common import (
    load_average,
    parse_list,
    print_machine,
    print_summary,
    seams,
    setup_paths,
    table,
)

setup_paths()
# C-core logs the servers' GOAWAY at INFO when the backends stop; keep the output readable.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import conference_pb2  # noqa: E402
import conference_pb2_grpc  # noqa: E402
import grpc  # noqa: E402

import grpc_leastconn  # noqa: E402

N_BACKENDS = 4
CLIENT_COUNTS = (8, 16)
VARIANTS = ("plain", "extra")
POLICIES = (
    "grpc_round_robin",
    "leastconn_local",
    "leastconn_server_load",
    "leastconn_server_load_lowest",
)
LEASTCONN = POLICIES[1:]
GRADED = "leastconn_server_load"
# Streams the holder keeps on backend 0 in the extra variant, per client process.
EXTRA_PER_CLIENT = 1.5
# The schedule (unscaled): opens per second per client, for how long, which durations.
RATE_PER_CLIENT = 1.0
WINDOW_S = 24.0
SHORT_S = (2.0, 5.0)
LONG_S = (8.0, 16.0)
LONG_SHARE = 0.5
FRAME_INTERVAL_MS = 500
SAMPLE_EVERY_S = 0.2
MIN_TOTAL = 8
TARGET_RATIO = 1.2
# Sync servers hold a worker thread per stream: Joins, plus one health Watch and
# one ORCA stream per grpc_leastconn client channel. 64 (the default) is too few.
MAX_WORKERS = 256
ROUND_ROBIN_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
PICK_FIRST_CONFIG = json.dumps({"loadBalancingConfig": [{"pick_first": {}}]})
# Bounds on every wait.
READY_TIMEOUT_S = 30.0
START_DELAY_S = 0.5
STREAM_SLACK_S = 20.0
EXIT_TIMEOUT_S = 5.0
IDLE_TIMEOUT_S = 15.0
CALL_TIMEOUT_S = 5.0
MAX_WARM_PINGS = 400
# The hot path.
HOT_THREADS = 4
HOT_ROUNDS = 6
HOT_BLOCK_S = 2.0
HOT_POLICIES = ("grpc_raw", "leastconn_local", "leastconn_server_load")


@dataclass(frozen=True)
class Config:
    scale: float
    rate: float  # opens per second per client
    window_s: float
    short_s: tuple[float, float]
    long_s: tuple[float, float]
    frame_ms: int

    @classmethod
    def scaled(cls, scale: float) -> Config:
        return cls(
            scale=scale,
            # Shorter streams, more of them: about as many live at once.
            rate=RATE_PER_CLIENT / scale,
            window_s=WINDOW_S * scale,
            short_s=(SHORT_S[0] * scale, SHORT_S[1] * scale),
            long_s=(LONG_S[0] * scale, LONG_S[1] * scale),
            frame_ms=max(100, round(FRAME_INTERVAL_MS * scale)),
        )

    @property
    def ramp_s(self) -> float:
        """Until the longest stream may end, live streams only pile up."""
        return self.long_s[1]

    @property
    def limit_s(self) -> float:
        """The latest a run may end, from its start."""
        return self.window_s + self.long_s[1] + STREAM_SLACK_S

    @property
    def mean_duration_s(self) -> float:
        return (1 - LONG_SHARE) * sum(self.short_s) / 2 + LONG_SHARE * sum(self.long_s) / 2

    def run_s(self) -> float:
        """About how long one run takes (start-up, window, the last long streams)."""
        return 3.0 + self.window_s + 0.9 * self.long_s[1]


def extra_for(clients: int, variant: str) -> int:
    return round(EXTRA_PER_CLIENT * clients) if variant == "extra" else 0


def make_plan(cfg: Config, seed: int, run: int, clients: int, index: int) -> list[list[float]]:
    """One client's [offset s, duration ms] opens: the same for every policy and variant."""
    rng = random.Random(f"many_clients:{seed}:{run}:{clients}:{index}")
    plan: list[list[float]] = []
    t = rng.expovariate(cfg.rate)
    while t < cfg.window_s:
        lo, hi = cfg.long_s if rng.random() < LONG_SHARE else cfg.short_s
        plan.append([round(t, 4), round(rng.uniform(lo, hi) * 1000)])
        t += rng.expovariate(cfg.rate)
    return plan


# -- the client processes (python bench/many_clients.py --client JSON) -----------------


def emit(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


def read_line(timeout: float) -> str:
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    return sys.stdin.readline() if ready else ""


def open_client_channel(policy: str, addresses: Sequence[str], seed: int) -> grpc.Channel:
    rng = random.Random(seed)
    if policy == "grpc_round_robin":
        return grpc.insecure_channel(
            "ipv4:" + ",".join(addresses), options=[("grpc.service_config", ROUND_ROBIN_CONFIG)]
        )
    if policy == "leastconn_local":
        return grpc_leastconn.insecure_channel(list(addresses), rng=rng)
    if policy == "leastconn_server_load":
        return grpc_leastconn.insecure_channel(list(addresses), server_load=True, rng=rng)
    if policy == "leastconn_server_load_lowest":
        s = seams()
        return s.open_channel(  # type: ignore[no-any-return]
            list(addresses), seams=s.Seams(two_choices=False), server_load=True, rng=rng
        )
    raise ValueError(f"unknown policy {policy!r}")


def warm_client(
    policy: str, channel: grpc.Channel, addresses: Sequence[str], extra: int, deadline: float
) -> None:
    """Return once every backend would take the next stream, or raise."""
    try:
        grpc.channel_ready_future(channel).result(timeout=max(0.1, deadline - time.monotonic()))
    except grpc.FutureTimeoutError:
        states = getattr(channel, "backends", lambda: "(grpcio channel)")()
        raise RuntimeError(f"channel not READY within {READY_TIMEOUT_S:g} s: {states}") from None
    if policy == "grpc_round_robin":
        # READY as soon as one connection is; round_robin rotates over the connected ones.
        ping = conference_pb2_grpc.ConferenceStub(channel).Ping  # type: ignore[no-untyped-call]
        seen: set[str] = set()
        for _ in range(MAX_WARM_PINGS):
            if seen == set(addresses) or time.monotonic() > deadline:
                break
            seen.add(ping(conference_pb2.PingRequest(), timeout=CALL_TIMEOUT_S).backend)
        if seen != set(addresses):
            raise RuntimeError(f"round_robin reached only {sorted(seen)}")
        return
    assert isinstance(channel, grpc_leastconn.LeastConnChannel)

    def ready() -> bool:
        states = channel.backends()
        if len(states) != len(addresses) or not all(s.eligible for s in states):
            return False
        if extra and "server_load" in policy:
            # The held streams are in backend 0's report before we start.
            first = next(s for s in states if s.address == addresses[0])
            return first.reported_others >= extra
        return True

    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not ready: {channel.backends()}")
        time.sleep(0.02)


@dataclass
class StreamRecord:
    t_open: float
    duration_ms: int
    view: list[int] | None
    t_end: float | None = None
    backend: int = -1
    error: str | None = None

    def row(self) -> list[Any]:
        return [
            round(self.t_open, 4),
            None if self.t_end is None else round(self.t_end, 4),
            self.backend,
            self.error,
            self.view,
        ]


def client(spec: dict[str, Any]) -> int:
    policy, addresses = spec["policy"], spec["addresses"]
    index_of = {a: i for i, a in enumerate(addresses)}
    stop = threading.Event()
    calls: list[Any] = []
    threads: list[threading.Thread] = []
    records: list[StreamRecord] = []
    channel = open_client_channel(policy, addresses, spec["seed"])
    try:
        started = time.monotonic()
        try:
            warm_client(policy, channel, addresses, spec["extra"], started + READY_TIMEOUT_S)
        except Exception as exc:
            emit({"ready": False, "error": repr(exc)})
            return 1
        emit({"ready": True, "warm_s": round(time.monotonic() - started, 3)})
        line = read_line(READY_TIMEOUT_S)
        if not line:
            return 1
        start_at = float(json.loads(line)["start_at"])

        def watch_stdin() -> None:
            # EOF: the coordinator is done with us (or gone): stop.
            sys.stdin.readline()
            stop.set()

        threading.Thread(target=watch_stdin, daemon=True).start()
        join = conference_pb2_grpc.ConferenceStub(channel).Join  # type: ignore[no-untyped-call]
        backends = getattr(channel, "backends", None)

        def consume(call: Any, record: StreamRecord) -> None:
            try:
                for frame in call:
                    if record.backend < 0:
                        record.backend = index_of.get(frame.backend, -1)
            except grpc.RpcError as exc:
                record.error = f"{exc.code().name}: {exc.details()}"
            finally:
                record.t_end = time.time() - start_at

        for number, (offset, duration_ms) in enumerate(spec["plan"]):
            if stop.wait(max(0.0, start_at + offset - time.time())):
                break
            view = None
            if backends is not None:
                believed = {s.address: s.in_flight + s.reported_others for s in backends()}
                view = [believed.get(a, -1) for a in addresses]
            record = StreamRecord(time.time() - start_at, int(duration_ms), view)
            request = conference_pb2.JoinRequest(
                session_id=f"{spec['index']}-{number}",
                duration_ms=int(duration_ms),
                frame_interval_ms=spec["frame_ms"],
            )
            call = join(request, timeout=duration_ms / 1000 + STREAM_SLACK_S)
            calls.append(call)
            records.append(record)
            thread = threading.Thread(target=consume, args=(call, record), daemon=True)
            thread.start()
            threads.append(thread)
        longest = max((d for _, d in spec["plan"]), default=0) / 1000
        limit = time.monotonic() + longest + STREAM_SLACK_S
        for thread in threads:
            # Bounded: each stream has a timeout, and so has this wait.
            while thread.is_alive() and not stop.is_set() and time.monotonic() < limit:
                thread.join(0.2)
        emit({"done": True, "streams": [r.row() for r in records]})
        return 0
    finally:
        for call in calls:
            call.cancel()
        for thread in threads:
            thread.join(2)
        channel.close()


def hold(spec: dict[str, Any]) -> int:
    """A plain grpcio client holding ``count`` endless Joins on one backend until stdin ends."""
    channel = grpc.insecure_channel(
        "ipv4:" + spec["address"], options=[("grpc.service_config", PICK_FIRST_CONFIG)]
    )
    calls: list[Any] = []
    threads: list[threading.Thread] = []
    first = threading.Semaphore(0)

    def consume(call: Any) -> None:
        seen = False
        with contextlib.suppress(grpc.RpcError):
            for _ in call:
                if not seen:
                    seen = True
                    first.release()

    try:
        join = conference_pb2_grpc.ConferenceStub(channel).Join  # type: ignore[no-untyped-call]
        for i in range(spec["count"]):
            request = conference_pb2.JoinRequest(
                session_id=f"hold-{i}", duration_ms=0, frame_interval_ms=spec["frame_ms"]
            )
            calls.append(join(request, timeout=spec["limit_s"]))
            threads.append(threading.Thread(target=consume, args=(calls[-1],), daemon=True))
            threads[-1].start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        got = sum(first.acquire(timeout=max(0.0, deadline - time.monotonic())) for _ in calls)
        emit({"ready": got == len(calls), "streams": got})
        # Until the coordinator closes our stdin (or dies); the streams' timeout bounds it too.
        read_line(spec["limit_s"])
        return 0
    finally:
        for call in calls:
            call.cancel()
        for thread in threads:
            thread.join(2)
        channel.close()


# -- the coordinator's view of a child process ------------------------------------------


class Child:
    """One child process, messages from its stdout; close() ends that process only (its PID)."""

    def __init__(self, mode: str, spec: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), mode, json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.eof = False

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):
            for line in self.proc.stdout:
                self._lines.put(line)
        self._lines.put(None)

    def message(self, timeout: float) -> dict[str, Any] | None:
        """The next JSON message, None if none came within ``timeout`` (or EOF)."""
        if self.eof:
            return None
        try:
            line = self._lines.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if line is None:
            self.eof = True
            return None
        return json.loads(line)  # type: ignore[no-any-return]

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(EXIT_TIMEOUT_S)
        self._reader.join(EXIT_TIMEOUT_S)
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()


# -- one run ---------------------------------------------------------------------------


@dataclass
class Run:
    policy: str
    variant: str
    clients: int
    run: int
    extra: int
    # (seconds after the start, live streams per backend) every SAMPLE_EVERY_S.
    samples: list[tuple[float, list[int]]]
    # Per client stream: [t_open, t_end, backend, error, view].
    streams: list[list[Any]]
    elapsed_s: float
    warm_s_max: float
    phases: dict[str, list[float]] = field(default_factory=dict)

    @property
    def errors(self) -> list[str]:
        return [s[3] for s in self.streams if s[3]]


def server_state(backends: list[Any]) -> list[dict[str, Any]]:
    """What the backends hold now, for an error message."""
    out = []
    for backend in backends:
        stats = backend.servicer.stats()
        pool = backend.executor
        out.append(
            {
                "live": stats.live,
                "live_streams": stats.live_streams,
                "reporter_in_flight": backend.reporter.in_flight,
                # The stdlib pool's own counters (private; a diagnosis only).
                "pool_threads": len(getattr(pool, "_threads", ())),
                "pool_queued": getattr(getattr(pool, "_work_queue", None), "qsize", lambda: -1)(),
            }
        )
    return out


def check_idle(backends: list[Any]) -> None:
    for backend in backends:
        # The next run starts from empty backends.
        if not backend.servicer.wait_until(lambda s: s.live_streams == 0, timeout=IDLE_TIMEOUT_S):
            raise RuntimeError(
                f"{backend.address} still has {backend.servicer.live_streams} live streams"
            )


def run_once(
    cfg: Config, policy: str, variant: str, clients: int, run: int, seed: int, backends: list[Any]
) -> Run:
    addresses = [b.address for b in backends]
    extra = extra_for(clients, variant)
    children: list[Child] = []
    holder: Child | None = None
    samples: list[tuple[float, list[int]]] = []
    done: dict[int, dict[str, Any]] = {}
    try:
        if extra:
            holder = Child(
                "--hold",
                {
                    "address": addresses[0],
                    "count": extra,
                    "frame_ms": cfg.frame_ms,
                    "limit_s": cfg.limit_s + READY_TIMEOUT_S * 2,
                },
            )
            message = holder.message(READY_TIMEOUT_S)
            if not message or not message.get("ready"):
                raise RuntimeError(f"the holder did not get its streams: {message}")
            if not backends[0].servicer.wait_until(lambda s: s.live_streams >= extra, 10):
                raise RuntimeError("backend 0 does not show the held streams")
        for i in range(clients):
            spec = {
                "index": i,
                "policy": policy,
                "addresses": addresses,
                "plan": make_plan(cfg, seed, run, clients, i),
                "frame_ms": cfg.frame_ms,
                "seed": seed * 1000 + run * 100 + i,
                "extra": extra,
            }
            children.append(Child("--client", spec))
        deadline = time.monotonic() + READY_TIMEOUT_S
        warm = []
        for i, child in enumerate(children):
            message = child.message(deadline - time.monotonic())
            if not message or not message.get("ready"):
                raise RuntimeError(
                    f"client {i} ({policy}) did not get ready: {message}; "
                    f"backends: {server_state(backends)}"
                )
            warm.append(message["warm_s"])
        start_at = time.time() + START_DELAY_S
        t0 = time.monotonic() + (start_at - time.time())
        for child in children:
            child.send({"start_at": start_at})
        # Bounded: one sample per SAMPLE_EVERY_S, at most until cfg.limit_s.
        for k in range(int(cfg.limit_s / SAMPLE_EVERY_S) + 1):
            time.sleep(max(0.0, t0 + k * SAMPLE_EVERY_S - time.monotonic()))
            samples.append((k * SAMPLE_EVERY_S, [b.servicer.live_streams for b in backends]))
            for i, child in enumerate(children):
                if i not in done:
                    message = child.message(0)
                    if message is not None and message.get("done"):
                        done[i] = message
                    elif child.eof:
                        raise RuntimeError(f"client {i} ({policy}) ended without its results")
            if len(done) == clients:
                break
        else:
            raise RuntimeError(f"clients still streaming after {cfg.limit_s:.0f} s")
        elapsed = time.monotonic() - t0
    finally:
        for child in children:
            child.close()
        if holder is not None:
            holder.close()
        check_idle(backends)
    streams = [row for i in sorted(done) for row in done[i]["streams"]]
    return Run(policy, variant, clients, run, extra, samples, streams, elapsed, max(warm))


# -- figures ----------------------------------------------------------------------------


def floor_ratio(total: int, extra: int) -> float:
    """max/mean of the best placement of ``total`` streams, ``extra`` of them fixed on one."""
    mean = total / N_BACKENDS
    return max(math.ceil(mean), extra) / mean


PHASES = ("ramp", "steady", "drain")
# The time series of the ratio is shown in bins of this many (unscaled) seconds.
BIN_S = 2.0


def phase(t: float, cfg: Config) -> str:
    if t < cfg.ramp_s:
        return "ramp"
    return "steady" if t < cfg.window_s else "drain"


@dataclass
class Figures:
    ratios: list[float]
    spreads: list[int]
    floors: list[float]
    by_phase: dict[str, list[float]]
    floor_by_phase: dict[str, list[float]]
    # Ratios by BIN_S bin of time since the start.
    bins: dict[int, list[float]]
    excess: list[int]
    view_errors: list[float]
    picks: int
    errors: int


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def truth_at_picks(run: Run) -> list[tuple[list[int], list[Any]]]:
    """Per client stream: the live streams of each backend just before it opened."""
    known = [s for s in run.streams if s[2] >= 0 and s[1] is not None]
    out = []
    for stream in known:
        t = stream[0]
        live = [0] * N_BACKENDS
        live[0] += run.extra
        for other in known:
            if other is not stream and other[0] < t < other[1]:
                live[other[2]] += 1
        out.append((live, stream))
    return out


def figures(runs: Sequence[Run], cfg: Config) -> Figures:
    f = Figures([], [], [], {p: [] for p in PHASES}, {p: [] for p in PHASES}, {}, [], [], 0, 0)
    for run in runs:
        for t, live in run.samples:
            total = sum(live)
            if total < MIN_TOTAL:
                continue
            ratio = max(live) / (total / N_BACKENDS)
            f.ratios.append(ratio)
            f.spreads.append(max(live) - min(live))
            f.floors.append(floor_ratio(total, run.extra))
            f.by_phase[phase(t, cfg)].append(ratio)
            f.floor_by_phase[phase(t, cfg)].append(f.floors[-1])
            f.bins.setdefault(int(t / (BIN_S * cfg.scale)), []).append(ratio)
        for live, stream in truth_at_picks(run):
            f.picks += 1
            f.excess.append(live[stream[2]] - min(live))
            view = stream[4]
            if view is not None:
                f.view_errors.append(
                    statistics.fmean(abs(v - x) for v, x in zip(view, live, strict=True))
                )
        f.errors += len(run.errors)
    return f


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def fmt(x: float, digits: int = 2) -> str:
    return "-" if x != x else f"{x:.{digits}f}"


def cell_results(f: Figures, runs: Sequence[Run]) -> dict[str, Any]:
    per_run = []
    for run in runs:
        ratios = [
            max(live) / (sum(live) / N_BACKENDS)
            for _, live in run.samples
            if sum(live) >= MIN_TOTAL
        ]
        per_run.append(round(mean(ratios), 4))
    return {
        "mean_ratio": round(mean(f.ratios), 4),
        "mean_ratio_per_run": per_run,
        "p95_ratio": round(percentile(f.ratios, 0.95), 4),
        "max_ratio": round(max(f.ratios, default=float("nan")), 4),
        "mean_spread": round(mean(f.spreads), 3),
        "floor_mean_ratio": round(mean(f.floors), 4),
        "mean_ratio_ramp": round(mean(f.by_phase["ramp"]), 4),
        "mean_ratio_steady": round(mean(f.by_phase["steady"]), 4),
        "mean_ratio_drain": round(mean(f.by_phase["drain"]), 4),
        "floor_ramp": round(mean(f.floor_by_phase["ramp"]), 4),
        "floor_steady": round(mean(f.floor_by_phase["steady"]), 4),
        "floor_drain": round(mean(f.floor_by_phase["drain"]), 4),
        "mean_ratio_by_bin": [round(mean(f.bins[b]), 3) for b in sorted(f.bins)],
        "samples": len(f.ratios),
        "picks": f.picks,
        "mean_pick_excess": round(mean(f.excess), 3),
        "picks_on_lowest": round(mean([e == 0 for e in f.excess]), 4),
        "mean_view_error": round(mean(f.view_errors), 3) if f.view_errors else None,
        "errors": f.errors,
        "mean_live_total": round(
            mean([sum(live) for run in runs for _, live in run.samples if sum(live) >= MIN_TOTAL]),
            1,
        ),
        "elapsed_s_per_run": [round(r.elapsed_s, 1) for r in runs],
    }


def report(
    runs: list[Run], cfg: Config, variants: list[str], counts: list[int], policies: list[str]
) -> tuple[dict[str, Any], dict[str, bool]]:
    results: dict[str, Any] = {}
    verdicts: dict[str, bool] = {}
    for variant in variants:
        for n in counts:
            rows = []
            key = f"{variant}/{n}"
            results[key] = {}
            for policy in policies:
                mine = [
                    r
                    for r in runs
                    if r.policy == policy and r.variant == variant and r.clients == n
                ]
                if not mine:
                    continue
                f = figures(mine, cfg)
                res = results[key][policy] = cell_results(f, mine)
                verdict = "-"
                if policy == GRADED:
                    verdicts[key] = res["mean_ratio_steady"] <= TARGET_RATIO
                    verdict = "met" if verdicts[key] else "MISSED"
                rows.append(
                    [
                        policy,
                        fmt(res["mean_ratio"], 3),
                        fmt(res["p95_ratio"]),
                        fmt(res["max_ratio"]),
                        fmt(res["mean_spread"], 1),
                        fmt(res["floor_mean_ratio"], 3),
                        *(
                            f"{fmt(res[f'mean_ratio_{p}'])}/{fmt(res[f'floor_{p}'])}"
                            for p in PHASES
                        ),
                        res["samples"],
                        fmt(res["mean_live_total"], 0),
                        fmt(res["mean_pick_excess"]),
                        f"{100 * res['picks_on_lowest']:.0f} %",
                        "-" if res["mean_view_error"] is None else fmt(res["mean_view_error"]),
                        res["errors"],
                        verdict,
                    ]
                )
            series = [
                f"   {p:<28} " + " ".join(fmt(x) for x in results[key][p]["mean_ratio_by_bin"])
                for p in policies
                if p in results[key]
            ]
            extra = extra_for(n, variant)
            print(
                f"\n{variant}: {n} client processes"
                + (f", {extra} streams held on backend 0" if extra else "")
                + f" (samples with >= {MIN_TOTAL} live; ratio = max/mean over the backends)"
            )
            print(
                table(
                    [
                        "policy",
                        "mean max/mean",
                        "p95",
                        "max",
                        "spread",
                        "floor",
                        "ramp/floor",
                        "steady/floor",
                        "drain/floor",
                        "samples",
                        "live",
                        "excess",
                        "on lowest",
                        "view err",
                        "errors",
                        f"steady <= {TARGET_RATIO:g}",
                    ],
                    rows,
                )
            )
            print(f"   mean max/mean per {BIN_S * cfg.scale:g} s since the start:")
            print("\n".join(series))
    return results, verdicts


def print_run(run: Run, cfg: Config) -> None:
    f = figures([run], cfg)
    errors = run.errors
    print(
        f"   run {run.run + 1} {run.variant:<5} {run.clients:>2} clients {run.policy:<28} "
        f"mean max/mean {fmt(mean(f.ratios), 3)} (floor {fmt(mean(f.floors), 3)})  "
        f"p95 {fmt(percentile(f.ratios, 0.95))}  {len(run.streams)} streams  "
        f"{run.elapsed_s:.0f} s" + (f"  ERRORS {len(errors)}: {errors[0]}" if errors else ""),
        flush=True,
    )


# -- the hot path ------------------------------------------------------------------------


def closed_loop(ping: Callable[..., Any], threads: int, seconds: float) -> float:
    """Calls per second of ``threads`` threads calling ``ping`` back to back."""
    counts = [0] * threads
    errors: list[BaseException] = []
    start = time.perf_counter() + 0.05
    end = start + seconds
    request = conference_pb2.PingRequest()

    def work(i: int) -> None:
        n = 0
        try:
            time.sleep(max(0.0, start - time.perf_counter()))
            while time.perf_counter() < end:
                ping(request, timeout=CALL_TIMEOUT_S)
                n += 1
        except Exception as exc:
            errors.append(exc)
        counts[i] = n

    pool = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(seconds + CALL_TIMEOUT_S + 5)
    if errors or any(t.is_alive() for t in pool):
        raise RuntimeError(f"hot path calls failed: {errors[:1]}")
    return sum(counts) / seconds


def hot_path(rounds: int, block_s: float, threads: int) -> dict[str, Any]:
    import server as example_server

    backend = example_server.start_backend(
        "127.0.0.1", 0, load_reporter=grpc_leastconn.LoadReporter(), observe_authority=False
    )
    channels: dict[str, grpc.Channel] = {}
    cps: dict[str, list[float]] = {p: [] for p in HOT_POLICIES}
    try:
        channels["grpc_raw"] = grpc.insecure_channel(backend.address)
        channels["leastconn_local"] = grpc_leastconn.insecure_channel([backend.address])
        channels["leastconn_server_load"] = grpc_leastconn.insecure_channel(
            [backend.address], server_load=True
        )
        pings = {}
        for name, channel in channels.items():
            grpc.channel_ready_future(channel).result(timeout=READY_TIMEOUT_S)
            if isinstance(channel, grpc_leastconn.LeastConnChannel):
                deadline = time.monotonic() + READY_TIMEOUT_S
                while not all(s.eligible for s in channel.backends()):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name}: backend not eligible")
                    time.sleep(0.01)
            pings[name] = conference_pb2_grpc.ConferenceStub(channel).Ping  # type: ignore[no-untyped-call]
            for _ in range(200):
                pings[name](conference_pb2.PingRequest(), timeout=CALL_TIMEOUT_S)
        for r in range(rounds):
            order = HOT_POLICIES[r % 3 :] + HOT_POLICIES[: r % 3]
            for name in order:
                cps[name].append(closed_loop(pings[name], threads, block_s))
            print(
                f"   hot path round {r + 1}/{rounds}: "
                + "  ".join(f"{p} {cps[p][-1]:6.0f}/s" for p in HOT_POLICIES),
                flush=True,
            )
    finally:
        for channel in channels.values():
            channel.close()
        backend.stop(timeout=5)
    local, sl, raw = cps["leastconn_local"], cps["leastconn_server_load"], cps["grpc_raw"]
    added = statistics.median(1e6 / b - 1e6 / a for a, b in zip(local, sl, strict=True))
    ratio = statistics.median(b / a for a, b in zip(local, sl, strict=True))
    local_added = statistics.median(1e6 / b - 1e6 / a for a, b in zip(raw, local, strict=True))
    rows = []
    for name in HOT_POLICIES:
        med = statistics.median(cps[name])
        rows.append(
            [
                name,
                f"{med:.0f}",
                f"{min(cps[name]):.0f} .. {max(cps[name]):.0f}",
                f"{1e6 / med:.1f}",
            ]
        )
    print(
        f"\nhot path: unary Ping, {threads} threads closed loop, 1 backend with the reporter, "
        f"{rounds} rounds of {block_s:g} s blocks"
    )
    print(table(["channel", "calls/s (median)", "range", "us/call"], rows))
    print(
        f"server_load adds {added:.1f} us per call (median of rounds); "
        f"server_load/local calls/s {ratio:.3f}; local over raw grpcio {local_added:.1f} us"
    )
    return {
        "threads": threads,
        "rounds": rounds,
        "block_s": block_s,
        "calls_per_s": {p: [round(x) for x in cps[p]] for p in HOT_POLICIES},
        "calls_per_s_median": {p: round(statistics.median(cps[p])) for p in HOT_POLICIES},
        "server_load_added_us_per_call": round(added, 2),
        "server_load_over_local_calls_per_s": round(ratio, 4),
        "local_added_over_raw_us_per_call": round(local_added, 2),
    }


# -- main --------------------------------------------------------------------------------


def parse_counts(value: str) -> list[int]:
    try:
        counts = [int(v) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of client counts: {value!r}") from exc
    if not counts or not all(1 <= n <= 32 for n in counts):
        raise argparse.ArgumentTypeError("client counts must be 1..32")
    return counts


def parse_args() -> Any:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1, help="runs per cell (default 1)")
    ap.add_argument(
        "--clients",
        type=parse_counts,
        default=list(CLIENT_COUNTS),
        help="comma-separated client process counts (default 8,16)",
    )
    ap.add_argument(
        "--variants",
        type=lambda v: parse_list(v, VARIANTS, "variant"),
        default=list(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)}",
    )
    ap.add_argument(
        "--policies",
        type=lambda v: parse_list(v, POLICIES, "policy"),
        default=list(POLICIES),
        help=f"comma-separated subset of {','.join(POLICIES)}",
    )
    ap.add_argument("--seed", type=int, default=1, help="schedule seed (default 1)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every duration")
    ap.add_argument("--hot-rounds", type=int, default=HOT_ROUNDS, help="hot path rounds")
    ap.add_argument("--hot-block-s", type=float, default=HOT_BLOCK_S, help="hot path block (s)")
    ap.add_argument("--hot-threads", type=int, default=HOT_THREADS, help="hot path threads")
    ap.add_argument("--hot-path-only", action="store_true", help="only the hot path")
    ap.add_argument("--no-hot-path", action="store_true", help="skip the hot path")
    ap.add_argument(
        "--quick", action="store_true", help="4 clients, one run at --scale 0.2, short hot path"
    )
    ap.add_argument("--client", help=argparse.SUPPRESS)
    ap.add_argument("--hold", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.runs, args.scale, args.clients = 1, 0.2, [4]
        args.hot_rounds, args.hot_block_s = 2, 0.5
    if args.runs < 1 or not 0 < args.scale <= 10:
        ap.error("need --runs >= 1 and 0 < --scale <= 10")
    if args.hot_rounds < 1 or not 0 < args.hot_block_s <= 60 or not 1 <= args.hot_threads <= 64:
        ap.error("need --hot-rounds >= 1, 0 < --hot-block-s <= 60, 1 <= --hot-threads <= 64")
    return args


def main() -> int:
    args = parse_args()
    if args.client is not None or args.hold is not None:
        # SIGTERM (the coordinator's last resort) must unwind through the finally blocks.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        if args.client is not None:
            return client(json.loads(args.client))
        return hold(json.loads(args.hold))

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cfg = Config.scaled(args.scale)
    began = time.monotonic()
    info = print_machine(
        f"many_clients: {N_BACKENDS} backends with the reporter, client processes with a "
        "channel each"
    )
    do_balance = not args.hot_path_only
    do_hot = not args.no_hot_path
    cells = len(args.variants) * len(args.clients) * len(args.policies) * args.runs
    if do_balance:
        print(
            f"   {args.runs} run(s) x {len(args.variants)} variants x clients "
            f"{','.join(map(str, args.clients))} x {len(args.policies)} policies = {cells} runs "
            f"of ~{cfg.run_s():.0f} s: ~{cells * cfg.run_s() / 60:.1f} min; opens "
            f"{cfg.rate:g}/s per client for {cfg.window_s:g} s, durations "
            f"{cfg.short_s[0]:g}-{cfg.short_s[1]:g} s or {cfg.long_s[0]:g}-{cfg.long_s[1]:g} s "
            f"(about {cfg.rate * cfg.mean_duration_s:.1f} live per client at most), frames "
            f"every {cfg.frame_ms} ms",
            flush=True,
        )
    summary: dict[str, Any] = {
        "bench": "many_clients",
        "quick": args.quick,
        "runs": args.runs,
        "scale": args.scale,
        "seed": args.seed,
        "clients": args.clients,
        "schedule": {
            "opens_per_s_per_client": cfg.rate,
            "window_s": cfg.window_s,
            "short_s": list(cfg.short_s),
            "long_s": list(cfg.long_s),
            "long_share": LONG_SHARE,
            "frame_ms": cfg.frame_ms,
            "extra_per_client": EXTRA_PER_CLIENT,
        },
    }
    if do_hot:
        summary["hot_path"] = hot_path(args.hot_rounds, args.hot_block_s, args.hot_threads)
    if do_balance:
        import server as example_server

        backends = [
            example_server.start_backend(
                "127.0.0.1",
                0,
                max_workers=MAX_WORKERS,
                load_reporter=grpc_leastconn.LoadReporter(),
            )
            for _ in range(N_BACKENDS)
        ]
        print("   backends: " + ", ".join(f"b{i} {b.address}" for i, b in enumerate(backends)))
        runs: list[Run] = []
        failures: list[str] = []
        cell = 0
        try:
            for r in range(args.runs):
                for variant in args.variants:
                    for n in args.clients:
                        # The policies' order rotates from cell to cell.
                        k = cell % len(args.policies)
                        cell += 1
                        for policy in args.policies[k:] + args.policies[:k]:
                            # A broken run is reported and tried once more; it must
                            # not lose the others.
                            for attempt in range(2):
                                try:
                                    run = run_once(cfg, policy, variant, n, r, args.seed, backends)
                                except RuntimeError as exc:
                                    failures.append(
                                        f"{variant}/{n} {policy} run {r + 1} "
                                        f"attempt {attempt + 1}: {exc}"
                                    )
                                    print(f"   FAILED: {failures[-1]}", flush=True)
                                    continue
                                runs.append(run)
                                print_run(run, cfg)
                                break
        finally:
            example_server.stop_backends(backends, grace=None, timeout=10)
        results, verdicts = report(runs, cfg, args.variants, args.clients, args.policies)
        print()
        for key, met in verdicts.items():
            print(
                f"{GRADED}, {key}: steady mean max/mean "
                f"{results[key][GRADED]['mean_ratio_steady']:.3f} <= {TARGET_RATIO:g}: "
                f"{'met' if met else 'MISSED'} (whole run "
                f"{results[key][GRADED]['mean_ratio']:.3f})"
            )
        summary["results"] = results
        summary["failed_runs"] = failures
        summary["target_mean_ratio"] = TARGET_RATIO
        summary["target_met"] = verdicts
        expected = {f"{v}/{n}" for v in args.variants for n in args.clients}
        summary["target_met_all"] = (
            GRADED in args.policies and set(verdicts) == expected and all(verdicts.values())
        )
        for failure in failures:
            print(f"FAILED attempt: {failure}")
    elapsed = time.monotonic() - began
    print(f"took {elapsed / 60:.1f} min")
    summary["elapsed_s"] = round(elapsed, 1)
    summary["load_avg_before"] = info["load_avg"]
    summary["load_avg_after"] = load_average()
    print_summary(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
