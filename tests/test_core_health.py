"""Pure tests of the health-watch policy (gRFC A17) and the Health enum."""

from __future__ import annotations

import random

import grpc
import pytest
from grpc_health.v1 import health_pb2
from seams import Backoff, Health, WatchEnd, WatchPolicy

SEED = 11
# Every way a Watch can end other than UNIMPLEMENTED, OK (the server closed it) included.
RETRIED_CODES = [code for code in grpc.StatusCode if code is not grpc.StatusCode.UNIMPLEMENTED]


def policy(seed: int = SEED, service: str = "") -> WatchPolicy:
    return WatchPolicy(service, Backoff(rng=random.Random(seed)))


def response(status: int) -> object:
    return health_pb2.HealthCheckResponse(status=status)


def bounds(attempt: int) -> tuple[float, float]:
    """gRPC connection backoff: 1 s x 1.6 per attempt, capped at 30 s, then ±20 %."""
    base = min(1.0 * 1.6**attempt, 30.0)
    return base * 0.8, base * 1.2


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (health_pb2.HealthCheckResponse.SERVING, Health.SERVING),
        (health_pb2.HealthCheckResponse.NOT_SERVING, Health.NOT_SERVING),
        (health_pb2.HealthCheckResponse.SERVICE_UNKNOWN, Health.SERVICE_UNKNOWN),
        (health_pb2.HealthCheckResponse.UNKNOWN, Health.UNKNOWN),
    ],
)
def test_each_status_maps_to_its_health(status: int, expected: Health) -> None:
    assert policy().answered(response(status)) is expected


def test_every_status_of_the_proto_is_mapped() -> None:
    statuses = health_pb2.HealthCheckResponse.ServingStatus.values()
    answers = {policy().answered(response(status)) for status in statuses}
    assert answers == {Health.SERVING, Health.NOT_SERVING, Health.SERVICE_UNKNOWN, Health.UNKNOWN}


@pytest.mark.parametrize("status", [4, 99, 12345])
def test_unknown_status_values_are_unknown(status: int) -> None:
    assert status not in health_pb2.HealthCheckResponse.ServingStatus.values()
    assert policy().answered(response(status)) is Health.UNKNOWN


def test_request_names_the_service() -> None:
    assert policy(service="conference.Conference").request.service == "conference.Conference"
    assert policy(service="").request.service == ""


def test_unimplemented_means_healthy_until_the_next_connection() -> None:
    assert policy().ended(grpc.StatusCode.UNIMPLEMENTED) == WatchEnd(Health.UNIMPLEMENTED, None)


@pytest.mark.parametrize("code", RETRIED_CODES, ids=lambda code: code.name)
def test_any_other_end_is_pending_and_retried_after_the_first_backoff(
    code: grpc.StatusCode,
) -> None:
    end = policy().ended(code)
    assert end.report is Health.PENDING
    assert end.retry_after is not None
    low, high = bounds(0)
    assert low <= end.retry_after <= high


def test_successive_ends_follow_the_backoff_up_to_its_ceiling() -> None:
    watch = policy()
    delays = []
    for attempt in range(20):
        end = watch.ended(RETRIED_CODES[attempt % len(RETRIED_CODES)])
        assert end.report is Health.PENDING
        assert end.retry_after is not None
        low, high = bounds(attempt)
        assert low <= end.retry_after <= high, (attempt, end.retry_after)
        delays.append(end.retry_after)
    # 1.6**8 > 30: the ceiling, give or take jitter.
    assert all(24.0 <= delay <= 36.0 for delay in delays[8:])
    # Jittered, and by the given rng.
    assert len(set(delays[8:])) > 1
    reference = Backoff(rng=random.Random(SEED))
    assert delays == [reference.delay(attempt) for attempt in range(20)]


def test_jitter_follows_the_seed() -> None:
    def delays(seed: int) -> list[float | None]:
        watch = policy(seed)
        return [watch.ended(grpc.StatusCode.UNAVAILABLE).retry_after for _ in range(5)]

    assert delays(3) == delays(3)
    assert delays(3) != delays(4)


def test_an_answer_resets_the_backoff() -> None:
    watch = policy()
    for _ in range(6):
        watch.ended(grpc.StatusCode.UNAVAILABLE)
    end = watch.ended(grpc.StatusCode.UNAVAILABLE)
    assert end.retry_after is not None
    assert end.retry_after >= bounds(6)[0]
    assert watch.answered(response(health_pb2.HealthCheckResponse.SERVING)) is Health.SERVING
    end = watch.ended(grpc.StatusCode.OK)
    assert end.report is Health.PENDING
    assert end.retry_after is not None
    low, high = bounds(0)
    assert low <= end.retry_after <= high
    end = watch.ended(grpc.StatusCode.OK)
    assert end.retry_after is not None
    low, high = bounds(1)
    assert low <= end.retry_after <= high


def test_any_answer_resets_the_backoff_even_not_serving() -> None:
    watch = policy()
    for _ in range(6):
        watch.ended(grpc.StatusCode.CANCELLED)
    assert watch.answered(response(health_pb2.HealthCheckResponse.NOT_SERVING)) is (
        Health.NOT_SERVING
    )
    end = watch.ended(grpc.StatusCode.CANCELLED)
    assert end.retry_after is not None
    assert end.retry_after <= bounds(0)[1]


def test_reconnected_is_pending_with_a_fresh_backoff() -> None:
    watch = policy()
    first = watch.ended(grpc.StatusCode.UNAVAILABLE).retry_after
    for _ in range(5):
        watch.ended(grpc.StatusCode.UNAVAILABLE)
    assert watch.reconnected() is Health.PENDING
    # A new connection starts over, as after an answer.
    again = watch.ended(grpc.StatusCode.UNAVAILABLE).retry_after
    assert first is not None and again is not None
    assert 0.8 <= first <= 1.2 and 0.8 <= again <= 1.2


# -- the Health enum ------------------------------------------------------------

MAY_SERVE = {
    Health.DISABLED: True,
    Health.PENDING: False,
    Health.SERVING: True,
    Health.NOT_SERVING: False,
    Health.SERVICE_UNKNOWN: False,
    Health.UNKNOWN: False,
    Health.UNIMPLEMENTED: True,
    # The backend channel checks: its connectivity (READY) decides.
    Health.CHANNEL: True,
}


def test_may_serve_covers_every_member() -> None:
    assert set(MAY_SERVE) == set(Health)


@pytest.mark.parametrize("health", list(Health), ids=lambda health: health.value)
def test_may_serve(health: Health) -> None:
    assert health.may_serve is MAY_SERVE[health]


def test_health_is_a_str_enum() -> None:
    assert Health.SERVING == "SERVING"
    assert [member for member in Health if member == "SERVING"] == [Health.SERVING]
    assert isinstance(Health.UNKNOWN, str)
    assert str(Health.UNIMPLEMENTED) == "UNIMPLEMENTED"
    assert f"{Health.PENDING}" == "PENDING"
    assert Health("SERVICE_UNKNOWN") is Health.SERVICE_UNKNOWN
    assert all(member.value == member.name for member in Health)
