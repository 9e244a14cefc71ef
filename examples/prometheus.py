"""Example: a least-connection channel's metrics, served to Prometheus.

Builds a ``grpc_leastconn`` channel with an OpenTelemetry ``MeterProvider``
whose reader is OpenTelemetry's Prometheus exporter, serves ``/metrics`` on
127.0.0.1, sends a ``Ping`` every 0.2 s and prints the channel's backends
about once a second. Needs the ``prometheus`` extra::

    pip install -e '.[examples,prometheus]'
    python examples/server.py --port 50051 --port 50052 &
    python examples/prometheus.py ipv4:127.0.0.1:50051,127.0.0.1:50052
    curl -s http://127.0.0.1:9464/metrics | grep grpc_leastconn_backend

``--port 0`` serves on a free port, printed at start; ``--seconds N`` stops
after N seconds (default: run until Ctrl-C).

The OpenTelemetry names reach Prometheus mangled: dots become underscores,
counters gain ``_total``, annotation units (``{call}``) add nothing. So
``grpc_leastconn.backend.in_flight`` is scraped as::

    grpc_leastconn_backend_in_flight{grpc_leastconn_backend="127.0.0.1:50051",
        grpc_target="ipv4:127.0.0.1:50051,127.0.0.1:50052",...} 2.0

and ``grpc_leastconn.backend.picks`` as ``grpc_leastconn_backend_picks_total``.
The exporter collects at every scrape: each value is the channel's own at
that moment. Run the metric server next to the rest of your application's
metrics, once per process (``serve_metrics`` uses prometheus_client's global
registry, where every ``PrometheusMetricReader`` registers itself).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import start_http_server

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import conference_pb2  # noqa: E402
import conference_pb2_grpc  # noqa: E402

import grpc_leastconn  # noqa: E402

DEFAULT_PORT = 9464  # OpenTelemetry's default for the Prometheus exporter
PING_EVERY_S = 0.2
TABLE_EVERY_S = 1.0


def prometheus_meter_provider() -> MeterProvider:
    """A MeterProvider read by prometheus_client's registry at every scrape."""
    return MeterProvider(metric_readers=[PrometheusMetricReader()])


def serve_metrics(
    port: int = DEFAULT_PORT, addr: str = "127.0.0.1"
) -> tuple[int, Callable[[], None]]:
    """Serve ``/metrics`` on ``addr:port`` (0: a free port); return the port and a close()."""
    if port == 0 and not _returns_server():
        port = _free_port(addr)
    started = start_http_server(port, addr=addr)
    if started is None:  # prometheus_client before 0.20 keeps its server to itself
        return port, lambda: None
    server, thread = started

    def close() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5.0)

    return server.server_port, close


def _returns_server() -> bool:
    major, minor = importlib.metadata.version("prometheus-client").split(".")[:2]
    return (int(major), int(minor)) >= (0, 20)


def _free_port(addr: str) -> int:
    with socket.socket() as sock:
        sock.bind((addr, 0))
        return int(sock.getsockname()[1])


def backends_table(channel: grpc_leastconn.LeastConnChannel) -> str:
    """One line per backend: what ``channel.backends()`` says now."""
    lines = [f"{'backend':<22} {'in flight':>9}  {'state':<17} {'health':<11} penalty"]
    for state in channel.backends():
        lines.append(
            f"{state.address:<22} {state.in_flight:>9}  {state.connectivity.name:<17} "
            f"{state.health.value:<11} {state.penalty:g}"
            + (" ejected" if state.ejected else "")
            + (" draining" if state.draining else "")
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="e.g. ipv4:127.0.0.1:50051,127.0.0.1:50052")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="/metrics port (default %(default)s; 0: any)"
    )
    parser.add_argument("--seconds", type=float, help="stop after this long (default: never)")
    args = parser.parse_args(argv)

    provider = prometheus_meter_provider()
    channel = grpc_leastconn.insecure_channel(args.target, meter_provider=provider)
    port, close = serve_metrics(args.port)
    print(f"metrics: http://127.0.0.1:{port}/metrics", flush=True)
    ping = conference_pb2_grpc.ConferenceStub(channel).Ping
    end = None if args.seconds is None else time.monotonic() + args.seconds
    next_table = time.monotonic()
    try:
        while end is None or time.monotonic() < end:
            try:
                ping(conference_pb2.PingRequest(payload="ping"), timeout=2.0)
            except grpc.RpcError as error:
                print(f"ping failed: {error.code().name}: {error.details()}", flush=True)
            if time.monotonic() >= next_table:
                print(backends_table(channel) + "\n", flush=True)
                next_table = time.monotonic() + TABLE_EVERY_S
            time.sleep(PING_EVERY_S)
    except KeyboardInterrupt:
        pass
    finally:
        close()
        channel.close()
        provider.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
