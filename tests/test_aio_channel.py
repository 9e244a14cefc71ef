"""The asyncio channel as a whole: its surface, state, health, failures, re-picks, drains."""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import logging
import threading
import typing
from collections import Counter
from typing import Any

import aio_client
import conference_pb2 as pb
import conference_pb2_grpc
import grpc
import pytest
from aio_support import (
    RPC_TIMEOUT,
    SETTLE_S,
    all_eligible,
    backend_of,
    balanced,
    endless_join,
    eventually,
    run,
    server_until,
)
from dns_support import established_to
from helpers import BackendFactory, Ledger, observed_aio_channel
from seams import Address, Resolution, Resolver, Seams, open_aio_channel, parse_target

import grpc_leastconn
import grpc_leastconn.aio
from grpc_leastconn import Health

READY = grpc.ChannelConnectivity.READY
SHUTDOWN = grpc.ChannelConnectivity.SHUTDOWN
TRANSIENT_FAILURE = grpc.ChannelConnectivity.TRANSIENT_FAILURE

# -- the public surface -------------------------------------------------------------


def test_public_surface() -> None:
    assert grpc_leastconn.aio.__all__ == ["LeastConnChannel", "insecure_channel", "secure_channel"]
    channel_class = grpc_leastconn.aio.LeastConnChannel
    assert issubclass(channel_class, grpc.aio.Channel)
    assert not channel_class.__abstractmethods__
    for name in ("insecure_channel", "secure_channel"):
        sync_factory = getattr(grpc_leastconn, name)
        aio_factory = getattr(grpc_leastconn.aio, name)
        sync = inspect.signature(sync_factory).parameters
        aio = inspect.signature(aio_factory).parameters
        # grpc.aio's own order, then interceptors, then the same tuning keywords.
        positional = [p for p in sync if sync[p].kind is not inspect.Parameter.VAR_KEYWORD]
        assert list(sync) == [*positional, "tuning"]
        assert list(aio) == [*positional, "interceptors", "tuning"]
        assert aio["interceptors"].kind is inspect.Parameter.KEYWORD_ONLY
        assert sync["tuning"].kind is aio["tuning"].kind is inspect.Parameter.VAR_KEYWORD
        # Declared once: both take **tuning: Unpack[Tuning], the same TypedDict.
        sync_tuning = typing.get_type_hints(sync_factory)["tuning"]
        aio_tuning = typing.get_type_hints(aio_factory)["tuning"]
        assert sync_tuning == aio_tuning
        assert typing.get_origin(sync_tuning) is typing.Unpack
        (tuning,) = typing.get_args(sync_tuning)
        assert set(typing.get_type_hints(tuning)) == {
            "tie_break",
            "health_check_service",
            "health_checker",
            "resolve_min_interval",
            "resolve_max_interval",
            "drain_timeout",
            "rng",
            "failure_codes",
            "failure_penalty",
            "outlier_detection",
            "weights",
            "slow_start",
            "call_costs",
            "meter_provider",
            "server_load",
        }
    assert "after the pick" in (grpc_leastconn.aio.insecure_channel.__doc__ or "")


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"target": ""}, ValueError, "empty"),
        ({"target": "unix:///tmp/socket"}, ValueError, "unsupported scheme"),
        ({"target": "127.0.0.1:99999"}, ValueError, "out of range"),
        ({"target": "no-such-host.invalid:50051"}, ValueError, "cannot resolve"),
        ({"target": 5}, TypeError, "target"),
        ({"tie_break": "fewest"}, ValueError, "tie_break"),
        ({"tie_break": 1}, TypeError, "tie_break"),
        ({"resolve_min_interval": 0}, ValueError, "resolve_min_interval"),
        ({"drain_timeout": -1}, ValueError, "drain_timeout"),
        ({"options": {"a": 1}}, TypeError, "options"),
        ({"compression": "gzip"}, TypeError, "compression"),
        ({"interceptors": object()}, TypeError, "interceptors"),
        ({"interceptors": [object()]}, TypeError, "interceptors[0]"),
    ],
)
def test_bad_arguments_fail_at_construction(
    kwargs: dict[str, Any], error: type[Exception], words: str
) -> None:
    async def body() -> None:
        arguments = {"target": "127.0.0.1:1", **kwargs}
        with pytest.raises(error, match=words.replace("[", r"\[")):
            grpc_leastconn.aio.insecure_channel(**arguments)

    run(body)


