"""For operators: a log line when a backend that was READY becomes unreachable, one when back.

Once each way, not once per reconnect attempt: C-core retries a refused
connection with backoff, and a line per attempt would drown the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc

from .backend import Backend, Health

log = logging.getLogger("grpc_leastconn")

_READY = grpc.ChannelConnectivity.READY
_TRANSIENT_FAILURE = grpc.ChannelConnectivity.TRANSIENT_FAILURE


def log_reachability(
    backend: Backend[Any], state: grpc.ChannelConnectivity, target: str, clock: Callable[[], float]
) -> None:
    """Log ``backend``'s new connectivity ``state`` if it crosses reachable/unreachable."""
    # With health_checker="grpc" the backend channel's TRANSIENT_FAILURE may as
    # well mean NOT_SERVING: C-core does not say which.
    checked = backend.health is Health.CHANNEL
    if state is _READY:
        backend.was_ready = True
        if backend.unreachable_since is not None:
            log.info(
                "backend %s of %r is %s again after %.1f s",
                backend.key,
                target,
                "reachable and serving" if checked else "reachable",
                clock() - backend.unreachable_since,
            )
            backend.unreachable_since = None
    elif state is _TRANSIENT_FAILURE and backend.was_ready and backend.unreachable_since is None:
        backend.unreachable_since = clock()
        log.warning(
            "backend %s of %r is %s (last error: %s)",
            backend.key,
            target,
            "unreachable or not serving" if checked else "unreachable",
            backend.last_error or "none seen",
        )
