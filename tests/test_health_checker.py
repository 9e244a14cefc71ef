"""health_checker="grpc": C-core's client-side health checking in each backend channel.

With it, no Watch stream of ours runs: each backend channel's service config
carries ``healthCheckConfig`` and its connectivity is READY only while the
backend serves. Both front ends are held to the same promises here, against
real in-process backends: a NOT_SERVING backend leaves the eligible set and
returns, calls avoid it meanwhile, a server without the health service is
used, and (sync) the threads the channel adds stay within one per backend.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import conference_pb2 as pb
import conference_pb2_grpc
import grpc
import pytest
from aio_support import eventually, run
from grpc_health.v1 import health_pb2
from helpers import BackendFactory, all_eligible, state_of, wait_until
from many_ports import ManyPorts, client_threads
from seams import HEALTH_WATCH, Address, Foundation, Seams, channel_options, make_settings
from seams import Backend as CoreBackend
from server import SERVICE_NAME, Backend

import grpc_leastconn
import grpc_leastconn.aio
from grpc_leastconn import Health

RPC_TIMEOUT = 5.0
# The promises under test: as with the Watch (test_health.py).
LEAVES_WITHIN_S = 1.0
RETURNS_WITHIN_S = 1.0
READY = grpc.ChannelConnectivity.READY
TRANSIENT_FAILURE = grpc.ChannelConnectivity.TRANSIENT_FAILURE
# Threads of a sync channel with health_checker="grpc", beyond one per backend
# (grpcio's connectivity poller): delivery threads of grpcio's, ours.
THREADS_BEYOND_ONE_PER_BACKEND = 4
N_THREADS = 20


def ipv4_target(backends: list[Backend]) -> str:
    return "ipv4:" + ",".join(b.address for b in backends)


def ping(stub: conference_pb2_grpc.ConferenceStub) -> pb.PingReply:
    return stub.Ping(pb.PingRequest(payload="checker"), timeout=RPC_TIMEOUT)


# -- validation, both factories ---------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (1, TypeError),
        (None, TypeError),
        (b"grpc", TypeError),
        ("c-core", ValueError),
        ("", ValueError),
    ],
)
@pytest.mark.parametrize("front", ["sync", "aio"])
def test_bad_health_checker_fails_at_construction_naming_the_keyword(
    value: Any, error: type[Exception], front: str
) -> None:
    if front == "sync":
        with pytest.raises(error, match="health_checker"):
            grpc_leastconn.insecure_channel("127.0.0.1:1", health_checker=value)
        return

    async def body() -> None:
        with pytest.raises(error, match="health_checker"):
            grpc_leastconn.aio.insecure_channel("127.0.0.1:1", health_checker=value)

    run(body)


def test_health_checker_value_error_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="'watch', 'grpc'; got 'c-core'"):
        grpc_leastconn.insecure_channel("127.0.0.1:1", health_checker="c-core")


# -- what each backend channel is built with (the policy, once in _core) ---------------


def _settings(**tuning: Any) -> Any:
    return make_settings("insecure_channel", "127.0.0.1:1", None, None, None, tuning)


def _service_config(options: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    (config,) = [value for name, value in options if name == "grpc.service_config"]
    parsed: dict[str, Any] = json.loads(config)
    return parsed


ADDRESS = Address("127.0.0.1", 1)


def test_grpc_checker_puts_health_check_config_in_the_backend_service_config() -> None:
    settings = _settings(health_checker="grpc", health_check_service=SERVICE_NAME)
    assert settings.channel_health_service == SERVICE_NAME
    assert not settings.watches_health
    assert settings.initial_health is Health.CHANNEL
    config = _service_config(channel_options((), ADDRESS, settings.channel_health_service))
    assert config == {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": SERVICE_NAME},
    }


def test_grpc_checker_merges_with_the_users_service_config() -> None:
    user = json.dumps({"methodConfig": [{"name": [{}], "timeout": "2s"}]})
    config = _service_config(channel_options([("grpc.service_config", user)], ADDRESS, ""))
    assert config["methodConfig"] == [{"name": [{}], "timeout": "2s"}]
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": ""}
    # A healthCheckConfig of the user's own is theirs.
    own = json.dumps({"healthCheckConfig": {"serviceName": "their.Service"}})
    config = _service_config(channel_options([("grpc.service_config", own)], ADDRESS, ""))
    assert config["healthCheckConfig"] == {"serviceName": "their.Service"}


@pytest.mark.parametrize(
    ("tuning", "health_config", "initial"),
    [
        ({}, None, Health.PENDING),
        ({"health_checker": "watch"}, None, Health.PENDING),
        ({"health_checker": "grpc"}, {"serviceName": ""}, Health.CHANNEL),
        # With health checking off there is nothing for a checker to check.
        ({"health_checker": "grpc", "health_check_service": None}, None, Health.DISABLED),
        ({"health_checker": "watch", "health_check_service": None}, None, Health.DISABLED),
    ],
)
def test_watches_and_service_config_follow_the_checker(
    tuning: dict[str, Any], health_config: dict[str, str] | None, initial: Health
) -> None:
    foundation: Foundation[Any] = Foundation(_settings(**tuning), Seams())
    backend: CoreBackend[Any] = CoreBackend(ADDRESS, foundation.settings.initial_health)
    assert backend.health is initial
    config = _service_config(foundation._spec(backend).options)
    assert config.get("healthCheckConfig") == health_config
    methods = [w.method for w in foundation._watches(backend)]
    expected = [HEALTH_WATCH] if initial is Health.PENDING else []
    assert methods == expected


def test_grpc_checker_with_server_load_keeps_only_the_load_report_stream() -> None:
    pytest.importorskip("xds.service.orca.v3.orca_pb2")
    foundation: Foundation[Any] = Foundation(
        _settings(health_checker="grpc", server_load=True), Seams()
    )
    backend: CoreBackend[Any] = CoreBackend(ADDRESS, Health.CHANNEL)
    assert [w.kind for w in foundation._watches(backend)] == ["load reports"]


# -- sync: NOT_SERVING and back, calls avoid it, UNIMPLEMENTED serves ---------------------


def test_sync_not_serving_backend_leaves_and_returns(backends: BackendFactory) -> None:
    fleet = backends(3)
    victim = fleet[0]
    with grpc_leastconn.insecure_channel(ipv4_target(fleet), health_checker="grpc") as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        wait_until(lambda: all_eligible(channel), timeout=5.0)
        assert {s.health for s in channel.backends()} == {Health.CHANNEL}

        flipped = time.monotonic()
        victim.set_serving(False)
        wait_until(lambda: not state_of(channel, victim.address).eligible, LEAVES_WITHIN_S)
        left_after = time.monotonic() - flipped
        state = state_of(channel, victim.address)
        assert (state.connectivity, state.health) == (TRANSIENT_FAILURE, Health.CHANNEL)
        served = victim.servicer.started_by_method.get("Ping", 0)
        replies = [ping(stub).backend for _ in range(30)]
        assert victim.name not in replies
        assert victim.servicer.started_by_method.get("Ping", 0) == served

        restored = time.monotonic()
        victim.set_serving(True)
        wait_until(lambda: state_of(channel, victim.address).eligible, RETURNS_WITHIN_S)
        back_after = time.monotonic() - restored
        wait_until(lambda: ping(stub).backend == victim.name, timeout=RETURNS_WITHIN_S)
    print(f"\ngrpc checker (sync): out {left_after * 1e3:.1f} ms, back {back_after * 1e3:.1f} ms")


def test_sync_server_without_health_service_is_serving(backends: BackendFactory) -> None:
    (checked,) = backends(1)
    (unchecked,) = backends(1, health=False)
    fleet = [checked, unchecked]
    with grpc_leastconn.insecure_channel(ipv4_target(fleet), health_checker="grpc") as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        wait_until(lambda: all_eligible(channel), timeout=5.0)
        assert state_of(channel, unchecked.address).health is Health.CHANNEL
        wait_until(lambda: {ping(stub).backend for _ in range(4)} == {b.name for b in fleet})


def test_sync_named_service_is_the_one_checked(backends: BackendFactory) -> None:
    fleet = backends(2)
    sick = fleet[0]
    assert sick.health is not None
    # Only the named service is down; the server as a whole ("") still serves.
    sick.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    with grpc_leastconn.insecure_channel(
        ipv4_target(fleet), health_checker="grpc", health_check_service=SERVICE_NAME
    ) as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        wait_until(lambda: state_of(channel, fleet[1].address).eligible, timeout=5.0)
        assert not state_of(channel, sick.address).eligible
        assert {ping(stub).backend for _ in range(10)} == {fleet[1].name}
        sick.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        wait_until(lambda: ping(stub).backend == sick.name, timeout=RETURNS_WITHIN_S)


def test_sync_every_backend_not_serving_fails_fast_naming_the_state(
    backends: BackendFactory,
) -> None:
    fleet = backends(2)
    target = ipv4_target(fleet)
    with grpc_leastconn.insecure_channel(target, health_checker="grpc") as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        wait_until(lambda: all_eligible(channel), timeout=5.0)
        for backend in fleet:
            backend.set_serving(False)
        wait_until(lambda: not any(s.eligible for s in channel.backends()), LEAVES_WITHIN_S)
        with pytest.raises(grpc.RpcError) as raised:
            ping(stub)
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
        for backend in fleet:
            assert f"{backend.address} TRANSIENT_FAILURE" in raised.value.details()


# -- sync: threads ----------------------------------------------------------------------


def _settled_count(settle_s: float = 5.0) -> int:
    """The client's Python threads once their number has stopped changing.

    grpcio delivers each connectivity change on a short-lived thread of its
    own; the count is taken when two looks 0.1 s apart agree.
    """
    deadline = time.monotonic() + settle_s
    last = len(client_threads())
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = len(client_threads())
        if now == last:
            return now
        last = now
    return last


@pytest.mark.parametrize("checker", ["grpc", "watch"])
def test_sync_threads_per_backend(checker: str, record_property: pytest.RecordProperty) -> None:
    server = ManyPorts(N_THREADS)
    try:
        before = _settled_count()
        channel = grpc_leastconn.insecure_channel(server.target, health_checker=checker)
        try:
            wait_until(lambda: all_eligible(channel), timeout=15.0)
            added = _settled_count() - before
        finally:
            channel.close()
        wait_until(lambda: len(client_threads()) <= before, timeout=5.0)
    finally:
        server.stop()
    record_property(f"threads_added_{checker}", added)
    print(f"\n{checker}: {added} threads for {N_THREADS} backends")
    if checker == "grpc":
        # grpcio's connectivity poller per backend channel, nothing of ours.
        assert added <= N_THREADS + THREADS_BEYOND_ONE_PER_BACKEND
    else:
        # The Watch: our reader and grpcio's stream thread per backend besides.
        assert added >= 2 * N_THREADS


# -- asyncio: the same promises ----------------------------------------------------------


def test_aio_not_serving_backend_leaves_and_returns(backends: BackendFactory) -> None:
    fleet = backends(3)
    victim = fleet[0]

    async def body() -> None:
        async with grpc_leastconn.aio.insecure_channel(
            ipv4_target(fleet), health_checker="grpc"
        ) as channel:
            stub = conference_pb2_grpc.ConferenceStub(channel)
            await eventually(lambda: all_eligible(channel), message="all eligible")
            assert {s.health for s in channel.backends()} == {Health.CHANNEL}
            tasks = {t.get_name() for t in asyncio.all_tasks()}
            assert not any(name.startswith("grpc_leastconn health") for name in tasks), tasks

            await asyncio.to_thread(victim.set_serving, False)
            await eventually(
                lambda: not state_of(channel, victim.address).eligible, LEAVES_WITHIN_S
            )
            state = state_of(channel, victim.address)
            assert (state.connectivity, state.health) == (TRANSIENT_FAILURE, Health.CHANNEL)
            request = pb.PingRequest(payload="checker")
            replies = [(await stub.Ping(request, timeout=RPC_TIMEOUT)).backend for _ in range(30)]
            assert victim.name not in replies

            await asyncio.to_thread(victim.set_serving, True)
            await eventually(lambda: state_of(channel, victim.address).eligible, RETURNS_WITHIN_S)

            async def reached() -> bool:
                return (await stub.Ping(request, timeout=RPC_TIMEOUT)).backend == victim.name

            for _ in range(100):
                if await reached():
                    break
            else:
                raise AssertionError(f"no call reached {victim.name} once it served again")

    run(body)


def test_aio_server_without_health_service_is_serving(backends: BackendFactory) -> None:
    (checked,) = backends(1)
    (unchecked,) = backends(1, health=False)
    fleet = [checked, unchecked]

    async def body() -> None:
        async with grpc_leastconn.aio.insecure_channel(
            ipv4_target(fleet), health_checker="grpc", tie_break="round_robin"
        ) as channel:
            stub = conference_pb2_grpc.ConferenceStub(channel)
            await eventually(lambda: all_eligible(channel), message="all eligible")
            assert state_of(channel, unchecked.address).health is Health.CHANNEL
            request = pb.PingRequest(payload="checker")
            seen = {(await stub.Ping(request, timeout=RPC_TIMEOUT)).backend for _ in range(8)}
            assert seen == {b.name for b in fleet}

    run(body)


def test_random_flips_end_in_the_right_state(backends: BackendFactory) -> None:
    # Flips faster than a check answers must still leave each backend as its
    # server last said.
    fleet = backends(2)
    rng = random.Random(7)
    with grpc_leastconn.insecure_channel(ipv4_target(fleet), health_checker="grpc") as channel:
        wait_until(lambda: all_eligible(channel), timeout=5.0)
        last = {b.address: True for b in fleet}
        for _ in range(20):
            backend = rng.choice(fleet)
            last[backend.address] = serving = rng.random() < 0.5
            backend.set_serving(serving)
        wait_until(lambda: {s.address: s.eligible for s in channel.backends()} == last, timeout=5.0)
