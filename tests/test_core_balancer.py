"""Pure tests of the balancer, its Observer seam and the rules every RPC follows."""

from __future__ import annotations

import logging
import random

import grpc
import pytest
from seams import (
    Address,
    Backend,
    Balancer,
    Health,
    Observer,
    Seams,
    make_balancer,
    make_settings,
    may_repick,
    never_sent,
    no_backend,
)

TARGET = "dns:///svc.test:50051"
A1 = Address("10.0.0.1", 50051)
A2 = Address("10.0.0.2", 50051)
A3 = Address("2001:db8::1", 50051)
T0 = 500.0

Connectivity = grpc.ChannelConnectivity
READY = Connectivity.READY
IDLE = Connectivity.IDLE
CONNECTING = Connectivity.CONNECTING
TRANSIENT_FAILURE = Connectivity.TRANSIENT_FAILURE
SHUTDOWN = Connectivity.SHUTDOWN


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Recorder(Observer):
    """Every hook, recorded in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, object]] = []

    def on_pick(self, backend: Backend[object]) -> None:
        self.events.append(("pick", backend.key, backend.in_flight))

    def on_release(self, backend: Backend[object]) -> None:
        self.events.append(("release", backend.key, backend.in_flight))

    def on_connectivity(self, backend: Backend[object], state: grpc.ChannelConnectivity) -> None:
        self.events.append(("connectivity", backend.key, state))

    def on_health(self, backend: Backend[object], health: Health) -> None:
        self.events.append(("health", backend.key, health))


class ConnectivityOnly(Observer):
    def __init__(self) -> None:
        self.states: list[grpc.ChannelConnectivity] = []

    def on_connectivity(self, backend: Backend[object], state: grpc.ChannelConnectivity) -> None:
        self.states.append(state)


def balancer_with(
    *addresses: Address,
    health_checking: bool = True,
    drain_timeout: float | None = None,
    observer: Observer | None = None,
    clock: FakeClock | None = None,
) -> Balancer[object]:
    balancer: Balancer[object] = Balancer(
        TARGET,
        health_checking=health_checking,
        drain_timeout=drain_timeout,
        clock=clock if clock is not None else FakeClock(),
        observer=observer,
    )
    balancer.set_addresses(addresses)
    return balancer


def make_eligible(balancer: Balancer[object], *backends: Backend[object]) -> None:
    for backend in backends:
        balancer.set_connectivity(backend, READY)
        if backend.health is Health.PENDING:
            balancer.set_health(backend, Health.SERVING)
        assert backend.eligible


def ready(*addresses: Address) -> tuple[Balancer[object], list[Backend[object]]]:
    balancer = balancer_with(*addresses, health_checking=False)
    make_eligible(balancer, *balancer.backends)
    return balancer, balancer.backends


# -- new backends and eligibility ----------------------------------------------


@pytest.mark.parametrize(
    ("health_checking", "initial"), [(True, Health.PENDING), (False, Health.DISABLED)]
)
def test_new_addresses_start_idle_with_the_initial_health(
    health_checking: bool, initial: Health
) -> None:
    balancer: Balancer[object] = Balancer(TARGET, health_checking=health_checking)
    change = balancer.set_addresses([A1, A2, A1])
    assert [b.address for b in change.added] == [A1, A2]
    assert change.to_close == []
    assert balancer.backends == change.added
    for backend in change.added:
        assert backend.health is initial
        assert backend.connectivity is IDLE
        assert backend.in_flight == 0
        assert not backend.eligible
        assert not backend.removed
    assert balancer.set_addresses([A1, A2]).added == []
    assert balancer.pick() is None


def test_health_checked_by_the_backend_channel_lets_connectivity_decide() -> None:
    balancer: Balancer[object] = Balancer(TARGET, initial_health=Health.CHANNEL)
    (backend,) = balancer.set_addresses([A1]).added
    assert backend.health is Health.CHANNEL
    assert backend.starting and not backend.eligible
    balancer.set_connectivity(backend, READY)
    assert backend.eligible
    assert balancer.pick() is backend
    balancer.release(backend)
    # Not serving, as C-core's health checking reports it: out, not "starting".
    balancer.set_connectivity(backend, TRANSIENT_FAILURE)
    assert not backend.eligible and not balancer.starting
    assert backend.problem() == "TRANSIENT_FAILURE"
    balancer.check_invariants()


@pytest.mark.parametrize("connectivity", list(Connectivity), ids=lambda c: c.name)
@pytest.mark.parametrize("health", list(Health), ids=lambda h: h.value)
def test_eligible_needs_ready_and_a_health_that_may_serve(
    connectivity: grpc.ChannelConnectivity, health: Health
) -> None:
    balancer = balancer_with(A1)
    [backend] = balancer.backends
    balancer.set_connectivity(backend, connectivity)
    balancer.set_health(backend, health)
    expected = connectivity is READY and health in (
        Health.DISABLED,
        Health.SERVING,
        Health.UNIMPLEMENTED,
        Health.CHANNEL,
    )
    assert backend.eligible is expected
    assert balancer.has_eligible is expected
    assert balancer.states()[0].eligible is expected
    balancer.check_invariants()
    assert balancer.pick() is (backend if expected else None)
    balancer.check_invariants()


def test_eligibility_follows_each_change() -> None:
    balancer = balancer_with(A1)
    [backend] = balancer.backends
    balancer.set_connectivity(backend, READY)
    assert not backend.eligible  # health still PENDING
    balancer.set_health(backend, Health.SERVING)
    assert backend.eligible
    balancer.set_health(backend, Health.NOT_SERVING)
    assert not backend.eligible
    balancer.check_invariants()
    balancer.set_health(backend, Health.SERVING)
    balancer.set_connectivity(backend, TRANSIENT_FAILURE)
    assert not backend.eligible
    balancer.check_invariants()
    balancer.set_connectivity(backend, READY)
    assert backend.eligible
    balancer.check_invariants()


def test_set_connectivity_and_set_health_report_whether_anything_changed() -> None:
    balancer = balancer_with(A1, A2)
    first, second = balancer.backends
    assert balancer.set_connectivity(first, CONNECTING) is True
    assert balancer.set_connectivity(first, CONNECTING) is False
    assert balancer.set_connectivity(first, READY) is True
    assert balancer.set_health(first, Health.PENDING) is False
    assert balancer.set_health(first, Health.SERVING) is True
    assert balancer.set_health(first, Health.SERVING) is False
    assert balancer.set_health(first, Health.NOT_SERVING) is True
    # Removed with nothing in flight: closed, and its reports change nothing.
    change = balancer.set_addresses([A2])
    assert change.to_close == [first]
    assert first.removed
    assert balancer.set_connectivity(first, TRANSIENT_FAILURE) is False
    assert first.connectivity is READY
    assert balancer.set_health(first, Health.SERVING) is False
    assert first.health is Health.NOT_SERVING
    assert not first.eligible
    assert balancer.set_connectivity(second, READY) is True


def test_reports_about_a_draining_backend_change_nothing() -> None:
    balancer, (first, _) = ready(A1, A2)
    assert balancer.pick() is first
    balancer.set_addresses([A2])
    assert balancer.set_connectivity(first, TRANSIENT_FAILURE) is False
    assert balancer.set_health(first, Health.NOT_SERVING) is False
    assert first.connectivity is READY
    assert first.health is Health.DISABLED
    assert not first.eligible
    balancer.check_invariants()


def test_unimplemented_is_warned_about_once_per_backend(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="grpc_leastconn")
    balancer = balancer_with(A1)
    [backend] = balancer.backends
    balancer.set_connectivity(backend, READY)
    for _ in range(3):
        assert balancer.set_health(backend, Health.UNIMPLEMENTED)
        assert backend.eligible
        assert balancer.set_health(backend, Health.PENDING)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"backend 10.0.0.1:50051 of {TARGET!r} has no grpc.health.v1 service: treated as healthy"
    ]


# -- views ----------------------------------------------------------------------


def view(state: object) -> tuple[object, ...]:
    """A BackendState's fields that these tests are about."""
    fields = ("address", "in_flight", "connectivity", "health", "draining", "eligible")
    return tuple(getattr(state, name) for name in fields)


