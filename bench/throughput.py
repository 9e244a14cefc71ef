"""Unary throughput under concurrency: grpc_leastconn against grpcio's round_robin.

Four backends, each a grpc server on its own 127.0.0.1 port with a
grpc.health.v1 service reporting SERVING (grpc_leastconn watches it by default)
and a minimal ``conference.Conference`` servicer whose ``Ping`` echoes the
payload, names the backend ("127.0.0.1:port", as examples/server.py does) and
waits ``delay_ms`` first. All four run in ONE subprocess (this script with
``--serve``), so they do not compete with the client for its GIL; their cost is
part of every round trip and the same for both variants.

The client sends ``Ping`` (``delay_ms`` 0 by default: pure overhead) through
one channel over the four addresses, ``ipv4:a,b,c,d``:

  leastconn    grpc_leastconn.insecure_channel / grpc_leastconn.aio.insecure_channel
  round_robin  grpc.insecure_channel / grpc.aio.insecure_channel with the service
               config {"loadBalancingConfig": [{"round_robin": {}}]}

in two parts, each with its own pair of channels (the first pair is closed
before the second is opened):

  sync  8 client threads, each calling the blocking stub in a closed loop
  aio   16 coroutines on one event loop, each awaiting the stub in a closed loop,
        so 16 calls are in flight

Both channels are warmed first: leastconn until every backend is eligible
(connected, health SERVING), round_robin until all four backends have
answered; then a warm-up round that is not counted.

On a shared machine throughput drifts by tens of percent within seconds, so
each round gives every variant about --window seconds in blocks of 0.1 s,
alternating the variants block by block (the order reversed every cycle), so
both see the same machine load. In a block every caller loops until the
block's deadline; the block ends when the last call begun before it returns.
Per round: calls/s of each variant (calls over the summed wall time of its
blocks) and the ratio leastconn/round_robin; the median over rounds is
reported with its min and max, for sync and aio separately, next to the
client's CPU time per call (time.process_time: every client thread, grpcio's
included), the steadier measure of what each variant costs the client.
Target: leastconn/round_robin >= 0.97 in both parts.

Run:  python bench/throughput.py [--rounds 15] [--window 1.0] [--delay-ms 0] [--quick]
A default run takes about 70 s: 2 parts x (15 rounds + 1 warm-up) x 2 variants
x 1 s, plus set-up; --quick (3 rounds of 0.3 s) about 6 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from _common import ServerProcess as BenchServer
from _common import (
    load_average,
    print_machine,
    print_summary,
    serve_until_stopped,
    setup_paths,
    table,
)

setup_paths()
# C-core logs the servers' GOAWAY at INFO when the benchmark ends; keep the output readable.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import conference_pb2  # noqa: E402
import conference_pb2_grpc  # noqa: E402
import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_health.v1.health import HealthServicer  # noqa: E402

import grpc_leastconn  # noqa: E402
import grpc_leastconn.aio  # noqa: E402

TARGET_RATIO = 0.97
VARIANTS = ("leastconn", "round_robin")
PARTS = ("sync", "aio")
N_BACKENDS = 4
THREADS = 8
IN_FLIGHT = 16
# Long enough that the ramp at a block's end (the last calls, fewer in
# flight) and the hand-over between blocks stay small; short enough that
# neighbouring blocks see the same machine load.
BLOCK_S = 0.1
# Each backend's handlers: 16 concurrent calls, plus the health Watch streams
# (one per grpc_leastconn channel), which hold a worker thread each.
SERVER_WORKERS = IN_FLIGHT + 4
ROUND_ROBIN_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
# Bounds on every wait.
CALL_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 15.0
SERVER_START_TIMEOUT_S = 30.0
MAX_WARM_PINGS = 400


# -- the backends (run in a subprocess: python bench/throughput.py --serve) ------------


class _PingServicer(conference_pb2_grpc.ConferenceServicer):
    def __init__(self, name: str) -> None:
        self.name = name

    def Ping(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.delay_ms > 0:
            # Cut short if the RPC ends first (cancelled, deadline).
            ended = threading.Event()
            if context.add_callback(ended.set):
                ended.wait(request.delay_ms / 1000)
        return conference_pb2.PingReply(backend=self.name, payload=request.payload)


def serve() -> int:
    servers: list[grpc.Server] = []
    ports: list[int] = []
    for _ in range(N_BACKENDS):
        server = grpc.server(
            ThreadPoolExecutor(max_workers=SERVER_WORKERS), options=[("grpc.so_reuseport", 0)]
        )
        port = server.add_insecure_port("127.0.0.1:0")
        if port == 0:
            raise RuntimeError("cannot listen on 127.0.0.1")
        conference_pb2_grpc.add_ConferenceServicer_to_server(  # type: ignore[no-untyped-call]
            _PingServicer(f"127.0.0.1:{port}"), server
        )
        health = HealthServicer()
        health.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        server.start()
        servers.append(server)
        ports.append(port)
    print(json.dumps({"ports": ports}), flush=True)
    serve_until_stopped()
    events = [server.stop(None) for server in servers]
    for event in events:
        event.wait(5)
    return 0


class ServerProcess(BenchServer):
    """The backends' process, at ``addresses``."""

    def __init__(self) -> None:
        super().__init__(__file__, timeout=SERVER_START_TIMEOUT_S)
        self.addresses: list[str] = [f"127.0.0.1:{port}" for port in self.ready["ports"]]
        if len(self.addresses) != N_BACKENDS:
            self.stop()
            raise RuntimeError(f"the benchmark server reported {self.ready}")


