"""Failover of the asyncio channel against backends that really die (SIGKILLed subprocesses).

The scenarios and promises of ``test_failover.py``, with the processes of
``process_support``; load comes from tasks on the channel's loop instead of
threads. Starting and reaping processes blocks, so it runs in a thread while
the channel's tasks go on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import conference_pb2 as pb
import conference_pb2_grpc
import grpc
import pytest
from aio_support import SETTLE_S, StreamTask, eventually, run
from helpers import observed_aio_channel
from process_support import (
    FAIL_FAST_WITHIN_S,
    FAILURES_ALLOWED_FOR_S,
    FRAME_MS,
    LOAD_LIMIT_S,
    LOAD_THREADS,
    PICK_FAILURES,
    RELEASE_WITHIN_S,
    REUSE_WITHIN_S,
    RPC_TIMEOUT,
    STREAM_MS,
    Outcome,
    ServerProcess,
    Watch,
    eligible,
    failures,
    ipv4_target,
)

import grpc_leastconn.aio

READY = grpc.ChannelConnectivity.READY
TRANSIENT_FAILURE = grpc.ChannelConnectivity.TRANSIENT_FAILURE
# Spawning a server may take up to SPAWN_TIMEOUT_S on a busy machine.
TEST_TIMEOUT_S = 120.0


async def ping(stub: conference_pb2_grpc.ConferenceStub, **kwargs: Any) -> pb.PingReply:
    kwargs.setdefault("timeout", RPC_TIMEOUT)
    return await stub.Ping(pb.PingRequest(payload="failover"), **kwargs)


async def outcome_of(stub: conference_pb2_grpc.ConferenceStub, request: pb.PingRequest) -> Outcome:
    started = time.monotonic()
    try:
        reply = await stub.Ping(request, timeout=RPC_TIMEOUT)
    except grpc.aio.AioRpcError as error:
        return Outcome(started, time.monotonic(), error.code(), error.details() or "", "")
    return Outcome(started, time.monotonic(), grpc.StatusCode.OK, "", reply.backend)


@dataclass
class PingLoad:
    """Tasks sending unary Pings in a loop, recording every call's start and outcome."""

    stub: conference_pb2_grpc.ConferenceStub
    tasks: int = LOAD_THREADS
    delay_ms: int = 5
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _workers: list[asyncio.Task[None]] = field(default_factory=list)

    async def _run(self) -> None:
        deadline = time.monotonic() + LOAD_LIMIT_S
        request = pb.PingRequest(payload="load", delay_ms=self.delay_ms)
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.outcomes.append(await outcome_of(self.stub, request))

    def start(self) -> PingLoad:
        self._workers = [asyncio.create_task(self._run()) for _ in range(self.tasks)]
        return self

    async def stop(self) -> None:
        self._stop.set()
        _, pending = await asyncio.wait(self._workers, timeout=RPC_TIMEOUT + 5)
        assert not pending, "load tasks did not stop"
        for worker in self._workers:
            worker.result()


async def warm_up(stub: conference_pb2_grpc.ConferenceStub, servers: list[ServerProcess]) -> None:
    """Ping until every backend has served one call."""
    wanted = {s.address for s in servers}
    seen: set[str] = set()
    deadline = time.monotonic() + 10.0
    for _ in range(1000):
        seen.add((await ping(stub)).backend)
        if seen >= wanted or time.monotonic() > deadline:
            break
    assert seen >= wanted, f"never served a call: {sorted(wanted - seen)}"


async def served_by(stub: conference_pb2_grpc.ConferenceStub, address: str, limit: float) -> None:
    """Ping until ``address`` serves a call, within ``limit`` seconds."""
    deadline = time.monotonic() + limit
    for _ in range(10_000):
        if (await ping(stub)).backend == address:
            return
        assert time.monotonic() < deadline, f"{address} served no call within {limit:g}s"
        await asyncio.sleep(0.01)


# -- one backend killed under load ------------------------------------------------------