def test_secure_channel_needs_credentials() -> None:
    async def body() -> None:
        with pytest.raises(TypeError, match="credentials"):
            grpc_leastconn.aio.secure_channel("127.0.0.1:1", None)  # type: ignore[arg-type]

    run(body)


def test_construction_needs_a_running_loop() -> None:
    with pytest.raises(RuntimeError, match="inside a coroutine"):
        grpc_leastconn.aio.insecure_channel("127.0.0.1:1")


# -- state, readiness, close ----------------------------------------------------------


def test_state_ready_and_async_with(backends: BackendFactory) -> None:
    servers = backends(2)

    async def body() -> None:
        channel, ledger = observed_aio_channel([s.address for s in servers])
        async with channel:
            # Nothing has connected yet: the loop has not run since construction.
            assert channel.get_state() is grpc.ChannelConnectivity.IDLE
            await channel.channel_ready()
            assert channel.get_state(try_to_connect=True) is READY
            stub = conference_pb2_grpc.ConferenceStub(channel)
            assert (await stub.Ping(pb.PingRequest(payload="x"), timeout=RPC_TIMEOUT)).payload
            grpc_channels = [ledger.backend(s.address).channel.grpc_channel for s in servers]
            assert "LeastConnChannel" in repr(channel)
        assert channel.get_state() is SHUTDOWN
        assert channel.connection_table() == {}
        assert channel.backends() == ()
        assert all(c.get_state() is SHUTDOWN for c in grpc_channels)
        # As grpc.aio does once a channel is closed.
        with pytest.raises(grpc.aio.UsageError):
            stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT)
        with pytest.raises(grpc.aio.UsageError):
            await channel.channel_ready()
        await channel.close()  # twice is harmless

    run(body)


def test_state_follows_the_backends(backends: BackendFactory) -> None:
    (server,) = backends(1)

    async def body() -> None:
        channel = grpc_leastconn.aio.insecure_channel([server.address])
        seen = [channel.get_state()]
        while seen[-1] is not READY:
            await channel.wait_for_state_change(seen[-1])
            seen.append(channel.get_state())
        assert seen[0] in (grpc.ChannelConnectivity.IDLE, grpc.ChannelConnectivity.CONNECTING)
        await asyncio.to_thread(server.stop, None)
        while seen[-1] is not TRANSIENT_FAILURE:
            await channel.wait_for_state_change(seen[-1])
            seen.append(channel.get_state())
        await channel.close()
        assert channel.get_state() is SHUTDOWN

    run(body)


def test_calls_made_before_any_backend_is_ready_wait_for_one(backends: BackendFactory) -> None:
    servers = backends(2)

    async def body() -> None:
        channel, ledger = observed_aio_channel([s.address for s in servers])
        stub = conference_pb2_grpc.ConferenceStub(channel)
        assert not any(state.eligible for state in channel.backends())
        ping = stub.Ping(pb.PingRequest(payload="early"), timeout=RPC_TIMEOUT)
        stream = stub.Join(pb.JoinRequest(duration_ms=50, frame_interval_ms=10), timeout=5)
        assert not ping.done() and not stream.done()
        assert (await ping).payload == "early"
        assert len([frame async for frame in stream]) == 5
        await eventually(lambda: not any(channel.connection_table().values()))
        ledger.check()
        await channel.close()

    run(body)


def test_dropped_channel_closes_its_backend_channels(backends: BackendFactory) -> None:
    servers = backends(2)

    async def body() -> None:
        channel, ledger = observed_aio_channel([s.address for s in servers])
        stub = conference_pb2_grpc.ConferenceStub(channel)
        await stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT)
        grpc_channels = [ledger.backend(s.address).channel.grpc_channel for s in servers]
        # The ledger holds the core too: drop it with the channel.
        del stub, channel, ledger
        gc.collect()
        await eventually(lambda: all(c.get_state() is SHUTDOWN for c in grpc_channels))

    run(body)


