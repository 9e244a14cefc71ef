"""Pure tests of server-reported load: other clients' calls, and when reports expire."""

from __future__ import annotations

import logging

import grpc
import pytest
from seams import Address, Backend, Balancer

READY = grpc.ChannelConnectivity.READY
A1 = Address("10.0.0.1", 50051)
A2 = Address("10.0.0.2", 50051)
T0 = 1000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def reporting() -> tuple[Balancer[object], list[Backend[object]], FakeClock]:
    clock = FakeClock()
    balancer: Balancer[object] = Balancer(
        "t", health_checking=False, clock=clock, server_load=True, two_choices=False
    )
    backends = balancer.set_addresses((A1, A2)).added
    for backend in backends:
        balancer.set_connectivity(backend, READY)
    return balancer, backends, clock


def others(balancer: Balancer[object]) -> dict[str, int]:
    return {state.address: state.reported_others for state in balancer.states()}


def test_a_report_counts_other_clients_calls_beside_ours() -> None:
    balancer, [busy, idle], _ = reporting()
    for _ in range(2):
        assert balancer.pick_excluding([idle]) is busy
    balancer.report_load(busy, 5)  # ours (2) are in it
    assert others(balancer) == {str(A1): 3, str(A2): 0}
    # 2 + 3 on one, 0 on the other: the next three go to the idle one.
    assert [balancer.pick() for _ in range(3)] == [idle] * 3
    balancer.check_invariants()


def test_a_report_expires_after_five_seconds_without_another(
    caplog: pytest.LogCaptureFixture,
) -> None:
    balancer, [busy, _], clock = reporting()
    balancer.report_load(busy, 4)
    clock.now = T0 + 4.9
    assert others(balancer)[str(A1)] == 4
    caplog.set_level(logging.INFO, logger="grpc_leastconn")
    clock.now = T0 + 5.0
    assert others(balancer)[str(A1)] == 0
    assert "no load report for 5.0 s, judged by local counts" in caplog.text
    clock.now = T0 + 6.0
    balancer.report_load(busy, 2)
    assert others(balancer)[str(A1)] == 2
    assert "reports its load again" in caplog.text
    balancer.check_invariants()


def test_a_backend_that_reports_seldom_keeps_its_report_for_three_of_its_gaps() -> None:
    # grpc-go's ORCA service reports every 30 s at the most often.
    balancer, [busy, _], clock = reporting()
    balancer.report_load(busy, 6)
    clock.now = T0 + 30
    balancer.report_load(busy, 7)
    clock.now = T0 + 30 + 89.9
    assert others(balancer)[str(A1)] == 7
    clock.now = T0 + 30 + 90
    assert others(balancer)[str(A1)] == 0
    balancer.check_invariants()


def test_frequent_reports_expire_after_five_seconds_not_three_gaps() -> None:
    balancer, [busy, _], clock = reporting()
    for step in range(10):
        clock.now = T0 + step * 0.2
        balancer.report_load(busy, 3)
    last = clock.now
    clock.now = last + 4.9
    assert others(balancer)[str(A1)] == 3
    clock.now = last + 5.0
    assert others(balancer)[str(A1)] == 0


def test_a_removed_backend_forgets_its_report() -> None:
    balancer, [busy, idle], clock = reporting()
    balancer.report_load(busy, 9)
    balancer.set_addresses((A2,))
    balancer.report_load(busy, 9)  # a late report of a removed backend: ignored
    assert others(balancer) == {str(A2): 0}
    clock.now = T0 + 100
    assert balancer.pick() is idle
    balancer.check_invariants()