def test_killed_backend_is_dropped_without_failures_and_reused_after_restart(
    spawn: Callable[..., ServerProcess], record_property: pytest.RecordProperty
) -> None:
    servers = [spawn() for _ in range(3)]
    victim, survivors = servers[0], servers[1:]

    async def body() -> dict[str, Any]:
        async with grpc_leastconn.aio.insecure_channel(ipv4_target(servers)) as channel:
            stub = conference_pb2_grpc.ConferenceStub(channel)
            await warm_up(stub, servers)
            # Two per backend: least-connection spreads them exactly on an idle fleet.
            streams = [
                StreamTask(
                    stub.Join(
                        pb.JoinRequest(
                            session_id=f"s{i}", duration_ms=STREAM_MS, frame_interval_ms=FRAME_MS
                        ),
                        timeout=STREAM_MS / 1000 + 10,
                    )
                ).start()
                for i in range(2 * len(servers))
            ]
            by_backend = {
                s.address: [r for r in streams if await r.backend() == s.address] for s in servers
            }
            assert [len(v) for v in by_backend.values()] == [2, 2, 2], by_backend

            load = PingLoad(stub).start()
            try:
                await eventually(lambda: len(load.outcomes) > 50, 5.0)
                assert channel.connection_table()[victim.address] >= 2

                victim.kill()
                killed = time.monotonic()
                timings = await Watch(
                    {
                        "ineligible": lambda: not eligible(channel, victim.address),
                        "released": lambda: channel.connection_table()[victim.address] == 0,
                    },
                    limit=5.0,
                ).watched()
                await asyncio.to_thread(victim.proc.wait, 5.0)
                # Enough calls started past the grace second to judge them.
                await eventually(
                    lambda: (
                        sum(o.started >= killed + FAILURES_ALLOWED_FOR_S for o in load.outcomes)
                        >= 200
                    ),
                    10.0,
                )
            finally:
                await load.stop()

            late = failures(load.outcomes, since=killed + FAILURES_ALLOWED_FOR_S)
            early = failures(load.outcomes, since=killed)
            before = failures(load.outcomes)
            after_kill = [o for o in load.outcomes if o.started >= killed + FAILURES_ALLOWED_FOR_S]
            assert not late, late[:5]
            assert {o.backend for o in after_kill} == {s.address for s in survivors}

            for reader in streams:
                await reader.join(STREAM_MS / 1000 + 10)
            for reader in by_backend[victim.address]:
                assert reader.error is not None
                assert reader.error.code() is grpc.StatusCode.UNAVAILABLE
            for survivor in survivors:
                for reader in by_backend[survivor.address]:
                    assert reader.error is None, reader.error
                    assert len(reader.frames) == STREAM_MS // FRAME_MS

            assert "released" in timings, "the killed backend's count never reached 0"
            assert timings["released"] <= RELEASE_WITHIN_S
            assert "ineligible" in timings

            # Back on the same port: the channel reconnects by itself.
            restarted_at = time.monotonic()
            await asyncio.to_thread(spawn, victim.port)
            spawned = time.monotonic() - restarted_at
            await served_by(stub, victim.address, REUSE_WITHIN_S)
            reused = time.monotonic() - restarted_at
            # Each end learns of a call's end on its own: the release may follow the reply.
            await eventually(
                lambda: channel.connection_table() == {s.address: 0 for s in servers}, SETTLE_S
            )
            print("failure kinds:", sorted({f"{o.code.name}: {o.details[:70]}" for o in before}))
            return {
                "kill_to_ineligible_s": round(timings["ineligible"], 4),
                "kill_to_count_zero_s": round(timings["released"], 4),
                "failures_in_flight_at_kill": len(before) - len(early),
                "failures_first_second": len(early) - len(late),
                "failures_after_first_second": len(late),
                "restart_to_reuse_s": round(reused, 3),
                "restart_spawn_s": round(spawned, 3),
                "calls": len(load.outcomes),
            }

    figures = run(body, timeout=TEST_TIMEOUT_S)
    for name, value in figures.items():
        record_property(f"aio_{name}", value)
    print(f"\naio kill under load: {figures}")


# -- every backend killed --------------------------------------------------------------


def test_all_backends_killed_fail_fast_then_wait_for_ready_succeeds_after_restart(
    spawn: Callable[..., ServerProcess], record_property: pytest.RecordProperty
) -> None:
    servers = [spawn() for _ in range(2)]
    target = ipv4_target(servers)

    async def body() -> tuple[float, float, float]:
        async with grpc_leastconn.aio.insecure_channel(target) as channel:
            stub = conference_pb2_grpc.ConferenceStub(channel)
            await warm_up(stub, servers)

            for server in servers:
                server.kill()
            killed = time.monotonic()
            for server in servers:
                await asyncio.to_thread(server.proc.wait, 5.0)

            details = ""
            slowest = 0.0
            for _ in range(10_000):
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await ping(stub)
                slowest = max(slowest, time.monotonic() - started)
                assert failure.value.code() is grpc.StatusCode.UNAVAILABLE, failure.value
                details = failure.value.details() or ""
                if details.startswith("no healthy backend") or started - killed > 5.0:
                    break
            balancer_failure = time.monotonic() - killed
            assert details.startswith("no healthy backend"), details
            assert repr(target) in details
            for server in servers:
                assert f"{server.address} " in details
            assert slowest < FAIL_FAST_WITHIN_S, "a call waited instead of failing fast"
            assert balancer_failure <= FAIL_FAST_WITHIN_S

            waiting = asyncio.ensure_future(
                ping(stub, wait_for_ready=True, timeout=REUSE_WITHIN_S + 10)
            )
            done, _ = await asyncio.wait({waiting}, timeout=0.3)
            assert not done, waiting
            restarted_at = time.monotonic()
            await asyncio.to_thread(spawn, servers[1].port)
            result = await asyncio.wait_for(waiting, REUSE_WITHIN_S + 10)
            waited = time.monotonic() - restarted_at
            assert isinstance(result, pb.PingReply), result
            assert result.backend == servers[1].address
            assert waited <= REUSE_WITHIN_S
            return balancer_failure, slowest, waited

    balancer_failure, slowest, waited = run(body, timeout=TEST_TIMEOUT_S)
    record_property("aio_all_killed_to_fast_unavailable_s", round(balancer_failure, 4))
    record_property("aio_restart_to_waiting_call_done_s", round(waited, 3))
    print(
        f"\naio all killed: fast UNAVAILABLE {balancer_failure * 1000:.0f} ms after the kill"
        f" (slowest failing call {slowest * 1000:.0f} ms); waiting call done"
        f" {waited:.2f} s after the restart"
    )


