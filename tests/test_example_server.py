"""The example backend, exercised with plain grpcio channels."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import conference_pb2
import conference_pb2_grpc
import grpc
import pytest
import server as example_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import ROOT, BackendFactory, ChannelFactory, wait_until
from server import Backend

RPC_TIMEOUT = 5.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def stub_for(
    insecure_channel: ChannelFactory, backend: Backend
) -> conference_pb2_grpc.ConferenceStub:
    return conference_pb2_grpc.ConferenceStub(insecure_channel(backend.address))


def wait_idle(backend: Backend, timeout: float = 1.0) -> None:
    assert backend.servicer.wait_until(lambda s: s.live == 0, timeout), backend.servicer.stats()


class RequestQueue:
    """Request iterator fed one message at a time, for lock-step streaming."""

    _DONE = object()

    def __init__(self) -> None:
        self._queue: queue.Queue[object] = queue.Queue()

    def put(self, message: object) -> None:
        self._queue.put(message)

    def close(self) -> None:
        self._queue.put(self._DONE)

    def __iter__(self) -> Iterator[object]:
        while True:
            item = self._queue.get(timeout=RPC_TIMEOUT)
            if item is self._DONE:
                return
            yield item


# Unary ----------------------------------------------------------------------


def test_ping_echoes_payload_and_names_backend(
    backend: Backend, insecure_channel: ChannelFactory
) -> None:
    stub = stub_for(insecure_channel, backend)
    reply = stub.Ping(conference_pb2.PingRequest(payload="hello"), timeout=RPC_TIMEOUT)
    assert reply.payload == "hello"
    assert reply.backend == backend.address == backend.name
    wait_idle(backend)
    stats = backend.servicer.stats()
    assert (stats.started, stats.finished, stats.cancelled) == (1, 1, 0)
    assert stats.started_by_method == {"Ping": 1}


def test_ping_delay_is_cut_short_by_the_deadline(
    backend: Backend, insecure_channel: ChannelFactory
) -> None:
    stub = stub_for(insecure_channel, backend)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Ping(conference_pb2.PingRequest(delay_ms=10_000), timeout=0.2)
    assert excinfo.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(backend)
    assert time.monotonic() - started < 5
    assert backend.servicer.cancelled == 1


def test_ping_delay_is_honoured(backend: Backend, insecure_channel: ChannelFactory) -> None:
    stub = stub_for(insecure_channel, backend)
    started = time.monotonic()
    stub.Ping(conference_pb2.PingRequest(delay_ms=150), timeout=RPC_TIMEOUT)
    assert time.monotonic() - started >= 0.15


# Server streaming -----------------------------------------------------------


def test_join_streams_frames_for_the_requested_duration(
    backend: Backend, insecure_channel: ChannelFactory
) -> None:
    stub = stub_for(insecure_channel, backend)
    started = time.monotonic()
    frames = list(
        stub.Join(
            conference_pb2.JoinRequest(session_id="s1", duration_ms=300, frame_interval_ms=50),
            timeout=RPC_TIMEOUT,
        )
    )
    elapsed = time.monotonic() - started
    assert [f.seq for f in frames] == [0, 1, 2, 3, 4, 5]
    assert {f.session_id for f in frames} == {"s1"}
    assert {f.backend for f in frames} == {backend.name}
    assert 0.3 <= elapsed < 3
    wait_idle(backend)
    assert backend.servicer.cancelled == 0


def test_join_uses_default_frame_interval(
    backend: Backend, insecure_channel: ChannelFactory
) -> None:
    stub = stub_for(insecure_channel, backend)
    frames = list(stub.Join(conference_pb2.JoinRequest(duration_ms=250), timeout=RPC_TIMEOUT))
    assert [f.seq for f in frames] == [0, 1, 2]


def test_open_join_counts_as_live_until_client_cancels(
    backend: Backend, insecure_channel: ChannelFactory
) -> None:
    stub = stub_for(insecure_channel, backend)
    call = stub.Join(
        conference_pb2.JoinRequest(session_id="s", duration_ms=0, frame_interval_ms=10),
        timeout=30,
    )
    frames = [next(call) for _ in range(3)]
    assert [f.seq for f in frames] == [0, 1, 2]
    assert backend.servicer.wait_until(lambda s: s.live == 1 and s.live_streams == 1, 1.0)

    cancelled_at = time.monotonic()
    call.cancel()
    wait_idle(backend, timeout=1.0)
    assert time.monotonic() - cancelled_at < 1.0
    stats = backend.servicer.stats()
    assert (stats.live_streams, stats.finished, stats.cancelled) == (0, 1, 1)


def test_cancelled_join_releases_its_worker_thread(
    backends: BackendFactory, insecure_channel: ChannelFactory
) -> None:
    # With a single worker, the Ping can only run once the Join handler has
    # returned, so this fails if the stream keeps running after cancellation.
    (backend,) = backends(1, max_workers=1)
    stub = stub_for(insecure_channel, backend)
    call = stub.Join(
        conference_pb2.JoinRequest(duration_ms=0, frame_interval_ms=10_000), timeout=30
    )
    next(call)
    call.cancel()
    started = time.monotonic()
    reply = stub.Ping(conference_pb2.PingRequest(payload="after"), timeout=5)
    assert time.monotonic() - started < 1.0
    assert reply.payload == "after"


def test_endless_join_is_bounded_by_the_deadline(
    backend: Backend, insecure_channel: ChannelFactory
) -> None:
    stub = stub_for(insecure_channel, backend)
    call = stub.Join(conference_pb2.JoinRequest(duration_ms=0, frame_interval_ms=20), timeout=0.3)
    received = 0
    with pytest.raises(grpc.RpcError) as excinfo:
        for _ in call:
            received += 1
    assert excinfo.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert received >= 1
    wait_idle(backend)
    assert backend.servicer.cancelled == 1


def test_live_counts_every_rpc_kind(backend: Backend, insecure_channel: ChannelFactory) -> None:
    stub = stub_for(insecure_channel, backend)
    joins = [stub.Join(conference_pb2.JoinRequest(duration_ms=0), timeout=30) for _ in range(3)]
    for call in joins:
        next(call)
    ping = stub.Ping.future(conference_pb2.PingRequest(delay_ms=10_000), timeout=30)
    assert backend.servicer.wait_until(lambda s: s.live == 4 and s.live_streams == 3, 2.0)

    ping.cancel()
    assert backend.servicer.wait_until(lambda s: s.live == 3 and s.live_streams == 3, 2.0)
    for call in joins:
        call.cancel()
    wait_idle(backend)
    stats = backend.servicer.stats()
    assert stats.max_live == 4
    assert stats.started_by_method == {"Join": 3, "Ping": 1}
    assert stats.cancelled == 4


# Client streaming and bidi --------------------------------------------------


def test_upload_counts_frames(backend: Backend, insecure_channel: ChannelFactory) -> None:
    stub = stub_for(insecure_channel, backend)
    frames = (conference_pb2.Frame(session_id="up", seq=i) for i in range(7))
    summary = stub.Upload(frames, timeout=RPC_TIMEOUT)
    assert (summary.frames, summary.backend) == (7, backend.name)
    wait_idle(backend)
    assert backend.servicer.started_by_method == {"Upload": 1}


def test_cancelled_upload_is_accounted(backend: Backend, insecure_channel: ChannelFactory) -> None:
    stub = stub_for(insecure_channel, backend)
    requests = RequestQueue()
    future = stub.Upload.future(iter(requests), timeout=30)
    requests.put(conference_pb2.Frame(seq=0))
    assert backend.servicer.wait_until(lambda s: s.live_streams == 1, 2.0)
    future.cancel()
    wait_idle(backend)
    assert backend.servicer.cancelled == 1


def test_chat_echoes_each_message_in_lock_step(
    backend: Backend, insecure_channel: ChannelFactory
) -> None:
    stub = stub_for(insecure_channel, backend)
    requests = RequestQueue()
    replies = stub.Chat(iter(requests), timeout=RPC_TIMEOUT)
    for text in ("one", "two", "three"):
        requests.put(conference_pb2.ChatMessage(text=text))
        reply = next(replies)
        assert (reply.text, reply.backend) == (text, backend.name)
    assert backend.servicer.live_streams == 1
    requests.close()
    assert list(replies) == []
    assert replies.code() == grpc.StatusCode.OK
    wait_idle(backend)
    assert backend.servicer.cancelled == 0


def test_cancelled_chat_is_accounted(backend: Backend, insecure_channel: ChannelFactory) -> None:
    stub = stub_for(insecure_channel, backend)
    requests = RequestQueue()
    replies = stub.Chat(iter(requests), timeout=30)
    requests.put(conference_pb2.ChatMessage(text="hi"))
    next(replies)
    replies.cancel()
    wait_idle(backend)
    assert backend.servicer.cancelled == 1


# Accounting details ---------------------------------------------------------


def test_peers_and_authorities_are_recorded(
    backend: Backend, insecure_channel: ChannelFactory
) -> None:
    plain = conference_pb2_grpc.ConferenceStub(insecure_channel(backend.address))
    overridden = conference_pb2_grpc.ConferenceStub(
        insecure_channel(backend.address, options=[("grpc.default_authority", "conf.example")])
    )
    plain.Ping(conference_pb2.PingRequest(), timeout=RPC_TIMEOUT)
    overridden.Ping(conference_pb2.PingRequest(), timeout=RPC_TIMEOUT)
    assert backend.servicer.authorities == {backend.address, "conf.example"}
    peers = backend.servicer.peers
    assert len(peers) == 2
    assert all(peer.startswith("ipv4:127.0.0.1:") for peer in peers)


def test_authority_is_not_observable_through_registered_methods(
    backends: BackendFactory, insecure_channel: ChannelFactory
) -> None:
    (backend,) = backends(1, observe_authority=False)
    stub = stub_for(insecure_channel, backend)
    stub.Ping(conference_pb2.PingRequest(), timeout=RPC_TIMEOUT)
    assert backend.servicer.started == 1
    assert backend.servicer.authorities == set()


def test_stop_cancels_open_streams(backend: Backend, insecure_channel: ChannelFactory) -> None:
    stub = stub_for(insecure_channel, backend)
    call = stub.Join(conference_pb2.JoinRequest(duration_ms=0), timeout=30)
    next(call)
    assert backend.stop(grace=None, timeout=5.0)
    with pytest.raises(grpc.RpcError):
        for _ in call:
            pass
    wait_idle(backend)
    assert backend.servicer.cancelled == 1


# Backends and the fixture ---------------------------------------------------


def test_backends_fixture_starts_distinct_backends(
    backends: BackendFactory, insecure_channel: ChannelFactory
) -> None:
    started = backends(3)
    assert len({b.port for b in started}) == 3
    for b in started:
        assert b.address == f"127.0.0.1:{b.port}"
        reply = stub_for(insecure_channel, b).Ping(conference_pb2.PingRequest(), timeout=5)
        assert reply.backend == b.address


def test_backend_name_can_be_chosen(
    backends: BackendFactory, insecure_channel: ChannelFactory
) -> None:
    (backend,) = backends(1, name="eu-west-1")
    reply = stub_for(insecure_channel, backend).Ping(conference_pb2.PingRequest(), timeout=5)
    assert reply.backend == "eu-west-1"


def test_busy_port_raises(backend: Backend) -> None:
    with pytest.raises(example_server.BackendBindError, match=str(backend.port)):
        example_server.start_backend(port=backend.port)


# Health ---------------------------------------------------------------------


def test_health_reports_serving(backend: Backend, insecure_channel: ChannelFactory) -> None:
    health = health_pb2_grpc.HealthStub(insecure_channel(backend.address))
    for service in ("", example_server.SERVICE_NAME):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == SERVING
    with pytest.raises(grpc.RpcError) as excinfo:
        health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
    assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND
    # Health checks are not conference RPCs and must not count as load.
    assert backend.servicer.started == 0


def test_health_watch_sees_status_changes(
    backend: Backend, insecure_channel: ChannelFactory
) -> None:
    health = health_pb2_grpc.HealthStub(insecure_channel(backend.address))
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT)
    assert next(watch).status == SERVING
    backend.set_serving(False)
    assert next(watch).status == NOT_SERVING
    backend.set_serving(True)
    assert next(watch).status == SERVING
    watch.cancel()


def test_backend_without_health(backends: BackendFactory, insecure_channel: ChannelFactory) -> None:
    (backend,) = backends(1, health=False)
    assert backend.health is None
    health = health_pb2_grpc.HealthStub(insecure_channel(backend.address))
    with pytest.raises(grpc.RpcError) as excinfo:
        health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert excinfo.value.code() == grpc.StatusCode.UNIMPLEMENTED


# Command line ---------------------------------------------------------------


class LineReader:
    """Reads a pipe on a thread so each line can be awaited with a timeout."""

    def __init__(self, stream: object) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        thread.start()

    def _pump(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self._lines.put(line)
        self._lines.put(None)

    def next_json(self, timeout: float = 10.0) -> dict[str, object]:
        line = self._lines.get(timeout=timeout)
        assert line is not None, "server exited before printing the expected line"
        record: dict[str, object] = json.loads(line)
        return record


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_cli_serves_several_backends_and_stops_on_signal(
    insecure_channel: ChannelFactory, stop_signal: signal.Signals
) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "examples" / "server.py"),
            "--count",
            "2",
            "--base-port",
            "0",
            "--table",
            "--interval",
            "0.05",
            "--grace",
            "0.2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        reader = LineReader(proc.stdout)
        listening = reader.next_json()
        assert listening["event"] == "listening"
        addresses = listening["backends"]
        assert isinstance(addresses, list)
        assert len(addresses) == 2

        for address in addresses:
            stub = conference_pb2_grpc.ConferenceStub(insecure_channel(address))
            assert stub.Ping(conference_pb2.PingRequest(), timeout=5).backend == address

        def table_shows_both_pings() -> bool:
            record = reader.next_json()
            started = record.get("started")
            return isinstance(started, dict) and all(started.get(a) == 1 for a in addresses)

        wait_until(table_shows_both_pings, timeout=10)

        proc.send_signal(stop_signal)
        assert proc.wait(timeout=15) == 0
        record = reader.next_json()
        while "event" not in record:
            record = reader.next_json()
        assert record["event"] == "stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