def test_states_list_the_current_backends_then_the_draining_ones() -> None:
    balancer = balancer_with(A1, A2, A3)
    first, second, third = balancer.backends
    make_eligible(balancer, first)
    balancer.set_connectivity(second, TRANSIENT_FAILURE)
    assert balancer.pick() is first
    assert balancer.pick() is first
    balancer.set_addresses([A2, A3])
    assert [view(state) for state in balancer.states()] == [
        ("10.0.0.2:50051", 0, TRANSIENT_FAILURE, Health.PENDING, False, False),
        ("[2001:db8::1]:50051", 0, IDLE, Health.PENDING, False, False),
        ("10.0.0.1:50051", 2, READY, Health.SERVING, True, False),
    ]
    make_eligible(balancer, third)
    _, current, draining = balancer.states()
    assert view(current) == ("[2001:db8::1]:50051", 0, READY, Health.SERVING, False, True)
    assert draining.draining and draining.in_flight == 2
    assert balancer.connection_table() == {
        "10.0.0.2:50051": 0,
        "[2001:db8::1]:50051": 0,
        "10.0.0.1:50051": 2,
    }


def test_a_new_balancer_is_in_transient_failure_until_it_has_addresses() -> None:
    balancer: Balancer[object] = Balancer(TARGET)
    assert balancer.states() == ()
    assert balancer.aggregate_state() is TRANSIENT_FAILURE
    assert balancer.unavailable_details() == f"no healthy backend for {TARGET!r} (0 known: )"