# -- shared by both parts --------------------------------------------------------------

Sample = tuple[int, int, int]  # wall ns, client CPU ns, calls
Result = dict[str, tuple[float, float]]  # variant -> (calls/s, client CPU us per call)


class Tally:
    """One round's blocks, summed per variant."""

    def __init__(self) -> None:
        self.wall = dict.fromkeys(VARIANTS, 0)
        self.cpu = dict.fromkeys(VARIANTS, 0)
        self.calls = dict.fromkeys(VARIANTS, 0)

    def add(self, name: str, sample: Sample) -> None:
        wall, cpu, calls = sample
        if calls == 0:
            raise RuntimeError(f"{name}: no call finished within a block")
        self.wall[name] += wall
        self.cpu[name] += cpu
        self.calls[name] += calls

    def done(self, seconds: float) -> bool:
        return min(self.wall.values()) >= seconds * 1e9

    def result(self) -> Result:
        return {
            name: (
                self.calls[name] / (self.wall[name] / 1e9),
                self.cpu[name] / 1000 / self.calls[name],
            )
            for name in VARIANTS
        }


def cycle_order(cycle: int) -> tuple[str, ...]:
    return VARIANTS if cycle % 2 == 0 else VARIANTS[::-1]


def check_backends(seen: set[str], addresses: list[str], name: str) -> None:
    if seen != set(addresses):
        raise RuntimeError(
            f"{name}: only {sorted(seen)} of {addresses} answered {MAX_WARM_PINGS} warm-up pings"
        )


def print_round(part: str, r: int, rounds: int, result: Result) -> None:
    lc, rr = result["leastconn"], result["round_robin"]
    print(
        f"   {part:>4} round {r + 1:>2}/{rounds}: "
        + "  ".join(f"{n} {result[n][0]:>6.0f}/s {result[n][1]:>5.1f} us cpu" for n in VARIANTS)
        + f"  ratio {lc[0] / rr[0]:.3f}",
        flush=True,
    )


# -- sync: 8 threads, blocking calls -----------------------------------------------------

SyncCall = Callable[..., Any]


