"""Health checking against real backends: grpc.health.v1 Watch drives eligibility.

Each backend's health servicer is flipped while real RPCs run through one
channel; the server-side counters show where calls actually went.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import conference_pb2 as pb
import conference_pb2_grpc
import grpc
import pytest
import server as example_server
from grpc_health.v1 import health_pb2
from helpers import BackendFactory, StreamReader, wait_until
from server import SERVICE_NAME, Backend

import grpc_leastconn

RPC_TIMEOUT = 5.0
# The promises under test.
STOP_WITHIN_S = 0.5
RESUME_WITHIN_S = 1.0
FAIL_FAST_WITHIN_S = 1.0
# How long a NOT_SERVING backend must stay untouched to count as left alone.
QUIET_S = 1.0
STREAM_MS = 3000
FRAME_MS = 100
LOAD_THREADS = 3
LOAD_LIMIT_S = 30.0

READY = grpc.ChannelConnectivity.READY
TRANSIENT_FAILURE = grpc.ChannelConnectivity.TRANSIENT_FAILURE


def ipv4_target(backends: list[Backend]) -> str:
    return "ipv4:" + ",".join(b.address for b in backends)


def ping(stub: conference_pb2_grpc.ConferenceStub, **kwargs: object) -> pb.PingReply:
    kwargs.setdefault("timeout", RPC_TIMEOUT)
    return stub.Ping(pb.PingRequest(payload="health"), **kwargs)


def warm_up(stub: conference_pb2_grpc.ConferenceStub, backends: list[Backend]) -> None:
    """Ping until every backend has served one call: all are connected and healthy."""
    wanted = {b.name for b in backends}
    seen: set[str] = set()
    deadline = time.monotonic() + 10.0
    for _ in range(1000):
        seen.add(ping(stub).backend)
        if seen >= wanted or time.monotonic() > deadline:
            break
    assert seen >= wanted, f"backends never served a call: {sorted(wanted - seen)}"


def pings_served(backend: Backend) -> int:
    return backend.servicer.started_by_method.get("Ping", 0)


@dataclass
class PingLoad:
    """Threads sending unary Pings through one channel until stopped."""

    stub: conference_pb2_grpc.ConferenceStub
    threads: int = LOAD_THREADS
    delay_ms: int = 2
    errors: list[grpc.RpcError] = field(default_factory=list)
    calls: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _run(self) -> None:
        deadline = time.monotonic() + LOAD_LIMIT_S
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.stub.Ping(
                    pb.PingRequest(payload="load", delay_ms=self.delay_ms), timeout=RPC_TIMEOUT
                )
            except grpc.RpcError as error:
                with self._lock:
                    self.errors.append(error)
            with self._lock:
                self.calls += 1

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


def logged_at(caplog: pytest.LogCaptureFixture, prefix: str, suffix: str) -> float:
    """Wall-clock time of the first grpc_leastconn record with this start and end."""
    for record in caplog.records:
        message = record.getMessage()
        if (
            record.name == "grpc_leastconn"
            and message.startswith(prefix)
            and message.endswith(suffix)
        ):
            return record.created
    raise AssertionError(f"nothing logged like {prefix!r}...{suffix!r}")


def open_streams(stub: conference_pb2_grpc.ConferenceStub, count: int) -> list[StreamReader]:
    readers = []
    for index in range(count):
        call = stub.Join(
            pb.JoinRequest(
                session_id=f"s{index}", duration_ms=STREAM_MS, frame_interval_ms=FRAME_MS
            ),
            timeout=STREAM_MS / 1000 + 10,
        )
        readers.append(StreamReader(call).start())
    return readers


def last_increase(backend: Backend, since: float, quiet: float, limit: float) -> float:
    """When ``backend`` last started a Ping, once none has started for ``quiet`` s.

    Returns seconds after ``since`` (0 when none started after it). Fails if
    Pings keep arriving ``limit`` seconds after ``since``.
    """
    last = since
    count = pings_served(backend)
    while True:
        current = count
        if not backend.servicer.wait_until(
            lambda s, seen=current: s.started_by_method.get("Ping", 0) != seen, timeout=quiet
        ):
            return last - since
        last = time.monotonic()
        count = pings_served(backend)
        assert last - since < limit, f"{backend.name} still receives Pings {limit:g}s on"


# -- (a) NOT_SERVING under load ---------------------------------------------------


def test_not_serving_backend_gets_no_new_calls_streams_finish_and_it_returns(
    backends: BackendFactory,
    record_property: pytest.RecordProperty,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="grpc_leastconn")
    fleet = backends(3)
    victim, others = fleet[0], fleet[1:]
    with grpc_leastconn.insecure_channel(ipv4_target(fleet)) as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        warm_up(stub, fleet)
        # Two per backend: least-connection spreads them exactly on an idle fleet.
        streams = open_streams(stub, 2 * len(fleet))
        assert victim.servicer.wait_until(lambda s: s.live_streams == 2, timeout=5.0)

        load = PingLoad(stub).start()
        try:
            before = pings_served(victim)
            assert victim.servicer.wait_until(
                lambda s: s.started_by_method.get("Ping", 0) > before + 5, timeout=5.0
            ), "the load never reached the victim"

            flipped = time.monotonic()
            flipped_wall = time.time()
            victim.set_serving(False)
            stopped_after = last_increase(victim, flipped, quiet=QUIET_S, limit=5.0)
            others_during_quiet = [pings_served(b) for b in others]
            assert victim.servicer.live_streams == 2, "streams on the victim were cut"

            # The others carried the load meanwhile.
            assert all(n > 0 for n in others_during_quiet)
            assert not load.errors, load.errors[:3]

            idle = pings_served(victim)
            restored = time.monotonic()
            restored_wall = time.time()
            victim.set_serving(True)
            assert victim.servicer.wait_until(
                lambda s: s.started_by_method.get("Ping", 0) > idle, timeout=RESUME_WITHIN_S
            ), f"no call reached {victim.name} within {RESUME_WITHIN_S:g}s of SERVING"
            resumed_after = time.monotonic() - restored
        finally:
            load.stop()

        for stream in streams:
            stream.join(STREAM_MS / 1000 + 10)
        assert [s.error for s in streams] == [None] * len(streams)
        expected_frames = STREAM_MS // FRAME_MS
        assert [len(s.frames) for s in streams] == [expected_frames] * len(streams)
        assert {s.frames[0].backend for s in streams} == {b.name for b in fleet}
        assert not load.errors, load.errors[:3]

    # The balancer logs each health change as it applies it.
    noticed = logged_at(caplog, f"backend {victim.address} of", "is NOT_SERVING") - flipped_wall
    renoticed = (
        logged_at(caplog, f"backend {victim.address} of", "is SERVING again") - restored_wall
    )
    record_property("not_serving_noticed_s", round(noticed, 4))
    record_property("not_serving_to_no_new_calls_s", round(stopped_after, 4))
    record_property("serving_noticed_s", round(renoticed, 4))
    record_property("serving_to_first_call_s", round(resumed_after, 4))
    print(
        f"\nhealth flip: NOT_SERVING applied {noticed * 1000:.1f} ms after the flip, last Ping"
        f" on it {stopped_after * 1000:.1f} ms after; SERVING applied {renoticed * 1000:.1f} ms"
        f" after, first Ping {resumed_after * 1000:.1f} ms after"
        f" ({load.calls} calls, {len(load.errors)} errors)"
    )
    assert stopped_after <= STOP_WITHIN_S


# -- (b) no health service -------------------------------------------------------


def test_backend_without_health_service_is_used_and_warned_about_once(
    backends: BackendFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="grpc_leastconn")
    (checked,) = backends(1)
    (unchecked,) = backends(1, health=False)

    def warnings_about(backend: Backend) -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.name == "grpc_leastconn"
            and r.levelno == logging.WARNING
            and r.getMessage().startswith(f"backend {backend.address} of")
        ]

    with grpc_leastconn.insecure_channel(ipv4_target([checked, unchecked])) as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        warm_up(stub, [checked, unchecked])
        wait_until(lambda: warnings_about(unchecked), timeout=5.0)
        for _ in range(20):
            ping(stub)
        assert pings_served(unchecked) >= 10
        assert pings_served(checked) >= 10

    records = warnings_about(unchecked)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert "no grpc.health.v1 service" in records[0].getMessage()
    assert not warnings_about(checked)


def test_health_is_watched_again_on_a_new_connection(
    backends: BackendFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # gRFC A17 starts a Watch on every new connection; UNIMPLEMENTED only
    # stops retries on the connection that answered it. A backend replaced
    # by one that has the health service (a rolling upgrade) must be
    # checked: here it comes back NOT_SERVING and must get no calls.
    caplog.set_level(logging.DEBUG, logger="grpc_leastconn")
    (steady,) = backends(1)
    (old,) = backends(1, health=False)
    port = old.port
    with grpc_leastconn.insecure_channel(ipv4_target([steady, old])) as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        warm_up(stub, [steady, old])
        old.stop(grace=None)
        new = _restart_on(backends, port)
        new.set_serving(False)
        # Connected a second time: from here on the new server's health decides.
        wait_until(lambda: _times_ready(caplog, old.address) >= 2, timeout=15.0)
        for _ in range(30):
            ping(stub)
        assert pings_served(new) == 0, "a NOT_SERVING backend got calls after a reconnect"
        new.set_serving(True)
        wait_until(lambda: ping(stub).backend == new.name, timeout=RESUME_WITHIN_S)


def _restart_on(backends: BackendFactory, port: int) -> Backend:
    for _ in range(20):
        try:
            (backend,) = backends(1, port=port)
        except example_server.BackendBindError:
            # The old listener's port is released asynchronously.
            time.sleep(0.05)
            continue
        return backend
    raise AssertionError(f"port {port} never came free")


def _times_ready(caplog: pytest.LogCaptureFixture, address: str) -> int:
    """How often the balancer saw this backend's backend channel become READY."""
    return sum(
        1
        for r in caplog.records
        if r.name == "grpc_leastconn"
        and r.getMessage().startswith(f"backend {address} of")
        and r.getMessage().endswith(" is READY")
    )


