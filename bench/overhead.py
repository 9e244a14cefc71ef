"""Per-call cost of grpc_leastconn on the unary hot path, against a raw grpcio channel.

One client thread sends blocking ``Ping`` calls to one backend through these
channels, the first three with a connection of their own, every stub built once:

  raw        grpc.insecure_channel
  leastconn  grpc_leastconn.insecure_channel (one backend, so only the overhead shows)
  backend    the backend channel grpc_leastconn sends through, called directly:
             leastconn minus backend is the cost of grpc_leastconn's Python layers,
             backend minus raw that of the backend channel's settings (round_robin
             over its one address, a local subchannel pool, health watch stream)
  intercept  grpc.intercept_channel with a no-op UnaryUnaryClientInterceptor (reference:
             the usual way to add client-side logic to grpcio)

The backend is a minimal server in a subprocess, so it does not compete with the
client for the GIL; its own cost is part of every round trip and the same for all
variants.

On a shared machine the round-trip time drifts by tens of percent within seconds,
so windows of a second each would compare variants under different loads. Each
round therefore gives every variant about --window seconds in blocks of 50 calls,
cycling through the variants block by block (order rotated every cycle), so all
variants see the same load. The ratios leastconn/raw and intercept/raw are taken
within each round; the medians over rounds are reported. The client's CPU time
per call (time.process_time: every client thread, grpcio's included) is reported
too: it does not count time spent waiting for the CPU, so it is the steadier
measure of what each variant costs the client.

Run:  python bench/overhead.py [--rounds 15] [--window 1.0] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from _common import ServerProcess as BenchServer
from _common import (
    load_average,
    print_machine,
    print_summary,
    seams,
    serve_until_stopped,
    setup_paths,
    table,
)

setup_paths()
# C-core logs the server's GOAWAY at INFO when the benchmark ends; keep the output readable.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import conference_pb2  # noqa: E402
import conference_pb2_grpc  # noqa: E402
import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_health.v1.health import HealthServicer  # noqa: E402

SEAMS = seams()

TARGET_RATIO = 0.97
VARIANTS = ("raw", "leastconn", "backend", "intercept")
# Calls per block: enough to make the clock reads negligible, few enough
# (tens of milliseconds) that neighbouring blocks see the same machine load.
BATCH = 50


# -- the backend (runs in a subprocess: python bench/overhead.py --serve) ----------


class _PingServicer(conference_pb2_grpc.ConferenceServicer):
    def Ping(self, request: Any, context: grpc.ServicerContext) -> Any:
        return conference_pb2.PingReply(backend="bench", payload=request.payload)


def serve() -> int:
    server = grpc.server(ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
    conference_pb2_grpc.add_ConferenceServicer_to_server(_PingServicer(), server)
    # grpc_leastconn watches grpc.health.v1 by default; serve it as a real backend would.
    health = HealthServicer()
    health.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(json.dumps({"address": f"127.0.0.1:{port}"}), flush=True)
    serve_until_stopped()
    server.stop(None).wait(5)
    return 0


class ServerProcess(BenchServer):
    """The backend's process, at ``address``."""

    def __init__(self) -> None:
        super().__init__(__file__)
        self.address: str = self.ready["address"]


# -- the client ---------------------------------------------------------------------


class _NoopInterceptor(grpc.UnaryUnaryClientInterceptor):
    def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return continuation(client_call_details, request)


def make_variants(address: str) -> tuple[dict[str, Callable[..., Any]], list[Any], Any]:
    raw = grpc.insecure_channel(address)
    lc, core = SEAMS.observed_channel(address)
    intercepted = grpc.intercept_channel(grpc.insecure_channel(address), _NoopInterceptor())
    channels = [raw, lc, intercepted]
    for channel in channels:
        grpc.channel_ready_future(channel).result(timeout=10)
    # The backend channel grpc_leastconn itself sends through, called directly.
    (backend,) = core.inspect(lambda balancer: balancer.backends)
    stubs = {
        "raw": conference_pb2_grpc.ConferenceStub(raw).Ping,
        "leastconn": conference_pb2_grpc.ConferenceStub(lc).Ping,
        "backend": conference_pb2_grpc.ConferenceStub(backend.channel.grpc_channel).Ping,
        "intercept": conference_pb2_grpc.ConferenceStub(intercepted).Ping,
    }
    return stubs, channels, core


def block(call: Callable[..., Any], request: Any) -> tuple[int, int]:
    """Wall and client CPU nanoseconds for BATCH calls."""
    wall, cpu = time.perf_counter_ns(), time.process_time_ns()
    for _ in range(BATCH):
        call(request)
    return time.perf_counter_ns() - wall, time.process_time_ns() - cpu


