"""Under OpenTelemetry's gRPC auto-instrumentation, both channels work and count exactly.

``GrpcInstrumentorClient`` patches ``grpc.insecure_channel`` (so every backend
channel comes back intercepted, its server-streaming calls plain
generators); ``GrpcAioInstrumentorClient`` adds ``interceptors=`` to
``grpc.aio.insecure_channel``. Many services run them (``opentelemetry-
instrument``). Every call type must succeed and be counted exactly, health
watching must go on, no thread or task may raise, and the spans users get
name the backend that served each call.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import conference_pb2 as pb
import conference_pb2_grpc
import grpc
import pytest
from aio_support import eventually, run
from helpers import (
    BackendFactory,
    all_eligible,
    observed_aio_channel,
    observed_channel,
    state_of,
    wait_until,
)
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcInstrumentorClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

RPC_TIMEOUT = 10.0

_exporter = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(_exporter))
# Set once per process, as an application does.
trace.set_tracer_provider(_provider)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The instrumentors active (and threads watched) for one test, then undone."""
    sync, aio = GrpcInstrumentorClient(), GrpcAioInstrumentorClient()
    sync.instrument(tracer_provider=_provider)
    aio.instrument(tracer_provider=_provider)
    errors: list[BaseException] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)  # type: ignore[assignment]
    _exporter.clear()
    try:
        yield _exporter
    finally:
        sync.uninstrument()
        aio.uninstrument()
        threading.excepthook = previous
    assert not errors, errors


def frames(n: int) -> Iterator[pb.Frame]:
    for seq in range(n):
        yield pb.Frame(session_id="s", seq=seq)


def served_spans(exporter: InMemorySpanExporter, method: str) -> list[tuple[str, int]]:
    return [
        (str(span.attributes.get("server.address")), int(span.attributes.get("server.port", 0)))  # type: ignore[arg-type, union-attr]
        for span in exporter.get_finished_spans()
        if span.name == f"/conference.Conference/{method}"
    ]


def test_every_call_type_works_and_counts_exactly_when_instrumented(
    backends: BackendFactory, spans: InMemorySpanExporter
) -> None:
    servers = backends(2)
    channel, ledger = observed_channel([s.address for s in servers])
    with channel:
        wait_until(lambda: all_eligible(channel), timeout=RPC_TIMEOUT)
        stub = conference_pb2_grpc.ConferenceStub(channel)
        reply = stub.Ping(pb.PingRequest(payload="a"), timeout=RPC_TIMEOUT)
        assert reply.payload == "a"
        _, call = stub.Ping.with_call(pb.PingRequest(), timeout=RPC_TIMEOUT)
        assert call.code() is grpc.StatusCode.OK
        assert stub.Ping.future(pb.PingRequest(), timeout=RPC_TIMEOUT).result().backend
        join = stub.Join(pb.JoinRequest(duration_ms=40, frame_interval_ms=10), timeout=RPC_TIMEOUT)
        assert len(list(join)) == 4
        assert stub.Upload(frames(3), timeout=RPC_TIMEOUT).frames == 3
        assert stub.Upload.future(frames(2), timeout=RPC_TIMEOUT).result().frames == 2
        chat = stub.Chat(iter([pb.ChatMessage(text="x"), pb.ChatMessage(text="y")]), timeout=5)
        assert [m.text for m in chat] == ["x", "y"]
        # A stream the caller drops unread, and one cancelled.
        dropped = stub.Join(pb.JoinRequest(duration_ms=0), timeout=RPC_TIMEOUT)
        next(dropped)
        del dropped
        cancelled = stub.Join(pb.JoinRequest(duration_ms=0), timeout=RPC_TIMEOUT)
        next(cancelled)
        assert cancelled.cancel()
        # An error status.
        with pytest.raises(grpc.RpcError):
            stub.Ping(pb.PingRequest(delay_ms=2000), timeout=0.2)
        wait_until(lambda: not any(channel.connection_table().values()), timeout=RPC_TIMEOUT)
        ledger.check()
        assert sum(ledger.picked.values()) == 10
    # Spans name the backend each call went to.
    addresses = {s.address for s in servers}
    pings = served_spans(spans, "Ping")
    assert pings and all(f"{host}:{port}" in addresses for host, port in pings)
    assert served_spans(spans, "Join") and served_spans(spans, "Upload")