def test_closed_channel_lets_go_of_connections_its_kept_calls_used(
    backends: BackendFactory,
) -> None:
    # A grpc.aio call object holds its channel's connection until it is
    # collected, even after close(); applications keep calls they are done with.
    servers = backends(2)
    if established_to(servers[0].address) is None:
        pytest.skip("no socket table to read")

    async def body() -> None:
        channel = grpc_leastconn.aio.insecure_channel([s.address for s in servers])
        stub = conference_pb2_grpc.ConferenceStub(channel)
        await all_eligible(channel)
        unary = stub.Ping(pb.PingRequest(payload="kept"), timeout=RPC_TIMEOUT)
        reply = await unary
        finished = stub.Join(pb.JoinRequest(duration_ms=40, frame_interval_ms=10))
        frames = [frame async for frame in finished]
        endless = endless_join(stub)
        await endless.read()
        assert all(established_to(s.address) for s in servers)

        await channel.close()
        await eventually(lambda: not any(established_to(s.address) for s in servers), SETTLE_S)

        # Every kept call answers as it did before the close.
        assert await unary == reply and reply.payload == "kept"
        assert await unary.code() is grpc.StatusCode.OK
        assert len(frames) == 4 and await finished.code() is grpc.StatusCode.OK
        assert await finished.read() is grpc.aio.EOF
        # The close cancelled the endless stream, as grpc.aio's close does.
        assert await endless.code() is grpc.StatusCode.CANCELLED
        with pytest.raises(asyncio.CancelledError):
            await endless.read()

    run(body)


def test_calls_remembered_for_a_backend_stay_bounded(backends: BackendFactory) -> None:
    # Each backend remembers, weakly, the calls sent to it (to let go of
    # them when it closes); dropped calls must not pile up there.
    async def body() -> None:
        async with balanced(backends(1)) as c:
            backend_channel = c.ledger.backend(c.servers[0].address).channel
            for _ in range(1500):
                await c.stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT)
            kept = [c.stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT) for _ in range(20)]
            await asyncio.gather(*kept)
            assert backend_channel.remembered_count < 1024
            remembered = backend_channel.remembered()
            # A unary call is its own RPC.
            assert all(call in remembered for call in kept)

    run(body)


# -- health ---------------------------------------------------------------------------


def test_not_serving_backend_gets_no_new_calls_until_serving_again(
    backends: BackendFactory,
) -> None:
    servers = backends(3)
    sick = servers[0]

    async def body() -> None:
        async with balanced(servers) as c:
            streams = [endless_join(c.stub, timeout=30.0) for _ in range(3)]
            for stream in streams:
                await stream.read()
            assert await c.in_flight(3) == dict.fromkeys(c.client(), 1)

            sick.set_serving(False)
            await eventually(lambda: not backend_of(c.channel, sick.address).eligible)
            before = sick.servicer.started
            replies = await asyncio.gather(
                *(c.stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT) for _ in range(12))
            )
            assert sick.servicer.started == before
            assert sick.name not in {reply.backend for reply in replies}
            # Its stream goes on: health decides new picks only.
            assert c.client()[sick.address] == 1
            assert sick.servicer.live_streams == 1

            sick.set_serving(True)
            await eventually(lambda: backend_of(c.channel, sick.address).eligible)
            replies = await asyncio.gather(
                *(c.stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT) for _ in range(12))
            )
            assert Counter(reply.backend for reply in replies)[sick.name] >= 3
            for stream in streams:
                stream.cancel()
            await c.assert_idle()

    run(body)


def test_backend_without_health_service_is_used(
    backends: BackendFactory, caplog: pytest.LogCaptureFixture
) -> None:
    servers = [*backends(1, health=False), *backends(1)]

    async def body() -> None:
        async with balanced(servers) as c:
            replies = await asyncio.gather(
                *(c.stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT) for _ in range(4))
            )
            assert {reply.backend for reply in replies} == {s.name for s in servers}
            await c.assert_idle()

    run(body)
    assert "has no grpc.health.v1 service: treated as healthy" in caplog.text


def test_unimplemented_health_is_watched_again_on_the_next_connection(
    backends: BackendFactory,
) -> None:
    (plain,) = backends(1, health=False)

    async def body() -> None:
        channel = grpc_leastconn.aio.insecure_channel([plain.address])
        await eventually(lambda: backend_of(channel, plain.address).health is Health.UNIMPLEMENTED)
        assert backend_of(channel, plain.address).eligible
        # The server is replaced by one with a health service, which says no.
        await asyncio.to_thread(plain.stop, None)
        (replaced,) = backends(1, port=plain.port)
        replaced.set_serving(False)
        await eventually(
            lambda: backend_of(channel, plain.address).health is Health.NOT_SERVING, timeout=15
        )
        assert not backend_of(channel, plain.address).eligible
        await channel.close()

    run(body)


# -- no backend -----------------------------------------------------------------------


