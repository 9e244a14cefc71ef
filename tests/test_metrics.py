"""OpenTelemetry metrics and operator logs, checked against what really happened.

Every channel here gets an SDK ``MeterProvider`` with an
``InMemoryMetricReader`` through ``meter_provider=``, drives real backends
and reads the metrics back: they must agree with ``channel.backends()`` and
with the servers' own counters (``servicer.started``, ``live``), and every
data point must carry ``grpc.target`` (and ``grpc_leastconn.backend`` for the
per-backend series). The no-SDK paths run in subprocesses, so that the
global provider of this process cannot interfere. The log tests kill real
backend processes (``process_support.spawn``).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import conference_pb2 as pb
import conference_pb2_grpc
import grpc
import pytest
from aio_support import StreamTask, endless_join, eventually, run
from failure_support import Tally, closed_loop
from helpers import ROOT, BackendFactory, StreamReader, all_eligible, state_of, wait_until
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from process_support import ServerProcess, eligible, ipv4_target

import grpc_leastconn

READY = grpc.ChannelConnectivity.READY
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
RPC_TIMEOUT = 10.0
# Long enough to outlast any load below; every stream is cancelled before its end.
STREAM_TIMEOUT = 60.0

TARGET = "grpc.target"
BACKEND = "grpc_leastconn.backend"
CHANNEL = "grpc_leastconn.channel"
# The documented instruments: per backend (TARGET, CHANNEL and BACKEND) and per
# channel (TARGET and CHANNEL).
PER_BACKEND = frozenset(
    {
        "grpc_leastconn.backend.in_flight",
        "grpc_leastconn.backend.picks",
        "grpc_leastconn.backend.penalty",
        "grpc_leastconn.backend.weight",
    }
)
PER_CHANNEL = frozenset(
    {
        "grpc.subchannel.connection_attempts_succeeded",
        "grpc.subchannel.connection_attempts_failed",
        "grpc.subchannel.disconnections",
        "grpc.subchannel.open_connections",
        "grpc_leastconn.backends.eligible",
        "grpc_leastconn.backends.ejected",
        "grpc_leastconn.ejections",
        "grpc_leastconn.health_changes",
        "grpc_leastconn.resolutions",
        "grpc_leastconn.resolution_failures",
        "grpc_leastconn.repicks",
        "grpc_leastconn.fail_fast",
    }
)
ALL_METRICS = PER_BACKEND | PER_CHANNEL


# -- reading the metrics ---------------------------------------------------------------


@dataclass(frozen=True)
class Points:
    """One collection: every grpc_leastconn data point, by metric name."""

    by_name: dict[str, list[tuple[dict[str, Any], float]]]

    @property
    def names(self) -> set[str]:
        return set(self.by_name)

    @property
    def targets(self) -> set[str]:
        return {attrs[TARGET] for points in self.by_name.values() for attrs, _ in points}

    def channel(self, name: str, target: str) -> float:
        """The one value of a per-channel metric for ``target``."""
        values = [value for attrs, value in self.by_name.get(name, []) if attrs[TARGET] == target]
        assert len(values) == 1, (name, target, self.by_name.get(name))
        return values[0]

    def backends(self, name: str, target: str) -> dict[str, float]:
        """A per-backend metric for ``target``: backend address -> value (one point each)."""
        points = [(a[BACKEND], v) for a, v in self.by_name.get(name, []) if a[TARGET] == target]
        table = dict(points)
        assert len(table) == len(points), (name, points)
        return table

    def check_attributes(self, target: str, addresses: set[str]) -> None:
        """Every point of ``target`` has exactly the documented attributes."""
        assert self.names <= ALL_METRICS, self.names - ALL_METRICS
        for name, points in self.by_name.items():
            for attrs, value in points:
                if attrs[TARGET] != target:
                    continue
                if name in PER_BACKEND:
                    assert set(attrs) == {TARGET, CHANNEL, BACKEND}, (name, attrs)
                    assert attrs[BACKEND] in addresses, (name, attrs, addresses)
                else:
                    assert set(attrs) == {TARGET, CHANNEL}, (name, attrs)
                assert value >= 0, (name, attrs, value)


@dataclass(frozen=True)
class Metrics:
    provider: MeterProvider
    reader: InMemoryMetricReader

    def collect(self) -> Points:
        data = self.reader.get_metrics_data()
        by_name: dict[str, list[tuple[dict[str, Any], float]]] = {}
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                if scope.scope.name != "grpc_leastconn":
                    continue
                for metric in scope.metrics:
                    points = by_name.setdefault(metric.name, [])
                    for point in metric.data.data_points:
                        points.append((dict(point.attributes or {}), point.value))
        return Points({name: points for name, points in by_name.items() if points})


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield Metrics(provider, reader)
    provider.shutdown()


def ready_channel(servers: list[Any], **kwargs: Any) -> grpc_leastconn.LeastConnChannel:
    channel = grpc_leastconn.insecure_channel([s.address for s in servers], **kwargs)
    wait_until(lambda: all_eligible(channel), timeout=10.0)
    return channel


def hold_streams(stub: conference_pb2_grpc.ConferenceStub, n: int) -> list[StreamReader]:
    """``n`` endless Join streams, each read on a thread of its own."""
    request = pb.JoinRequest(duration_ms=0, frame_interval_ms=50)
    return [StreamReader(stub.Join(request, timeout=STREAM_TIMEOUT)).start() for _ in range(n)]


def end_streams(streams: list[StreamReader]) -> None:
    for stream in streams:
        stream.call.cancel()
    for stream in streams:
        stream.join(5.0)


def in_background(work: Callable[[], Tally]) -> tuple[threading.Thread, list[Tally]]:
    result: list[Tally] = []
    thread = threading.Thread(target=lambda: result.append(work()), daemon=True)
    thread.start()
    return thread, result


# -- agreement under load ----------------------------------------------------------------

STREAMS = 4
LOAD_THREADS = 4
LOAD_CALLS = 600


def test_metrics_agree_with_the_channel_and_the_servers_under_load(
    backends: BackendFactory, metrics: Metrics
) -> None:
    servers = backends(3)
    addresses = {s.address for s in servers}
    with ready_channel(servers, meter_provider=metrics.provider) as channel:
        target = channel.target
        stub = conference_pb2_grpc.ConferenceStub(channel)
        streams = hold_streams(stub, STREAMS)
        loader, result = in_background(
            lambda: closed_loop(stub, threads=LOAD_THREADS, calls=LOAD_CALLS, delay_ms=5)
        )
        # Collected again and again while the load runs, on this thread.
        collections = 0
        last_picks = dict.fromkeys(addresses, 0.0)
        while loader.is_alive():
            points = metrics.collect()
            points.check_attributes(target, addresses)
            assert points.names == ALL_METRICS
            in_flight = points.backends("grpc_leastconn.backend.in_flight", target)
            assert set(in_flight) == addresses
            assert all(0 <= n <= STREAMS + LOAD_THREADS for n in in_flight.values()), in_flight
            picks = points.backends("grpc_leastconn.backend.picks", target)
            assert all(picks[a] >= last_picks[a] for a in addresses), (last_picks, picks)
            last_picks = picks
            collections += 1
            time.sleep(0.01)
        loader.join()
        (tally,) = result
        assert tally.total == LOAD_CALLS and not tally.failed, tally.codes
        assert collections >= 3

        # Quiescent: only the streams are in flight, and both ends agree on it.
        wait_until(
            lambda: (
                sum(s.in_flight for s in channel.backends()) == STREAMS
                and sum(s.servicer.live for s in servers) == STREAMS
            ),
            timeout=5.0,
        )
        points = metrics.collect()
        states = {state.address: state for state in channel.backends()}
        in_flight = points.backends("grpc_leastconn.backend.in_flight", target)
        assert in_flight == {a: s.in_flight for a, s in states.items()}
        assert in_flight == {s.address: s.servicer.live for s in servers}
        assert sum(in_flight.values()) == STREAMS
        # Every call picked is a call a server saw: the Pings and the streams.
        picks = points.backends("grpc_leastconn.backend.picks", target)
        assert picks == {s.address: s.servicer.started for s in servers}
        assert sum(picks.values()) == LOAD_CALLS + STREAMS
        assert points.backends("grpc_leastconn.backend.penalty", target) == dict.fromkeys(
            addresses, 0
        )
        assert points.backends("grpc_leastconn.backend.weight", target) == {
            a: s.weight for a, s in states.items()
        }
        ready = sum(1 for s in states.values() if s.connectivity is READY)
        assert points.channel("grpc.subchannel.open_connections", target) == ready == 3
        assert points.channel("grpc_leastconn.backends.eligible", target) == 3
        assert points.channel("grpc_leastconn.backends.ejected", target) == 0
        assert points.channel("grpc.subchannel.connection_attempts_succeeded", target) >= 3
        assert points.channel("grpc.subchannel.disconnections", target) == 0
        # Each backend's health went PENDING -> SERVING once.
        assert points.channel("grpc_leastconn.health_changes", target) == 3
        for quiet in ("fail_fast", "repicks", "ejections", "resolutions", "resolution_failures"):
            assert points.channel(f"grpc_leastconn.{quiet}", target) == 0, quiet

        end_streams(streams)
        wait_until(lambda: all(s.in_flight == 0 for s in channel.backends()), timeout=5.0)
        points = metrics.collect()
        assert points.backends("grpc_leastconn.backend.in_flight", target) == dict.fromkeys(
            addresses, 0
        )
        assert points.backends("grpc_leastconn.backend.picks", target) == picks


def test_a_stopped_backend_counts_a_disconnection_and_closes_its_connection(
    backends: BackendFactory, metrics: Metrics
) -> None:
    servers = backends(3)
    victim = servers[0]
    with ready_channel(servers, meter_provider=metrics.provider) as channel:
        target = channel.target
        before = metrics.collect()
        assert before.channel("grpc.subchannel.open_connections", target) == 3
        assert before.channel("grpc.subchannel.disconnections", target) == 0

        victim.stop(None)
        wait_until(lambda: state_of(channel, victim.address).connectivity is not READY, 10.0)
        after = metrics.collect()
        after.check_attributes(target, {s.address for s in servers})
        ready = sum(1 for s in channel.backends() if s.connectivity is READY)
        assert after.channel("grpc.subchannel.open_connections", target) == ready == 2
        assert after.channel("grpc.subchannel.disconnections", target) == 1
        assert after.channel("grpc_leastconn.backends.eligible", target) == 2


def test_a_failing_backend_shows_its_penalty(backends: BackendFactory, metrics: Metrics) -> None:
    servers = backends(3)
    sick = servers[0]
    with ready_channel(servers, meter_provider=metrics.provider) as channel:
        target = channel.target
        stub = conference_pb2_grpc.ConferenceStub(channel)
        sick.servicer.fail_calls(UNAVAILABLE)
        tally = closed_loop(stub, threads=4, calls=300)
        points = metrics.collect()
        penalty = points.backends("grpc_leastconn.backend.penalty", target)
        state = state_of(channel, sick.address)
        assert penalty[sick.address] > 0, penalty
        # Read a moment later, the channel's penalty can only have decayed.
        assert 0 < state.penalty <= penalty[sick.address] + 0.001, (state, penalty)
        assert all(penalty[s.address] == 0 for s in servers[1:]), penalty
        picks = points.backends("grpc_leastconn.backend.picks", target)
        assert picks[sick.address] == tally.failed[sick.address] == sick.servicer.started


def test_calls_failed_fast_with_no_backend_up_are_counted(
    backends: BackendFactory, metrics: Metrics
) -> None:
    servers = backends(2)
    with ready_channel(servers, meter_provider=metrics.provider) as channel:
        target = channel.target
        stub = conference_pb2_grpc.ConferenceStub(channel)
        stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT)
        assert metrics.collect().channel("grpc_leastconn.fail_fast", target) == 0
        for server in servers:
            server.stop(None)
        wait_until(lambda: not any(s.connectivity is READY for s in channel.backends()), 10.0)
        codes = []
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as failure:
                stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT)
            codes.append(failure.value.code())
        assert codes == [UNAVAILABLE] * 5
        points = metrics.collect()
        assert points.channel("grpc_leastconn.fail_fast", target) == 5
        assert points.channel("grpc_leastconn.backends.eligible", target) == 0
        assert points.channel("grpc.subchannel.open_connections", target) == 0


def test_a_health_flip_is_counted(backends: BackendFactory, metrics: Metrics) -> None:
    servers = backends(2)
    flipper = servers[0]
    with ready_channel(servers, meter_provider=metrics.provider) as channel:
        target = channel.target
        before = metrics.collect().channel("grpc_leastconn.health_changes", target)
        flipper.set_serving(False)
        wait_until(lambda: not state_of(channel, flipper.address).eligible, timeout=5.0)
        points = metrics.collect()
        assert points.channel("grpc_leastconn.health_changes", target) == before + 1
        assert points.channel("grpc_leastconn.backends.eligible", target) == 1
        # Not serving, still connected.
        assert points.channel("grpc.subchannel.open_connections", target) == 2
        flipper.set_serving(True)
        wait_until(lambda: state_of(channel, flipper.address).eligible, timeout=5.0)
        points = metrics.collect()
        assert points.channel("grpc_leastconn.health_changes", target) == before + 2
        assert points.channel("grpc_leastconn.backends.eligible", target) == 2


def test_an_ejection_is_counted_and_shown(backends: BackendFactory, metrics: Metrics) -> None:
    servers = backends(4)
    sick = servers[0]
    detection = grpc_leastconn.OutlierDetection(
        interval=0.3,
        # Long, so it is still ejected when read.
        base_ejection_time=30.0,
        failure_percentage_ejection=grpc_leastconn.FailurePercentageEjection(
            minimum_hosts=4, request_volume=10
        ),
    )
    with ready_channel(
        servers,
        failure_penalty=False,
        outlier_detection=detection,
        meter_provider=metrics.provider,
    ) as channel:
        target = channel.target
        stub = conference_pb2_grpc.ConferenceStub(channel)
        assert metrics.collect().channel("grpc_leastconn.ejections", target) == 0
        sick.servicer.fail_calls(grpc.StatusCode.INTERNAL)
        closed_loop(
            stub,
            threads=8,
            calls=100_000,
            until=lambda: state_of(channel, sick.address).ejected,
            timeout=10.0,
        )
        assert state_of(channel, sick.address).ejected
        points = metrics.collect()
        ejected = sum(1 for s in channel.backends() if s.ejected)
        assert points.channel("grpc_leastconn.backends.ejected", target) == ejected == 1
        assert points.channel("grpc_leastconn.ejections", target) == 1
        assert points.channel("grpc_leastconn.backends.eligible", target) == 3
        # Ejected, not disconnected.
        assert points.channel("grpc.subchannel.open_connections", target) == 4


# -- channels and providers ------------------------------------------------------------------


def test_two_channels_on_one_provider_report_their_own_series_until_closed(
    backends: BackendFactory, metrics: Metrics
) -> None:
    servers = backends(3)
    first = ready_channel(servers[:2], meter_provider=metrics.provider)
    second = ready_channel(servers[2:], meter_provider=metrics.provider)
    try:
        for channel, calls in ((first, 20), (second, 7)):
            stub = conference_pb2_grpc.ConferenceStub(channel)
            for _ in range(calls):
                stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT)
        points = metrics.collect()
        assert points.targets == {first.target, second.target}
        for channel, group, calls in ((first, servers[:2], 20), (second, servers[2:], 7)):
            addresses = {s.address for s in group}
            points.check_attributes(channel.target, addresses)
            picks = points.backends("grpc_leastconn.backend.picks", channel.target)
            assert picks == {s.address: s.servicer.started for s in group}
            assert sum(picks.values()) == calls
            assert points.channel("grpc.subchannel.open_connections", channel.target) == len(group)
            assert points.channel("grpc_leastconn.backends.eligible", channel.target) == len(group)
        # One point per channel for each per-channel metric.
        for name in PER_CHANNEL:
            assert len(points.by_name[name]) == 2, (name, points.by_name[name])

        first.close()
        points = metrics.collect()
        assert points.targets == {second.target}
        assert points.names == ALL_METRICS
        assert points.backends("grpc_leastconn.backend.picks", second.target) == {
            servers[2].address: 7
        }
        second.close()
        assert metrics.collect().names == set()
    finally:
        first.close()
        second.close()


def test_two_channels_to_one_target_keep_their_series_apart(
    backends: BackendFactory, metrics: Metrics
) -> None:
    servers = backends(2)
    first = ready_channel(servers, meter_provider=metrics.provider)
    second = ready_channel(servers, meter_provider=metrics.provider)
    try:
        assert first.target == second.target
        for channel, calls in ((first, 6), (second, 3)):
            stub = conference_pb2_grpc.ConferenceStub(channel)
            for _ in range(calls):
                stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT)
        points = metrics.collect()
        points.check_attributes(first.target, {s.address for s in servers})
        picks: dict[Any, float] = {}
        for attrs, value in points.by_name["grpc_leastconn.backend.picks"]:
            picks[attrs[CHANNEL]] = picks.get(attrs[CHANNEL], 0.0) + value
        # Two channel numbers, each with its own calls: none summed into the other.
        assert sorted(picks.values()) == [3, 6], picks
        for name in PER_CHANNEL:
            channels = [attrs[CHANNEL] for attrs, _ in points.by_name[name]]
            assert len(set(channels)) == 2, (name, points.by_name[name])
    finally:
        first.close()
        second.close()


def test_metrics_off_report_nothing(backends: BackendFactory, metrics: Metrics) -> None:
    servers = backends(2)
    with ready_channel(servers, meter_provider=False) as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        for _ in range(10):
            stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT)
        assert metrics.collect().names == set()
        data = metrics.reader.get_metrics_data()
        names = {
            metric.name
            for resource in (data.resource_metrics if data is not None else ())
            for scope in resource.scope_metrics
            for metric in scope.metrics
        }
        assert not any(name.startswith(("grpc_leastconn", "grpc.subchannel")) for name in names)


@pytest.mark.parametrize("bad", ["x", True, 1, object()], ids=["str", "True", "int", "object"])
def test_a_meter_provider_that_is_not_one_is_refused_at_construction(bad: object) -> None:
    for factory in (grpc_leastconn.insecure_channel, grpc_leastconn.aio.insecure_channel):
        with pytest.raises(TypeError, match="meter_provider"):
            factory("127.0.0.1:5001", meter_provider=bad)


# Run in a fresh interpreter: this process's global MeterProvider stays out of it.
_NO_SDK_SCRIPT = """
import asyncio, json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
mode = sys.argv[3]
if mode == "no-opentelemetry":
    sys.modules["opentelemetry"] = None  # as if the otel extra were not installed
