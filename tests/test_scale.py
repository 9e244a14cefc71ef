"""Channels over many backends: construction does not wait for them, close leaves nothing.

The backends are the ports of one in-process server (many_ports.py). Both
front ends are held to the same promises: the factory returns while backend
channels are still being opened (calls made meanwhile wait as during any
start-up), closing, even while backends are still being opened, leaves no
thread, task or connection behind. bench/scale.py measures the same at up to
1,000 backends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import conference_pb2 as pb
import conference_pb2_grpc
import pytest
from aio_support import eventually, run
from helpers import all_eligible, observed_aio_channel, observed_channel, wait_until
from many_ports import ManyPorts, client_threads
from seams import MANY_WATCHED_BACKENDS

import grpc_leastconn

RPC_TIMEOUT = 10.0
CLOSE_N = 50
OPEN_N = 200
# Generous bounds for a shared 2-core machine (bench/scale.py measures).
ELIGIBLE_WITHIN_S = 30.0
CLOSE_WITHIN_S = 2.0
SETTLE_S = 5.0


@pytest.fixture
def close_server() -> Iterator[ManyPorts]:
    server = ManyPorts(CLOSE_N)
    yield server
    server.stop()


@pytest.fixture
def open_server() -> Iterator[ManyPorts]:
    server = ManyPorts(OPEN_N, health=False)
    yield server
    server.stop()


def _unopened(core: object) -> int:
    """Backends whose channel is not open yet (through the declared inspect seam)."""
    return core.inspect(  # type: ignore[attr-defined, no-any-return]
        lambda balancer: sum(backend.channel is None for backend in balancer.backends)
    )


def _thread_count_settled(settle_s: float = SETTLE_S) -> int:
    """The client's Python threads once two looks 0.1 s apart agree."""
    deadline = time.monotonic() + settle_s
    last = len(client_threads())
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = len(client_threads())
        if now == last:
            break
        last = now
    return last


def _request() -> pb.PingRequest:
    return pb.PingRequest(payload="scale")


# -- sync ------------------------------------------------------------------------------


@pytest.mark.parametrize("checker", ["watch", "grpc"])
def test_sync_close_leaves_no_thread_or_connection(
    close_server: ManyPorts, checker: str, record_property: pytest.RecordProperty
) -> None:
    before = _thread_count_settled()
    channel, ledger = observed_channel(close_server.target, health_checker=checker)
    try:
        wait_until(lambda: all_eligible(channel), timeout=ELIGIBLE_WITHIN_S)
        stub = conference_pb2_grpc.ConferenceStub(channel)
        for _ in range(CLOSE_N):
            stub.Ping(_request(), timeout=RPC_TIMEOUT)
        assert close_server.client_connections() == CLOSE_N
    finally:
        started = time.monotonic()
        channel.close()
        took = time.monotonic() - started
    record_property(f"close_s_{checker}", round(took, 3))
    assert took < CLOSE_WITHIN_S
    wait_until(lambda: close_server.client_connections() == 0, timeout=SETTLE_S)
    wait_until(lambda: len(client_threads()) <= before, timeout=SETTLE_S)
    ledger.check()


def test_sync_factory_returns_before_the_backends_are_open(open_server: ManyPorts) -> None:
    before = _thread_count_settled()
    channel, ledger = observed_channel(open_server.target, health_check_service=None)
    try:
        # Opening one backend channel takes a fraction of a millisecond at
        # least: most of them are still to open when the factory has returned.
        assert _unopened(ledger.core) > OPEN_N // 2
        # A call made now waits for a backend, as on any channel starting up.
        stub = conference_pb2_grpc.ConferenceStub(channel)
        assert stub.Ping(_request(), timeout=RPC_TIMEOUT).backend == "many"
        wait_until(lambda: all_eligible(channel), timeout=ELIGIBLE_WITHIN_S)
        assert len(channel.backends()) == OPEN_N
        assert _unopened(ledger.core) == 0
    finally:
        channel.close()
    wait_until(lambda: open_server.client_connections() == 0, timeout=SETTLE_S)
    wait_until(lambda: len(client_threads()) <= before, timeout=SETTLE_S)
    ledger.check()