def test_all_down_fails_fast_then_wait_for_ready_waits_for_a_return(
    backends: BackendFactory,
) -> None:
    (server,) = backends(1)
    port = server.port

    async def body() -> None:
        channel, ledger = observed_aio_channel([server.address])
        stub = conference_pb2_grpc.ConferenceStub(channel)
        await channel.channel_ready()
        await asyncio.to_thread(server.stop, None)
        # The server says NOT_SERVING as it shuts down, then its connection goes.
        await eventually(
            lambda: backend_of(channel, server.address).connectivity is TRANSIENT_FAILURE
        )

        loop = asyncio.get_running_loop()
        started = loop.time()
        call = stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert loop.time() - started < SETTLE_S
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert info.value.details() == (
            f"no healthy backend for {channel.target!r} "
            f"(1 known: {server.address} TRANSIENT_FAILURE)"
        )
        assert await call.code() is grpc.StatusCode.UNAVAILABLE
        assert call.done()
        stream = stub.Join(pb.JoinRequest(), timeout=RPC_TIMEOUT)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stream.read()
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert await stream.details() == info.value.details()

        # wait_for_ready waits at the pick, until the deadline...
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Ping(pb.PingRequest(), timeout=0.3, wait_for_ready=True)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "while waiting for a backend" in (info.value.details() or "")
        # ...and a waiting task can be cancelled there...
        cancelled = asyncio.ensure_future(
            stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT, wait_for_ready=True)
        )
        waiting = stub.Ping(pb.PingRequest(payload="back"), timeout=15, wait_for_ready=True)
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert not waiting.done()
        # ...or served once a backend returns.
        backends(1, port=port)
        assert (await waiting).payload == "back"
        await eventually(lambda: not any(channel.connection_table().values()))
        ledger.check()
        await channel.close()

    run(body)


def test_time_waiting_for_a_backend_counts_against_the_deadline(
    backends: BackendFactory,
) -> None:
    (server,) = backends(1)

    async def body() -> None:
        async with balanced([server]) as c:
            server.set_serving(False)
            await eventually(lambda: not backend_of(c.channel, server.address).eligible)
            loop = asyncio.get_running_loop()
            loop.call_later(0.4, server.set_serving, True)
            started = loop.time()
            # Picked after ~0.4 s: 0.6 s are left for a reply that takes 0.8 s.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await c.stub.Ping(pb.PingRequest(delay_ms=800), timeout=1.0, wait_for_ready=True)
            assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert loop.time() - started < 1.0 + SETTLE_S / 2
            assert server.servicer.started == 1
            await c.assert_idle()

    run(body)


def test_backend_channel_gone_idle_is_reconnected(backends: BackendFactory) -> None:
    (server,) = backends(1)

    async def body() -> None:
        # Without health checking nothing keeps a quiet connection busy, and
        # gRPC drops it after the client idle timeout.
        options = [("grpc.client_idle_timeout_ms", 200)]
        async with balanced([server], options=options, health_check_service=None) as c:
            seen = c.ledger.connectivity.setdefault(server.address, [])
            await c.stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT)
            await eventually(lambda: grpc.ChannelConnectivity.IDLE in seen)
            reply = await c.stub.Ping(pb.PingRequest(payload="again"), timeout=RPC_TIMEOUT)
            assert reply.payload == "again"
            assert seen[-1] is READY
            await c.assert_idle()

    run(body)


def test_never_sent_unary_calls_are_repicked_streams_are_not(
    backends: BackendFactory, caplog: pytest.LogCaptureFixture
) -> None:
    live, dead = backends(2)

    async def body() -> None:
        await asyncio.to_thread(dead.stop, None)
        # round_robin: the counts below follow its rotation among ties.
        channel, ledger = observed_aio_channel(
            [live.address, dead.address], health_check_service=None, tie_break="round_robin"
        )
        stub = conference_pb2_grpc.ConferenceStub(channel)
        core = ledger.core
        gone = ledger.backend(dead.address)
        await eventually(lambda: gone.connectivity is TRANSIENT_FAILURE)
        hold = endless_join(stub, timeout=30.0)
        await hold.read()

        # A backend the balancer believes READY, whose connection is gone: a
        # race with its failure that a real fleet loses now and then.
        core.on_connectivity(gone, READY)
        stream = endless_join(stub)  # least loaded: the dead one
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stream.read()
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert ledger.picked[dead.address] == 1

        core.on_connectivity(gone, READY)
        pings = [stub.Ping(pb.PingRequest(payload=str(i)), timeout=RPC_TIMEOUT) for i in range(2)]
        replies = await asyncio.gather(*pings)
        assert [reply.backend for reply in replies] == [live.name, live.name]
        assert ledger.picked[dead.address] == 2
        hold.cancel()
        await eventually(lambda: not any(channel.connection_table().values()))
        ledger.check()
        await channel.close()

    with caplog.at_level(logging.DEBUG, logger="grpc_leastconn"):
        run(body)
    assert f"RPC never reached {dead.address}; re-picking" in caplog.text