def test_health_watching_goes_on_when_instrumented(
    backends: BackendFactory, spans: InMemorySpanExporter
) -> None:
    servers = backends(2)
    sick = servers[0]
    with observed_channel([s.address for s in servers])[0] as channel:
        wait_until(lambda: all_eligible(channel), timeout=RPC_TIMEOUT)
        sick.set_serving(False)
        wait_until(lambda: not state_of(channel, sick.address).eligible, timeout=RPC_TIMEOUT)
        stub = conference_pb2_grpc.ConferenceStub(channel)
        replies = {stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT).backend for _ in range(6)}
        assert replies == {servers[1].name}
        sick.set_serving(True)
        wait_until(lambda: state_of(channel, sick.address).eligible, timeout=RPC_TIMEOUT)
    # Closing ended the Watch threads without an exception (the fixture checks).


def test_asyncio_channel_works_and_counts_exactly_when_instrumented(
    backends: BackendFactory, spans: InMemorySpanExporter
) -> None:
    servers = backends(2)

    async def body() -> None:
        channel, ledger = observed_aio_channel([s.address for s in servers])
        async with channel:
            await eventually(lambda: all_eligible(channel), timeout=RPC_TIMEOUT)
            stub = conference_pb2_grpc.ConferenceStub(channel)
            assert (await stub.Ping(pb.PingRequest(payload="a"), timeout=RPC_TIMEOUT)).payload
            join = stub.Join(pb.JoinRequest(duration_ms=40, frame_interval_ms=10), timeout=5)
            assert len([frame async for frame in join]) == 4
            assert (await stub.Upload(frames(3), timeout=RPC_TIMEOUT)).frames == 3
            chat = stub.Chat(iter([pb.ChatMessage(text="x")]), timeout=RPC_TIMEOUT)
            assert [m.text async for m in chat] == ["x"]
            stream = stub.Join(pb.JoinRequest(duration_ms=0), timeout=RPC_TIMEOUT)
            await stream.read()
            stream.cancel()
            sick = servers[0]
            sick.set_serving(False)
            await eventually(lambda: not state_of(channel, sick.address).eligible)
            sick.set_serving(True)
            await eventually(lambda: state_of(channel, sick.address).eligible)
            await eventually(lambda: not any(channel.connection_table().values()))
            ledger.check()
            assert sum(ledger.picked.values()) == 5
        await asyncio.sleep(0)

    run(body)
    addresses = {s.address for s in servers}
    pings = served_spans(spans, "Ping")
    assert pings and all(f"{host}:{port}" in addresses for host, port in pings)


def test_spans_of_an_interceptor_on_top_of_the_channel_name_the_backend(
    backends: BackendFactory,
) -> None:
    # The other way users trace: OpenTelemetry's interceptor around the
    # balanced channel itself; the span is current while the pick happens.
    from opentelemetry.instrumentation.grpc import client_interceptor, grpcext

    servers = backends(2)
    _exporter.clear()
    channel, _ = observed_channel([s.address for s in servers])
    with channel:
        wait_until(lambda: all_eligible(channel), timeout=RPC_TIMEOUT)
        traced: Any = grpcext.intercept_channel(
            channel, client_interceptor(tracer_provider=_provider)
        )
        stub = conference_pb2_grpc.ConferenceStub(traced)
        served = [stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT).backend for _ in range(4)]
    pings = served_spans(_exporter, "Ping")
    assert [f"{host}:{port}" for host, port in pings] == served