import conference_pb2 as pb, conference_pb2_grpc
import grpc_leastconn
import server

backend = server.start_backend()
try:
    provider = None
    if mode == "api-default":
        from opentelemetry import metrics
        provider = type(metrics.get_meter_provider()).__name__
    with grpc_leastconn.insecure_channel(backend.address) as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        replies = [
            stub.Ping(pb.PingRequest(payload=str(i)), timeout=10, wait_for_ready=True).payload
            for i in range(20)
        ]
        states = [s.eligible for s in channel.backends()]

    async def aio_pings():
        async with grpc_leastconn.aio.insecure_channel(backend.address) as channel:
            stub = conference_pb2_grpc.ConferenceStub(channel)
            return [
                (await stub.Ping(pb.PingRequest(payload=str(i)), timeout=10)).payload
                for i in range(5)
            ]

    aio_replies = asyncio.run(aio_pings())
finally:
    backend.stop(None)
print(json.dumps({
    "replies": replies, "aio_replies": aio_replies, "eligible": states, "provider": provider
}))
"""


@pytest.mark.parametrize("mode", ["api-default", "no-opentelemetry"])
def test_channels_work_without_an_sdk(mode: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _NO_SDK_SCRIPT,
            str(ROOT),
            str(ROOT / "examples"),
            mode,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["replies"] == [str(i) for i in range(20)]
    assert result["aio_replies"] == [str(i) for i in range(5)]
    assert result["eligible"] == [True]
    if mode == "api-default":
        # The API's stand-in: nothing is set, so nothing is recorded.
        assert result["provider"] == "_ProxyMeterProvider"


_GLOBAL_SDK_SCRIPT = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import conference_pb2 as pb, conference_pb2_grpc
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
import grpc_leastconn
import server

reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
backend = server.start_backend()
try:
    with grpc_leastconn.insecure_channel(backend.address) as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        for _ in range(9):
            stub.Ping(pb.PingRequest(), timeout=10, wait_for_ready=True)
        picks = [
            (dict(p.attributes), p.value)
            for r in reader.get_metrics_data().resource_metrics
            for s in r.scope_metrics
            for m in s.metrics
            if m.name == "grpc_leastconn.backend.picks"
            for p in m.data.data_points
        ]
finally:
    backend.stop(None)
print(json.dumps({"address": backend.address, "target": channel.target, "picks": picks}))
"""


