"""Interop: gRPC C-core's own ``weighted_round_robin`` balances on LoadReporter's reports.

Two sync Python backends (the example Conference service) each run a
``LoadReporter`` whose ``application_utilization`` the test sets, 0.9 on
one and 0.1 on the other. A plain grpcio channel with the
``weighted_round_robin`` policy (gRFC A58: weight = qps / utilization) sends
Pings to both; the backend reporting the low utilization must get clearly
more of them (> 2x), and once the utilizations are swapped the traffic must
swing the other way. Once with the per-call trailers, once with the
out-of-band stream (``enableOobLoadReport``), which the policy opens on
each backend itself.

Traffic is measured in windows of ``WINDOW_S`` seconds as the backends
count it; a phase passes once ``STREAK`` windows in a row favour the
expected backend, and fails if that has not happened within
``PHASE_TIMEOUT_S``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import conference_pb2 as pb
import conference_pb2_grpc
import grpc
import pytest
import server as example_server
from helpers import wait_until

from grpc_leastconn import LoadReporter

OOB = "/xds.service.orca.v3.OpenRcaService/StreamCoreMetrics"
WINDOW_S = 0.5
STREAK = 3
PHASE_TIMEOUT_S = 10.0
FAVOURED_RATIO = 2.0


class MethodCounter(grpc.ServerInterceptor):
    """Counts the calls each method received (the reporter does not count its stream)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        self.calls[details.method] += 1
        return continuation(details)


@dataclass
class Backend:
    reporter: LoadReporter
    servicer: example_server.ConferenceServicer
    methods: MethodCounter
    server: grpc.Server
    address: str


@dataclass
class Phase:
    """The Pings per backend in each window until the expected one was favoured."""

    windows: list[list[int]] = field(default_factory=list)
    elapsed: float = 0.0

    def share(self, index: int) -> float:
        """The favoured backend's share of the Pings over the passing streak."""
        last = self.windows[-STREAK:]
        return sum(w[index] for w in last) / max(1, sum(sum(w) for w in last))


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    started: list[Backend] = []
    for utilization in (0.9, 0.1):
        reporter = LoadReporter(min_report_interval=0.1)
        reporter.set_application_utilization(utilization)
        methods = MethodCounter()
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16),
            interceptors=[methods, reporter.interceptor()],
        )
        servicer = example_server.ConferenceServicer(f"u{utilization}")
        example_server.add_servicer_to_server(servicer, server)
        reporter.add_to_server(server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        started.append(Backend(reporter, servicer, methods, server, f"127.0.0.1:{port}"))
    yield started
    for backend in started:
        backend.server.stop(None).wait(5)


def wrr_channel(backends: list[Backend], oob: bool) -> grpc.Channel:
    policy: dict[str, Any] = {"blackoutPeriod": "0.1s", "weightUpdatePeriod": "0.1s"}
    if oob:
        policy |= {"enableOobLoadReport": True, "oobReportingPeriod": "0.1s"}
    config = {"loadBalancingConfig": [{"weighted_round_robin": policy}]}
    target = "ipv4:" + ",".join(backend.address for backend in backends)
    return grpc.insecure_channel(target, options=[("grpc.service_config", json.dumps(config))])


def until_favoured(stub: Any, backends: list[Backend], favoured: int) -> Phase:
    """Ping in windows until ``STREAK`` windows in a row favour backend ``favoured``."""
    phase = Phase()
    started = time.monotonic()
    streak = 0
    while streak < STREAK:
        assert time.monotonic() - started < PHASE_TIMEOUT_S, (
            f"backend {favoured} not favoured within {PHASE_TIMEOUT_S:g}s: {phase.windows}"
        )
        before = [backend.servicer.started for backend in backends]
        window_end = time.monotonic() + WINDOW_S
        while time.monotonic() < window_end:
            stub.Ping(pb.PingRequest(), timeout=5)
        counts = [b.servicer.started - n for b, n in zip(backends, before, strict=True)]
        phase.windows.append(counts)
        others = max(n for i, n in enumerate(counts) if i != favoured)
        streak = streak + 1 if counts[favoured] > FAVOURED_RATIO * others else 0
    phase.elapsed = time.monotonic() - started
    return phase


@pytest.mark.timeout(60)
@pytest.mark.parametrize("oob", [False, True], ids=["per-call", "out-of-band"])
def test_weighted_round_robin_follows_the_reported_utilization(
    backends: list[Backend], oob: bool
) -> None:
    channel = wrr_channel(backends, oob)
    try:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        first = until_favoured(stub, backends, favoured=1)  # utilization 0.1
        backends[0].reporter.set_application_utilization(0.1)
        backends[1].reporter.set_application_utilization(0.9)
        swapped = until_favoured(stub, backends, favoured=0)
        print(
            f"\n{'oob' if oob else 'per-call'}: low-utilization share "
            f"{first.share(1):.1%} after {first.elapsed:.1f}s, "
            f"after the swap {swapped.share(0):.1%} after {swapped.elapsed:.1f}s; "
            f"windows {first.windows} | {swapped.windows}"
        )
        assert first.share(1) > FAVOURED_RATIO / (1 + FAVOURED_RATIO)
        assert swapped.share(0) > FAVOURED_RATIO / (1 + FAVOURED_RATIO)
        for backend in backends:
            # The policy opened the report stream itself only when told to.
            assert (backend.methods.calls[OOB] > 0) == oob
    finally:
        channel.close()
    for backend in backends:
        # Pings are over and the report streams are not counted: nothing in flight.
        assert backend.servicer.wait_until(lambda s: s.live == 0, 5.0)
        wait_until(lambda reporter=backend.reporter: reporter.in_flight == 0)
