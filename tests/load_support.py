"""Backends whose ORCA load reports a test scripts, for the server_load tests.

A real grpc server on loopback with the example Conference service, the
health service, and (unless told not to) the out-of-band
``OpenRcaService/StreamCoreMetrics`` stream, whose reports carry the
in-flight count the test sets. Calls can carry the same report in their
``endpoint-load-metrics-bin`` trailer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import server as example_server
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from xds.data.orca.v3 import orca_load_report_pb2
from xds.service.orca.v3 import orca_pb2

IN_FLIGHT_METRIC = "grpc_leastconn.in_flight"
# grpcio's clients never see ORCA's own key (C-core takes it): the mirror.
TRAILER = "grpc-leastconn-load-bin"
OOB = "/xds.service.orca.v3.OpenRcaService/StreamCoreMetrics"


@dataclass
class Script:
    """What a scripted backend reports: its in-flight count, now and on each change."""

    in_flight: float = 0.0
    changed: threading.Condition = field(default_factory=threading.Condition)
    streams_opened: int = 0
    closed: bool = False

    def set(self, in_flight: float) -> None:
        with self.changed:
            self.in_flight = in_flight
            self.changed.notify_all()

    def report(self) -> bytes:
        report = orca_load_report_pb2.OrcaLoadReport()
        report.named_metrics[IN_FLIGHT_METRIC] = self.in_flight
        return report.SerializeToString()

    def stream(self, _request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
        with self.changed:
            self.streams_opened += 1
        context.add_callback(self._wake)
        sent = None
        while context.is_active() and not self.closed:
            with self.changed:
                if sent == self.in_flight:
                    self.changed.wait(0.5)
                if sent == self.in_flight:
                    continue
                sent = self.in_flight
            yield self.report()

    def _wake(self) -> None:
        with self.changed:
            self.changed.notify_all()


class _TrailingServicer(example_server.ConferenceServicer):
    """The example service, each Ping answered with the script's report as a trailer."""

    def __init__(self, name: str, script: Script) -> None:
        super().__init__(name)
        self._script = script

    def Ping(self, request: Any, context: grpc.ServicerContext) -> Any:
        context.set_trailing_metadata(((TRAILER, self._script.report()),))
        return super().Ping(request, context)


@dataclass
class LoadBackend:
    server: grpc.Server
    address: str
    script: Script
    servicer: example_server.ConferenceServicer

    def stop(self) -> None:
        self.script.closed = True
        self.script._wake()
        self.server.stop(None).wait(5)


def start(*, oob: bool = True, trailers: bool = False, port: int = 0) -> LoadBackend:
    script = Script()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    address_port = server.add_insecure_port(f"127.0.0.1:{port}")
    address = f"127.0.0.1:{address_port}"
    servicer: example_server.ConferenceServicer = (
        _TrailingServicer(address, script)
        if trailers
        else example_server.ConferenceServicer(address)
    )
    example_server.add_servicer_to_server(servicer, server)
    checker = health.HealthServicer()
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    if oob:
        handler = grpc.unary_stream_rpc_method_handler(
            script.stream,
            request_deserializer=orca_pb2.OrcaLoadReportRequest.FromString,
            response_serializer=lambda data: data,
        )
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "xds.service.orca.v3.OpenRcaService", {"StreamCoreMetrics": handler}
                ),
            )
        )
    server.start()
    return LoadBackend(server, address, script, servicer)