# -- interceptors ---------------------------------------------------------------------


class UnaryRecorder(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self) -> None:
        self.seen: list[tuple[str, bool | None]] = []

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        self.seen.append((method, details.wait_for_ready))
        if getattr(request, "payload", None) == "cached":
            return pb.PingReply(backend="cache", payload="cached")
        return await continuation(details, request)


class StreamRecorder(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        self.methods.append(method)
        return await continuation(details, request)


def test_interceptors_run_per_call_after_the_pick(backends: BackendFactory) -> None:
    servers = backends(2)
    unary, stream = UnaryRecorder(), StreamRecorder()

    async def body() -> None:
        async with balanced(servers, interceptors=[unary, stream]) as c:
            replies = await asyncio.gather(
                *(c.stub.Ping(pb.PingRequest(payload="x"), timeout=RPC_TIMEOUT) for _ in range(4))
            )
            assert {reply.backend for reply in replies} == {s.name for s in servers}
            # Answered by the interceptor itself: counted, and released all the same.
            cached = await c.stub.Ping(pb.PingRequest(payload="cached"), timeout=RPC_TIMEOUT)
            assert cached.backend == "cache"
            await c.stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT, wait_for_ready=True)
            frames = c.stub.Join(pb.JoinRequest(duration_ms=30, frame_interval_ms=10))
            assert len([frame async for frame in frames]) == 3
            await c.assert_idle()

        assert [m for m, _ in unary.seen] == ["/conference.Conference/Ping"] * 6
        # wait_for_ready is honoured at the pick, never passed to a backend.
        assert {w for _, w in unary.seen} == {None}
        assert "/conference.Conference/Join" in stream.methods
        # Documented: the health Watch shares each backend's channel.
        assert "/grpc.health.v1.Health/Watch" in stream.methods

    run(body)


class DetailsRecorder(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self) -> None:
        self.seen: list[Any] = []

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.seen.append(details)
        return await continuation(details, request)


def test_per_call_options_reach_the_backend_call(backends: BackendFactory) -> None:
    recorder = DetailsRecorder()

    async def body() -> None:
        async with balanced(backends(2), interceptors=[recorder]) as c:
            ping, request = c.stub.Ping, pb.PingRequest()
            await ping(request)
            await ping(request, timeout=RPC_TIMEOUT)
            await ping(request, metadata=(("x-tenant", "a"),))
            await ping(
                request,
                timeout=RPC_TIMEOUT,
                metadata=(("x-tenant", "b"),),
                compression=grpc.Compression.Gzip,
            )
            await c.assert_idle()

        plain, timed, tagged, everything = recorder.seen
        assert plain.timeout is None and not plain.metadata
        assert 0 < timed.timeout <= RPC_TIMEOUT and not timed.metadata
        assert tagged.timeout is None and list(tagged.metadata) == [("x-tenant", "a")]
        assert 0 < everything.timeout <= RPC_TIMEOUT
        # grpc.aio carries the compression as metadata of its own.
        assert ("x-tenant", "b") in list(everything.metadata)
        assert ("grpc-internal-encoding-request", "gzip") in list(everything.metadata)

    run(body)


# -- re-resolution and draining -------------------------------------------------------


class FakeResolver:
    """Stands in for the channel's resolver: answers whatever the test set last.

    While ``hang`` is set, each resolution blocks until it is cleared (at
    most 10 s), as with a DNS server that does not answer.
    """

    def __init__(self, addresses: list[Address]) -> None:
        self.addresses = addresses
        self.hang = False
        self.hanging = threading.Event()
        self._released = threading.Event()

    def resolve(self) -> Resolution:
        if self.hang:
            self.hanging.set()
            self._released.wait(10)
        return Resolution(tuple(self.addresses))

    def release(self) -> None:
        self.hang = False
        self._released.set()


def dns_channel(
    port: int, **kwargs: Any
) -> tuple[grpc_leastconn.aio.LeastConnChannel, FakeResolver, Ledger]:
    target = f"localhost:{port}"
    fake = FakeResolver(list(Resolver(parse_target(target)).resolve().addresses))
    ledger = Ledger()
    channel = open_aio_channel(
        target,
        seams=Seams(resolver=fake, observer=ledger),
        resolve_min_interval=0.05,
        resolve_max_interval=0.1,
        **kwargs,
    )
    return channel, fake, ledger