@pytest.mark.parametrize(
    ("situation", "expected"),
    [
        # Any eligible backend: READY, whatever the others are doing.
        ([(READY, Health.SERVING), (TRANSIENT_FAILURE, Health.PENDING)], READY),
        ([(READY, Health.UNIMPLEMENTED), (CONNECTING, Health.PENDING)], READY),
        # All idle (nothing asked them to connect yet).
        ([(IDLE, Health.PENDING), (IDLE, Health.PENDING)], IDLE),
        # Some on their way: connecting, or connected and awaiting their health.
        ([(CONNECTING, Health.PENDING), (TRANSIENT_FAILURE, Health.PENDING)], CONNECTING),
        ([(READY, Health.PENDING), (TRANSIENT_FAILURE, Health.PENDING)], CONNECTING),
        ([(IDLE, Health.PENDING), (TRANSIENT_FAILURE, Health.PENDING)], CONNECTING),
        # None can serve, none on its way.
        (
            [(TRANSIENT_FAILURE, Health.PENDING), (TRANSIENT_FAILURE, Health.PENDING)],
            TRANSIENT_FAILURE,
        ),
        ([(READY, Health.NOT_SERVING), (TRANSIENT_FAILURE, Health.PENDING)], TRANSIENT_FAILURE),
        ([(READY, Health.SERVICE_UNKNOWN), (SHUTDOWN, Health.PENDING)], TRANSIENT_FAILURE),
    ],
)
def test_aggregate_state(
    situation: list[tuple[grpc.ChannelConnectivity, Health]],
    expected: grpc.ChannelConnectivity,
) -> None:
    balancer = balancer_with(A1, A2)
    for backend, (connectivity, health) in zip(balancer.backends, situation, strict=True):
        balancer.set_connectivity(backend, connectivity)
        balancer.set_health(backend, health)
    assert balancer.aggregate_state() is expected
    balancer.close()
    assert balancer.aggregate_state() is SHUTDOWN