# -- (c) health checking off -------------------------------------------------------


def test_health_check_service_none_ignores_not_serving(backends: BackendFactory) -> None:
    fleet = backends(2)
    sick = fleet[0]
    sick.set_serving(False)
    with grpc_leastconn.insecure_channel(ipv4_target(fleet), health_check_service=None) as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        warm_up(stub, fleet)
        for _ in range(10):
            ping(stub)
    assert pings_served(sick) >= 5

    # The same fleet through a checking channel leaves it alone.
    served = pings_served(sick)
    with grpc_leastconn.insecure_channel(ipv4_target(fleet)) as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        for _ in range(10):
            assert ping(stub).backend == fleet[1].name
    assert pings_served(sick) == served


# -- (d) a named service -------------------------------------------------------------


def test_health_check_service_name_is_the_one_watched(backends: BackendFactory) -> None:
    fleet = backends(2)
    sick = fleet[0]
    assert sick.health is not None
    # Only the named service is down; the server as a whole ("") still serves.
    sick.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)

    with grpc_leastconn.insecure_channel(
        ipv4_target(fleet), health_check_service=SERVICE_NAME
    ) as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        for _ in range(10):
            assert ping(stub).backend == fleet[1].name
        sick.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        wait_until(lambda: ping(stub).backend == sick.name, timeout=RESUME_WITHIN_S)

    # The default ("") watches the whole server, which still serves.
    sick.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    with grpc_leastconn.insecure_channel(ipv4_target(fleet)) as channel:
        warm_up(conference_pb2_grpc.ConferenceStub(channel), fleet)


