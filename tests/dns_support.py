"""A real DNS server for discovery tests: dnsmasq serving a hosts file we edit.

dnsmasq runs as a plain foreground child of the test (never as a service),
on a free port of 127.0.0.1, answering only from a temporary hosts file; a
SIGHUP makes it re-read the file. Backends listen on 127.0.0.2, 127.0.0.3, ...
with one shared port, so each DNS address is one backend, as with a real
service name. Shared by the sync and asyncio front ends' DNS tests, which
hold both to the same bounds.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.resolver
import pytest
import server as example_server
from helpers import wait_until
from process_support import stop_process
from server import Backend, BackendBindError

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
        if self.proc is not None:
            stop_process(self.proc)


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


def logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(r.name == "grpc_leastconn" and text in r.getMessage() for r in caplog.records)