def test_draining_backends_do_not_make_the_channel_ready() -> None:
    balancer, (first, second) = ready(A1, A2)
    assert balancer.pick() is first
    balancer.set_addresses([A2])
    assert balancer.aggregate_state() is READY
    balancer.set_connectivity(second, TRANSIENT_FAILURE)
    assert balancer.aggregate_state() is TRANSIENT_FAILURE
    assert balancer.pick() is None


def test_unavailable_details_name_the_target_and_each_problem() -> None:
    balancer = balancer_with(A1, A2, A3)
    first, second, third = balancer.backends
    balancer.set_connectivity(first, TRANSIENT_FAILURE)
    balancer.set_connectivity(second, READY)
    balancer.set_health(second, Health.NOT_SERVING)
    balancer.set_connectivity(third, CONNECTING)
    assert balancer.unavailable_details() == (
        f"no healthy backend for {TARGET!r} (3 known: 10.0.0.1:50051 TRANSIENT_FAILURE, "
        "10.0.0.2:50051 NOT_SERVING, [2001:db8::1]:50051 CONNECTING)"
    )
    balancer.set_connectivity(third, READY)
    assert "[2001:db8::1]:50051 PENDING" in balancer.unavailable_details()


# -- picks ------------------------------------------------------------------------


def test_pick_excluding_skips_the_excluded_and_puts_them_back() -> None:
    balancer, (first, second, third) = ready(A1, A2, A3)
    picked = balancer.pick_excluding([first])
    assert picked is second
    picked = balancer.pick_excluding([first, third])
    assert picked is second
    assert [b.in_flight for b in (first, second, third)] == [0, 2, 0]
    assert first.in_picker and third.in_picker
    balancer.check_invariants()
    assert balancer.pick_excluding([first, second, third]) is None
    balancer.check_invariants()
    assert {id(balancer.pick()), id(balancer.pick())} == {id(first), id(third)}
    balancer.check_invariants()


def test_pick_excluding_an_ineligible_backend_leaves_it_out() -> None:
    balancer, (first, second) = ready(A1, A2)
    balancer.set_connectivity(first, TRANSIENT_FAILURE)
    assert balancer.pick_excluding([first]) is second
    assert not first.in_picker
    balancer.check_invariants()
    assert balancer.pick_excluding([second]) is None
    balancer.check_invariants()


def test_release_of_more_than_was_picked_is_refused() -> None:
    balancer, (first, _) = ready(A1, A2)
    assert balancer.pick() is first
    assert balancer.release(first) is False
    with pytest.raises(RuntimeError, match="released more RPCs than were picked"):
        balancer.release(first)
    assert first.in_flight == 0
    balancer.check_invariants()


def test_address_back_while_draining_gets_a_fresh_backend() -> None:
    balancer, (old, _) = ready(A1, A2)
    assert balancer.pick() is old
    assert balancer.set_addresses([A2]).to_close == []
    change = balancer.set_addresses([A1, A2])
    [fresh] = change.added
    assert fresh is not old
    assert fresh.address == A1
    assert (fresh.in_flight, fresh.connectivity, fresh.health) == (0, IDLE, Health.DISABLED)
    assert old.removed and not fresh.removed
    assert balancer.backend("10.0.0.1:50051") is fresh
    assert [(s.address, s.draining) for s in balancer.states()] == [
        ("10.0.0.2:50051", False),
        ("10.0.0.1:50051", False),
        ("10.0.0.1:50051", True),
    ]
    assert balancer.connection_table()["10.0.0.1:50051"] == 1
    # The old one still closes once its last RPC ends.
    assert balancer.release(old) is True
    assert [(s.address, s.draining) for s in balancer.states()] == [
        ("10.0.0.2:50051", False),
        ("10.0.0.1:50051", False),
    ]
    balancer.check_invariants()


