"""DNS discovery against a real DNS server: dnsmasq serving a hosts file we edit.

dnsmasq runs as a plain foreground child of the test (never as a service),
on a free port of 127.0.0.1, answering only from a temporary hosts file; a
SIGHUP makes it re-read the file. Backends listen on 127.0.0.2, 127.0.0.3, ...
with one shared port, so each DNS address is one backend, as with a real
service name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import conference_pb2 as pb
import conference_pb2_grpc
import grpc
import pytest
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
from helpers import StreamReader, wait_until

import grpc_leastconn


def open_channel(target: str, **kwargs: object) -> grpc_leastconn.LeastConnChannel:
    kwargs.setdefault("resolve_min_interval", RESOLVE_MIN_S)
    kwargs.setdefault("resolve_max_interval", RESOLVE_MAX_S)
    return grpc_leastconn.insecure_channel(target, **kwargs)  # type: ignore[arg-type]


def ping(stub: conference_pb2_grpc.ConferenceStub) -> str:
    return str(stub.Ping(pb.PingRequest(payload="dns"), timeout=RPC_TIMEOUT).backend)


def serves_all(stub: conference_pb2_grpc.ConferenceStub, addresses: set[str]) -> set[str]:
    """Backends that served a call, once each of ``addresses`` has (bounded)."""
    seen: set[str] = set()
    deadline = time.monotonic() + PICKUP_WITHIN_S
    for _ in range(1000):
        seen.add(ping(stub))
        if seen >= addresses or time.monotonic() > deadline:
            break
    return seen


def open_streams(
    stub: conference_pb2_grpc.ConferenceStub, count: int, duration_ms: int
) -> list[StreamReader]:
    return [
        StreamReader(
            stub.Join(
                pb.JoinRequest(
                    session_id=f"s{i}", duration_ms=duration_ms, frame_interval_ms=FRAME_MS
                ),
                timeout=30.0,
            )
        ).start()
        for i in range(count)
    ]


# -- tests ------------------------------------------------------------------------------------


def test_initial_backends_come_from_dns(dns_server: Callable[..., DnsServer], fleet: Fleet) -> None:
    hosts = HOSTS[:3]
    dns = dns_server(hosts)
    with open_channel(dns_target(dns, fleet)) as channel:
        expected = {fleet.address(h) for h in hosts}
        assert channel.connection_table() == dict.fromkeys(expected, 0)
        stub = conference_pb2_grpc.ConferenceStub(channel)
        assert serves_all(stub, expected) == expected
    assert pings_served(fleet.backends[HOSTS[3]]) == 0


def test_added_address_is_picked_up(
    dns_server: Callable[..., DnsServer],
    fleet: Fleet,
    record_property: pytest.RecordProperty,
) -> None:
    dns = dns_server(HOSTS[:2])
    newcomer = fleet.backends[HOSTS[2]]
    with open_channel(dns_target(dns, fleet)) as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        assert serves_all(stub, {fleet.address(h) for h in HOSTS[:2]})

        published = dns.set_hosts(HOSTS[:3])
        wait_until(lambda: newcomer.address in channel.connection_table(), timeout=PICKUP_WITHIN_S)
        in_table = time.monotonic() - published
        wait_until(lambda: ping(stub) == newcomer.address, timeout=PICKUP_WITHIN_S)
        first_call = time.monotonic() - published

    record_property("dns_added_to_table_s", round(in_table, 3))
    record_property("dns_added_to_first_call_s", round(first_call, 3))
    print(
        f"\nDNS add: in the table {in_table:.2f} s after dnsmasq reloaded,"
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
    with open_channel(dns_target(dns, fleet)) as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        assert serves_all(stub, {fleet.address(h) for h in hosts})
        streams = open_streams(stub, len(hosts), STREAM_MS)
        on_leaving = [s for s in streams if s.backend == leaving.address]
        assert len(on_leaving) == 1
        connections = established_to(leaving.address)
        assert connections is None or connections >= 1

        dns.set_hosts(hosts[1:])
        wait_until(
            lambda: logged(caplog, f"backend {leaving.address} removed"), timeout=PICKUP_WITHIN_S
        )
        assert channel.connection_table()[leaving.address] == 1
        served = pings_served(leaving)
        for _ in range(30):
            assert ping(stub) != leaving.address
        assert pings_served(leaving) == served
        assert on_leaving[0].ended is None, "the stream was cut when its backend left DNS"

        for stream in streams:
            stream.join(STREAM_MS / 1000 + 10)
        assert [s.error for s in streams] == [None] * len(streams)
        assert [len(s.frames) for s in streams] == [STREAM_MS // FRAME_MS] * len(streams)

        wait_until(lambda: leaving.address not in channel.connection_table(), timeout=SETTLE_S)
        assert channel.connection_table() == {fleet.address(h): 0 for h in hosts[1:]}
        if connections is not None:
            # Its backend channel is closed: no connection to it is left.
            wait_until(lambda: established_to(leaving.address) == 0, timeout=SETTLE_S)
        assert logged(caplog, f"backend {leaving.address} of {channel.target!r} drained")


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
    with open_channel(dns_target(dns, fleet), drain_timeout=drain_timeout) as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        assert serves_all(stub, {fleet.address(h) for h in hosts})
        # Endless streams: only the drain timeout (or the deadline) ends them.
        streams = open_streams(stub, 2 * len(hosts), 0)
        on_leaving = [s for s in streams if s.backend == leaving.address]
        on_staying = [s for s in streams if s.backend == staying.address]
        assert len(on_leaving) == len(on_staying) == 2

        dns.set_hosts(hosts[1:])
        wait_until(
            lambda: logged(caplog, f"backend {leaving.address} removed"), timeout=PICKUP_WITHIN_S
        )
        removed = time.monotonic()
        for stream in on_leaving:
            stream.join(drain_timeout + SETTLE_S)
        cut_after = max(s.ended or 0 for s in on_leaving) - removed
        for stream in on_leaving:
            assert stream.error is not None
            assert stream.error.code() is grpc.StatusCode.CANCELLED, stream.error
        assert leaving.servicer.wait_until(
            lambda s: s.live_streams == 0 and s.cancelled >= 2, timeout=SETTLE_S
        )
        wait_until(lambda: leaving.address not in channel.connection_table(), timeout=SETTLE_S)
        assert logged(caplog, "drain timeout, cancelling 2 RPCs")

        # The backend still in DNS keeps its streams.
        assert [s.ended for s in on_staying] == [None, None]
        assert staying.servicer.live_streams == 2
        for stream in on_staying:
            stream.call.cancel()
            stream.join(SETTLE_S)

    record_property("drain_timeout_to_cancel_s", round(cut_after, 3))
    print(f"\ndrain timeout {drain_timeout:g} s: streams cancelled {cut_after:.2f} s after removal")
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
    with open_channel(dns_target(dns, fleet), drain_timeout=drain_timeout) as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        assert serves_all(stub, {fleet.address(h) for h in hosts})
        streams = open_streams(stub, 2 * len(hosts), 0)
        on_leaving = [s for s in streams if s.backend == leaving.address]
        assert len(on_leaving) == 2

        dns.set_hosts(hosts[1:])
        wait_until(
            lambda: logged(caplog, f"backend {leaving.address} removed"), timeout=PICKUP_WITHIN_S
        )
        removed = time.monotonic()
        dns.kill()
        for stream in on_leaving:
            stream.join(drain_timeout + 10)
        cut_after = max(s.ended or 0 for s in on_leaving) - removed
        for stream in streams:
            stream.call.cancel()
            stream.join(SETTLE_S)

    record_property("drain_timeout_dns_down_to_cancel_s", round(cut_after, 3))
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
    with open_channel(dns_target(dns, fleet)) as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        assert serves_all(stub, expected) == expected

        dns.kill()
        # Nothing answers a dead server's UDP port, so each query runs into
        # the resolver's own timeout (5 s) first. Only this channel's warning
        # counts: an earlier test's resolver thread may still be finishing.
        failed = f"re-resolution of {channel.target!r} failed, keeping the last good backends"
        wait_until(lambda: logged(caplog, failed), timeout=RESOLVE_MAX_S + 6.0)
        assert set(channel.connection_table()) == expected
        before = {h: pings_served(fleet.backends[h]) for h in hosts}
        assert serves_all(stub, expected) == expected
        assert all(pings_served(fleet.backends[h]) > before[h] for h in hosts)
    record = next(r for r in caplog.records if failed in r.getMessage())
    assert record.levelno == logging.WARNING


def test_name_missing_from_dns_fails_construction(
    dns_server: Callable[..., DnsServer], fleet: Fleet
) -> None:
    dns = dns_server(HOSTS[:1])
    target = f"dns://127.0.0.1:{dns.port}/missing.test:{fleet.port}"
    started = time.monotonic()
    with pytest.raises(ValueError) as failure:
        grpc_leastconn.insecure_channel(target)
    assert target in str(failure.value)
    assert "missing.test" in str(failure.value)
    assert time.monotonic() - started < 5.0


def test_dns_server_down_at_construction_fails_naming_the_target(
    dns_server: Callable[..., DnsServer], fleet: Fleet
) -> None:
    dns = dns_server(HOSTS[:1])
    dns.kill()
    target = dns_target(dns, fleet)
    with pytest.raises(ValueError) as failure:
        grpc_leastconn.insecure_channel(target)
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
    with open_channel(dns_target(dns, fleet)) as channel:
        assert set(channel.connection_table()) == expected
        assert serves_all(conference_pb2_grpc.ConferenceStub(channel), expected) == expected