def test_removed_backend_drains_its_streams_then_closes(
    backends: BackendFactory, caplog: pytest.LogCaptureFixture
) -> None:
    leaving, staying = backends(2)

    async def body() -> None:
        channel, fake, ledger = dns_channel(leaving.port)
        stub = conference_pb2_grpc.ConferenceStub(channel)
        await all_eligible(channel)
        old = ledger.backend(leaving.address).channel.grpc_channel
        stream = endless_join(stub, timeout=30.0)
        await stream.read()

        fake.addresses = [Address("127.0.0.1", staying.port, f"localhost:{leaving.port}")]
        await eventually(lambda: staying.address in channel.connection_table())
        assert channel.connection_table()[leaving.address] == 1
        await all_eligible(channel)
        reply = await stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT)
        assert reply.backend == staying.name
        # The stream goes on on the draining backend.
        assert (await stream.read()).backend == leaving.name

        stream.cancel()
        await eventually(lambda: channel.connection_table() == {staying.address: 0})
        await eventually(lambda: old.get_state() is SHUTDOWN)
        assert await server_until(leaving.servicer, lambda s: s.live == 0, SETTLE_S)
        await channel.close()

    with caplog.at_level(logging.INFO, logger="grpc_leastconn"):
        run(body)
    assert f"backend {leaving.address} removed from" in caplog.text
    assert f"backend {leaving.address} of 'localhost:{leaving.port}' drained" in caplog.text


def test_drain_timeout_cancels_streams_left_on_a_removed_backend(
    backends: BackendFactory, caplog: pytest.LogCaptureFixture
) -> None:
    leaving, staying = backends(2)
    drain_timeout = 0.3

    async def body() -> None:
        channel, fake, _ = dns_channel(leaving.port, drain_timeout=drain_timeout)
        stub = conference_pb2_grpc.ConferenceStub(channel)
        await all_eligible(channel)
        stream = endless_join(stub, timeout=30.0)
        await stream.read()

        loop = asyncio.get_running_loop()
        fake.addresses = [Address("127.0.0.1", staying.port, f"localhost:{leaving.port}")]
        removed_at = loop.time()
        # Closing the backend's channel cancels the calls left on it.
        with pytest.raises(asyncio.CancelledError):
            while True:
                await stream.read()
        assert loop.time() - removed_at < drain_timeout + SETTLE_S
        await eventually(lambda: channel.connection_table() == {staying.address: 0})
        assert await server_until(leaving.servicer, lambda s: s.live == 0, SETTLE_S)
        assert leaving.servicer.cancelled == 1
        await channel.close()

    with caplog.at_level(logging.INFO, logger="grpc_leastconn"):
        run(body)
    assert "drain timeout, cancelling 1 RPCs" in caplog.text


def test_drain_timeout_holds_while_a_resolution_hangs(backends: BackendFactory) -> None:
    leaving, staying = backends(2)
    drain_timeout = 0.3

    async def body() -> None:
        channel, fake, _ = dns_channel(leaving.port, drain_timeout=drain_timeout)
        stub = conference_pb2_grpc.ConferenceStub(channel)
        await all_eligible(channel)
        stream = endless_join(stub, timeout=30.0)
        await stream.read()
        fake.addresses = [Address("127.0.0.1", staying.port, f"localhost:{leaving.port}")]
        await eventually(lambda: staying.address in channel.connection_table())
        loop = asyncio.get_running_loop()
        removed_at = loop.time()
        fake.hang = True
        try:
            await eventually(fake.hanging.is_set)
            with pytest.raises(asyncio.CancelledError):
                while True:
                    await stream.read()
            assert loop.time() - removed_at < drain_timeout + SETTLE_S
            assert fake.hang, "the resolution was still hanging"
        finally:
            fake.release()
        await channel.close()

    run(body)


# -- the example client -----------------------------------------------------------------


def test_example_aio_client(backends: BackendFactory, capsys: pytest.CaptureFixture[str]) -> None:
    servers = backends(2)
    target = "ipv4:" + ",".join(s.address for s in servers)
    argv = ["--target", target, "--sessions", "4", "--long", "0.4", "--short", "0.1"]
    assert run(lambda: aio_client.amain([*argv, "--interval", "0.02"])) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    label, _, served = last.partition(": ")
    assert label == "sessions served per backend"
    assert json.loads(served) == {s.name: 2 for s in servers}