def test_drain_deadline_comes_from_the_injected_clock() -> None:
    clock = FakeClock()
    balancer = balancer_with(A1, A2, health_checking=False, drain_timeout=60.0, clock=clock)
    make_eligible(balancer, *balancer.backends)
    first = balancer.pick()
    assert first is not None
    clock.now = T0 + 5.0
    balancer.set_addresses([A2])
    assert balancer.next_drain_deadline() == T0 + 65.0
    clock.now = T0 + 64.0
    assert balancer.expired_drains() == []
    clock.now = T0 + 65.0
    assert balancer.expired_drains() == [first]
    assert balancer.expired_drains() == []


def test_close_returns_every_backend_draining_included() -> None:
    balancer, (first, second, third) = ready(A1, A2, A3)
    assert balancer.pick() is first
    balancer.set_addresses([A2, A3])
    closed = balancer.close()
    assert closed == [second, third, first]
    assert all(backend.removed for backend in closed)
    assert balancer.closed
    assert balancer.aggregate_state() is SHUTDOWN
    assert balancer.states() == ()
    assert balancer.pick() is None
    assert balancer.set_connectivity(second, TRANSIENT_FAILURE) is False
    assert balancer.next_drain_deadline() is None


# -- the Observer seam -------------------------------------------------------------


def test_observer_sees_picks_releases_connectivity_and_health() -> None:
    recorder = Recorder()
    balancer = balancer_with(A1, observer=recorder)
    [backend] = balancer.backends
    balancer.set_connectivity(backend, READY)
    balancer.set_connectivity(backend, READY)  # no change: not reported
    balancer.set_health(backend, Health.SERVING)
    assert balancer.pick() is backend
    assert balancer.pick_excluding([]) is backend
    assert balancer.pick_excluding([backend]) is None  # nothing picked: nothing seen
    balancer.release(backend)
    balancer.release(backend)
    key = "10.0.0.1:50051"
    assert recorder.events == [
        ("connectivity", key, READY),
        ("health", key, Health.SERVING),
        ("pick", key, 1),
        ("pick", key, 2),
        # on_release runs before the count goes down.
        ("release", key, 2),
        ("release", key, 1),
    ]


def test_watches_tells_which_hooks_a_subclass_overrides() -> None:
    plain = Observer()
    for hook in ("on_attach", "on_pick", "on_release", "on_connectivity", "on_health"):
        assert plain.watches(hook) is False
        assert Recorder().watches(hook) is (hook != "on_attach")
    partial = ConnectivityOnly()
    assert partial.watches("on_connectivity") is True
    assert partial.watches("on_pick") is False
    assert partial.watches("on_release") is False


def test_an_observer_of_connectivity_only_still_sees_it_and_picks_work() -> None:
    observer = ConnectivityOnly()
    balancer = balancer_with(A1, health_checking=False, observer=observer)
    [backend] = balancer.backends
    balancer.set_connectivity(backend, CONNECTING)
    balancer.set_connectivity(backend, READY)
    assert observer.states == [CONNECTING, READY]
    assert balancer.pick() is backend
    assert balancer.release(backend) is False
    assert backend.in_flight == 0
    balancer.check_invariants()


# -- rules ---------------------------------------------------------------------------


def test_make_balancer_takes_settings_and_seams() -> None:
    clock = FakeClock()
    recorder = Recorder()
    settings = make_settings(
        "insecure_channel",
        TARGET,
        None,
        None,
        None,
        {"health_check_service": None, "drain_timeout": 7.0, "rng": random.Random(1)},
    )
    balancer: Balancer[object] = make_balancer(settings, Seams(clock=clock, observer=recorder))
    assert balancer.target == TARGET
    assert balancer.clock is clock
    balancer.set_addresses([A1, A2])
    [first, _] = balancer.backends
    assert first.health is Health.DISABLED
    balancer.set_connectivity(first, READY)
    assert balancer.pick() is first
    balancer.set_addresses([A2])
    assert balancer.next_drain_deadline() == T0 + 7.0
    assert ("pick", "10.0.0.1:50051", 1) in recorder.events
    checking = make_balancer(make_settings("f", TARGET, None, None, None, {}), Seams())
    checking.set_addresses([A1])
    assert checking.backends[0].health is Health.PENDING


