"""Shared fixtures: real in-process ``conference.Conference`` backends.

The example backend lives in ``examples/server.py``; its directory goes on
``sys.path`` because the generated ``conference_pb2_grpc`` imports
``conference_pb2`` as a top-level module. ``server`` is a generic module name,
so test modules should import it as ``import server as example_server``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

TESTS_DIR = Path(__file__).resolve().parent
EXAMPLES_DIR = TESTS_DIR.parent / "examples"

# examples/ goes first so that its ``server`` module wins over any other
# module of that name; tests/ is added explicitly so ``helpers`` imports also
# work under ``--import-mode=importlib``.
for _path in (TESTS_DIR, EXAMPLES_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import server as example_server  # noqa: E402
from helpers import BackendFactory, ChannelFactory  # noqa: E402
from server import Backend  # noqa: E402

# Bounded so a test that leaves a stream open cannot stall the suite.
TEARDOWN_GRACE_S = 0.5
TEARDOWN_TIMEOUT_S = 10.0

# Fixtures over real processes (dnsmasq, server subprocesses), here so that the
# sync and the asyncio front ends' test modules share them.
from dns_support import dns_server, fleet  # noqa: E402, F401
from process_support import spawn  # noqa: E402, F401


@pytest.fixture
def backends() -> Iterator[BackendFactory]:
    """Factory: ``backends(n, **start_backend_kwargs)`` starts ``n`` backends.

    Each listens on its own ephemeral port on 127.0.0.1 and is named after its
    address unless ``name`` is given (only allowed with ``n == 1``). All are
    stopped at teardown.
    """
    started: list[Backend] = []

    def start(n: int = 1, **kwargs: Any) -> list[Backend]:
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if n > 1 and kwargs.get("name") is not None:
            raise ValueError("name would be shared by several backends; start them one by one")
        kwargs.setdefault("host", "127.0.0.1")
        new: list[Backend] = []
        try:
            for _ in range(n):
                new.append(example_server.start_backend(**kwargs))
        finally:
            started.extend(new)
        return new

    yield start
    example_server.stop_backends(started, grace=TEARDOWN_GRACE_S, timeout=TEARDOWN_TIMEOUT_S)


@pytest.fixture
def backend(backends: BackendFactory) -> Backend:
    """One running backend with default settings."""
    return backends(1)[0]


@pytest.fixture
def insecure_channel() -> Iterator[ChannelFactory]:
    """Factory for plain ``grpc.insecure_channel``s, closed at teardown."""
    channels: list[grpc.Channel] = []

    def make(target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        channel = grpc.insecure_channel(target, options=list(options))
        channels.append(channel)
        return channel

    yield make
    for channel in channels:
        channel.close()
