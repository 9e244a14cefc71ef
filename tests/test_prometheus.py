"""examples/prometheus.py against real backends: what /metrics serves is what the channel says.

The example's setup runs in this process (its ``prometheus_meter_provider``
and ``serve_metrics``), and the example as a whole in a subprocess. Each
test scrapes ``http://127.0.0.1:<port>/metrics`` over loopback and parses the
text exposition itself: OpenTelemetry's names as Prometheus mangles them
(dots to underscores, ``_total`` on counters), its attributes as labels.
"""

from __future__ import annotations

import importlib.util
import queue
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from types import ModuleType
from typing import IO, Any

import conference_pb2 as pb
import conference_pb2_grpc
import pytest
from helpers import ROOT, BackendFactory, StreamReader, all_eligible, wait_until

import grpc_leastconn

EXAMPLE = ROOT / "examples" / "prometheus.py"
SCRAPE_TIMEOUT = 5.0
RPC_TIMEOUT = 10.0
STREAMS = 3


def _load_example() -> ModuleType:
    # By path, under a name of its own: "prometheus" is too generic a module name.
    spec = importlib.util.spec_from_file_location("prometheus_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()


# -- the text exposition -----------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Scrape:
    samples: list[tuple[str, dict[str, str], float]]
    types: dict[str, str]

    def of(self, name: str, target: str) -> list[tuple[dict[str, str], float]]:
        return [
            (labels, value)
            for sample, labels, value in self.samples
            if sample == name and labels.get("grpc_target") == target
        ]

    def per_backend(self, name: str, target: str) -> dict[str, float]:
        rows = [
            (labels["grpc_leastconn_backend"], value) for labels, value in self.of(name, target)
        ]
        table = dict(rows)
        assert len(table) == len(rows), rows
        return table

    def per_channel(self, name: str, target: str) -> float:
        rows = self.of(name, target)
        assert len(rows) == 1, (name, rows)
        return rows[0][1]


def parse(text: str) -> Scrape:
    samples: list[tuple[str, dict[str, str], float]] = []
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match is not None, line
        name, labels, value = match.groups()
        samples.append((name, dict(_LABEL.findall(labels or "")), float(value)))
    return Scrape(samples, types)


def scrape(port: int) -> Scrape:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse(response.read().decode("utf-8"))


# -- the setup, in this process --------------------------------------------------------------


def test_what_prometheus_scrapes_matches_the_channel(backends: BackendFactory) -> None:
    servers = backends(2)
    addresses = {s.address for s in servers}
    provider = example.prometheus_meter_provider()
    channel = grpc_leastconn.insecure_channel([s.address for s in servers], meter_provider=provider)
    port, close = example.serve_metrics(0)
    streams: list[StreamReader] = []
    try:
        assert port > 0
        wait_until(lambda: all_eligible(channel), timeout=10.0)
        target = channel.target
        stub = conference_pb2_grpc.ConferenceStub(channel)
        for _ in range(5):
            stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT)
        request = pb.JoinRequest(duration_ms=0, frame_interval_ms=50)
        streams = [StreamReader(stub.Join(request, timeout=60.0)).start() for _ in range(STREAMS)]
        wait_until(
            lambda: (
                sum(s.in_flight for s in channel.backends()) == STREAMS
                and sum(s.servicer.live for s in servers) == STREAMS
            ),
            timeout=5.0,
        )
        scraped = scrape(port)
        states = {state.address: state for state in channel.backends()}

        in_flight = scraped.per_backend("grpc_leastconn_backend_in_flight", target)
        assert in_flight == {a: float(s.in_flight) for a, s in states.items()}
        assert sorted(in_flight.values()) == [1.0, 2.0]
        picks = scraped.per_backend("grpc_leastconn_backend_picks_total", target)
        assert picks == {s.address: float(s.servicer.started) for s in servers}
        assert sum(picks.values()) == 5 + STREAMS
        penalty = scraped.per_backend("grpc_leastconn_backend_penalty", target)
        assert penalty == dict.fromkeys(addresses, 0.0)
        assert scraped.per_channel("grpc_subchannel_open_connections", target) == 2
        assert scraped.per_channel("grpc_leastconn_backends_eligible", target) == 2
        assert scraped.per_channel("grpc_leastconn_backends_ejected", target) == 0
        assert scraped.per_channel("grpc_subchannel_disconnections_total", target) == 0
        assert scraped.per_channel("grpc_leastconn_fail_fast_total", target) == 0
        assert scraped.per_channel("grpc_leastconn_health_changes_total", target) == 2
        assert scraped.types["grpc_leastconn_backend_in_flight"] == "gauge"
        assert scraped.types["grpc_leastconn_backend_picks_total"] == "counter"

        for stream in streams:
            stream.call.cancel()
        for stream in streams:
            stream.join(5.0)
        wait_until(lambda: all(s.in_flight == 0 for s in channel.backends()), timeout=5.0)
        scraped = scrape(port)
        in_flight = scraped.per_backend("grpc_leastconn_backend_in_flight", target)
        assert in_flight == dict.fromkeys(addresses, 0.0)
        assert scraped.per_backend("grpc_leastconn_backend_picks_total", target) == picks
    finally:
        for stream in streams:
            stream.call.cancel()
        close()
        channel.close()
        provider.shutdown()
    # Shut down: nothing listens there any more.
    with pytest.raises(urllib.error.URLError):
        scrape(port)


# -- the example as a program --------------------------------------------------------------


def _lines(stream: IO[str], out: queue.Queue[str | None]) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


def test_the_example_serves_its_pings_metrics_until_interrupted(
    backends: BackendFactory,
) -> None:
    servers = backends(2)
    target = "ipv4:" + ",".join(s.address for s in servers)
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), target, "--port", "0", "--seconds", "60"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    out: queue.Queue[str | None] = queue.Queue()
    assert proc.stdout is not None and proc.stderr is not None
    stderr: list[str] = []
    readers = [
        threading.Thread(target=_lines, args=(proc.stdout, out), daemon=True),
        threading.Thread(target=lambda: stderr.extend(proc.stderr or ()), daemon=True),
    ]
    for reader in readers:
        reader.start()
    printed: list[str] = []
    try:
        first = out.get(timeout=30.0)
        assert first is not None, stderr
        printed.append(first)
        match = re.fullmatch(r"metrics: http://127\.0\.0\.1:(\d+)/metrics\n", first)
        assert match is not None, first
        port = int(match.group(1))

        def pinged() -> Any:
            scraped = scrape(port)
            picks = scraped.per_backend("grpc_leastconn_backend_picks_total", target)
            return scraped if sum(picks.values()) >= 4 else None

        scraped = wait_until(pinged, timeout=10.0, interval=0.1)
        in_flight = scraped.per_backend("grpc_leastconn_backend_in_flight", target)
        assert set(in_flight) == {s.address for s in servers}
        assert all(value in (0.0, 1.0) for value in in_flight.values()), in_flight
        assert scraped.per_channel("grpc_subchannel_open_connections", target) == 2
        # Ctrl-C: it closes everything and ends well.
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30.0) == 0, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5.0)
    for reader in readers:
        reader.join(5.0)
    while (line := out.get(timeout=5.0)) is not None:
        printed.append(line)
    text = "".join(printed)
    assert "Traceback" not in "".join(stderr), stderr
    for server in servers:
        assert f"{server.address}" in text and "READY" in text, text
    assert sum(s.servicer.started for s in servers) >= 4
