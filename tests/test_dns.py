"""DNS discovery against a real DNS server: dnsmasq serving a hosts file we edit.

dnsmasq runs as a plain foreground child of the test (never as a service),
on a free port of 127.0.0.1, answering only from a temporary hosts file; a
SIGHUP makes it re-read the file. Backends listen on 127.0.0.2, 127.0.0.3, ...
with one shared port, so each DNS address is one backend, as with a real
service name.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import conference_pb2 as pb
import conference_pb2_grpc
import dns.exception
import dns.resolver
import grpc
import pytest
import server as example_server
from helpers import wait_until
from server import Backend, BackendBindError

import grpc_leastconn

NAME = "svc.test"
HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
RPC_TIMEOUT = 5.0
RESOLVE_MIN_S = 0.2
RESOLVE_MAX_S = 1.0
# The promise under test: a DNS change is seen within a few seconds.
PICKUP_WITHIN_S = 5.0
SETTLE_S = 2.0
STREAM_MS = 4000
FRAME_MS = 100
START_ATTEMPTS = 5


def _find_dnsmasq() -> str | None:
    # /usr/sbin is not on every user's PATH, and that is where Debian puts it.
    found = shutil.which("dnsmasq")
    if found is None and os.access("/usr/sbin/dnsmasq", os.X_OK):
        found = "/usr/sbin/dnsmasq"
    return found


DNSMASQ = _find_dnsmasq()


def _require_dnsmasq() -> str:
    if DNSMASQ is not None:
        return DNSMASQ
    if os.environ.get("CI") == "true":
        pytest.fail("dnsmasq is required in CI (.ci/run installs dnsmasq-base)")
    pytest.skip("dnsmasq not installed (Debian: apt-get install dnsmasq-base)")


def _free_port_udp_and_tcp(host: str) -> int:
    # DNS is served over both; dnsmasq needs the port free for each.
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port
    raise AssertionError("no port free for both UDP and TCP")


# -- the DNS server ------------------------------------------------------------------------


@dataclass
class DnsServer:
    """A dnsmasq child process answering for ``*.test`` from ``hosts_file`` only."""

    executable: str
    directory: Path
    # False: names outside the hosts file (and AAAA for names that have only
    # A records) go to upstream servers, of which there are none: REFUSED.
    local: bool = True
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    hosts_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.hosts_file = self.directory / "hosts"

    def start(self, addresses: list[str]) -> None:
        self._write(addresses)
        for _ in range(START_ATTEMPTS):
            self.port = _free_port_udp_and_tcp("127.0.0.1")
            args = [
                self.executable,
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                f"--port={self.port}",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                f"--addn-hosts={self.hosts_file}",
                "--local-ttl=1",
                f"--pid-file={self.directory / 'dnsmasq.pid'}",
                # Stay the user we are: dropping root to nobody would lose
                # read access to the private temporary directory on SIGHUP.
                f"--user={pwd.getpwuid(os.getuid()).pw_name}",
                "--log-facility=-",
            ]
            if self.local:
                args.append("--local=/test/")
            with (self.directory / "dnsmasq.log").open("ab") as log:
                self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            if self._wait_answering(sorted(addresses)):
                return
            self.stop()
        log_text = (self.directory / "dnsmasq.log").read_text(errors="replace")
        raise AssertionError(f"dnsmasq did not start:\n{log_text[-2000:]}")

    def _wait_answering(self, expected: list[str], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                if self.query() == expected:
                    return True
            except dns.exception.DNSException:
                pass
            time.sleep(0.02)
        return False

    def query(self, name: str = NAME) -> list[str]:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.port
        resolver.lifetime = 0.5
        return sorted(r.address for r in resolver.resolve(name, "A", search=False))

    def _write(self, addresses: list[str]) -> None:
        staged = self.hosts_file.with_suffix(".new")
        staged.write_text("".join(f"{a} {NAME}\n" for a in addresses))
        staged.replace(self.hosts_file)

    def set_hosts(self, addresses: list[str]) -> float:
        """Publish a new address set; returns when dnsmasq serves it (monotonic time)."""
        assert self.proc is not None
        self._write(addresses)
        self.proc.send_signal(signal.SIGHUP)
        published = time.monotonic()
        expected = sorted(addresses)
        wait_until(lambda: self._answers(expected), timeout=5.0, interval=0.02)
        return published

    def _answers(self, expected: list[str]) -> bool:
        try:
            return self.query() == expected
        except dns.exception.DNSException:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5.0)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5.0)


@pytest.fixture
def dns_server(tmp_path: Path) -> Iterator[Callable[..., DnsServer]]:
    """Factory: ``dns_server(addresses, local=True)`` starts dnsmasq serving them."""
    executable = _require_dnsmasq()
    servers: list[DnsServer] = []

    def start(addresses: list[str], *, local: bool = True) -> DnsServer:
        directory = tmp_path / f"dns{len(servers)}"
        directory.mkdir()
        server = DnsServer(executable, directory, local=local)
        servers.append(server)
        server.start(addresses)
        return server

    yield start
    for server in servers:
        server.stop()


# -- backends on several loopback addresses, one port ----------------------------------------


@dataclass
class Fleet:
    port: int
    backends: dict[str, Backend]

    def address(self, host: str) -> str:
        return f"{host}:{self.port}"


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    started: list[Backend] = []
    try:
        for _ in range(START_ATTEMPTS):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind((HOSTS[0], 0))
                port = int(probe.getsockname()[1])
            try:
                for host in HOSTS:
                    started.append(example_server.start_backend(host=host, port=port))
            except BackendBindError:
                example_server.stop_backends(started, grace=None)
                started.clear()
                continue
            yield Fleet(port, {b.address.split(":")[0]: b for b in started})
            return
        raise AssertionError(f"no port free on all of {HOSTS}")
    finally:
        example_server.stop_backends(started, grace=0.5, timeout=10.0)


def dns_target(dns: DnsServer, fleet: Fleet) -> str:
    return f"dns://127.0.0.1:{dns.port}/{NAME}:{fleet.port}"


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


def pings_served(backend: Backend) -> int:
    return backend.servicer.started_by_method.get("Ping", 0)


def _socket_address(text: str) -> tuple[str, int]:
    """A /proc/net/tcp{,6} address ("0100007F:1F90") as (IP, port)."""
    hex_ip, hex_port = text.split(":")
    # The kernel prints each 32-bit word of the address in host byte order.
    raw = b"".join(bytes.fromhex(hex_ip[i : i + 8])[::-1] for i in range(0, len(hex_ip), 8))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(hex_port, 16)


def established_to(address: str) -> int | None:
    """TCP connections on this machine whose remote end is ``address`` (IPv4).

    None where the kernel's socket tables cannot be read (not Linux).
    """
    if not os.path.exists("/proc/net/tcp"):
        return None
    host, port = address.rsplit(":", 1)
    wanted = (host, int(port))
    count = 0
    # grpcio uses dual-stack sockets: IPv4 peers show up in tcp6 as well.
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                # Field 2 is the remote end, field 3 the state: 01 = ESTABLISHED.
                if fields[3] == "01" and _socket_address(fields[2]) == wanted:
                    count += 1
    return count


@dataclass
class StreamReader:
    call: grpc.Call
    frames: list[pb.Frame] = field(default_factory=list)
    error: grpc.RpcError | None = None
    ended: float | None = None
    thread: threading.Thread | None = None

    def _run(self) -> None:
        try:
            for frame in self.call:
                self.frames.append(frame)
        except grpc.RpcError as error:
            self.error = error
        self.ended = time.monotonic()

    def start(self) -> StreamReader:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def join(self, timeout: float) -> None:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "stream did not end"

    @property
    def backend(self) -> str:
        wait_until(lambda: self.frames or self.ended, timeout=5.0)
        return self.frames[0].backend if self.frames else ""


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


def logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(r.name == "grpc_leastconn" and text in r.getMessage() for r in caplog.records)


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
            # Its sub-channel is closed: no connection to it is left.
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