class ThreadLoad:
    """THREADS client threads; in each block every one calls in a closed loop until its deadline."""

    def __init__(self, request: Any) -> None:
        self._request = request
        self._barrier = threading.Barrier(THREADS + 1)
        self._call: SyncCall | None = None
        self._deadline = 0.0
        self._counts = [0] * THREADS
        self._errors: list[BaseException] = []
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._work, args=(i,), name=f"client-{i}", daemon=True)
            for i in range(THREADS)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self, i: int) -> None:
        # A thread left waiting (the benchmark stuck elsewhere) gives up after a minute.
        idle_timeout = 60.0
        end_timeout = BLOCK_S + CALL_TIMEOUT_S + 5
        while True:
            try:
                self._barrier.wait(idle_timeout)
            except threading.BrokenBarrierError:
                return
            if self._stopping:
                return
            call, request, deadline = self._call, self._request, self._deadline
            assert call is not None
            n = 0
            try:
                while time.perf_counter() < deadline:
                    call(request, timeout=CALL_TIMEOUT_S)
                    n += 1
            except Exception as exc:
                self._errors.append(exc)
            self._counts[i] = n
            try:
                self._barrier.wait(end_timeout)
            except threading.BrokenBarrierError:
                return

    def block(self, call: SyncCall, seconds: float) -> Sample:
        self._call = call
        wall, cpu = time.perf_counter_ns(), time.process_time_ns()
        self._deadline = time.perf_counter() + seconds
        self._barrier.wait(5)
        self._barrier.wait(seconds + CALL_TIMEOUT_S + 10)
        wall, cpu = time.perf_counter_ns() - wall, time.process_time_ns() - cpu
        if self._errors:
            raise RuntimeError(f"a call failed: {self._errors[0]!r}") from self._errors[0]
        return wall, cpu, sum(self._counts)

    def close(self) -> None:
        self._stopping = True
        with contextlib.suppress(threading.BrokenBarrierError):
            self._barrier.wait(1)
        self._barrier.abort()
        for thread in self._threads:
            thread.join(5)


def sync_round(load: ThreadLoad, stubs: dict[str, SyncCall], seconds: float, first: int) -> Result:
    tally = Tally()
    block_s = min(BLOCK_S, seconds)
    cycle = first
    # Bounded: every block adds at least block_s to each variant's wall time.
    while not tally.done(seconds):
        for name in cycle_order(cycle):
            tally.add(name, load.block(stubs[name], block_s))
        cycle += 1
    return tally.result()


def warm_sync(
    lc: grpc_leastconn.LeastConnChannel,
    rr: grpc.Channel,
    stubs: dict[str, SyncCall],
    request: Any,
    addresses: list[str],
) -> None:
    grpc.channel_ready_future(lc).result(timeout=READY_TIMEOUT_S)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not (len(backends := lc.backends()) == N_BACKENDS and all(s.eligible for s in backends)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"leastconn: backends not all eligible: {lc.backends()}")
        time.sleep(0.01)
    grpc.channel_ready_future(rr).result(timeout=READY_TIMEOUT_S)
    seen: set[str] = set()
    for _ in range(MAX_WARM_PINGS):
        seen.add(stubs["round_robin"](request, timeout=CALL_TIMEOUT_S).backend)
        if len(seen) == N_BACKENDS:
            break
    check_backends(seen, addresses, "round_robin")


def measure_sync(addresses: list[str], request: Any, args: Any) -> list[Result]:
    target = "ipv4:" + ",".join(addresses)
    lc = grpc_leastconn.insecure_channel(target)
    rr = grpc.insecure_channel(target, options=[("grpc.service_config", ROUND_ROBIN_CONFIG)])
    load: ThreadLoad | None = None
    try:
        stubs: dict[str, SyncCall] = {
            "leastconn": conference_pb2_grpc.ConferenceStub(lc).Ping,  # type: ignore[no-untyped-call]
            "round_robin": conference_pb2_grpc.ConferenceStub(rr).Ping,  # type: ignore[no-untyped-call]
        }
        warm_sync(lc, rr, stubs, request, addresses)
        load = ThreadLoad(request)
        sync_round(load, stubs, args.warmup, 0)
        results = []
        for r in range(args.rounds):
            gc.collect()
            results.append(sync_round(load, stubs, args.window, r))
            print_round("sync", r, args.rounds, results[-1])
        return results
    finally:
        if load is not None:
            load.close()
        lc.close()
        rr.close()


# -- aio: 16 calls in flight on one event loop --------------------------------------------

AioCall = Callable[..., Awaitable[Any]]


