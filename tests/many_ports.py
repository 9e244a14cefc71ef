"""Many backends from one in-process server: one grpc.server listening on N ports.

Each port is one backend to a balanced channel (as in bench/scale.py), so a
test can build a channel over dozens or hundreds of backends without
starting a server per backend. The server serves grpc.health.v1 (SERVING)
and the example ``conference.Conference`` servicer; its worker threads are
named ``many-ports`` so that thread counts of the client can leave them out.

``client_connections()`` counts this process's TCP connections to those
ports, from /proc/self/net (the kernel's view, no gRPC API): what a closed channel
must leave none of.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import HealthServicer
from server import ConferenceServicer, add_servicer_to_server

SERVER_THREADS = "many-ports"
_ESTABLISHED = "01"


class ManyPorts:
    """One server on ``count`` ports of 127.0.0.1; ``stop()`` it when done."""

    def __init__(self, count: int, *, health: bool = True) -> None:
        # A Watch stream (ours or C-core's) holds a worker for as long as it
        # is open: one per backend and client, plus room for calls.
        self._executor = ThreadPoolExecutor(
            max_workers=2 * count + 32, thread_name_prefix=SERVER_THREADS
        )
        self.server = grpc.server(self._executor, options=[("grpc.so_reuseport", 0)])
        self.ports: list[int] = []
        for _ in range(count):
            port = self.server.add_insecure_port("127.0.0.1:0")
            if port == 0:
                raise RuntimeError("cannot listen on 127.0.0.1")
            self.ports.append(port)
        self.servicer = ConferenceServicer("many")
        add_servicer_to_server(self.servicer, self.server, observe_authority=False)
        self.health: HealthServicer | None = None
        if health:
            self.health = HealthServicer()
            self.health.set("", health_pb2.HealthCheckResponse.SERVING)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.server.start()

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.ports]

    @property
    def target(self) -> str:
        return "ipv4:" + ",".join(self.addresses)

    def client_connections(self) -> int:
        """Established TCP connections of this process to one of the ports (client side)."""
        return len(_connections_to(set(self.ports)))

    def stop(self) -> None:
        self.server.stop(None).wait(10)
        self._executor.shutdown(wait=False)


def client_threads() -> list[threading.Thread]:
    """This process's Python threads, less the in-process servers' workers."""
    return [
        t for t in threading.enumerate() if not t.name.startswith((SERVER_THREADS, "conference"))
    ]


def _socket_inodes() -> set[str]:
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if link.startswith("socket:["):
            inodes.add(link[len("socket:[") : -1])
    return inodes


def _connections_to(ports: set[int]) -> list[str]:
    """/proc/net/tcp{,6} rows of our sockets whose remote end is one of ``ports``.

    gRPC's sockets are IPv6 ones even to 127.0.0.1 (as ::ffff:127.0.0.1).
    """
    mine = _socket_inodes()
    rows = []
    for table_path in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table_path, encoding="ascii") as table:
            next(table)
            for line in table:
                fields = line.split()
                remote, state, inode = fields[2], fields[3], fields[9]
                port = int(remote.rsplit(":", 1)[1], 16)
                if state == _ESTABLISHED and inode in mine and port in ports:
                    rows.append(line)
    return rows
