"""Counts: a channel's events, counted as they happen, for its metrics.

Plain integers the balancer and its signals bump (a few nanoseconds each);
``grpc_leastconn._metrics`` reads them when the OpenTelemetry SDK collects.
"""

from __future__ import annotations

from dataclasses import dataclass


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