async def aio_block(call: AioCall, request: Any, seconds: float) -> Sample:
    async def caller() -> int:
        n = 0
        while time.perf_counter() < deadline:
            await call(request, timeout=CALL_TIMEOUT_S)
            n += 1
        return n

    wall, cpu = time.perf_counter_ns(), time.process_time_ns()
    deadline = time.perf_counter() + seconds
    counts = await asyncio.wait_for(
        asyncio.gather(*(caller() for _ in range(IN_FLIGHT))), seconds + CALL_TIMEOUT_S + 5
    )
    return time.perf_counter_ns() - wall, time.process_time_ns() - cpu, sum(counts)


async def aio_round(stubs: dict[str, AioCall], request: Any, seconds: float, first: int) -> Result:
    tally = Tally()
    block_s = min(BLOCK_S, seconds)
    cycle = first
    # Bounded: every block adds at least block_s to each variant's wall time.
    while not tally.done(seconds):
        for name in cycle_order(cycle):
            tally.add(name, await aio_block(stubs[name], request, block_s))
        cycle += 1
    return tally.result()


async def warm_aio(
    lc: grpc_leastconn.aio.LeastConnChannel,
    rr: grpc.aio.Channel,
    stubs: dict[str, AioCall],
    request: Any,
    addresses: list[str],
) -> None:
    await asyncio.wait_for(lc.channel_ready(), READY_TIMEOUT_S)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not (len(backends := lc.backends()) == N_BACKENDS and all(s.eligible for s in backends)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"aio leastconn: backends not all eligible: {lc.backends()}")
        await asyncio.sleep(0.01)
    await asyncio.wait_for(rr.channel_ready(), READY_TIMEOUT_S)
    seen: set[str] = set()
    for _ in range(MAX_WARM_PINGS):
        seen.add((await stubs["round_robin"](request, timeout=CALL_TIMEOUT_S)).backend)
        if len(seen) == N_BACKENDS:
            break
    check_backends(seen, addresses, "aio round_robin")


async def measure_aio(addresses: list[str], request: Any, args: Any) -> list[Result]:
    target = "ipv4:" + ",".join(addresses)
    lc = grpc_leastconn.aio.insecure_channel(target)
    rr = grpc.aio.insecure_channel(target, options=[("grpc.service_config", ROUND_ROBIN_CONFIG)])
    try:
        stubs: dict[str, AioCall] = {
            "leastconn": conference_pb2_grpc.ConferenceStub(lc).Ping,  # type: ignore[no-untyped-call]
            "round_robin": conference_pb2_grpc.ConferenceStub(rr).Ping,  # type: ignore[no-untyped-call]
        }
        await warm_aio(lc, rr, stubs, request, addresses)
        await aio_round(stubs, request, args.warmup, 0)
        results = []
        for r in range(args.rounds):
            gc.collect()
            results.append(await aio_round(stubs, request, args.window, r))
            print_round("aio", r, args.rounds, results[-1])
        return results
    finally:
        await lc.close()
        await rr.close()


# -- the report ----------------------------------------------------------------------------


