"""Per-call cost of grpc_leastconn.aio on the unary hot path, against a raw grpc.aio channel.

Unary ``Ping`` calls to one backend, awaited on one event loop, through these
channels, every stub built once:

  raw        grpc.aio.insecure_channel
  leastconn  grpc_leastconn.aio.insecure_channel (one backend, so only the overhead shows)
  backend    the backend channel grpc_leastconn.aio sends through, called directly:
             leastconn minus backend is the cost of grpc_leastconn.aio's Python layers

each with 1 call in flight (one coroutine awaiting call after call) and with 16 in
flight (16 tasks doing the same). The backend is overhead.py's server, in a
subprocess so that it does not compete with the client for the GIL.

As in overhead.py, each round gives every (in flight, variant) pair about --window
seconds in blocks of calls, cycling through the pairs block by block (order
shuffled every cycle), so all see the same machine load; the ratios to raw are
taken within each round and their medians reported, next to the client's CPU
time per call (time.process_time: every client thread, grpcio's included).

Then where the overhead comes from, without the network: the balancer's pick +
release alone; the whole wrapper, with grpc.aio's call replaced by a stand-in that
has already finished; and a cProfile of real calls through each channel, its time
split by package, with the loop's work per call (iterations, tasks, callbacks).

Run:  python bench/aio_overhead.py [--rounds 15] [--window 1.0] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import random
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from _common import load_average, print_machine, print_summary, seams, setup_paths, table
from overhead import BATCH, TARGET_RATIO, ServerProcess

setup_paths()

import conference_pb2  # noqa: E402
import conference_pb2_grpc  # noqa: E402
import grpc  # noqa: E402

SEAMS = seams()
FinishedCall = SEAMS.FinishedCall

VARIANTS = ("raw", "leastconn", "backend")
IN_FLIGHT = (1, 16)
# With 16 in flight a block is 16 tasks of this many calls each: enough that
# the ramp at the block's start and end, with fewer calls in flight, stays small.
CALLS_PER_TASK = 12
PROFILED_CALLS = 3_000

Unary = Callable[[Any], Awaitable[Any]]


async def make_variants(address: str) -> tuple[dict[str, Unary], list[Any], Any]:
    raw = grpc.aio.insecure_channel(address)
    lc, core = SEAMS.observed_aio_channel(address)
    await raw.channel_ready()
    # READY here means the backend is connected and its health Watch says SERVING.
    await lc.channel_ready()
    (backend,) = core.inspect(lambda balancer: balancer.backends)
    stubs = {
        "raw": conference_pb2_grpc.ConferenceStub(raw).Ping,
        "leastconn": conference_pb2_grpc.ConferenceStub(lc).Ping,
        "backend": conference_pb2_grpc.ConferenceStub(backend.channel.grpc_channel).Ping,
    }
    return stubs, [raw, lc], core


async def block(call: Unary, request: Any, in_flight: int) -> tuple[int, int, int]:
    """Wall and client CPU nanoseconds, and the number of calls, of one block."""
    per_task = BATCH if in_flight == 1 else CALLS_PER_TASK

    async def caller() -> None:
        for _ in range(per_task):
            await call(request)

    wall, cpu = time.perf_counter_ns(), time.process_time_ns()
    if in_flight == 1:
        # No task around it: one call in flight is the caller's own coroutine.
        await caller()
    else:
        await asyncio.gather(*(caller() for _ in range(in_flight)))
    return time.perf_counter_ns() - wall, time.process_time_ns() - cpu, per_task * in_flight


Pair = tuple[int, str]
PAIRS: tuple[Pair, ...] = tuple((n, v) for n in IN_FLIGHT for v in VARIANTS)


async def run_round(
    stubs: dict[str, Unary], request: Any, seconds: float, seed: int
) -> dict[Pair, tuple[float, float]]:
    """Per (in flight, variant): calls per second and client CPU microseconds per call."""
    wall = dict.fromkeys(PAIRS, 0)
    cpu = dict.fromkeys(PAIRS, 0)
    calls = dict.fromkeys(PAIRS, 0)
    # Shuffled, not rotated: in a rotated cycle each pair nearly always
    # follows the same other pair, and a block right after a 16-in-flight
    # block runs measurably differently from one after a 1-in-flight block.
    rng = random.Random(seed)
    order = list(PAIRS)
    while min(wall.values()) < seconds * 1e9:
        rng.shuffle(order)
        for pair in order:
            w, c, n = await block(stubs[pair[1]], request, pair[0])
            wall[pair] += w
            cpu[pair] += c
            calls[pair] += n
    return {p: (calls[p] / (wall[p] / 1e9), cpu[p] / 1000 / calls[p]) for p in PAIRS}


# -- where the overhead comes from ----------------------------------------------------


def pick_release_ns(core: Any, n: int = 100_000) -> float:
    """The balancer's share of a call: pick and release, no lock on the loop; no RPC."""
    pick, release = core.pick, core.release
    start = time.thread_time_ns()
    for _ in range(n):
        release(pick(None, None))
    return (time.thread_time_ns() - start) / n


