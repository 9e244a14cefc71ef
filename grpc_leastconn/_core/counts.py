"""Counts: a channel's events, counted as they happen, for its metrics.

Plain integers the balancer and its signals bump (a few nanoseconds each);
``grpc_leastconn._metrics`` reads them when the OpenTelemetry SDK collects.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

_READY = grpc.ChannelConnectivity.READY
_TRANSIENT_FAILURE = grpc.ChannelConnectivity.TRANSIENT_FAILURE


@dataclass(slots=True)
class Counts:
    """Events of one channel, counted as they happen (cumulative)."""

    connection_attempts_succeeded: int = 0
    connection_attempts_failed: int = 0
    disconnections: int = 0
    health_changes: int = 0
    ejections: int = 0
    resolutions: int = 0
    resolution_failures: int = 0
    repicks: int = 0
    fail_fast: int = 0

    def connection_changed(
        self, before: grpc.ChannelConnectivity, state: grpc.ChannelConnectivity
    ) -> None:
        """gRFC A94's connection attempts and disconnections, from two states in a row."""
        if state is _READY:
            self.connection_attempts_succeeded += 1
        elif before is _READY:
            self.disconnections += 1
        elif state is _TRANSIENT_FAILURE:
            self.connection_attempts_failed += 1