def test_sync_close_while_backends_are_still_opening(open_server: ManyPorts) -> None:
    before = _thread_count_settled()
    channel, ledger = observed_channel(open_server.target, health_check_service=None)
    assert _unopened(ledger.core) > 0
    channel.close()
    # The opener has stopped, and closed what it was opening: nothing is left.
    wait_until(lambda: open_server.client_connections() == 0, timeout=SETTLE_S)
    wait_until(lambda: len(client_threads()) <= before, timeout=SETTLE_S)
    assert not any(t.name.startswith("grpc_leastconn") for t in client_threads())


@pytest.mark.parametrize(
    ("tuning", "warned"),
    [({}, True), ({"health_checker": "grpc"}, False), ({"health_check_service": None}, False)],
)
def test_sync_says_once_when_many_backends_each_cost_three_threads(
    open_server: ManyPorts,
    caplog: pytest.LogCaptureFixture,
    tuning: dict[str, Any],
    warned: bool,
) -> None:
    assert OPEN_N > MANY_WATCHED_BACKENDS
    with caplog.at_level(logging.WARNING, logger="grpc_leastconn"):
        grpc_leastconn.insecure_channel(open_server.target, **tuning).close()
    said = [r for r in caplog.records if "health_checker='grpc'" in r.getMessage()]
    assert len(said) == (1 if warned else 0)
    if warned:
        assert said[0].levelno == logging.WARNING
        assert f"{OPEN_N} backends" in said[0].getMessage()
    wait_until(lambda: open_server.client_connections() == 0, timeout=SETTLE_S)


# -- asyncio ---------------------------------------------------------------------------


def _our_tasks() -> set[str]:
    return {t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task()}


@pytest.mark.parametrize("checker", ["watch", "grpc"])
def test_aio_close_leaves_no_task_or_connection(
    close_server: ManyPorts, checker: str, record_property: pytest.RecordProperty
) -> None:
    async def body() -> float:
        before = len(asyncio.all_tasks())
        channel, ledger = observed_aio_channel(close_server.target, health_checker=checker)
        try:
            await eventually(lambda: all_eligible(channel), ELIGIBLE_WITHIN_S, "all eligible")
            stub = conference_pb2_grpc.ConferenceStub(channel)
            for _ in range(CLOSE_N):
                await stub.Ping(_request(), timeout=RPC_TIMEOUT)
            assert close_server.client_connections() == CLOSE_N
        finally:
            started = time.monotonic()
            await channel.close()
            took = time.monotonic() - started
        await eventually(lambda: close_server.client_connections() == 0, SETTLE_S, "no connection")
        await eventually(lambda: len(asyncio.all_tasks()) <= before, SETTLE_S, _our_tasks)
        ledger.check()
        return took

    took = run(body)
    record_property(f"close_s_{checker}", round(took, 3))
    assert took < CLOSE_WITHIN_S


def test_aio_factory_returns_before_the_backends_are_open(open_server: ManyPorts) -> None:
    async def body() -> None:
        before = len(asyncio.all_tasks())
        channel, ledger = observed_aio_channel(open_server.target, health_check_service=None)
        try:
            # The opener task has not run yet: the factory opened nothing itself.
            assert _unopened(ledger.core) == OPEN_N
            stub = conference_pb2_grpc.ConferenceStub(channel)
            reply = await stub.Ping(_request(), timeout=RPC_TIMEOUT)
            assert reply.backend == "many"
            await eventually(lambda: all_eligible(channel), ELIGIBLE_WITHIN_S, "all eligible")
            assert _unopened(ledger.core) == 0
        finally:
            await channel.close()
        await eventually(lambda: open_server.client_connections() == 0, SETTLE_S, "no connection")
        await eventually(lambda: len(asyncio.all_tasks()) <= before, SETTLE_S, _our_tasks)
        ledger.check()

    run(body)


def test_aio_close_while_backends_are_still_opening(open_server: ManyPorts) -> None:
    async def body() -> None:
        before = len(asyncio.all_tasks())
        channel, ledger = observed_aio_channel(open_server.target, health_check_service=None)
        # Let the opener open a batch or two, then close in the middle of it.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert 0 < _unopened(ledger.core) < OPEN_N
        await channel.close()
        await eventually(lambda: open_server.client_connections() == 0, SETTLE_S, "no connection")
        await eventually(lambda: len(asyncio.all_tasks()) <= before, SETTLE_S, _our_tasks)

    run(body)
