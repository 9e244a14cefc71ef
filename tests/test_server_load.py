"""server_load=True: other clients' calls, as the backends report them, join the count.

Backends here report an in-flight count the test scripts (load_support),
out of band and in call trailers; the channel adds what others hold to
its own count: backend load = reported - this channel's own at the time of
the report, plus this channel's own now.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import conference_pb2 as pb
import conference_pb2_grpc
import load_support
import pytest
from aio_support import eventually, run
from helpers import all_eligible, observed_aio_channel, state_of, wait_until
from seams import Seams, open_aio_channel, open_channel

import grpc_leastconn

RPC_TIMEOUT = 10.0


@pytest.fixture
def load_backends() -> Iterator[Any]:
    started: list[load_support.LoadBackend] = []

    def make(n: int, **kwargs: Any) -> list[load_support.LoadBackend]:
        new = [load_support.start(**kwargs) for _ in range(n)]
        started.extend(new)
        return new

    yield make
    for backend in started:
        backend.stop()


class Clock:
    """Real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def join(stub: Any) -> Any:
    stream = stub.Join(pb.JoinRequest(duration_ms=0, frame_interval_ms=20), timeout=30.0)
    return stream, next(stream).backend


def test_reported_calls_of_other_clients_count_with_ours(load_backends: Any) -> None:
    busy, idle = load_backends(2)
    busy.script.set(5)  # five calls of other clients
    with grpc_leastconn.insecure_channel([busy.address, idle.address], server_load=True) as channel:
        wait_until(lambda: all_eligible(channel), timeout=RPC_TIMEOUT)
        wait_until(lambda: state_of(channel, busy.address).reported_others == 5, RPC_TIMEOUT)
        stub = conference_pb2_grpc.ConferenceStub(channel)
        streams = [join(stub) for _ in range(5)]
        # The idle backend takes our calls until it holds what the busy one does.
        assert [backend for _, backend in streams] == [idle.address] * 5
        # Now ours (5) against theirs (5 reported): the next goes either way,
        # and then they alternate.
        more = [join(stub) for _ in range(4)]
        counts = {
            b: sum(1 for _, x in streams + more if x == b) for b in (busy.address, idle.address)
        }
        assert abs((counts[busy.address] + 5) - counts[idle.address]) <= 1, counts
        # The busy backend reports what it holds now, our calls included: its
        # others stay 5, whatever our count there.
        busy.script.set(5 + counts[busy.address])
        wait_until(lambda: state_of(channel, busy.address).in_flight == counts[busy.address], 5)
        wait_until(lambda: state_of(channel, busy.address).reported_others == 5, RPC_TIMEOUT)
        for stream, _ in streams + more:
            stream.cancel()
        wait_until(lambda: not any(channel.connection_table().values()), RPC_TIMEOUT)


def test_call_trailers_report_too(load_backends: Any) -> None:
    a, b = load_backends(2, oob=False, trailers=True)
    a.script.set(20)
    with grpc_leastconn.insecure_channel([a.address, b.address], server_load=True) as channel:
        wait_until(lambda: all_eligible(channel), timeout=RPC_TIMEOUT)
        stub = conference_pb2_grpc.ConferenceStub(channel)
        # Until a's first trailer both look idle, and two random choices
        # break the tie at random: Ping until a has answered once (each Ping
        # goes there with probability 1/2, so 40 all missing it is 1e-12).
        answered = []
        for _ in range(40):
            answered.append(stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT).backend)
            if answered[-1] == a.address:
                break
        assert answered[-1] == a.address, answered
        # That one call's trailer (20 calls) says a is busy: the only report there is.
        wait_until(lambda: state_of(channel, a.address).reported_others >= 19, RPC_TIMEOUT)
        streams = [join(stub) for _ in range(6)]
        assert {backend for _, backend in streams} == {b.address}
        for stream, _ in streams:
            stream.cancel()


def test_a_backend_without_reports_is_judged_by_local_counts_and_logged_once(
    load_backends: Any, caplog: pytest.LogCaptureFixture
) -> None:
    silent, reporting = load_backends(1, oob=False)[0], load_backends(1)[0]
    caplog.set_level(logging.INFO, logger="grpc_leastconn")
    with grpc_leastconn.insecure_channel(
        [silent.address, reporting.address], server_load=True
    ) as channel:
        wait_until(lambda: all_eligible(channel), timeout=RPC_TIMEOUT)
        wait_until(
            lambda: any("serves no ORCA load reports" in r.getMessage() for r in caplog.records),
            RPC_TIMEOUT,
        )
        stub = conference_pb2_grpc.ConferenceStub(channel)
        streams = [join(stub) for _ in range(6)]
        counts = {
            b: sum(1 for _, x in streams if x == b) for b in (silent.address, reporting.address)
        }
        assert counts == {silent.address: 3, reporting.address: 3}
        for stream, _ in streams:
            stream.cancel()
    notes = [r for r in caplog.records if "serves no ORCA load reports" in r.getMessage()]
    assert len(notes) == 1 and silent.address in notes[0].getMessage()