# -- re-pick in the race window -------------------------------------------------------------


def test_calls_racing_a_kill_are_repicked_not_failed(
    spawn: Callable[..., ServerProcess],
    caplog: pytest.LogCaptureFixture,
    record_property: pytest.RecordProperty,
) -> None:
    caplog.set_level(logging.DEBUG, logger="grpc_leastconn")
    servers = [spawn() for _ in range(4)]
    outcomes: list[Outcome] = []

    async def body() -> None:
        async with grpc_leastconn.aio.insecure_channel(ipv4_target(servers)) as channel:
            stub = conference_pb2_grpc.ConferenceStub(channel)
            await warm_up(stub, servers)

            async def burst(go: asyncio.Event) -> None:
                await go.wait()
                stop = time.monotonic() + 0.5
                request = pb.PingRequest(payload="race")
                for _ in range(10_000):
                    if time.monotonic() > stop:
                        return
                    outcomes.append(await outcome_of(stub, request))

            # Two kills, one after the other, for two race windows.
            for victim in servers[:2]:
                go = asyncio.Event()
                workers = [asyncio.create_task(burst(go)) for _ in range(LOAD_THREADS)]
                victim.kill()
                go.set()
                _, pending = await asyncio.wait(workers, timeout=RPC_TIMEOUT + 5)
                assert not pending
                for worker in workers:
                    worker.result()

    run(body, timeout=TEST_TIMEOUT_S)
    repicks = [r for r in caplog.records if "re-picking" in r.getMessage()]
    pick_failures = [o for o in outcomes if o.details.startswith(PICK_FAILURES)]
    failed = failures(outcomes)
    record_property("aio_race_calls", len(outcomes))
    record_property("aio_race_repicks", len(repicks))
    record_property("aio_race_failures", len(failed))
    print(
        f"\naio race: {len(outcomes)} calls, {len(repicks)} re-picked, {len(failed)} failed:",
        sorted({f"{o.code.name}: {o.details[:80]}" for o in failed}),
    )
    assert len(outcomes) > 100
    assert not pick_failures, pick_failures[:3]


def test_call_picked_onto_a_dead_backend_is_repicked(
    spawn: Callable[..., ServerProcess], caplog: pytest.LogCaptureFixture
) -> None:
    # The race window held open: the balancer is kept from hearing that the
    # victim's backend channel lost its connection, so picks keep landing on it
    # and every one of them must be re-picked. Health checking is off so the
    # broken Watch cannot give the death away either.
    caplog.set_level(logging.DEBUG, logger="grpc_leastconn")
    servers = [spawn() for _ in range(3)]
    victim = servers[0]

    async def body() -> None:
        channel, ledger = observed_aio_channel(ipv4_target(servers), health_check_service=None)
        async with channel:
            stub = conference_pb2_grpc.ConferenceStub(channel)
            await warm_up(stub, servers)
            # Private reach, on purpose: the balancer must go on believing the
            # dead backend READY, and no seam delays a connectivity report.
            balancer = ledger.core._balancer
            report = balancer.set_connectivity
            actual: dict[str, grpc.ChannelConnectivity] = {}

            def stale(backend: Any, state: grpc.ChannelConnectivity) -> bool:
                actual[backend.key] = state
                if backend.key == victim.address and state is not READY:
                    return False
                return report(backend, state)

            balancer.set_connectivity = stale  # type: ignore[method-assign]
            try:
                victim.kill()
                await asyncio.to_thread(victim.proc.wait, 5.0)
                # Its own channel knows: an RPC sent there now fails before it leaves.
                await eventually(lambda: actual.get(victim.address) is TRANSIENT_FAILURE, 5.0)
                assert eligible(channel, victim.address)

                served = [(await ping(stub)).backend for _ in range(30)]
            finally:
                balancer.set_connectivity = report  # type: ignore[method-assign]

            assert set(served) == {s.address for s in servers[1:]}
            assert channel.connection_table()[victim.address] == 0

    run(body, timeout=TEST_TIMEOUT_S)
    repick = f"RPC never reached {victim.address}; re-picking"
    repicked = [r for r in caplog.records if r.getMessage() == repick]
    # Round-robin among equal counts puts every third pick on the victim.
    assert len(repicked) >= 5, len(repicked)
