"""Static weights, call costs and slow start through the sync channel, against real backends.

Every new RPC goes to the eligible backend of least ``(load + 1) / weight``,
``load`` being the call costs in flight (1 per call unless ``call_costs``
says otherwise) and ``weight`` the static weight times the slow-start factor;
ties go to the backend picked most recently (the default tie-break,
"youngest"). Long ``Join`` streams are opened one after another, so each pick
sees every earlier one and the counts the cost model implies are exact.

The streams ask for one frame at once and the next a minute later: the test
reads the first (the stream has started, and says where) and leaves nothing
unread. grpcio delivers a call's status only after its messages have been
read, so an unread frame would keep a stream on a stopped backend counted.
"""

from __future__ import annotations

import math
import re
import socket
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import conference_pb2 as pb
import conference_pb2_grpc
import grpc
import pytest
from helpers import BackendFactory, all_eligible, state_of, wait_until

import grpc_leastconn

JOIN = "/conference.Conference/Join"
STREAM_TIMEOUT = 30.0
QUIET_FRAME_INTERVAL_MS = 60_000
WINDOW = 4.0
# New streams one at a time, this many seconds apart, while a backend ramps.
PACE = 0.1
# A ramping weight moves in steps of this share of the static weight.
STEP = 0.05
# A restarted backend is reconnected within about a second, not grpcio's
# default backoff (the health Watch's own backoff is about a second too).
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100)]


def ready_channel(target: Sequence[Any], **kwargs: Any) -> grpc_leastconn.LeastConnChannel:
    """A channel over backends (or "host:port" strings), once every backend is eligible."""
    addresses = [item if isinstance(item, str) else item.address for item in target]
    channel = grpc_leastconn.insecure_channel(addresses, **kwargs)
    try:
        wait_until(lambda: all_eligible(channel), timeout=10.0)
    except BaseException:
        channel.close()
        raise
    return channel