async def layers_ns(channel: Any, core: Any, request: Any, blocks: int, per_block: int) -> float:
    """CPU time the wrapper adds to an awaited unary call, without the RPC.

    The stub is the real one; grpc.aio's multicallable underneath is swapped
    for one returning a call that has already finished. Blocks of the
    stand-in alone alternate with blocks through the stub.
    """
    reply = conference_pb2.PingReply(backend="bench")
    no_metadata = grpc.aio.Metadata()

    def inner(_request: Any, **_kwargs: Any) -> FinishedCall:
        # The library's own stand-in for a call that has succeeded.
        return FinishedCall(grpc.StatusCode.OK, "", no_metadata, no_metadata, None, reply)

    ping = conference_pb2_grpc.ConferenceStub(channel).Ping
    SEAMS.set_inner(ping, core, inner)
    alone = wrapped = 0
    calls = range(per_block)
    for _ in range(blocks):
        start = time.thread_time_ns()
        for _ in calls:
            await inner(request)
        alone += time.thread_time_ns() - start
        start = time.thread_time_ns()
        for _ in calls:
            await ping(request)
        wrapped += time.thread_time_ns() - start
    return (wrapped - alone) / (blocks * per_block)


def _package(filename: str) -> str:
    path = filename.replace("\\", "/")
    for marker, name in (
        ("/grpc_leastconn/", "grpc_leastconn"),
        ("/grpc/", "grpcio"),
        ("/asyncio/", "asyncio"),
        ("/selectors.py", "asyncio"),
        ("aio_overhead.py", "the calling coroutine"),
        ("conference_pb2", "generated code"),
    ):
        if marker in path:
            return name
    # "~" is cProfile's file name for built-ins, grpcio's Cython functions included.
    return "built-ins, C" if path == "~" else "other"


# Counted per call in the profile: each loop iteration polls epoll once, each
# task and each scheduled callback costs a trip through the loop.
_COUNTED = {
    ("base_events.py", "_run_once"): "loop iterations",
    ("base_events.py", "create_task"): "tasks created",
    ("events.py", "_run"): "callbacks run",
}


async def profile(
    call: Unary, request: Any, n: int
) -> tuple[dict[str, float], list[Any], dict[str, float]]:
    """Main-thread CPU microseconds per call by package, our functions, loop activity.

    Profiled on thread CPU time, so waiting in epoll for the reply counts
    nothing. The profiler multiplies the cost of every Python call: the shares
    are what to read, not the absolute figures.
    """
    profiler = cProfile.Profile(time.thread_time_ns, 1e-9)
    profiler.enable()
    for _ in range(n):
        await call(request)
    profiler.disable()
    profiler.create_stats()
    by_package: dict[str, float] = {}
    ours = []
    counts = dict.fromkeys(_COUNTED.values(), 0.0)
    for (filename, line, function), (_, calls, tottime, _, _) in profiler.stats.items():
        package = _package(filename)
        counted = _COUNTED.get((filename.rsplit("/", 1)[-1], function))
        if package == "asyncio" and counted is not None:
            counts[counted] += calls / n
        by_package[package] = by_package.get(package, 0.0) + tottime * 1e6 / n
        if package == "grpc_leastconn":
            short = filename.rsplit("grpc_leastconn/", 1)[-1]
            ours.append((tottime * 1e6 / n, calls / n, f"{short}:{line} {function}"))
    ours.sort(reverse=True)
    return by_package, ours, counts


