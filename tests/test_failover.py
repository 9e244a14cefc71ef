"""Failover against backends that really die: example servers as subprocesses, SIGKILLed.

An in-process server stops politely (GOAWAY, health NOT_SERVING first); a
killed process just vanishes, its sockets reset by the kernel. That is the
case a balancer has to survive without failing calls it could have placed
elsewhere.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import conference_pb2 as pb
import conference_pb2_grpc
import grpc
import pytest
from helpers import StreamReader, observed_channel, wait_until
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

import grpc_leastconn

READY = grpc.ChannelConnectivity.READY
TRANSIENT_FAILURE = grpc.ChannelConnectivity.TRANSIENT_FAILURE


# -- load ---------------------------------------------------------------------------------


@dataclass
class PingLoad:
    """Threads sending unary Pings in a loop, recording every call's start and outcome."""

    stub: conference_pb2_grpc.ConferenceStub
    threads: int = LOAD_THREADS
    delay_ms: int = 5
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _run(self) -> None:
        deadline = time.monotonic() + LOAD_LIMIT_S
        request = pb.PingRequest(payload="load", delay_ms=self.delay_ms)
        while not self._stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            try:
                reply = self.stub.Ping(request, timeout=RPC_TIMEOUT)
            except grpc.RpcError as error:
                outcome = Outcome(started, time.monotonic(), error.code(), error.details(), "")
            else:
                outcome = Outcome(started, time.monotonic(), grpc.StatusCode.OK, "", reply.backend)
            self.outcomes.append(outcome)

    def start(self) -> PingLoad:
        for index in range(self.threads):
            worker = threading.Thread(target=self._run, name=f"ping-load-{index}", daemon=True)
            self._workers.append(worker)
            worker.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(RPC_TIMEOUT + 5)
        assert not any(w.is_alive() for w in self._workers), "load threads did not stop"

    def failures(self, since: float = float("-inf")) -> list[Outcome]:
        return failures(self.outcomes, since)


def ping(stub: conference_pb2_grpc.ConferenceStub, **kwargs: object) -> pb.PingReply:
    kwargs.setdefault("timeout", RPC_TIMEOUT)
    return stub.Ping(pb.PingRequest(payload="failover"), **kwargs)


def warm_up(stub: conference_pb2_grpc.ConferenceStub, servers: list[ServerProcess]) -> None:
    """Ping until every backend has served one call."""
    wanted = {s.address for s in servers}
    seen: set[str] = set()
    deadline = time.monotonic() + 10.0
    for _ in range(1000):
        seen.add(ping(stub).backend)
        if seen >= wanted or time.monotonic() > deadline:
            break
    assert seen >= wanted, f"never served a call: {sorted(wanted - seen)}"


# -- one backend killed under load ------------------------------------------------------


def test_killed_backend_is_dropped_without_failures_and_reused_after_restart(
    spawn: Callable[..., ServerProcess], record_property: pytest.RecordProperty
) -> None:
    servers = [spawn() for _ in range(3)]
    victim, survivors = servers[0], servers[1:]
    with grpc_leastconn.insecure_channel(ipv4_target(servers)) as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        warm_up(stub, servers)
        # Two per backend: least-connection spreads them exactly on an idle fleet.
        streams = [
            StreamReader(
                stub.Join(
                    pb.JoinRequest(
                        session_id=f"s{i}", duration_ms=STREAM_MS, frame_interval_ms=FRAME_MS
                    ),
                    timeout=STREAM_MS / 1000 + 10,
                )
            ).start()
            for i in range(2 * len(servers))
        ]
        by_backend = {s.address: [r for r in streams if r.backend == s.address] for s in servers}
        assert [len(v) for v in by_backend.values()] == [2, 2, 2], by_backend

        load = PingLoad(stub).start()
        try:
            wait_until(lambda: len(load.outcomes) > 50, timeout=5.0)
            assert channel.connection_table()[victim.address] >= 2

            victim.kill()
            killed = time.monotonic()
            watch = Watch(
                {
                    "ineligible": lambda: not eligible(channel, victim.address),
                    "released": lambda: channel.connection_table()[victim.address] == 0,
                },
                limit=5.0,
            ).in_thread()
            timings = watch.result()
            victim.proc.wait(5.0)
            # Enough calls started past the grace second to judge them.
            wait_until(
                lambda: (
                    sum(o.started >= killed + FAILURES_ALLOWED_FOR_S for o in load.outcomes) >= 200
                ),
                timeout=10.0,
            )
        finally:
            load.stop()

        late = load.failures(since=killed + FAILURES_ALLOWED_FOR_S)
        early = load.failures(since=killed)
        before = load.failures()
        after_kill = [o for o in load.outcomes if o.started >= killed + FAILURES_ALLOWED_FOR_S]
        assert not late, late[:5]
        assert {o.backend for o in after_kill} == {s.address for s in survivors}

        for reader in streams:
            reader.join(STREAM_MS / 1000 + 10)
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
        spawn(victim.port)
        spawned = time.monotonic() - restarted_at
        served = wait_until(
            lambda: any(ping(stub).backend == victim.address for _ in range(len(servers))),
            timeout=REUSE_WITHIN_S,
            interval=0.05,
        )
        assert served
        reused = time.monotonic() - restarted_at
        assert channel.connection_table() == {s.address: 0 for s in servers}

    figures = {
        "kill_to_ineligible_s": round(timings["ineligible"], 4),
        "kill_to_count_zero_s": round(timings["released"], 4),
        "failures_in_flight_at_kill": len(before) - len(early),
        "failures_first_second": len(early) - len(late),
        "failures_after_first_second": len(late),
        "restart_to_reuse_s": round(reused, 3),
        "restart_spawn_s": round(spawned, 3),
    }
    for name, value in figures.items():
        record_property(name, value)
    print(f"\nkill under load: {figures}; calls={len(load.outcomes)}")
    print("failure kinds:", sorted({f"{o.code.name}: {o.details[:70]}" for o in before}))