class Streams:
    """Long Join streams through one channel, each with the backend that serves it."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = conference_pb2_grpc.ConferenceStub(channel)
        self.open_calls: list[tuple[grpc.Call, str]] = []

    def open(self) -> str:
        """Open one stream; return its backend once the stream has started."""
        call = self._stub.Join(
            pb.JoinRequest(duration_ms=0, frame_interval_ms=QUIET_FRAME_INTERVAL_MS),
            timeout=STREAM_TIMEOUT,
        )
        self.open_calls.append((call, ""))
        backend = next(call).backend
        self.open_calls[-1] = (call, backend)
        return str(backend)

    def count(self) -> Counter[str]:
        return Counter(backend for _, backend in self.open_calls)

    def cancel(self, backend: str | None = None) -> None:
        """Cancel the streams on ``backend`` (None: all of them)."""
        kept = []
        for call, on in self.open_calls:
            if backend is None or on == backend:
                call.cancel()
            else:
                kept.append((call, on))
        self.open_calls = kept


@contextmanager
def streams_over(channel: grpc.Channel) -> Iterator[Streams]:
    streams = Streams(channel)
    try:
        yield streams
    finally:
        streams.cancel()


def live_streams(servers: Sequence[Any]) -> list[int]:
    return [server.servicer.live_streams for server in servers]


def wait_for_moment(moment: float) -> None:
    """Wait until the monotonic clock reaches ``moment`` (a few seconds ahead at most)."""
    wait_until(lambda: time.monotonic() >= moment, timeout=max(0.0, moment - time.monotonic()) + 5)


def restart(backends: BackendFactory, channel: Any, victim: Any, streams: Streams) -> Any:
    """Stop ``victim`` once its streams have ended, start it again on its port, wait for it.

    Its streams are cancelled first: ended by the server's stop they would
    end UNAVAILABLE and leave a failure penalty, which is not what is tested.
    """
    streams.cancel(victim.address)
    wait_until(lambda: state_of(channel, victim.address).in_flight == 0, timeout=5.0)
    assert victim.servicer.wait_until(lambda s: s.live == 0, 5.0)
    victim.stop(None)
    wait_until(lambda: not state_of(channel, victim.address).eligible, timeout=5.0)
    (back,) = backends(1, port=victim.port)
    wait_until(lambda: state_of(channel, victim.address).eligible, timeout=10.0)
    return back


# -- static weights ------------------------------------------------------------


def test_static_weights_split_long_streams_in_proportion(backends: BackendFactory) -> None:
    servers = backends(3)
    weights = {server.address: weight for server, weight in zip(servers, (1, 2, 4), strict=True)}
    with ready_channel(servers, weights=weights) as channel, streams_over(channel) as streams:
        counts = dict.fromkeys(weights, 0)
        for opened in range(1, 71):
            before = dict(counts)
            landed = streams.open()
            counts[landed] += 1
            # Each stream goes to a backend of least (streams + 1) / weight.
            least = min((before[a] + 1) / weights[a] for a in weights)
            assert (before[landed] + 1) / weights[landed] == least, (opened, landed, before)
            if opened % 7 == 0:
                # Exactly in proportion after every 7 streams.
                assert counts == {a: opened // 7 * w for a, w in weights.items()}, counts
        assert list(counts.values()) == [10, 20, 40]
        assert wait_until(lambda: sum(live_streams(servers)) == 70, timeout=10.0)
        assert live_streams(servers) == [10, 20, 40]
        states = {state.address: state for state in channel.backends()}
        assert [states[s.address].in_flight for s in servers] == [10, 20, 40]
        assert [states[s.address].weight for s in servers] == [1.0, 2.0, 4.0]
        assert all(state.eligible and not state.penalty for state in states.values())


def test_a_host_name_key_weighs_the_addresses_of_that_name(backends: BackendFactory) -> None:
    named, literal = backends(2)
    localhost = {info[4][0] for info in socket.getaddrinfo("localhost", named.port)}
    if localhost != {"127.0.0.1"}:
        pytest.skip(f"localhost resolves to {sorted(localhost)}, not to 127.0.0.1 alone")
    target = [f"localhost:{named.port}", literal.address]
    # The key names the backend as the target does: by its host name.
    weights = {f"localhost:{named.port}": 3}
    with ready_channel(target, weights=weights) as channel, streams_over(channel) as streams:
        states = {state.address: state for state in channel.backends()}
        # Backends are shown by address; the name's address weighs 3.
        assert set(states) == {named.address, literal.address}
        assert states[named.address].weight == 3.0
        assert states[literal.address].weight == 1.0
        for _ in range(8):
            streams.open()
        assert streams.count() == {named.address: 6, literal.address: 2}
        assert wait_until(lambda: live_streams([named, literal]) == [6, 2], timeout=10.0)
        assert [state_of(channel, s.address).in_flight for s in (named, literal)] == [6, 2]


# -- call costs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("call_costs", "pings_on_busy", "pings_on_idle"),
    [
        # 5 Joins weigh 0.5: the Pings alternate, starting with the idle one.
        ({JOIN: 0.1}, 5, 5),
        # 5 Joins weigh 5: the idle backend takes Pings until level (5), the
        # tie (youngest: itself), then they alternate in pairs.
        (None, 2, 8),
    ],
)
def test_call_costs_say_what_a_long_stream_weighs(
    backends: BackendFactory,
    call_costs: dict[str, float] | None,
    pings_on_busy: int,
    pings_on_idle: int,
) -> None:
    busy, idle = backends(2)
    with ready_channel([busy, idle], call_costs=call_costs) as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        pings: list[grpc.Future] = []
        with streams_over(channel) as streams:
            try:
                # All 5 Joins on one backend: the other is out of service meanwhile.
                idle.set_serving(False)
                wait_until(lambda: not state_of(channel, idle.address).eligible, timeout=5.0)
                for _ in range(5):
                    assert streams.open() == busy.address
                idle.set_serving(True)
                wait_until(lambda: state_of(channel, idle.address).eligible, timeout=5.0)
                # Then 10 Pings that last, each picked with every earlier one in flight.
                for _ in range(10):
                    pings.append(
                        stub.Ping.future(pb.PingRequest(delay_ms=30_000), timeout=STREAM_TIMEOUT)
                    )
                assert wait_until(lambda: busy.servicer.live + idle.servicer.live == 15, 10.0)
                started = [s.servicer.started_by_method.get("Ping", 0) for s in (busy, idle)]
                assert started == [pings_on_busy, pings_on_idle]
                # in_flight counts calls, whatever they cost.
                in_flight = [state_of(channel, s.address).in_flight for s in (busy, idle)]
                assert in_flight == [5 + pings_on_busy, pings_on_idle]
            finally:
                for ping in pings:
                    ping.cancel()
        wait_until(lambda: not any(channel.connection_table().values()), timeout=5.0)


# -- slow start ------------------------------------------------------------------


def test_slow_start_ramps_up_a_backend_that_rejoins(backends: BackendFactory) -> None:
    servers = backends(3)
    victim, peers = servers[0], servers[1:]
    config = grpc_leastconn.SlowStart(WINDOW)
    channel = ready_channel(servers, slow_start=WINDOW, options=FAST_RECONNECT)
    # The channel's own start: every backend is new, nobody ramps.
    started = time.monotonic()
    with channel, streams_over(channel) as streams:
        assert [state.weight for state in channel.backends()] == [1.0, 1.0, 1.0]
        for _ in range(36):
            streams.open()
        assert streams.count() == {server.address: 12 for server in servers}
        wait_for_moment(started + WINDOW + 0.2)

        restart(backends, channel, victim, streams)
        joined = time.monotonic()
        state = state_of(channel, victim.address)
        assert state.in_flight == 0 and state.penalty == 0
        # It starts at the 10 % floor (Envoy's min_weight_percent): the time
        # factor, max(seconds, 1 ms) / window, is below it for 0.4 s.
        assert config.factor(0.0) == 0.1
        assert state.weight == pytest.approx(0.1)

        # A burst at once: the newcomer takes one or two, not all 12.
        burst = [streams.open() == victim.address for _ in range(12)]
        burst_seconds = time.monotonic() - joined
        assert sum(burst) < 6, (burst, burst_seconds)

        # Then one stream every PACE seconds to the end of the window and a little beyond.
        ramp: list[tuple[float, bool, float]] = []
        while (now := time.monotonic()) < joined + WINDOW + 0.5:
            landed = streams.open() == victim.address
            ramp.append((now - joined, landed, state_of(channel, victim.address).weight))
            wait_for_moment(now + PACE)
        seen = [weight for _, _, weight in ramp]
        counts = streams.count()
        assert seen == sorted(seen), ramp
        for seconds, _, weight in ramp:
            # Updated every 0.1 s, in steps of 5 %: within half a second of the formula.
            assert config.factor(seconds - 0.5) <= weight <= config.factor(seconds + 0.2) + STEP, (
                ramp
            )
        assert seen[-1] == 1.0, ramp
        second_half = [landed for seconds, landed, _ in ramp if seconds >= WINDOW / 2]
        assert sum(second_half) / len(second_half) > sum(burst) / len(burst), ramp

        # At full weight it takes every new stream until level with its peers.
        behind = max(counts[p.address] for p in peers) - counts[victim.address]
        assert all(streams.open() == victim.address for _ in range(behind)), streams.count()


def test_without_slow_start_a_rejoining_backend_takes_every_new_stream(
    backends: BackendFactory,
) -> None:
    servers = backends(3)
    victim, peers = servers[0], servers[1:]
    with (
        ready_channel(servers, slow_start=None, options=FAST_RECONNECT) as channel,
        streams_over(channel) as streams,
    ):
        for _ in range(36):
            streams.open()
        back = restart(backends, channel, victim, streams)
        assert state_of(channel, victim.address).weight == 1.0
        burst = [streams.open() == victim.address for _ in range(12)]
        assert all(burst), burst
        # Level at 12: the tie goes to the backend just picked, then a peer.
        assert streams.open() == victim.address
        assert streams.open() != victim.address
        assert wait_until(lambda: sum(live_streams([back, *peers])) == 38, timeout=10.0)
        assert live_streams([back]) == [13] and sorted(live_streams(peers)) == [12, 13]


@pytest.mark.parametrize("a_call_ended", [True, False])
def test_slow_start_ramps_a_backend_back_after_a_health_flap(
    backends: BackendFactory, a_call_ended: bool
) -> None:
    # Peers warm for a whole window, with or without a call ended meanwhile
    # (only the end of a call or a pick that found nobody brings ramps up to date).
    servers = backends(3)
    victim = servers[0]
    config = grpc_leastconn.SlowStart(window=2.0)
    with (
        ready_channel(servers, slow_start=config) as channel,
        streams_over(channel) as streams,
    ):
        started = time.monotonic()
        for _ in range(6):
            streams.open()
        wait_for_moment(started + config.window + 0.2)
        if a_call_ended:
            stub = conference_pb2_grpc.ConferenceStub(channel)
            assert stub.Ping(pb.PingRequest(), timeout=5.0).backend
        victim.set_serving(False)
        wait_until(lambda: not state_of(channel, victim.address).eligible, timeout=5.0)
        victim.set_serving(True)
        wait_until(lambda: state_of(channel, victim.address).eligible, timeout=5.0)
        # Its streams never ended: it rejoins with its 2, and ramps from 10 % of its weight.
        state = state_of(channel, victim.address)
        assert state.in_flight == 2
        assert state.weight == pytest.approx(0.1)


# -- validation ------------------------------------------------------------------

TARGET = "127.0.0.1:5001"
NAMED_TARGET = "localhost:5001"
NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    ("target", "kwargs", "error", "words"),
    [
        (TARGET, {"weights": {"127.0.0.1:5999": 2}}, ValueError, "'127.0.0.1:5999'"),
        (TARGET, {"weights": {"localhost:5001": 2}}, ValueError, "'localhost:5001'"),
        (NAMED_TARGET, {"weights": {"127.0.0.1:5001": 2}}, ValueError, "'127.0.0.1:5001'"),
        (TARGET, {"weights": {"127.0.0.1": 2}}, ValueError, "'127.0.0.1'"),
        (TARGET, {"weights": {"127.0.0.1:99999": 2}}, ValueError, "99999"),
        (TARGET, {"weights": {TARGET: 0}}, ValueError, "positive"),
        (TARGET, {"weights": {TARGET: -1}}, ValueError, "positive"),
        (TARGET, {"weights": {TARGET: NAN}}, ValueError, "positive"),
        (TARGET, {"weights": {TARGET: INF}}, ValueError, "positive"),
        (TARGET, {"weights": {TARGET: "2"}}, TypeError, "number"),
        (TARGET, {"weights": {TARGET: True}}, TypeError, "number"),
        (TARGET, {"weights": {TARGET: None}}, TypeError, "number"),
        (TARGET, {"weights": {5001: 2}}, TypeError, "5001"),
        (
            NAMED_TARGET,
            {"weights": {NAMED_TARGET: 2, NAMED_TARGET.upper(): 3}},
            ValueError,
            "twice",
        ),
        (TARGET, {"weights": [(TARGET, 2)]}, TypeError, "mapping"),
        (TARGET, {"weights": 2}, TypeError, "mapping"),
        (TARGET, {"call_costs": {"Join": 0.1}}, ValueError, "'Join'"),
        (TARGET, {"call_costs": {"/conference.Conference": 0.1}}, ValueError, "full method"),
        (TARGET, {"call_costs": {"conference.Conference/Join": 0.1}}, ValueError, "full method"),
        (TARGET, {"call_costs": {"/conference.Conference/Join/": 0.1}}, ValueError, "full"),
        (TARGET, {"call_costs": {"//Join": 0.1}}, ValueError, "full method"),
        (TARGET, {"call_costs": {JOIN: 0}}, ValueError, "positive"),
        (TARGET, {"call_costs": {JOIN: -0.1}}, ValueError, "positive"),
        (TARGET, {"call_costs": {JOIN: NAN}}, ValueError, "positive"),
        (TARGET, {"call_costs": {JOIN: 0.0001}}, ValueError, "at least"),
        (TARGET, {"call_costs": {JOIN: "0.1"}}, TypeError, "number"),
        (TARGET, {"call_costs": {JOIN: True}}, TypeError, "number"),
        (TARGET, {"call_costs": [(JOIN, 0.1)]}, TypeError, "mapping"),
        (TARGET, {"slow_start": 0}, ValueError, "window"),
        (TARGET, {"slow_start": -1}, ValueError, "window"),
        (TARGET, {"slow_start": NAN}, ValueError, "window"),
        (TARGET, {"slow_start": INF}, ValueError, "window"),
        (TARGET, {"slow_start": "4"}, TypeError, "slow_start"),
        (TARGET, {"slow_start": True}, TypeError, "slow_start"),
        (TARGET, {"slow_start": {"window": 4}}, TypeError, "slow_start"),
    ],
)
@pytest.mark.parametrize("factory", ["insecure_channel", "secure_channel"])
def test_bad_weights_costs_and_slow_start_fail_at_construction(
    factory: str, target: str, kwargs: dict[str, Any], error: type[Exception], words: str
) -> None:
    make: Any = getattr(grpc_leastconn, factory)
    args = (target,) if factory == "insecure_channel" else (target, grpc.ssl_channel_credentials())
    with pytest.raises(error, match=re.escape(words)):
        make(*args, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"window": 0}, ValueError, "window"),
        ({"window": "4"}, TypeError, "window"),
        ({"window": 4, "aggression": 0}, ValueError, "aggression"),
        ({"window": 4, "aggression": INF}, ValueError, "aggression"),
        ({"window": 4, "min_weight_percent": 0}, ValueError, "min_weight_percent"),
        ({"window": 4, "min_weight_percent": 101}, ValueError, "min_weight_percent"),
        ({"window": 4, "min_weight_percent": True}, TypeError, "min_weight_percent"),
    ],
)
def test_bad_slow_start_config_is_refused(
    kwargs: dict[str, Any], error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words):
        grpc_leastconn.SlowStart(**kwargs)


def test_good_settings_are_accepted() -> None:
    with grpc_leastconn.insecure_channel(
        [TARGET, "127.0.0.1:5002"],
        weights={TARGET: 2.5, "127.0.0.1:5002": 1},
        call_costs={JOIN: 0.001, "/conference.Conference/Ping": 3},
        slow_start=grpc_leastconn.SlowStart(window=4, aggression=2.0, min_weight_percent=5),
    ) as channel:
        assert sorted(state.weight for state in channel.backends()) == [1.0, 2.5]