# -- the measurement -------------------------------------------------------------------


async def measure(address: str, args: Any) -> dict[str, Any]:
    stubs, channels, core = await make_variants(address)
    try:
        request = conference_pb2.PingRequest(payload="x")
        await run_round(stubs, request, args.warmup, 0)
        rates: dict[Pair, list[float]] = {p: [] for p in PAIRS}
        cpu_us: dict[Pair, list[float]] = {p: [] for p in PAIRS}
        for r in range(args.rounds):
            gc.collect()
            for pair, (rate, cpu) in (await run_round(stubs, request, args.window, r)).items():
                rates[pair].append(rate)
                cpu_us[pair].append(cpu)
            print(
                f"   round {r + 1:>2}/{args.rounds}: "
                + "  ".join(
                    f"{n}x {v} {rates[n, v][-1]:>5.0f}/s {cpu_us[n, v][-1]:>3.0f} us"
                    for n, v in PAIRS
                ),
                flush=True,
            )
        lc = channels[1]
        repeats = 3 if args.quick else 7
        parts = [
            (
                pick_release_ns(core),
                await layers_ns(lc, core, request, blocks=10, per_block=2_000),
            )
            for _ in range(repeats)
        ]
        # These stubs still make real calls: layers_ns swapped the inner
        # multicallable of a stub of its own.
        n = PROFILED_CALLS // (5 if args.quick else 1)
        profiles = {name: await profile(stubs[name], request, n) for name in ("raw", "leastconn")}
    finally:
        for channel in channels:
            await channel.close()
    return {
        "rates": rates,
        "cpu_us": cpu_us,
        "pick_release_ns": statistics.median(p[0] for p in parts),
        "layers_ns": statistics.median(p[1] for p in parts),
        "profiles": profiles,
        "profiled_calls": n,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="measured rounds (default 15)")
    ap.add_argument(
        "--window",
        type=float,
        default=1.0,
        help="seconds per (in flight, variant) per round (default 1)",
    )
    ap.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per pair")
    ap.add_argument("--quick", action="store_true", help="short smoke run")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.window, args.warmup = 3, 0.2, 0.2
    if args.rounds < 1 or args.window <= 0:
        ap.error("need --rounds >= 1 and --window > 0")

    info = print_machine("aio_overhead: unary calls/s on one event loop, one backend")
    # SIGTERM must unwind through the finally below, or the server would outlive us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    server = ServerProcess()
    try:
        print(f"   backend {server.address} (pid {server.proc.pid}); warming up", flush=True)
        m = asyncio.run(measure(server.address, args))
    finally:
        server.stop()

    rates, cpu_us = m["rates"], m["cpu_us"]

    def per_round(values: dict[Pair, list[float]], pair: Pair, op: Callable[..., float]) -> Any:
        return [op(x, y) for x, y in zip(values[pair], values[pair[0], "raw"], strict=True)]

    rows = []
    results: dict[str, Any] = {}
    for n, v in PAIRS:
        ratio = per_round(rates, (n, v), lambda x, y: x / y)
        cpu_ratio = per_round(cpu_us, (n, v), lambda x, y: x / y)
        added_cpu = per_round(cpu_us, (n, v), lambda x, y: x - y)
        base = v == "raw"
        rows.append(
            [
                f"{n} in flight, {v}",
                f"{statistics.median(rates[n, v]):.0f}",
                f"{min(rates[n, v]):.0f}..{max(rates[n, v]):.0f}",
                "1" if base else f"{statistics.median(ratio):.3f}",
                "" if base else f"{min(ratio):.3f}..{max(ratio):.3f}",
                f"{statistics.median(cpu_us[n, v]):.1f}",
                "1" if base else f"{statistics.median(cpu_ratio):.3f}",
                "0" if base else f"{statistics.median(added_cpu):+.1f}",
            ]
        )
        results.setdefault(f"in_flight_{n}", {})[v] = {
            "calls_per_s": round(statistics.median(rates[n, v])),
            "ratio_to_raw": round(statistics.median(ratio), 4),
            "ratio_to_raw_min": round(min(ratio), 4),
            "ratio_to_raw_max": round(max(ratio), 4),
            "client_cpu_us_per_call": round(statistics.median(cpu_us[n, v]), 2),
            "cpu_ratio_to_raw": round(statistics.median(cpu_ratio), 4),
            "added_cpu_us_per_call": round(statistics.median(added_cpu), 2),
        }
    print()
    print(
        table(
            [
                "variant",
                "calls/s",
                "range",
                "vs raw",
                "per-round range",
                "client cpu us/call",
                "vs raw",
                "added cpu us",
            ],
            rows,
        )
    )
    met = True
    for n in IN_FLIGHT:
        r = results[f"in_flight_{n}"]["leastconn"]["ratio_to_raw"]
        met = met and r >= TARGET_RATIO
        print(
            f"{n:>2} in flight: leastconn/raw = {r:.3f} (median of {args.rounds} per-round "
            f"ratios); target >= {TARGET_RATIO}: {'met' if r >= TARGET_RATIO else 'MISSED'}"
        )

    over_backend = {
        n: statistics.median(
            x - y for x, y in zip(cpu_us[n, "leastconn"], cpu_us[n, "backend"], strict=True)
        )
        for n in IN_FLIGHT
    }
    print(
        f"\nwhere it comes from (us per call): pick + release {m['pick_release_ns'] / 1000:.2f}; "
        f"the whole wrapper without an RPC {m['layers_ns'] / 1000:.2f};\n"
        f"  in the RPC loop leastconn used "
        + ", ".join(f"{over_backend[n]:.1f} ({n} in flight)" for n in IN_FLIGHT)
        + " more client CPU than backend"
    )
    n_prof = m["profiled_calls"]
    profiles = m["profiles"]
    packages = sorted({p for by, _, _ in profiles.values() for p in by})
    counted = list(_COUNTED.values())
    print(
        f"\ncProfile, main-thread CPU us per call ({n_prof} calls, 1 in flight; "
        "inflated by the profiler, read the shares):"
    )
    print(
        table(
            ["per call", *profiles],
            [[p, *(f"{by.get(p, 0.0):.1f}" for by, _, _ in profiles.values())] for p in packages]
            + [["total", *(f"{sum(by.values()):.1f}" for by, _, _ in profiles.values())]]
            + [[what, *(f"{c[what]:.2f}" for _, _, c in profiles.values())] for what in counted],
        )
    )
    _, ours, _ = profiles["leastconn"]
    print("\ngrpc_leastconn's own functions, leastconn channel (us per call, own time only):")
    print(
        table(
            ["function", "us/call", "calls/call"],
            [[name, f"{us:.2f}", f"{calls:.1f}"] for us, calls, name in ours[:10]],
        )
    )
    print_summary(
        {
            "bench": "aio_overhead",
            "quick": args.quick,
            "rounds": args.rounds,
            "window_s": args.window,
            "results": results,
            "pick_release_ns": round(m["pick_release_ns"]),
            "layers_ns_warm": round(m["layers_ns"]),
            "cpu_us_leastconn_over_backend": {str(n): round(v, 2) for n, v in over_backend.items()},
            "profile_us_per_call": {
                name: {pkg: round(us, 2) for pkg, us in by.items()}
                for name, (by, _, _) in profiles.items()
            },
            "profile_loop_per_call": {
                name: {what: round(c, 2) for what, c in counts.items()}
                for name, (_, _, counts) in profiles.items()
            },
            "target_ratio": TARGET_RATIO,
            "target_met": met,
            "load_avg_before": info["load_avg"],
            "load_avg_after": load_average(),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
