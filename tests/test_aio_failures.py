"""Failure-aware picking through the asyncio channel, against real backends.

The same scenarios as test_failures.py (one core decides), driven by
coroutines on one event loop.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import conference_pb2_grpc
import grpc
import pytest
from aio_support import eventually, run
from failure_support import closed_loop_aio
from helpers import BackendFactory, all_eligible, state_of

import grpc_leastconn
import grpc_leastconn.aio

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
READY = grpc.ChannelConnectivity.READY
ROUND_ROBIN_SHARE = 0.25


async def ready_channel(servers: list[Any], **kwargs: Any) -> grpc_leastconn.aio.LeastConnChannel:
    channel = grpc_leastconn.aio.insecure_channel([s.address for s in servers], **kwargs)
    await eventually(lambda: all_eligible(channel), timeout=10.0)
    return channel


@pytest.mark.parametrize("code", sorted(grpc_leastconn.DEFAULT_FAILURE_CODES, key=str))
def test_backend_failing_every_call_stops_attracting_calls(
    backends: BackendFactory, code: grpc.StatusCode
) -> None:
    servers = backends(4)
    sick = servers[0]

    async def body() -> None:
        async with await ready_channel(servers) as channel:
            stub = conference_pb2_grpc.ConferenceStub(channel)
            sick.servicer.fail_calls(code)
            tally = await closed_loop_aio(stub, in_flight=8, calls=1200)
            assert tally.failed_share() <= 0.05, (tally.served, tally.failed)
            assert tally.codes.keys() <= {code}
            for healthy in servers[1:]:
                assert tally.share(healthy.address) >= 0.25, (tally.served, tally.failed)
            state = state_of(channel, sick.address)
            assert state.penalty > 0 and state.eligible

    run(body)


def test_code_outside_the_failure_set_is_the_application_answer(backends: BackendFactory) -> None:
    servers = backends(4)
    picky = servers[0]

    async def body() -> None:
        async with await ready_channel(servers) as channel:
            stub = conference_pb2_grpc.ConferenceStub(channel)
            picky.servicer.fail_calls(grpc.StatusCode.NOT_FOUND)
            tally = await closed_loop_aio(stub, in_flight=8, calls=800)
            assert tally.share(picky.address) > ROUND_ROBIN_SHARE, (tally.served, tally.failed)
            assert tally.codes.keys() == {grpc.StatusCode.NOT_FOUND}
            assert state_of(channel, picky.address).penalty == 0

    run(body)


def test_half_failing_backend_takes_a_smaller_share(backends: BackendFactory) -> None:
    servers = backends(4)
    flaky = servers[0]

    async def body() -> None:
        async with await ready_channel(servers) as channel:
            stub = conference_pb2_grpc.ConferenceStub(channel)
            flaky.servicer.fail_calls(UNAVAILABLE, every=2)
            tally = await closed_loop_aio(stub, in_flight=8, calls=1200)
            assert 0 < tally.share(flaky.address) < 0.2, (tally.served, tally.failed)
            assert tally.failed_share() < ROUND_ROBIN_SHARE / 2, (tally.served, tally.failed)

    run(body)


def test_when_every_backend_fails_calls_spread_and_carry_the_real_error(
    backends: BackendFactory,
) -> None:
    servers = backends(4)

    async def body() -> None:
        async with await ready_channel(servers) as channel:
            stub = conference_pb2_grpc.ConferenceStub(channel)
            for server in servers:
                server.servicer.fail_calls(UNAVAILABLE)
            tally = await closed_loop_aio(stub, in_flight=4, calls=400)
            assert tally.codes == {UNAVAILABLE: 400}
            assert all("injected UNAVAILABLE" in details for details in tally.details)
            for server in servers:
                assert tally.share(server.address) >= 0.1, tally.failed

    run(body)


def test_same_background_error_rate_everywhere_keeps_the_balance(
    backends: BackendFactory,
) -> None:
    servers = backends(4)

    async def body() -> None:
        async with await ready_channel(servers) as channel:
            stub = conference_pb2_grpc.ConferenceStub(channel)
            for server in servers:
                server.servicer.fail_calls(UNAVAILABLE, every=10)
            tally = await closed_loop_aio(stub, in_flight=8, calls=1600)
            for server in servers:
                assert 0.17 <= tally.share(server.address) <= 0.33, (tally.served, tally.failed)

    run(body)


def test_recovered_backend_is_used_again_within_seconds(
    backends: BackendFactory, caplog: pytest.LogCaptureFixture
) -> None:
    servers = backends(4)
    sick = servers[0]
    caplog.set_level(logging.INFO, logger="grpc_leastconn")

    async def body() -> None:
        async with await ready_channel(servers) as channel:
            stub = conference_pb2_grpc.ConferenceStub(channel)
            sick.servicer.fail_calls(UNAVAILABLE)
            await closed_loop_aio(stub, in_flight=8, calls=800)
            sick.servicer.fail_calls(None)
            restored = time.monotonic()
            served_before = sick.servicer.finished
            tally = await closed_loop_aio(
                stub,
                in_flight=8,
                calls=100_000,
                until=lambda: sick.servicer.finished - served_before >= 20,
                timeout=15.0,
            )
            assert time.monotonic() - restored < 8.0, tally.served
            assert tally.served[sick.address] >= 20
            await eventually(lambda: state_of(channel, sick.address).penalty == 0, timeout=8.0)

    run(body)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    failing = [m for m in messages if "is failing calls" in m[1]]
    assert len(failing) == 1 and failing[0][0] == logging.WARNING, messages
    assert any(level == logging.INFO and "answers again" in text for level, text in messages)


def test_outlier_detection_ejects_a_failing_backend_then_returns_it(
    backends: BackendFactory,
) -> None:
    servers = backends(4)
    sick = servers[0]
    detection = grpc_leastconn.OutlierDetection(
        interval=0.3,
        # Longer than the check below takes on a loaded machine (200 calls
        # took 1.9 s once): the backend must still be out when it ends.
        base_ejection_time=4.0,
        failure_percentage_ejection=grpc_leastconn.FailurePercentageEjection(
            minimum_hosts=4, request_volume=10
        ),
    )

    async def body() -> None:
        channel = await ready_channel(servers, failure_penalty=False, outlier_detection=detection)
        async with channel:
            stub = conference_pb2_grpc.ConferenceStub(channel)
            sick.servicer.fail_calls(grpc.StatusCode.INTERNAL)
            await closed_loop_aio(
                stub,
                in_flight=8,
                calls=100_000,
                until=lambda: state_of(channel, sick.address).ejected,
                timeout=10.0,
            )
            state = state_of(channel, sick.address)
            assert state.ejected and not state.eligible and state.connectivity is READY
            started = sick.servicer.started
            tally = await closed_loop_aio(stub, in_flight=4, calls=100)
            assert tally.calls_to(sick.address) == 0
            assert sick.servicer.started == started
            sick.servicer.fail_calls(None)
            await closed_loop_aio(
                stub,
                in_flight=4,
                calls=100_000,
                until=lambda: not state_of(channel, sick.address).ejected,
                timeout=10.0,
            )
            assert state_of(channel, sick.address).eligible

    run(body)