def test_unknown_health_service_name_makes_backends_ineligible(
    backends: BackendFactory,
) -> None:
    fleet = backends(2)
    target = ipv4_target(fleet)
    with grpc_leastconn.insecure_channel(target, health_check_service="no.Such") as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        error = wait_until(lambda: _unavailable(stub), timeout=5.0)
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    for backend in fleet:
        assert f"{backend.address} SERVICE_UNKNOWN" in error.details()
    assert all(pings_served(b) == 0 for b in fleet)


def _unavailable(stub: conference_pb2_grpc.ConferenceStub) -> grpc.RpcError | None:
    try:
        ping(stub)
    except grpc.RpcError as error:
        if error.code() is grpc.StatusCode.UNAVAILABLE:
            return error
        raise
    return None


# -- (e) every backend NOT_SERVING -------------------------------------------------


def test_all_not_serving_fails_fast_and_wait_for_ready_waits(
    backends: BackendFactory, record_property: pytest.RecordProperty
) -> None:
    fleet = backends(3)
    target = ipv4_target(fleet)
    with grpc_leastconn.insecure_channel(target) as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        warm_up(stub, fleet)

        flipped = time.monotonic()
        for backend in fleet:
            backend.set_serving(False)
        error = None
        for _ in range(10_000):
            started = time.monotonic()
            error = _unavailable(stub)
            took = time.monotonic() - started
            if error is not None or started - flipped > FAIL_FAST_WITHIN_S:
                break
        assert error is not None, "calls kept succeeding with every backend NOT_SERVING"
        failed_after = time.monotonic() - flipped
        assert failed_after <= FAIL_FAST_WITHIN_S
        assert took < FAIL_FAST_WITHIN_S, "the call waited instead of failing fast"
        details = error.details()
        assert repr(target) in details
        for backend in fleet:
            assert f"{backend.address} NOT_SERVING" in details

        outcome: queue.Queue[pb.PingReply | grpc.RpcError] = queue.Queue()

        def waiting_call() -> None:
            try:
                outcome.put(ping(stub, wait_for_ready=True, timeout=10.0))
            except grpc.RpcError as exc:
                outcome.put(exc)

        caller = threading.Thread(target=waiting_call, daemon=True)
        caller.start()
        # Still waiting a while later: it neither failed fast nor went anywhere.
        with pytest.raises(queue.Empty):
            outcome.get(timeout=0.3)
        fleet[1].set_serving(True)
        result = outcome.get(timeout=5.0)
        caller.join(5.0)
        assert isinstance(result, pb.PingReply), result
        assert result.backend == fleet[1].name

    record_property("all_not_serving_to_unavailable_s", round(failed_after, 4))


# -- (f) aggregate state -----------------------------------------------------------------


def test_subscribe_reports_transient_failure_then_ready(backends: BackendFactory) -> None:
    fleet = backends(2)
    states: queue.Queue[grpc.ChannelConnectivity] = queue.Queue()
    with grpc_leastconn.insecure_channel(ipv4_target(fleet)) as channel:
        channel.subscribe(states.put)
        try:
            _await_state(states, READY)
            for backend in fleet:
                backend.set_serving(False)
            _await_state(states, TRANSIENT_FAILURE)
            fleet[0].set_serving(True)
            _await_state(states, READY)
        finally:
            channel.unsubscribe(states.put)


def _await_state(
    states: queue.Queue[grpc.ChannelConnectivity], wanted: grpc.ChannelConnectivity
) -> None:
    seen = []
    deadline = time.monotonic() + 5.0
    for _ in range(100):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            state = states.get(timeout=remaining)
        except queue.Empty:
            break
        seen.append(state)
        if state is wanted:
            return
    raise AssertionError(f"never reported {wanted.name}; saw {[s.name for s in seen]}")
