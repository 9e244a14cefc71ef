"""Health-watch policy (gRFC A17): what a Watch answer means, and what to do when it ends.

Pure: each front end runs one Watch stream per backend (its watch.py, a
thread or a task) and asks this policy what every answer and every end
mean; the ORCA report stream follows the same shape (server_load.py). The
rules:

- SERVING lets the backend serve; NOT_SERVING, SERVICE_UNKNOWN and UNKNOWN
  do not;
- a server without the health service (UNIMPLEMENTED) is healthy, and is
  not asked again on the same connection, only on its next one (the server
  may have been replaced);
- any other end of the Watch leaves the backend's health unknown (PENDING)
  until a new Watch answers, which starts after an exponential backoff with
  jitter, reset once a message arrives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import grpc
from grpc_health.v1 import health_pb2

from .backend import Health
from .backoff import Backoff

_STATUS = {
    health_pb2.HealthCheckResponse.SERVING: Health.SERVING,
    health_pb2.HealthCheckResponse.NOT_SERVING: Health.NOT_SERVING,
    health_pb2.HealthCheckResponse.SERVICE_UNKNOWN: Health.SERVICE_UNKNOWN,
    health_pb2.HealthCheckResponse.UNKNOWN: Health.UNKNOWN,
}


@dataclass(frozen=True, slots=True)
class WatchEnd:
    """What to do after a watched stream ended."""

    # Report this now (None: nothing).
    report: Any
    # Seconds before watching again; None: on the backend's next connection
    # (then report ``reconnected()`` and watch again).
    retry_after: float | None


class StreamPolicy(Protocol):
    """What a per-backend stream watcher asks of its policy (health, load reports)."""

    request: Any

    def answered(self, response: Any) -> Any:
        """What to report for one message (None: nothing)."""
        ...

    def ended(self, code: grpc.StatusCode) -> WatchEnd:
        """The stream ended with ``code`` (OK when the server closed it)."""
        ...

    def reconnected(self) -> Any:
        """The backend has a new connection: what to report (None: nothing)."""
        ...


class WatchPolicy:
    """gRFC A17 for one backend's Watch stream."""

    __slots__ = ("_attempt", "_backoff", "request")

    def __init__(self, service: str, backoff: Backoff) -> None:
        self.request = health_pb2.HealthCheckRequest(service=service)
        self._backoff = backoff
        self._attempt = 0

    def answered(self, response: Any) -> Health:
        """A Watch message: the backend's health now; the backoff starts over."""
        self._attempt = 0
        return _STATUS.get(response.status, Health.UNKNOWN)

    def ended(self, code: grpc.StatusCode) -> WatchEnd:
        """The Watch stream ended with ``code`` (OK when the server closed it)."""
        if code is grpc.StatusCode.UNIMPLEMENTED:
            return WatchEnd(Health.UNIMPLEMENTED, None)
        delay = self._backoff.delay(self._attempt)
        self._attempt += 1
        return WatchEnd(Health.PENDING, delay)

    def reconnected(self) -> Health:
        """The backend has a new connection: unknown until the new Watch answers.

        A new connection starts with a fresh backoff, as C-core's health
        client, which lives as long as its connection, does.
        """
        self._attempt = 0
        return Health.PENDING


@dataclass(frozen=True, slots=True)
class WatchSpec:
    """One stream a backend channel keeps watching, as both front ends open it."""

    # For the watcher's thread or task name: "health", "load reports".
    kind: str
    method: str
    serializer: Callable[[Any], bytes]
    deserializer: Callable[[bytes], Any]
    policy: StreamPolicy
    # Told each value the policy reports; errors the stream ends with (or None).
    report: Callable[[Any], None]
    on_error: Callable[[str], None] | None


HEALTH_WATCH: Final = "/grpc.health.v1.Health/Watch"


def health_watch(
    service: str,
    backoff: Backoff,
    report: Callable[[Health], None],
    on_error: Callable[[str], None],
) -> WatchSpec:
    """The grpc.health.v1 Watch of one backend."""
    return WatchSpec(
        kind="health",
        method=HEALTH_WATCH,
        serializer=health_pb2.HealthCheckRequest.SerializeToString,
        deserializer=health_pb2.HealthCheckResponse.FromString,
        policy=WatchPolicy(service, backoff),
        report=report,
        on_error=on_error,
    )
