"""Per-call cost of grpc_leastconn's OpenTelemetry metrics on the unary hot path.

Blocking ``Ping`` calls to one backend from one client thread (then, for the
asyncio channel, awaited one after another on one event loop) through three
channels, each with a connection of its own, every stub built once:

  raw  grpc.insecure_channel (grpc.aio.insecure_channel)
  off  grpc_leastconn with meter_provider=False: no metrics at all
  sdk  grpc_leastconn with an OpenTelemetry SDK MeterProvider whose
       PeriodicExportingMetricReader collects every instrument every second
       (to an exporter that keeps the last batch and prints nothing)

Every instrument is observable: a call only bumps counters the balancer keeps
anyway, and the SDK reads them once per export interval, on its own thread.
So sdk/off should be 1 within noise; the collection's own cost lands in the
client CPU time (time.process_time counts every thread of the process).

As in overhead.py, the backend is a minimal server in a subprocess, and each
round gives every variant about --window seconds in blocks of 50 calls,
cycling through the variants block by block (order rotated every cycle), so
all variants see the same machine load; ratios are taken within each round
and their medians over rounds reported. Last, the time one collection takes
(all 16 instruments of one channel with one backend), timed alone.

Run:  python bench/metrics_overhead.py [--rounds 15] [--window 1.0] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from _common import load_average, print_machine, print_summary, setup_paths, table

setup_paths()
# C-core logs the server's GOAWAY at INFO when the benchmark ends; keep the output readable.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import conference_pb2  # noqa: E402
import conference_pb2_grpc  # noqa: E402
import grpc  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import (  # noqa: E402
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from overhead import BATCH, ServerProcess  # noqa: E402

import grpc_leastconn  # noqa: E402

VARIANTS = ("raw", "off", "sdk")
EXPORT_INTERVAL_MS = 1000
COLLECTIONS_TIMED = 200


class LastBatch(MetricExporter):
    """An exporter that keeps the last batch it was given and counts the batches."""

    def __init__(self) -> None:
        super().__init__()
        self.exports = 0
        self.last: MetricsData | None = None

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self.exports += 1
        self.last = metrics_data
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


def sdk_provider() -> tuple[MeterProvider, LastBatch]:
    exporter = LastBatch()
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=EXPORT_INTERVAL_MS)
    return MeterProvider(metric_readers=[reader], shutdown_on_exit=False), exporter


def picks_exported(exporter: LastBatch) -> float:
    """grpc_leastconn.backend.picks in the last export, summed (the sdk channel's calls)."""
    data = exporter.last
    return sum(
        point.value
        for resource in (data.resource_metrics if data is not None else ())
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "grpc_leastconn.backend.picks"
        for point in metric.data.data_points
    )


# -- rounds -------------------------------------------------------------------------------


def sync_block(call: Callable[[Any], Any], request: Any) -> tuple[int, int]:
    """Wall and client CPU nanoseconds for BATCH calls."""
    wall, cpu = time.perf_counter_ns(), time.process_time_ns()
    for _ in range(BATCH):
        call(request)
    return time.perf_counter_ns() - wall, time.process_time_ns() - cpu


async def aio_block(call: Callable[[Any], Awaitable[Any]], request: Any) -> tuple[int, int]:
    wall, cpu = time.perf_counter_ns(), time.process_time_ns()
    for _ in range(BATCH):
        await call(request)
    return time.perf_counter_ns() - wall, time.process_time_ns() - cpu


Round = dict[str, tuple[float, float]]


class Totals:
    """One round's wall and CPU time per variant, blocks added as they run."""

    def __init__(self) -> None:
        self.wall = dict.fromkeys(VARIANTS, 0)
        self.cpu = dict.fromkeys(VARIANTS, 0)
        self.calls = 0

    def add(self, name: str, wall: int, cpu: int) -> None:
        self.wall[name] += wall
        self.cpu[name] += cpu

    def short_of(self, seconds: float) -> bool:
        return min(self.wall.values()) < seconds * 1e9

    def result(self) -> Round:
        """Per variant: calls per second and client CPU microseconds per call."""
        return {
            n: (self.calls / (self.wall[n] / 1e9), self.cpu[n] / 1000 / self.calls)
            for n in VARIANTS
        }


def order(cycle: int) -> Sequence[str]:
    k = cycle % len(VARIANTS)
    return VARIANTS[k:] + VARIANTS[:k]


def sync_round(stubs: dict[str, Any], request: Any, seconds: float, first: int) -> Round:
    totals, cycle = Totals(), first
    while totals.short_of(seconds):
        for name in order(cycle):
            totals.add(name, *sync_block(stubs[name], request))
        totals.calls += BATCH
        cycle += 1
    return totals.result()


async def aio_round(stubs: dict[str, Any], request: Any, seconds: float, first: int) -> Round:
    totals, cycle = Totals(), first
    while totals.short_of(seconds):
        for name in order(cycle):
            totals.add(name, *await aio_block(stubs[name], request))
        totals.calls += BATCH
        cycle += 1
    return totals.result()


class Series:
    """Every round's rates and CPU per call, per variant."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.rates: dict[str, list[float]] = {n: [] for n in VARIANTS}
        self.cpu_us: dict[str, list[float]] = {n: [] for n in VARIANTS}

    def record(self, index: int, total: int, measured: Round) -> None:
        for name, (rate, cpu) in measured.items():
            self.rates[name].append(rate)
            self.cpu_us[name].append(cpu)
        print(
            f"   {self.label} round {index + 1:>2}/{total}: "
            + "  ".join(
                f"{n} {self.rates[n][-1]:>6.0f}/s {self.cpu_us[n][-1]:>5.1f} us cpu"
                for n in VARIANTS
            ),
            flush=True,
        )

    def ratios(self, values: dict[str, list[float]], a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(values[a], values[b], strict=True)]


# -- the two front ends ------------------------------------------------------------------


def measure_sync(address: str, args: Any) -> tuple[Series, dict[str, Any]]:
    provider, exporter = sdk_provider()
    raw = grpc.insecure_channel(address)
    off = grpc_leastconn.insecure_channel(address, meter_provider=False)
    sdk = grpc_leastconn.insecure_channel(address, meter_provider=provider)
    channels: list[Any] = [raw, off, sdk]
    series = Series("sync")
    try:
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=10)
        stubs = {
            name: conference_pb2_grpc.ConferenceStub(channel).Ping
            for name, channel in zip(VARIANTS, channels, strict=True)
        }
        request = conference_pb2.PingRequest(payload="x")
        sync_round(stubs, request, args.warmup, 0)
        for r in range(args.rounds):
            gc.collect()
            series.record(r, args.rounds, sync_round(stubs, request, args.window, r))
        provider.force_flush()
        check = {"exports": exporter.exports, "picks_exported": picks_exported(exporter)}
    finally:
        for channel in channels:
            channel.close()
        provider.shutdown()
    return series, check


async def measure_aio(address: str, args: Any) -> tuple[Series, dict[str, Any]]:
    provider, exporter = sdk_provider()
    raw = grpc.aio.insecure_channel(address)
    off = grpc_leastconn.aio.insecure_channel(address, meter_provider=False)
    sdk = grpc_leastconn.aio.insecure_channel(address, meter_provider=provider)
    channels: list[Any] = [raw, off, sdk]
    series = Series("aio")
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 10)
        stubs = {
            name: conference_pb2_grpc.ConferenceStub(channel).Ping
            for name, channel in zip(VARIANTS, channels, strict=True)
        }
        request = conference_pb2.PingRequest(payload="x")
        await aio_round(stubs, request, args.warmup, 0)
        for r in range(args.rounds):
            gc.collect()
            series.record(r, args.rounds, await aio_round(stubs, request, args.window, r))
        provider.force_flush()
        check = {"exports": exporter.exports, "picks_exported": picks_exported(exporter)}
    finally:
        for channel in channels:
            await channel.close()
        provider.shutdown()
    return series, check


def collection_us(address: str) -> float:
    """Median microseconds of one collection of one channel's instruments (one backend)."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    channel = grpc_leastconn.insecure_channel(address, meter_provider=provider)
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
        times = []
        for _ in range(COLLECTIONS_TIMED):
            start = time.perf_counter_ns()
            reader.get_metrics_data()
            times.append(time.perf_counter_ns() - start)
    finally:
        channel.close()
        provider.shutdown()
    return statistics.median(times) / 1000


# -- the report ---------------------------------------------------------------------------


def report(series: Series, rounds: int) -> dict[str, Any]:
    rates, cpu = series.rates, series.cpu_us
    ratio = {
        pair: series.ratios(rates, *pair)
        for pair in (("off", "raw"), ("sdk", "raw"), ("sdk", "off"))
    }
    cpu_ratio = {pair: series.ratios(cpu, *pair) for pair in ratio}
    med = {n: statistics.median(rates[n]) for n in VARIANTS}
    med_cpu = {n: statistics.median(cpu[n]) for n in VARIANTS}

    def versus_raw(values: dict[tuple[str, str], list[float]], n: str) -> str:
        return "1" if n == "raw" else f"{statistics.median(values[n, 'raw']):.3f}"

    rows = [
        [
            n,
            f"{med[n]:.0f}",
            f"{min(rates[n]):.0f}..{max(rates[n]):.0f}",
            versus_raw(ratio, n),
            f"{med_cpu[n]:.1f}",
            versus_raw(cpu_ratio, n),
        ]
        for n in VARIANTS
    ]
    print()
    print(f"{series.label}:")
    print(
        table(
            ["variant", "calls/s", "range", "vs raw", "client cpu us/call", "cpu vs raw"],
            rows,
        )
    )
    added_cpu = [x - y for x, y in zip(cpu["sdk"], cpu["off"], strict=True)]
    for pair, values in ratio.items():
        print(
            f"   {pair[0]}/{pair[1]} = {statistics.median(values):.3f} "
            f"(median of {rounds} per-round ratios, min {min(values):.3f}, "
            f"max {max(values):.3f}); cpu {statistics.median(cpu_ratio[pair]):.3f}"
        )
    print(f"   sdk - off client CPU per call: {statistics.median(added_cpu):+.2f} us (median)")
    return {
        "calls_per_s": {n: round(med[n]) for n in VARIANTS},
        "ratio_off_raw": round(statistics.median(ratio["off", "raw"]), 4),
        "ratio_sdk_raw": round(statistics.median(ratio["sdk", "raw"]), 4),
        "ratio_sdk_off": round(statistics.median(ratio["sdk", "off"]), 4),
        "client_cpu_us_per_call": {n: round(med_cpu[n], 2) for n in VARIANTS},
        "cpu_ratio_sdk_off": round(statistics.median(cpu_ratio["sdk", "off"]), 4),
        "cpu_us_sdk_minus_off": round(statistics.median(added_cpu), 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="measured rounds (default 15)")
    ap.add_argument(
        "--window", type=float, default=1.0, help="seconds per variant per round (default 1)"
    )
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per variant")
    ap.add_argument("--no-aio", action="store_true", help="the sync channel only")
    ap.add_argument("--quick", action="store_true", help="short smoke run")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.window, args.warmup = 3, 0.2, 0.2
    if args.rounds < 1 or args.window <= 0:
        ap.error("need --rounds >= 1 and --window > 0")

    info = print_machine("metrics_overhead: unary calls/s, metrics off vs the OpenTelemetry SDK")
    # SIGTERM must unwind through the finally below, or the server would outlive us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    server = ServerProcess()
    try:
        print(f"   backend {server.address} (pid {server.proc.pid}); warming up", flush=True)
        sync_series, sync_check = measure_sync(server.address, args)
        aio_series, aio_check = (
            (None, None) if args.no_aio else asyncio.run(measure_aio(server.address, args))
        )
        collect_us = collection_us(server.address)
    finally:
        server.stop()

    summary: dict[str, Any] = {
        "bench": "metrics_overhead",
        "quick": args.quick,
        "rounds": args.rounds,
        "window_s": args.window,
        "export_interval_ms": EXPORT_INTERVAL_MS,
        "sync": report(sync_series, args.rounds) | {"sdk_export": sync_check},
    }
    if aio_series is not None:
        summary["aio"] = report(aio_series, args.rounds) | {"sdk_export": aio_check}
    print(
        f"\none collection of one channel's instruments (one backend): {collect_us:.0f} us, "
        f"every {EXPORT_INTERVAL_MS / 1000:g} s"
    )
    for label, check in (("sync", sync_check), ("aio", aio_check)):
        if check is not None:
            print(
                f"{label} sdk channel: {check['exports']} exports, the last with "
                f"{check['picks_exported']:.0f} picks"
            )
    summary |= {
        "collection_us": round(collect_us, 1),
        "load_avg_before": info["load_avg"],
        "load_avg_after": load_average(),
    }
    print_summary(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