def summarize(results: list[Result]) -> dict[str, Any]:
    rates = {n: [r[n][0] for r in results] for n in VARIANTS}
    cpu = {n: [r[n][1] for r in results] for n in VARIANTS}
    ratio = [x / y for x, y in zip(rates["leastconn"], rates["round_robin"], strict=True)]
    cpu_ratio = [x / y for x, y in zip(cpu["leastconn"], cpu["round_robin"], strict=True)]
    added_cpu = [x - y for x, y in zip(cpu["leastconn"], cpu["round_robin"], strict=True)]
    out: dict[str, Any] = {
        n: {
            "calls_per_s": round(statistics.median(rates[n])),
            "calls_per_s_min": round(min(rates[n])),
            "calls_per_s_max": round(max(rates[n])),
            "client_cpu_us_per_call": round(statistics.median(cpu[n]), 2),
        }
        for n in VARIANTS
    }
    out |= {
        "ratio": round(statistics.median(ratio), 4),
        "ratio_min": round(min(ratio), 4),
        "ratio_max": round(max(ratio), 4),
        "cpu_ratio": round(statistics.median(cpu_ratio), 4),
        "added_cpu_us_per_call": round(statistics.median(added_cpu), 2),
    }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="measured rounds (default 15)")
    ap.add_argument(
        "--window", type=float, default=1.0, help="seconds per variant per round (default 1)"
    )
    ap.add_argument(
        "--warmup", type=float, default=1.0, help="warm-up seconds per variant (default 1)"
    )
    ap.add_argument(
        "--delay-ms", type=int, default=0, help="server-side delay of each Ping (default 0)"
    )
    ap.add_argument("--quick", action="store_true", help="short smoke run: 3 rounds of 0.3 s")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve()
    if args.quick:
        args.rounds, args.window, args.warmup = 3, 0.3, 0.2
    if args.rounds < 1 or args.window <= 0 or args.warmup <= 0 or args.delay_ms < 0:
        ap.error("need --rounds >= 1, --window > 0, --warmup > 0 and --delay-ms >= 0")

    info = print_machine(
        f"throughput: unary calls/s over {N_BACKENDS} backends, leastconn vs round_robin "
        f"({THREADS} threads sync, {IN_FLIGHT} in flight aio, delay_ms {args.delay_ms})"
    )
    # SIGTERM must unwind through the finally below, or the server would outlive us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    server = ServerProcess()
    try:
        print(
            f"   backends {', '.join(server.addresses)} (pid {server.proc.pid}); warming up",
            flush=True,
        )
        request = conference_pb2.PingRequest(payload="x", delay_ms=args.delay_ms)
        per_part = {
            "sync": measure_sync(server.addresses, request, args),
            "aio": asyncio.run(measure_aio(server.addresses, request, args)),
        }
    finally:
        server.stop()
    elapsed = time.monotonic() - started

    summary = {part: summarize(per_part[part]) for part in PARTS}
    rows = []
    for part in PARTS:
        s = summary[part]
        for n in VARIANTS:
            base = n == "round_robin"
            rows.append(
                [
                    f"{part} {n}",
                    s[n]["calls_per_s"],
                    f"{s[n]['calls_per_s_min']}..{s[n]['calls_per_s_max']}",
                    "1" if base else f"{s['ratio']:.3f}",
                    "" if base else f"{s['ratio_min']:.3f}..{s['ratio_max']:.3f}",
                    f"{s[n]['client_cpu_us_per_call']:.1f}",
                    "1" if base else f"{s['cpu_ratio']:.3f}",
                ]
            )
    print()
    print(
        table(
            [
                "variant",
                "calls/s",
                "range",
                "vs round_robin",
                "per-round range",
                "client cpu us/call",
                "vs round_robin",
            ],
            rows,
        )
    )
    met = {part: summary[part]["ratio"] >= TARGET_RATIO for part in PARTS}
    labels = {"sync": f"sync ({THREADS} threads)", "aio": f"aio ({IN_FLIGHT} in flight)"}
    for part in PARTS:
        s = summary[part]
        print(
            f"{labels[part]}: leastconn/round_robin = {s['ratio']:.3f} (median of {args.rounds} "
            f"per-round ratios, min {s['ratio_min']:.3f}, max {s['ratio_max']:.3f}); "
            f"target >= {TARGET_RATIO}: {'met' if met[part] else 'MISSED'}"
        )
    print(f"({elapsed:.0f} s)")
    print_summary(
        {
            "bench": "throughput",
            "quick": args.quick,
            "rounds": args.rounds,
            "window_s": args.window,
            "block_s": BLOCK_S,
            "delay_ms": args.delay_ms,
            "backends": N_BACKENDS,
            "threads": THREADS,
            "in_flight": IN_FLIGHT,
            "sync": summary["sync"],
            "aio": summary["aio"],
            "target_ratio": TARGET_RATIO,
            "target_met": {**met, "all": all(met.values())},
            "elapsed_s": round(elapsed, 1),
            "load_avg_before": info["load_avg"],
            "load_avg_after": load_average(),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