def test_stale_reports_expire_and_are_logged(
    load_backends: Any, caplog: pytest.LogCaptureFixture
) -> None:
    busy, idle = load_backends(2)
    busy.script.set(4)
    caplog.set_level(logging.INFO, logger="grpc_leastconn")
    clock = Clock()
    channel = open_channel([busy.address, idle.address], seams=Seams(clock=clock), server_load=True)
    with channel:
        wait_until(lambda: state_of(channel, busy.address).reported_others == 4, RPC_TIMEOUT)
        busy.script.closed = True  # the report stream stops talking
        clock.offset += 6.0  # past STALE_AFTER_S since the last report
        stub = conference_pb2_grpc.ConferenceStub(channel)
        stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT)  # a release looks at the time
        wait_until(lambda: state_of(channel, busy.address).reported_others == 0, RPC_TIMEOUT)
    assert any(
        "no load report" in r.getMessage() and busy.address in r.getMessage()
        for r in caplog.records
    )


def test_server_load_off_ignores_reports(load_backends: Any) -> None:
    busy, idle = load_backends(2)
    busy.script.set(5)
    with grpc_leastconn.insecure_channel([busy.address, idle.address]) as channel:
        wait_until(lambda: all_eligible(channel), timeout=RPC_TIMEOUT)
        stub = conference_pb2_grpc.ConferenceStub(channel)
        streams = [join(stub) for _ in range(4)]
        assert sorted(b for _, b in streams) == sorted([busy.address, idle.address] * 2)
        assert busy.script.streams_opened == 0
        for stream, _ in streams:
            stream.cancel()


def test_asyncio_channel_counts_reported_calls_too(load_backends: Any) -> None:
    busy, idle = load_backends(2)
    busy.script.set(3)

    async def body() -> None:
        channel, _ = observed_aio_channel([busy.address, idle.address], server_load=True)
        async with channel:
            await eventually(lambda: all_eligible(channel), timeout=RPC_TIMEOUT)
            await eventually(
                lambda: state_of(channel, busy.address).reported_others == 3, RPC_TIMEOUT
            )
            stub = conference_pb2_grpc.ConferenceStub(channel)
            streams = []
            for _ in range(3):
                stream = stub.Join(pb.JoinRequest(duration_ms=0), timeout=30.0)
                streams.append((stream, (await stream.read()).backend))
            assert [backend for _, backend in streams] == [idle.address] * 3
            for stream, _ in streams:
                stream.cancel()

    run(body)


def test_asyncio_trailers_report(load_backends: Any) -> None:
    a, b = load_backends(2, oob=False, trailers=True)
    a.script.set(20)

    async def body() -> None:
        channel = open_aio_channel([a.address, b.address], seams=Seams(), server_load=True)
        async with channel:
            await eventually(lambda: all_eligible(channel), timeout=RPC_TIMEOUT)
            stub = conference_pb2_grpc.ConferenceStub(channel)
            # As in the sync test: Ping until a has answered once.
            answered = []
            for _ in range(40):
                reply = await stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT)
                answered.append(reply.backend)
                if reply.backend == a.address:
                    break
            assert answered[-1] == a.address, answered
            await eventually(lambda: state_of(channel, a.address).reported_others >= 19, 5.0)

    run(body)


def test_server_load_without_the_orca_extra_says_how_to_install_it() -> None:
    code = (
        "import sys; sys.modules['xds'] = None\n"
        "import grpc_leastconn\n"
        "try:\n"
        "    grpc_leastconn.insecure_channel('127.0.0.1:5001', server_load=True)\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'grpc-leastconn[orca]'" in result.stdout


@pytest.mark.parametrize("value", [1, "yes", None])
def test_server_load_must_be_a_bool(value: object) -> None:
    with pytest.raises(TypeError, match="server_load"):
        grpc_leastconn.insecure_channel("127.0.0.1:5001", server_load=value)