def test_a_global_meter_provider_is_used_with_no_keyword() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _GLOBAL_SDK_SCRIPT, str(ROOT), str(ROOT / "examples")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    # The only channel of that process is its channel number 1.
    assert result["picks"] == [
        [{TARGET: result["target"], CHANNEL: 1, BACKEND: result["address"]}, 9]
    ]


def test_the_asyncio_channel_reports_the_same_metrics(
    backends: BackendFactory, metrics: Metrics
) -> None:
    servers = backends(2)
    addresses = {s.address for s in servers}

    async def body() -> None:
        channel = grpc_leastconn.aio.insecure_channel(
            [s.address for s in servers], meter_provider=metrics.provider
        )
        target = channel.target
        try:
            await eventually(lambda: all_eligible(channel), timeout=10.0)
            stub = conference_pb2_grpc.ConferenceStub(channel)
            for _ in range(5):
                await stub.Ping(pb.PingRequest(delay_ms=2), timeout=RPC_TIMEOUT)
            streams = [
                StreamTask(endless_join(stub, timeout=STREAM_TIMEOUT)).start() for _ in range(3)
            ]
            # Quiescent: each stream's handler runs, every Ping has ended on both ends.
            await eventually(
                lambda: (
                    sum(s.servicer.live_streams for s in servers) == 3
                    and sum(s.servicer.live for s in servers) == 3
                )
            )
            await eventually(lambda: sum(s.in_flight for s in channel.backends()) == 3)
            points = metrics.collect()
            points.check_attributes(target, addresses)
            assert points.names == ALL_METRICS
            states = {state.address: state for state in channel.backends()}
            in_flight = points.backends("grpc_leastconn.backend.in_flight", target)
            assert in_flight == {a: s.in_flight for a, s in states.items()}
            assert in_flight == {s.address: s.servicer.live for s in servers}
            picks = points.backends("grpc_leastconn.backend.picks", target)
            assert picks == {s.address: s.servicer.started for s in servers}
            assert sum(picks.values()) == 8
            assert points.channel("grpc.subchannel.open_connections", target) == 2
            assert points.channel("grpc_leastconn.backends.eligible", target) == 2
            assert points.channel("grpc.subchannel.connection_attempts_succeeded", target) >= 2
            assert points.channel("grpc_leastconn.health_changes", target) == 2
            for stream in streams:
                stream.call.cancel()
            for stream in streams:
                await stream.join(5.0)
        finally:
            await channel.close()
        assert metrics.collect().names == set()

    run(body)