def test_no_backend_fails_fast_when_nothing_is_starting() -> None:
    balancer = balancer_with(A1, A2)
    for backend in balancer.backends:
        balancer.set_connectivity(backend, TRANSIENT_FAILURE)
    for wait_for_ready in (None, False):
        assert no_backend(balancer, wait_for_ready, None) == (
            grpc.StatusCode.UNAVAILABLE,
            balancer.unavailable_details(),
        )
        assert no_backend(balancer, wait_for_ready, 5.0) == (
            grpc.StatusCode.UNAVAILABLE,
            balancer.unavailable_details(),
        )
    # wait_for_ready waits for one until the deadline.
    assert no_backend(balancer, True, None) is None
    assert no_backend(balancer, True, 5.0) is None


@pytest.mark.parametrize("starting", [CONNECTING, IDLE])
def test_no_backend_waits_while_a_backend_is_starting(
    starting: grpc.ChannelConnectivity,
) -> None:
    balancer = balancer_with(A1, A2)
    first, second = balancer.backends
    balancer.set_connectivity(first, TRANSIENT_FAILURE)
    balancer.set_connectivity(second, starting)
    assert balancer.starting
    for wait_for_ready in (None, False, True):
        assert no_backend(balancer, wait_for_ready, None) is None
        assert no_backend(balancer, wait_for_ready, 0.25) is None


def test_no_backend_waits_for_a_first_health_report() -> None:
    balancer = balancer_with(A1)
    [backend] = balancer.backends
    balancer.set_connectivity(backend, READY)
    assert no_backend(balancer, False, None) is None
    balancer.set_health(backend, Health.NOT_SERVING)
    code_and_details = no_backend(balancer, False, None)
    assert code_and_details is not None
    assert code_and_details[0] is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("remaining", [0.0, -0.5])
@pytest.mark.parametrize("wait_for_ready", [None, False, True])
def test_no_backend_ends_with_deadline_exceeded_once_no_time_is_left(
    remaining: float, wait_for_ready: bool | None
) -> None:
    balancer = balancer_with(A1)
    [backend] = balancer.backends
    balancer.set_connectivity(backend, CONNECTING)
    outcome = no_backend(balancer, wait_for_ready, remaining)
    assert outcome is not None
    code, details = outcome
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert details == (
        "deadline exceeded while waiting for a backend: " + balancer.unavailable_details()
    )
    assert "10.0.0.1:50051 CONNECTING" in details


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


PICK_FAILURE = FakeRpcError(
    grpc.StatusCode.UNAVAILABLE,
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.1:50051: "
    "Connection refused",
)
AFTER_SEND = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "Socket closed")


def test_never_sent() -> None:
    assert never_sent(PICK_FAILURE, A1) is True
    assert never_sent(PICK_FAILURE, A2) is False
    assert never_sent(AFTER_SEND, A1) is False
    assert never_sent(FakeRpcError(grpc.StatusCode.INTERNAL, PICK_FAILURE.details()), A1) is False
    # An RpcError that is no call (no code(), no details()) says nothing.
    assert never_sent(grpc.RpcError(), A1) is False


def test_may_repick_only_what_was_never_sent_and_a_bounded_number_of_times() -> None:
    _, (first, second) = ready(A1, A2)
    assert may_repick(PICK_FAILURE, 0, first) is True
    assert may_repick(PICK_FAILURE, 2, first) is True
    assert may_repick(PICK_FAILURE, 3, first) is False
    assert may_repick(PICK_FAILURE, 0, second) is False
    assert may_repick(AFTER_SEND, 0, first) is False
