"""DNS discovery of the asyncio channel against a real DNS server (dnsmasq).

The scenarios and bounds of ``test_dns.py``, with the setup of ``dns_support``.
Whatever blocks (reloading dnsmasq and waiting for its answer, a servicer's
wait) runs in a thread, so the channel's tasks keep running meanwhile, as
they would in an application.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import conference_pb2 as pb
import conference_pb2_grpc
import grpc
import pytest
from aio_support import StreamTask, eventually, run, server_until
from dns_support import (
    FRAME_MS,
    HOSTS,
    PICKUP_WITHIN_S,
    RESOLVE_MAX_S,
    RESOLVE_MIN_S,
    RPC_TIMEOUT,
    SETTLE_S,
    STREAM_MS,
    DnsServer,
    Fleet,
    dns_target,
    established_to,
    logged,
    pings_served,
)

import grpc_leastconn.aio


def open_channel(target: str, **kwargs: object) -> grpc_leastconn.aio.LeastConnChannel:
    kwargs.setdefault("resolve_min_interval", RESOLVE_MIN_S)
    kwargs.setdefault("resolve_max_interval", RESOLVE_MAX_S)
    return grpc_leastconn.aio.insecure_channel(target, **kwargs)  # type: ignore[arg-type]


async def ping(stub: conference_pb2_grpc.ConferenceStub) -> str:
    reply = await stub.Ping(pb.PingRequest(payload="dns"), timeout=RPC_TIMEOUT)
    return str(reply.backend)


async def serves_all(stub: conference_pb2_grpc.ConferenceStub, addresses: set[str]) -> set[str]:
    """Backends that served a call, once each of ``addresses`` has (bounded)."""
    seen: set[str] = set()
    deadline = time.monotonic() + PICKUP_WITHIN_S
    for _ in range(1000):
        seen.add(await ping(stub))
        if seen >= addresses or time.monotonic() > deadline:
            break
    return seen


def open_streams(
    stub: conference_pb2_grpc.ConferenceStub, count: int, duration_ms: int
) -> list[StreamTask]:
    return [
        StreamTask(
            stub.Join(
                pb.JoinRequest(
                    session_id=f"s{i}", duration_ms=duration_ms, frame_interval_ms=FRAME_MS
                ),
                timeout=30.0,
            )
        ).start()
        for i in range(count)
    ]


async def on_backend(streams: list[StreamTask], address: str) -> list[StreamTask]:
    return [s for s in streams if await s.backend() == address]


def test_initial_backends_come_from_dns(dns_server: Callable[..., DnsServer], fleet: Fleet) -> None:
    hosts = HOSTS[:3]
    dns = dns_server(hosts)

    async def body() -> None:
        async with open_channel(dns_target(dns, fleet)) as channel:
            expected = {fleet.address(h) for h in hosts}
            assert channel.connection_table() == dict.fromkeys(expected, 0)
            stub = conference_pb2_grpc.ConferenceStub(channel)
            assert await serves_all(stub, expected) == expected

    run(body)
    assert pings_served(fleet.backends[HOSTS[3]]) == 0


def test_added_address_is_picked_up(
    dns_server: Callable[..., DnsServer],
    fleet: Fleet,
    record_property: pytest.RecordProperty,
) -> None:
    dns = dns_server(HOSTS[:2])
    newcomer = fleet.backends[HOSTS[2]]

    async def body() -> tuple[float, float]:
        async with open_channel(dns_target(dns, fleet)) as channel:
            stub = conference_pb2_grpc.ConferenceStub(channel)
            assert await serves_all(stub, {fleet.address(h) for h in HOSTS[:2]})

            published = await asyncio.to_thread(dns.set_hosts, HOSTS[:3])
            await eventually(
                lambda: newcomer.address in channel.connection_table(), PICKUP_WITHIN_S
            )
            in_table = time.monotonic() - published
            for _ in range(10_000):
                if await ping(stub) == newcomer.address:
                    break
                assert time.monotonic() - published < PICKUP_WITHIN_S, "newcomer never served"
            return in_table, time.monotonic() - published

    in_table, first_call = run(body)
    record_property("aio_dns_added_to_table_s", round(in_table, 3))
    record_property("aio_dns_added_to_first_call_s", round(first_call, 3))
    print(
        f"\naio DNS add: in the table {in_table:.2f} s after dnsmasq reloaded,"
        f" first call {first_call:.2f} s after (resolve interval {RESOLVE_MAX_S:g} s, TTL 1 s)"
    )
    assert first_call <= PICKUP_WITHIN_S


def test_removed_address_drains_its_streams_then_closes(
    dns_server: Callable[..., DnsServer],
    fleet: Fleet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="grpc_leastconn")
    hosts = HOSTS[:3]
    dns = dns_server(hosts)
    leaving = fleet.backends[hosts[0]]

    async def body() -> None:
        async with open_channel(dns_target(dns, fleet)) as channel:
            stub = conference_pb2_grpc.ConferenceStub(channel)
            assert await serves_all(stub, {fleet.address(h) for h in hosts})
            streams = open_streams(stub, len(hosts), STREAM_MS)
            on_leaving = await on_backend(streams, leaving.address)
            assert len(on_leaving) == 1
            connections = established_to(leaving.address)
            assert connections is None or connections >= 1

            await asyncio.to_thread(dns.set_hosts, hosts[1:])
            await eventually(
                lambda: logged(caplog, f"backend {leaving.address} removed"), PICKUP_WITHIN_S
            )
            assert channel.connection_table()[leaving.address] == 1
            served = pings_served(leaving)
            for _ in range(30):
                assert await ping(stub) != leaving.address
            assert pings_served(leaving) == served
            assert on_leaving[0].ended is None, "the stream was cut when its backend left DNS"

            for stream in streams:
                await stream.join(STREAM_MS / 1000 + 10)
            assert [s.error for s in streams] == [None] * len(streams)
            assert [s.code for s in streams] == [grpc.StatusCode.OK] * len(streams)
            assert [len(s.frames) for s in streams] == [STREAM_MS // FRAME_MS] * len(streams)

            await eventually(lambda: leaving.address not in channel.connection_table(), SETTLE_S)
            assert channel.connection_table() == {fleet.address(h): 0 for h in hosts[1:]}
            if connections is not None:
                # Its backend channel is closed: no connection to it is left once
                # the finished calls made on it are dropped (while one is held,
                # grpc.aio keeps its channel's connection: see the next test).
                del streams, on_leaving, stream
                await eventually(lambda: established_to(leaving.address) == 0, SETTLE_S)
            assert logged(caplog, f"backend {leaving.address} of {channel.target!r} drained")

    run(body)


def test_removed_backend_is_disconnected_while_its_finished_calls_are_held(
    dns_server: Callable[..., DnsServer], fleet: Fleet
) -> None:
    if established_to(fleet.address(HOSTS[0])) is None:
        pytest.skip("no socket table to read")
    hosts = HOSTS[:2]
    dns = dns_server(hosts)
    leaving = fleet.address(hosts[0])

    async def body() -> None:
        async with open_channel(dns_target(dns, fleet)) as channel:
            stub = conference_pb2_grpc.ConferenceStub(channel)
            assert await serves_all(stub, {fleet.address(h) for h in hosts})
            streams = open_streams(stub, len(hosts), 2 * FRAME_MS)
            for stream in streams:
                await stream.join(RPC_TIMEOUT)
            assert [s.code for s in streams] == [grpc.StatusCode.OK] * len(streams)
            (stream_there,) = await on_backend(streams, leaving)
            # One unary call there too, awaited and kept.
            for _ in range(10):
                unary_there = stub.Ping(pb.PingRequest(payload="kept"), timeout=RPC_TIMEOUT)
                if (await unary_there).backend == leaving:
                    break
            assert (await unary_there).backend == leaving

            await asyncio.to_thread(dns.set_hosts, hosts[1:])
            await eventually(lambda: leaving not in channel.connection_table(), PICKUP_WITHIN_S)
            # The application still holds its finished calls, as any may.
            await eventually(lambda: established_to(leaving) == 0, SETTLE_S)

            # ... and they answer as before.
            reply = await unary_there
            assert (reply.backend, reply.payload) == (leaving, "kept")
            assert await unary_there.code() is grpc.StatusCode.OK
            call = stream_there.call
            assert await call.code() is grpc.StatusCode.OK
            assert [frame async for frame in call] == []
            assert await call.read() is grpc.aio.EOF

    run(body)


def test_drain_timeout_cancels_streams_left_on_a_removed_backend(
    dns_server: Callable[..., DnsServer],
    fleet: Fleet,
    caplog: pytest.LogCaptureFixture,
    record_property: pytest.RecordProperty,
) -> None:
    caplog.set_level(logging.INFO, logger="grpc_leastconn")
    drain_timeout = 0.5
    hosts = HOSTS[:2]
    dns = dns_server(hosts)
    leaving, staying = fleet.backends[hosts[0]], fleet.backends[hosts[1]]

    async def body() -> float:
        async with open_channel(dns_target(dns, fleet), drain_timeout=drain_timeout) as channel:
            stub = conference_pb2_grpc.ConferenceStub(channel)
            assert await serves_all(stub, {fleet.address(h) for h in hosts})
            # Endless streams: only the drain timeout (or the deadline) ends them.
            streams = open_streams(stub, 2 * len(hosts), 0)
            on_leaving = await on_backend(streams, leaving.address)
            on_staying = await on_backend(streams, staying.address)
            assert len(on_leaving) == len(on_staying) == 2

            await asyncio.to_thread(dns.set_hosts, hosts[1:])
            await eventually(
                lambda: logged(caplog, f"backend {leaving.address} removed"), PICKUP_WITHIN_S
            )
            removed = time.monotonic()
            for stream in on_leaving:
                await stream.join(drain_timeout + SETTLE_S)
            cut_after = max(s.ended or 0 for s in on_leaving) - removed
            assert [s.code for s in on_leaving] == [grpc.StatusCode.CANCELLED] * 2
            assert await server_until(
                leaving.servicer, lambda s: s.live_streams == 0 and s.cancelled >= 2, SETTLE_S
            )
            await eventually(lambda: leaving.address not in channel.connection_table(), SETTLE_S)
            assert logged(caplog, "drain timeout, cancelling 2 RPCs")

            # The backend still in DNS keeps its streams.
            assert [s.ended for s in on_staying] == [None, None]
            assert staying.servicer.live_streams == 2
            for stream in on_staying:
                stream.call.cancel()
                await stream.join(SETTLE_S)
            return cut_after

    cut_after = run(body)
    record_property("aio_drain_timeout_to_cancel_s", round(cut_after, 3))
    print(f"\naio drain timeout {drain_timeout:g} s: cancelled {cut_after:.2f} s after removal")
    assert cut_after <= drain_timeout + RESOLVE_MAX_S


def test_drain_timeout_holds_while_the_dns_server_is_down(
    dns_server: Callable[..., DnsServer],
    fleet: Fleet,
    caplog: pytest.LogCaptureFixture,
    record_property: pytest.RecordProperty,
) -> None:
    # The re-resolution due one interval after the removal runs into the
    # dead server's timeout (5 s); the drain deadline falls inside it.
    caplog.set_level(logging.INFO, logger="grpc_leastconn")
    drain_timeout = 1.5
    hosts = HOSTS[:2]
    dns = dns_server(hosts)
    leaving = fleet.backends[hosts[0]]

    async def body() -> float:
        async with open_channel(dns_target(dns, fleet), drain_timeout=drain_timeout) as channel:
            stub = conference_pb2_grpc.ConferenceStub(channel)
            assert await serves_all(stub, {fleet.address(h) for h in hosts})
            streams = open_streams(stub, 2 * len(hosts), 0)
            on_leaving = await on_backend(streams, leaving.address)
            assert len(on_leaving) == 2

            await asyncio.to_thread(dns.set_hosts, hosts[1:])
            await eventually(
                lambda: logged(caplog, f"backend {leaving.address} removed"), PICKUP_WITHIN_S
            )
            removed = time.monotonic()
            await asyncio.to_thread(dns.kill)
            for stream in on_leaving:
                await stream.join(drain_timeout + 10)
            cut_after = max(s.ended or 0 for s in on_leaving) - removed
            for stream in streams:
                stream.call.cancel()
                await stream.join(SETTLE_S)
            return cut_after

    cut_after = run(body)
    record_property("aio_drain_timeout_dns_down_to_cancel_s", round(cut_after, 3))
    assert cut_after <= drain_timeout + 1.0, (
        f"drain timeout of {drain_timeout:g} s took {cut_after:.2f} s with the DNS server down"
    )


def test_dns_server_failure_keeps_the_last_good_backends(
    dns_server: Callable[..., DnsServer],
    fleet: Fleet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="grpc_leastconn")
    hosts = HOSTS[:3]
    dns = dns_server(hosts)
    expected = {fleet.address(h) for h in hosts}

    async def body() -> str:
        async with open_channel(dns_target(dns, fleet)) as channel:
            stub = conference_pb2_grpc.ConferenceStub(channel)
            assert await serves_all(stub, expected) == expected

            await asyncio.to_thread(dns.kill)
            # Nothing answers a dead server's UDP port, so each query runs into
            # the resolver's own timeout (5 s) first. Only this channel's warning
            # counts: an earlier test's resolution may still be finishing.
            failed = f"re-resolution of {channel.target!r} failed, keeping the last good backends"
            await eventually(lambda: logged(caplog, failed), RESOLVE_MAX_S + 6.0)
            assert set(channel.connection_table()) == expected
            before = {h: pings_served(fleet.backends[h]) for h in hosts}
            assert await serves_all(stub, expected) == expected
            assert all(pings_served(fleet.backends[h]) > before[h] for h in hosts)
            return failed

    failed = run(body)
    record = next(r for r in caplog.records if failed in r.getMessage())
    assert record.levelno == logging.WARNING


def test_name_missing_from_dns_fails_construction(
    dns_server: Callable[..., DnsServer], fleet: Fleet
) -> None:
    dns = dns_server(HOSTS[:1])
    target = f"dns://127.0.0.1:{dns.port}/missing.test:{fleet.port}"

    async def body() -> None:
        grpc_leastconn.aio.insecure_channel(target)

    started = time.monotonic()
    with pytest.raises(ValueError) as failure:
        run(body)
    assert target in str(failure.value)
    assert "missing.test" in str(failure.value)
    assert time.monotonic() - started < 5.0


def test_dns_server_down_at_construction_fails_naming_the_target(
    dns_server: Callable[..., DnsServer], fleet: Fleet
) -> None:
    dns = dns_server(HOSTS[:1])
    dns.kill()
    target = dns_target(dns, fleet)

    async def body() -> None:
        grpc_leastconn.aio.insecure_channel(target)

    with pytest.raises(ValueError) as failure:
        run(body)
    assert target in str(failure.value)


def test_a_records_are_used_when_the_server_refuses_aaaa(
    dns_server: Callable[..., DnsServer], fleet: Fleet
) -> None:
    # A server with no upstream refuses what it cannot answer itself: here
    # the AAAA query for a name that has only A records. gRPC's own resolver
    # uses the A answer when the AAAA query fails.
    hosts = HOSTS[:2]
    dns = dns_server(hosts, local=False)
    expected = {fleet.address(h) for h in hosts}

    async def body() -> None:
        async with open_channel(dns_target(dns, fleet)) as channel:
            assert set(channel.connection_table()) == expected
            stub = conference_pb2_grpc.ConferenceStub(channel)
            assert await serves_all(stub, expected) == expected

    run(body)