# -- operator logs --------------------------------------------------------------------------


def test_a_killed_backend_is_logged_once_unreachable_and_once_reachable_again(
    spawn: Callable[..., ServerProcess], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="grpc_leastconn")
    victim, survivor = spawn(), spawn()
    channel = grpc_leastconn.insecure_channel(ipv4_target([victim, survivor]))
    with channel:
        wait_until(lambda: all_eligible(channel), timeout=10.0)
        stub = conference_pb2_grpc.ConferenceStub(channel)
        # One stream on each backend (least connections), then light load.
        streams = hold_streams(stub, 2)
        assert {stream.backend for stream in streams} == {victim.address, survivor.address}
        stop = threading.Event()
        loader, _ = in_background(
            lambda: closed_loop(
                stub, threads=2, calls=100_000, delay_ms=20, until=stop.is_set, timeout=60.0
            )
        )
        try:
            victim.kill()
            victim.proc.wait(5.0)
            wait_until(
                lambda: any("is unreachable" in r.getMessage() for r in caplog.records),
                timeout=10.0,
            )
            restarted = spawn(victim.port)
            wait_until(lambda: eligible(channel, restarted.address), timeout=15.0)
            wait_until(
                lambda: any("reachable again" in r.getMessage() for r in caplog.records),
                timeout=5.0,
            )
        finally:
            stop.set()
            loader.join(30.0)
            end_streams(streams)
    unreachable = [r for r in caplog.records if "is unreachable" in r.getMessage()]
    assert len(unreachable) == 1, [r.getMessage() for r in unreachable]
    (warning,) = unreachable
    text = warning.getMessage()
    assert warning.levelno == logging.WARNING, text
    assert f"backend {victim.address} of" in text, text
    # Calls were running there: the error they met is named.
    assert "(last error: " in text and "none seen" not in text, text
    back = [r for r in caplog.records if "reachable again" in r.getMessage()]
    assert len(back) == 1, [r.getMessage() for r in back]
    assert back[0].levelno == logging.INFO
    assert f"backend {victim.address} of" in back[0].getMessage()


def test_nothing_is_logged_per_call(
    backends: BackendFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="grpc_leastconn")
    servers = backends(2)
    with ready_channel(servers) as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT)
        before = len(caplog.records)
        tally = closed_loop(stub, threads=2, calls=500, delay_ms=0)
        new = caplog.records[before:]
    assert tally.total == 500 and not tally.failed
    assert [r.getMessage() for r in new if r.levelno >= logging.INFO] == []
    # Not even at DEBUG: a few lines at most, none per call.
    assert len(new) < 5, [r.getMessage() for r in new]