# -- every backend killed --------------------------------------------------------------


def test_all_backends_killed_fail_fast_then_wait_for_ready_succeeds_after_restart(
    spawn: Callable[..., ServerProcess], record_property: pytest.RecordProperty
) -> None:
    servers = [spawn() for _ in range(2)]
    target = ipv4_target(servers)
    with grpc_leastconn.insecure_channel(target) as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        warm_up(stub, servers)

        for server in servers:
            server.kill()
        killed = time.monotonic()
        for server in servers:
            server.proc.wait(5.0)

        details = ""
        slowest = 0.0
        for _ in range(10_000):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as failure:
                ping(stub)
            slowest = max(slowest, time.monotonic() - started)
            assert failure.value.code() is grpc.StatusCode.UNAVAILABLE, failure.value
            details = failure.value.details()
            if details.startswith("no healthy backend") or started - killed > 5.0:
                break
        balancer_failure = time.monotonic() - killed
        assert details.startswith("no healthy backend"), details
        assert repr(target) in details
        for server in servers:
            assert f"{server.address} " in details
        assert slowest < FAIL_FAST_WITHIN_S, "a call waited instead of failing fast"
        assert balancer_failure <= FAIL_FAST_WITHIN_S

        outcome: queue.Queue[pb.PingReply | grpc.RpcError] = queue.Queue()

        def waiting_call() -> None:
            try:
                outcome.put(ping(stub, wait_for_ready=True, timeout=REUSE_WITHIN_S + 10))
            except grpc.RpcError as exc:
                outcome.put(exc)

        caller = threading.Thread(target=waiting_call, daemon=True)
        caller.start()
        with pytest.raises(queue.Empty):
            outcome.get(timeout=0.3)
        restarted_at = time.monotonic()
        spawn(servers[1].port)
        result = outcome.get(timeout=REUSE_WITHIN_S + 10)
        waited = time.monotonic() - restarted_at
        caller.join(5.0)
        assert isinstance(result, pb.PingReply), result
        assert result.backend == servers[1].address
        assert waited <= REUSE_WITHIN_S

    record_property("all_killed_to_fast_unavailable_s", round(balancer_failure, 4))
    record_property("restart_to_waiting_call_done_s", round(waited, 3))
    print(
        f"\nall killed: fast UNAVAILABLE {balancer_failure * 1000:.0f} ms after the kill"
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
    with grpc_leastconn.insecure_channel(ipv4_target(servers)) as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        warm_up(stub, servers)
        outcomes: list[Outcome] = []
        barrier = threading.Barrier(LOAD_THREADS + 1, timeout=10.0)

        def burst() -> None:
            barrier.wait()
            stop = time.monotonic() + 0.5
            request = pb.PingRequest(payload="race")
            for _ in range(10_000):
                started = time.monotonic()
                if started > stop:
                    return
                try:
                    reply = stub.Ping(request, timeout=RPC_TIMEOUT)
                except grpc.RpcError as error:
                    outcomes.append(Outcome(started, 0, error.code(), error.details(), ""))
                else:
                    outcomes.append(Outcome(started, 0, grpc.StatusCode.OK, "", reply.backend))

        # Two kills, one after the other, for two race windows.
        for victim in servers[:2]:
            workers = [threading.Thread(target=burst, daemon=True) for _ in range(LOAD_THREADS)]
            for worker in workers:
                worker.start()
            victim.kill()
            barrier.wait()
            for worker in workers:
                worker.join(RPC_TIMEOUT + 5)
            assert not any(w.is_alive() for w in workers)
            barrier.reset()

    repicks = [r for r in caplog.records if "re-picking" in r.getMessage()]
    pick_failures = [o for o in outcomes if o.details.startswith(PICK_FAILURES)]
    failures = [o for o in outcomes if o.code is not grpc.StatusCode.OK]
    record_property("race_calls", len(outcomes))
    record_property("race_repicks", len(repicks))
    record_property("race_failures", len(failures))
    print(
        f"\nrace: {len(outcomes)} calls, {len(repicks)} re-picked, {len(failures)} failed:",
        sorted({f"{o.code.name}: {o.details[:80]}" for o in failures}),
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
    channel, ledger = observed_channel(ipv4_target(servers), health_check_service=None)
    with channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        warm_up(stub, servers)
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
            victim.proc.wait(5.0)
            # Its own channel knows: an RPC sent there now fails before it leaves.
            wait_until(lambda: actual.get(victim.address) is TRANSIENT_FAILURE, timeout=5.0)
            assert eligible(channel, victim.address)

            served = [ping(stub).backend for _ in range(30)]
        finally:
            balancer.set_connectivity = report  # type: ignore[method-assign]

        assert set(served) == {s.address for s in servers[1:]}
        assert channel.connection_table()[victim.address] == 0
    repick = f"RPC never reached {victim.address}; re-picking"
    repicked = [r for r in caplog.records if r.getMessage() == repick]
    # Round-robin among equal counts puts every third pick on the victim.
    assert len(repicked) >= 5, len(repicked)