def run_round(
    stubs: dict[str, Callable[..., Any]], request: Any, seconds: float, first: int
) -> dict[str, tuple[float, float]]:
    """Per variant: calls per second and client CPU microseconds per call."""
    wall = dict.fromkeys(VARIANTS, 0)
    cpu = dict.fromkeys(VARIANTS, 0)
    calls = 0
    cycle = first
    while min(wall.values()) < seconds * 1e9:
        k = cycle % len(VARIANTS)
        for name in VARIANTS[k:] + VARIANTS[:k]:
            w, c = block(stubs[name], request)
            wall[name] += w
            cpu[name] += c
        calls += BATCH
        cycle += 1
    return {name: (calls / (wall[name] / 1e9), cpu[name] / 1000 / calls) for name in VARIANTS}


def lock_pick_release_ns(core: Any, n: int = 100_000) -> float:
    """The balancer's share of a call: lock, pick, lock, release; no RPC."""
    acquire, release = core.acquire, core.release
    start = time.perf_counter_ns()
    for _ in range(n):
        release(acquire(None, None))
    return (time.perf_counter_ns() - start) / n


_EVICT = bytearray(2 << 20)
_ONES = b"\x01" * (len(_EVICT) // 64)


def _evict_caches(*_args: Any) -> None:
    # One write per 64-byte line over 2 MiB, more than this core's L1 and L2
    # hold: our code then runs from cold caches, as it does after a real
    # round trip (kernel, C-core threads, the GIL handed around).
    _EVICT[::64] = _ONES


def layers_ns(
    channel: Any, core: Any, request: Any, cold: bool, blocks: int, per_block: int
) -> float:
    """CPU time grpc_leastconn adds to a blocking unary call, without the RPC.

    The stub is the real one; only grpcio's multicallable underneath is
    swapped for a stand-in, so what is left is our layers: the call wrapper,
    the lock, the pick and the release. Warm, the stand-in does nothing;
    cold, it evicts the caches first. Blocks of the stand-in alone alternate
    with blocks through the stub, and the difference is what we add.
    """
    inner: Callable[..., Any] = _evict_caches if cold else (lambda *_args: None)
    ping = conference_pb2_grpc.ConferenceStub(channel).Ping
    SEAMS.set_inner(ping, core, inner)
    alone = wrapped = 0
    calls = range(per_block)
    for _ in range(blocks):
        start = time.thread_time_ns()
        for _ in calls:
            inner(request)
        alone += time.thread_time_ns() - start
        start = time.thread_time_ns()
        for _ in calls:
            ping(request)
        wrapped += time.thread_time_ns() - start
    return (wrapped - alone) / (blocks * per_block)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="measured rounds (default 15)")
    ap.add_argument(
        "--window", type=float, default=1.0, help="seconds per variant per round (default 1)"
    )
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per variant")
    ap.add_argument("--quick", action="store_true", help="short smoke run")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve()
    if args.quick:
        args.rounds, args.window, args.warmup = 3, 0.2, 0.2
    if args.rounds < 1 or args.window <= 0:
        ap.error("need --rounds >= 1 and --window > 0")

    info = print_machine("overhead: unary calls/s, one client thread, one backend")
    # SIGTERM must unwind through the finally below, or the server would outlive us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    server = ServerProcess()
    channels: list[Any] = []
    try:
        stubs, channels, core = make_variants(server.address)
        request = conference_pb2.PingRequest(payload="x")
        print(f"   backend {server.address} (pid {server.proc.pid}); warming up")
        run_round(stubs, request, args.warmup, 0)

        rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
        cpu_us: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for r in range(args.rounds):
            gc.collect()
            for name, (rate, cpu) in run_round(stubs, request, args.window, r).items():
                rates[name].append(rate)
                cpu_us[name].append(cpu)
            print(
                f"   round {r + 1:>2}/{args.rounds}: "
                + "  ".join(
                    f"{n} {rates[n][-1]:>6.0f}/s {cpu_us[n][-1]:>4.0f} us cpu" for n in VARIANTS
                ),
                flush=True,
            )
        parts = [
            (
                lock_pick_release_ns(core),
                layers_ns(channels[1], core, request, cold=False, blocks=10, per_block=5_000),
                layers_ns(channels[1], core, request, cold=True, blocks=20, per_block=20),
            )
            for _ in range(3 if args.quick else 7)
        ]
        balancer_ns = statistics.median(p[0] for p in parts)
        hot_ns = statistics.median(p[1] for p in parts)
        cold_ns = statistics.median(p[2] for p in parts)
    finally:
        for channel in channels:
            channel.close()
        server.stop()

    others = ("leastconn", "backend", "intercept")

    def per_round(values: dict[str, list[float]], name: str) -> list[float]:
        return [x / y for x, y in zip(values[name], values["raw"], strict=True)]

    ratio = {name: per_round(rates, name) for name in others}
    cpu_ratio = {name: per_round(cpu_us, name) for name in others}
    added_us = {
        name: [(1 / x - 1 / y) * 1e6 for x, y in zip(rates[name], rates["raw"], strict=True)]
        for name in others
    }
    added_cpu = {
        name: [x - y for x, y in zip(cpu_us[name], cpu_us["raw"], strict=True)] for name in others
    }
    med = {name: statistics.median(rates[name]) for name in VARIANTS}
    med_cpu = {name: statistics.median(cpu_us[name]) for name in VARIANTS}
    rows = []
    for name in VARIANTS:
        base = name == "raw"
        rows.append(
            [
                name,
                f"{med[name]:.0f}",
                f"{min(rates[name]):.0f}..{max(rates[name]):.0f}",
                "1" if base else f"{statistics.median(ratio[name]):.3f}",
                "0" if base else f"{statistics.median(added_us[name]):+.1f}",
                f"{med_cpu[name]:.1f}",
                "1" if base else f"{statistics.median(cpu_ratio[name]):.3f}",
                "0" if base else f"{statistics.median(added_cpu[name]):+.1f}",
            ]
        )
    print()
    print(
        table(
            [
                "variant",
                "calls/s",
                "range",
                "vs raw",
                "added us/call",
                "client cpu us/call",
                "vs raw",
                "added cpu us",
            ],
            rows,
        )
    )
    lc_ratio = statistics.median(ratio["leastconn"])
    met = lc_ratio >= TARGET_RATIO
    print(
        f"\nleastconn/raw = {lc_ratio:.3f} (median of {args.rounds} per-round ratios, "
        f"min {min(ratio['leastconn']):.3f}, max {max(ratio['leastconn']):.3f}); "
        f"target >= {TARGET_RATIO}: {'met' if met else 'MISSED'}"
    )
    raw_us = 1e6 / med["raw"]
    expected = raw_us / (raw_us + cold_ns / 1000)
    over_backend = statistics.median(
        x - y for x, y in zip(cpu_us["leastconn"], cpu_us["backend"], strict=True)
    )
    print(
        f"grpc_leastconn's own layers, timed without the RPC: {hot_ns / 1000:.2f} us per call "
        f"with warm caches\n  (lock + pick + release: {balancer_ns / 1000:.2f} us), "
        f"{cold_ns / 1000:.2f} us with the caches evicted before each call, as an RPC does;\n"
        f"  in the RPC loop above leastconn used {over_backend:.1f} us more client CPU per call "
        f"than backend.\n  The cold cost against {raw_us:.0f} us per raw call predicts "
        f"leastconn/raw = {expected:.4f}"
    )
    print_summary(
        {
            "bench": "overhead",
            "quick": args.quick,
            "rounds": args.rounds,
            "window_s": args.window,
            "calls_per_s": {name: round(med[name]) for name in VARIANTS},
            "ratio_leastconn_raw": round(lc_ratio, 4),
            "ratio_intercept_raw": round(statistics.median(ratio["intercept"]), 4),
            "ratio_backend_raw": round(statistics.median(ratio["backend"]), 4),
            "added_us_per_call": {
                name: round(statistics.median(v), 2) for name, v in added_us.items()
            },
            "client_cpu_us_per_call": {name: round(med_cpu[name], 2) for name in VARIANTS},
            "cpu_ratio_leastconn_raw": round(statistics.median(cpu_ratio["leastconn"]), 4),
            "cpu_ratio_intercept_raw": round(statistics.median(cpu_ratio["intercept"]), 4),
            "cpu_ratio_backend_raw": round(statistics.median(cpu_ratio["backend"]), 4),
            "layers_ns_warm": round(hot_ns),
            "layers_ns_cold": round(cold_ns),
            "cpu_us_leastconn_over_backend": round(over_backend, 2),
            "lock_pick_release_ns": round(balancer_ns),
            "predicted_ratio_leastconn_raw": round(expected, 4),
            "target_ratio": TARGET_RATIO,
            "target_met": met,
            "load_avg_before": info["load_avg"],
            "load_avg_after": load_average(),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
