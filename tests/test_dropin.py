"""The balanced channel as a drop-in ``grpc.Channel`` for generated stubs.

Whatever code written for ``grpc.insecure_channel`` relies on has to work
unchanged: every call type and entry point, metadata, deadlines,
``wait_for_ready``, connectivity subscriptions, closing, and failures that look
like grpcio's own.
"""

from __future__ import annotations

import gc
import itertools
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import conference_pb2 as pb
import conference_pb2_grpc
import grpc
import pytest
import server as example_server
from grpc_health.v1 import health_pb2
from helpers import BackendFactory, all_eligible, observed_channel, state_of, wait_until

import grpc_leastconn

RPC_TIMEOUT = 5.0
READY = grpc.ChannelConnectivity.READY
TRANSIENT_FAILURE = grpc.ChannelConnectivity.TRANSIENT_FAILURE
PING = "/conference.Conference/Ping"
JOIN = "/conference.Conference/Join"
UPLOAD = "/conference.Conference/Upload"
CHAT = "/conference.Conference/Chat"
# grpcio's server-side time_remaining() runs up to ~10 ms over the timeout the
# client gave, with plain grpc channels too.
CLOCK_SLACK_S = 0.05


@pytest.fixture
def lc_channel() -> Iterator[Callable[..., grpc_leastconn.LeastConnChannel]]:
    channels: list[grpc_leastconn.LeastConnChannel] = []

    def make(target: Any, **kwargs: Any) -> grpc_leastconn.LeastConnChannel:
        channel = grpc_leastconn.insecure_channel(target, **kwargs)
        channels.append(channel)
        return channel

    yield make
    for channel in channels:
        channel.close()


def addresses(servers: list[Any]) -> list[str]:
    return [s.address for s in servers]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_eligible(channel: grpc_leastconn.LeastConnChannel) -> None:
    """Until every backend can take calls, the first ready one takes them all."""
    wait_until(lambda: all_eligible(channel), timeout=RPC_TIMEOUT)


def wait_idle(channel: grpc_leastconn.LeastConnChannel, servers: list[Any]) -> None:
    for server in servers:
        assert server.servicer.wait_until(lambda s: s.live == 0, 1.0), server.servicer.stats()
    wait_until(lambda: not any(channel.connection_table().values()), 1.0)


def frames(n: int) -> Iterator[pb.Frame]:
    return iter([pb.Frame(seq=i) for i in range(n)])


def chat_messages(*texts: str) -> Iterator[pb.ChatMessage]:
    return iter([pb.ChatMessage(text=t) for t in texts])


# -- a backend that reports what it received ------------------------------------


class EchoServicer:
    """Answers with the ``x-tag`` metadata and the deadline the server saw.

    Each reply carries ``"<tag>|<seconds left>"`` in its ``backend`` field and
    sends the tag back as initial (``x-initial``) and trailing (``x-trailing``)
    metadata.
    """

    @staticmethod
    def _seen(context: grpc.ServicerContext) -> str:
        tag = dict(context.invocation_metadata()).get("x-tag", "")
        context.send_initial_metadata((("x-initial", tag),))
        context.set_trailing_metadata((("x-trailing", tag),))
        left = context.time_remaining()
        return f"{tag}|{'none' if left is None else f'{left:.3f}'}"

    def ping(self, request: pb.PingRequest, context: grpc.ServicerContext) -> pb.PingReply:
        return pb.PingReply(backend=self._seen(context), payload=request.payload)

    def join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> Iterator[pb.Frame]:
        seen = self._seen(context)
        for seq in range(2):
            yield pb.Frame(session_id=request.session_id, seq=seq, backend=seen)

    def upload(
        self, request_iterator: Iterator[pb.Frame], context: grpc.ServicerContext
    ) -> pb.UploadSummary:
        seen = self._seen(context)
        return pb.UploadSummary(frames=sum(1 for _ in request_iterator), backend=seen)

    def chat(
        self, request_iterator: Iterator[pb.ChatMessage], context: grpc.ServicerContext
    ) -> Iterator[pb.ChatMessage]:
        seen = self._seen(context)
        for message in request_iterator:
            yield pb.ChatMessage(text=message.text, backend=seen)


@dataclass
class EchoBackend:
    server: grpc.Server
    address: str


@pytest.fixture
def echo_backends() -> Iterator[Callable[[int], list[EchoBackend]]]:
    started: list[tuple[grpc.Server, futures.ThreadPoolExecutor]] = []

    def start(n: int) -> list[EchoBackend]:
        new = []
        for _ in range(n):
            servicer = EchoServicer()
            executor = futures.ThreadPoolExecutor(max_workers=8)
            server = grpc.server(executor, options=[("grpc.so_reuseport", 0)])
            handlers = {
                "Ping": grpc.unary_unary_rpc_method_handler(
                    servicer.ping, pb.PingRequest.FromString, pb.PingReply.SerializeToString
                ),
                "Join": grpc.unary_stream_rpc_method_handler(
                    servicer.join, pb.JoinRequest.FromString, pb.Frame.SerializeToString
                ),
                "Upload": grpc.stream_unary_rpc_method_handler(
                    servicer.upload, pb.Frame.FromString, pb.UploadSummary.SerializeToString
                ),
                "Chat": grpc.stream_stream_rpc_method_handler(
                    servicer.chat, pb.ChatMessage.FromString, pb.ChatMessage.SerializeToString
                ),
            }
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler("conference.Conference", handlers),)
            )
            port = server.add_insecure_port("127.0.0.1:0")
            server.start()
            started.append((server, executor))
            new.append(EchoBackend(server, f"127.0.0.1:{port}"))
        return new

    yield start
    for event in [server.stop(None) for server, _ in started]:
        event.wait(10)
    for _, executor in started:
        executor.shutdown(wait=False, cancel_futures=True)


def parse_seen(seen: str) -> tuple[str, float]:
    tag, left = seen.split("|")
    return tag, float(left)


# -- types and call types -------------------------------------------------------


def test_channel_and_its_objects_have_grpc_types(
    backends: BackendFactory, lc_channel: Callable[..., Any]
) -> None:
    channel = lc_channel(addresses(backends(2)))
    assert isinstance(channel, grpc.Channel)
    assert isinstance(channel.unary_unary(PING), grpc.UnaryUnaryMultiCallable)
    assert isinstance(channel.unary_stream(JOIN), grpc.UnaryStreamMultiCallable)
    assert isinstance(channel.stream_unary(UPLOAD), grpc.StreamUnaryMultiCallable)
    assert isinstance(channel.stream_stream(CHAT), grpc.StreamStreamMultiCallable)
    stub = conference_pb2_grpc.ConferenceStub(channel)
    _, call = stub.Ping.with_call(pb.PingRequest(), timeout=RPC_TIMEOUT)
    assert isinstance(call, grpc.Call)
    stream = stub.Join(pb.JoinRequest(duration_ms=1), timeout=RPC_TIMEOUT)
    assert isinstance(stream, grpc.Call)
    assert isinstance(stream, grpc.Future)
    assert len(list(itertools.islice(stream, 100))) == 1
    assert stream.code() == grpc.StatusCode.OK
    future = stub.Ping.future(pb.PingRequest(), timeout=RPC_TIMEOUT)
    assert isinstance(future, grpc.Future)
    future.result(timeout=RPC_TIMEOUT)


def test_every_call_type_through_every_entry_point(
    backends: BackendFactory, lc_channel: Callable[..., Any]
) -> None:
    servers = backends(2)
    names = set(addresses(servers))
    channel = lc_channel(addresses(servers))
    stub = conference_pb2_grpc.ConferenceStub(channel)

    assert stub.Ping(pb.PingRequest(payload="a"), timeout=RPC_TIMEOUT).payload == "a"
    reply, call = stub.Ping.with_call(pb.PingRequest(payload="b"), timeout=RPC_TIMEOUT)
    assert (reply.payload, call.code()) == ("b", grpc.StatusCode.OK)
    future = stub.Ping.future(pb.PingRequest(payload="c"), timeout=RPC_TIMEOUT)
    assert future.result(timeout=RPC_TIMEOUT).payload == "c"
    assert future.code() == grpc.StatusCode.OK
    assert reply.backend in names

    stream = stub.Join(
        pb.JoinRequest(session_id="s", duration_ms=30, frame_interval_ms=10), timeout=RPC_TIMEOUT
    )
    received = list(itertools.islice(stream, 100))
    assert [(f.session_id, f.seq) for f in received] == [("s", 0), ("s", 1), ("s", 2)]
    assert {f.backend for f in received} <= names
    assert stream.code() == grpc.StatusCode.OK
    assert not stream.is_active()
    assert stream.done()

    assert stub.Upload(frames(3), timeout=RPC_TIMEOUT).frames == 3
    summary, call = stub.Upload.with_call(frames(4), timeout=RPC_TIMEOUT)
    assert (summary.frames, call.code()) == (4, grpc.StatusCode.OK)
    future = stub.Upload.future(frames(5), timeout=RPC_TIMEOUT)
    assert future.result(timeout=RPC_TIMEOUT).frames == 5

    chat = stub.Chat(chat_messages("x", "y"), timeout=RPC_TIMEOUT)
    assert [m.text for m in itertools.islice(chat, 100)] == ["x", "y"]
    assert chat.code() == grpc.StatusCode.OK

    wait_idle(channel, servers)
    assert sum(s.servicer.started for s in servers) == 8


@pytest.mark.parametrize("entry", ["__call__", "with_call", "future"])
@pytest.mark.parametrize("method", ["Ping", "Upload"])
def test_unary_response_metadata_and_timeout_passthrough(
    echo_backends: Callable[[int], list[EchoBackend]],
    lc_channel: Callable[..., Any],
    method: str,
    entry: str,
) -> None:
    channel = lc_channel(addresses(echo_backends(2)))
    stub = conference_pb2_grpc.ConferenceStub(channel)
    tag = f"{method}-{entry}"
    request: Any = pb.PingRequest() if method == "Ping" else frames(2)
    multicallable = getattr(stub, method)
    kwargs = {"timeout": 3.0, "metadata": (("x-tag", tag),)}
    trailing: Any = None
    if entry == "__call__":
        reply = multicallable(request, **kwargs)
    elif entry == "with_call":
        reply, call = multicallable.with_call(request, **kwargs)
        trailing = call.trailing_metadata()
        assert ("x-initial", tag) in call.initial_metadata()
    else:
        future = multicallable.future(request, **kwargs)
        reply = future.result(timeout=RPC_TIMEOUT)
        trailing = future.trailing_metadata()
    seen_tag, left = parse_seen(reply.backend)
    assert seen_tag == tag
    assert 1.5 < left <= 3.0 + CLOCK_SLACK_S
    if trailing is not None:
        assert ("x-trailing", tag) in trailing
    wait_until(lambda: not any(channel.connection_table().values()), 1.0)


@pytest.mark.parametrize("method", ["Join", "Chat"])
def test_streaming_metadata_and_timeout_passthrough(
    echo_backends: Callable[[int], list[EchoBackend]],
    lc_channel: Callable[..., Any],
    method: str,
) -> None:
    channel = lc_channel(addresses(echo_backends(2)))
    stub = conference_pb2_grpc.ConferenceStub(channel)
    request: Any = pb.JoinRequest() if method == "Join" else chat_messages("a", "b")
    call = getattr(stub, method)(request, timeout=3.0, metadata=(("x-tag", method),))
    replies = list(itertools.islice(call, 100))
    assert len(replies) == 2
    for reply in replies:
        seen_tag, left = parse_seen(reply.backend)
        assert seen_tag == method
        assert 1.5 < left <= 3.0 + CLOCK_SLACK_S
    assert ("x-initial", method) in call.initial_metadata()
    assert ("x-trailing", method) in call.trailing_metadata()
    assert call.code() == grpc.StatusCode.OK
    wait_until(lambda: not any(channel.connection_table().values()), 1.0)


def test_timeout_ends_a_slow_call(backends: BackendFactory, lc_channel: Callable[..., Any]) -> None:
    servers = backends(2)
    channel = lc_channel(addresses(servers))
    stub = conference_pb2_grpc.ConferenceStub(channel)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.Ping(pb.PingRequest(delay_ms=10_000), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.0
    wait_idle(channel, servers)


def test_interceptors_wrap_the_channel(
    echo_backends: Callable[[int], list[EchoBackend]], lc_channel: Callable[..., Any]
) -> None:
    class AddTag(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
        def _tagged(self, details: Any) -> Any:
            return details._replace(metadata=(*(details.metadata or ()), ("x-tag", "icpt")))

        def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            return continuation(self._tagged(details), request)

        def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
            return continuation(self._tagged(details), request)

    channel = lc_channel(addresses(echo_backends(2)))
    stub = conference_pb2_grpc.ConferenceStub(grpc.intercept_channel(channel, AddTag()))
    assert parse_seen(stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT).backend)[0] == "icpt"
    stream = stub.Join(pb.JoinRequest(), timeout=RPC_TIMEOUT)
    assert {parse_seen(f.backend)[0] for f in itertools.islice(stream, 100)} == {"icpt"}
    wait_until(lambda: not any(channel.connection_table().values()), 1.0)


# -- wait_for_ready -------------------------------------------------------------


def test_wait_for_ready_with_a_reachable_backend(
    backends: BackendFactory, lc_channel: Callable[..., Any]
) -> None:
    servers = backends(2)
    channel = lc_channel(addresses(servers))
    stub = conference_pb2_grpc.ConferenceStub(channel)
    kwargs: dict[str, Any] = {"timeout": RPC_TIMEOUT, "wait_for_ready": True}
    assert stub.Ping(pb.PingRequest(payload="w"), **kwargs).payload == "w"
    assert stub.Ping.with_call(pb.PingRequest(), **kwargs)[1].code() == grpc.StatusCode.OK
    assert stub.Ping.future(pb.PingRequest(), **kwargs).result(timeout=RPC_TIMEOUT)
    assert len(list(stub.Join(pb.JoinRequest(duration_ms=20, frame_interval_ms=10), **kwargs))) == 2
    assert stub.Upload(frames(2), **kwargs).frames == 2
    assert [m.text for m in stub.Chat(chat_messages("q"), **kwargs)] == ["q"]
    wait_idle(channel, servers)


def test_wait_for_ready_deadline_covers_the_wait_for_a_backend(
    lc_channel: Callable[..., Any],
) -> None:
    # grpcio counts a deadline from the call, however long wait_for_ready
    # queues it. Here the only backend comes up 0.4 s into a 1 s deadline
    # and then takes 10 s to answer: the call must fail at the 1 s mark.
    port = closed_port()
    fast_reconnect = [
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 100),
    ]
    channel = lc_channel(f"127.0.0.1:{port}", options=fast_reconnect)
    stub = conference_pb2_grpc.ConferenceStub(channel)
    wait_until(lambda: channel.backends()[0].connectivity == TRANSIENT_FAILURE, RPC_TIMEOUT)
    started = time.monotonic()
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            stub.Ping(pb.PingRequest(delay_ms=10_000), timeout=1.0, wait_for_ready=True)
        except grpc.RpcError as exc:
            outcome["code"] = exc.code()
        outcome["elapsed"] = time.monotonic() - started

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    # The delay is the point: part of the deadline goes by before any
    # backend can take the call.
    time.sleep(0.4)
    server = example_server.start_backend(port=port)
    try:
        caller.join(RPC_TIMEOUT)
        assert server.servicer.started == 1, "the call never reached the backend"
        assert outcome.get("code") == grpc.StatusCode.DEADLINE_EXCEEDED
        assert outcome["elapsed"] < 1.25, f"a 1 s deadline took {outcome['elapsed']:.2f} s"
    finally:
        server.stop(None)


def start_slow_to_serve_backend(health_delay_s: float) -> tuple[grpc.Server, str]:
    """A backend whose health Watch first answers SERVING after ``health_delay_s``.

    Its Ping never answers; it ends when the RPC does.
    """

    def watch(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        ended = threading.Event()
        context.add_callback(ended.set)
        if ended.wait(health_delay_s):
            return
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        ended.wait(30.0)

    def ping(request: pb.PingRequest, context: grpc.ServicerContext) -> pb.PingReply:
        ended = threading.Event()
        context.add_callback(ended.set)
        ended.wait(30.0)
        return pb.PingReply()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "grpc.health.v1.Health",
                {
                    "Watch": grpc.unary_stream_rpc_method_handler(
                        watch,
                        health_pb2.HealthCheckRequest.FromString,
                        health_pb2.HealthCheckResponse.SerializeToString,
                    )
                },
            ),
            grpc.method_handlers_generic_handler(
                "conference.Conference",
                {
                    "Ping": grpc.unary_unary_rpc_method_handler(
                        ping, pb.PingRequest.FromString, pb.PingReply.SerializeToString
                    )
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def test_deadline_covers_queueing_while_backends_start(lc_channel: Callable[..., Any]) -> None:
    # Without wait_for_ready too, a call made while every backend is still
    # starting (here: awaiting its first health answer, 0.5 s) queues in the
    # channel. That queueing is part of the caller's 1 s deadline.
    server, address = start_slow_to_serve_backend(health_delay_s=0.5)
    try:
        channel = lc_channel(address)
        stub = conference_pb2_grpc.ConferenceStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.Ping(pb.PingRequest(), timeout=1.0)
        elapsed = time.monotonic() - started
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert elapsed < 1.25, f"a 1 s deadline took {elapsed:.2f} s"
        wait_until(lambda: not any(channel.connection_table().values()), 1.0)
    finally:
        server.stop(None).wait(10)


# -- the _registered_method keyword ---------------------------------------------


@pytest.mark.parametrize("registered", [True, False, None])
def test_registered_method_keyword_is_accepted(
    backends: BackendFactory, lc_channel: Callable[..., Any], registered: bool | None
) -> None:
    servers = backends(2)
    channel = lc_channel(addresses(servers))
    ping = channel.unary_unary(
        PING,
        request_serializer=pb.PingRequest.SerializeToString,
        response_deserializer=pb.PingReply.FromString,
        _registered_method=registered,
    )
    join = channel.unary_stream(
        JOIN,
        request_serializer=pb.JoinRequest.SerializeToString,
        response_deserializer=pb.Frame.FromString,
        _registered_method=registered,
    )
    upload = channel.stream_unary(
        UPLOAD,
        request_serializer=pb.Frame.SerializeToString,
        response_deserializer=pb.UploadSummary.FromString,
        _registered_method=registered,
    )
    chat = channel.stream_stream(
        CHAT,
        request_serializer=pb.ChatMessage.SerializeToString,
        response_deserializer=pb.ChatMessage.FromString,
        _registered_method=registered,
    )
    assert ping(pb.PingRequest(payload="r"), timeout=RPC_TIMEOUT).payload == "r"
    assert len(list(join(pb.JoinRequest(duration_ms=10, frame_interval_ms=5), timeout=5))) == 2
    assert upload(frames(1), timeout=RPC_TIMEOUT).frames == 1
    assert [m.text for m in chat(chat_messages("r"), timeout=RPC_TIMEOUT)] == ["r"]
    wait_idle(channel, servers)


def test_raw_bytes_without_serializers(
    backends: BackendFactory, lc_channel: Callable[..., Any]
) -> None:
    servers = backends(1)
    channel = lc_channel(addresses(servers))
    raw = channel.unary_unary(PING)
    reply = raw(pb.PingRequest(payload="raw").SerializeToString(), timeout=RPC_TIMEOUT)
    assert pb.PingReply.FromString(reply).payload == "raw"


# -- closing --------------------------------------------------------------------


def assert_refuses_calls(channel: grpc.Channel) -> None:
    stub = conference_pb2_grpc.ConferenceStub(channel)
    attempts: list[Callable[[], Any]] = [
        lambda: stub.Ping(pb.PingRequest(), timeout=1.0),
        lambda: stub.Ping.with_call(pb.PingRequest(), timeout=1.0),
        lambda: stub.Ping.future(pb.PingRequest(), timeout=1.0).result(timeout=1.0),
        lambda: next(stub.Join(pb.JoinRequest(), timeout=1.0)),
        lambda: stub.Upload(frames(1), timeout=1.0),
        lambda: stub.Upload.future(frames(1), timeout=1.0).result(timeout=1.0),
        lambda: next(stub.Chat(chat_messages("a"), timeout=1.0)),
    ]
    for attempt in attempts:
        with pytest.raises(ValueError):
            attempt()


def test_context_manager_closes_the_channel(backends: BackendFactory) -> None:
    servers = backends(2)
    with grpc_leastconn.insecure_channel(addresses(servers)) as channel:
        assert isinstance(channel, grpc_leastconn.LeastConnChannel)
        stub = conference_pb2_grpc.ConferenceStub(channel)
        assert stub.Ping(pb.PingRequest(payload="cm"), timeout=RPC_TIMEOUT).payload == "cm"
    assert_refuses_calls(channel)


def test_close_cancels_in_flight_rpcs_and_refuses_new_ones(
    backends: BackendFactory, lc_channel: Callable[..., Any]
) -> None:
    servers = backends(2)
    channel, ledger = observed_channel(addresses(servers))
    stub = conference_pb2_grpc.ConferenceStub(channel)
    wait_eligible(channel)
    joins = [stub.Join(pb.JoinRequest(duration_ms=0), timeout=30.0) for _ in range(4)]
    for join in joins:
        next(join)
    ping = stub.Ping.future(pb.PingRequest(delay_ms=30_000), timeout=30.0)
    upload_gate = threading.Event()

    def held_frames() -> Iterator[pb.Frame]:
        yield pb.Frame(seq=0)
        upload_gate.wait(RPC_TIMEOUT)

    upload = stub.Upload.future(held_frames(), timeout=30.0)
    assert all(s.servicer.wait_until(lambda v: v.live == 3, RPC_TIMEOUT) for s in servers), (
        channel.connection_table()
    )
    assert channel.connection_table() == dict.fromkeys(addresses(servers), 3)

    channel.close()
    for server in servers:
        assert server.servicer.wait_until(lambda v: v.live == 0, 1.0), server.servicer.stats()
        assert server.servicer.cancelled == 3
    for join in joins:
        with pytest.raises(grpc.RpcError) as info:
            list(itertools.islice(join, 1000))
        assert info.value.code() == grpc.StatusCode.CANCELLED
    for future in (ping, upload):
        assert future.exception(timeout=RPC_TIMEOUT).code() == grpc.StatusCode.CANCELLED
    wait_until(lambda: ledger.picked == ledger.released, 1.0)
    ledger.check()
    upload_gate.set()
    assert_refuses_calls(channel)
    channel.close()  # a second close is harmless


# -- connectivity ---------------------------------------------------------------


class StateLog:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.states: list[grpc.ChannelConnectivity] = []

    def __call__(self, state: grpc.ChannelConnectivity) -> None:
        with self._cond:
            self.states.append(state)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[grpc.ChannelConnectivity]], bool]) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.states), RPC_TIMEOUT)


def test_subscribe_reports_ready_once_connected(
    backends: BackendFactory, lc_channel: Callable[..., Any]
) -> None:
    channel = lc_channel(addresses(backends(2)))
    log = StateLog()
    channel.subscribe(log, try_to_connect=True)
    assert log.wait_for(lambda states: READY in states), log.states


def test_unsubscribe_stops_reports(
    backends: BackendFactory, lc_channel: Callable[..., Any]
) -> None:
    servers = backends(1)
    channel = lc_channel(addresses(servers))
    grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT)
    # Subscribing once READY: each callback hears exactly one initial state.
    unsubscribed = StateLog()
    watching = StateLog()
    channel.subscribe(unsubscribed)
    channel.subscribe(watching)
    assert watching.wait_for(lambda states: states == [READY]), watching.states
    assert unsubscribed.wait_for(lambda states: states == [READY]), unsubscribed.states
    channel.unsubscribe(unsubscribed)

    # Stopping the only backend changes the channel's state; only the
    # remaining subscriber may hear of it. Callbacks run in subscription
    # order, so the unsubscribed one would have been called first.
    servers[0].stop(None)
    assert watching.wait_for(lambda states: len(states) > 1), watching.states
    assert watching.states[-1] != READY
    assert unsubscribed.states == [READY]


def test_channel_ready_future(backends: BackendFactory, lc_channel: Callable[..., Any]) -> None:
    channel = lc_channel(addresses(backends(3)))
    grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT)


def test_slow_subscriber_still_ends_on_the_current_state(
    backends: BackendFactory, lc_channel: Callable[..., Any]
) -> None:
    # grpcio delivers one subscriber's states in order, one at a time, so the
    # last state a callback saw is the channel's state. A callback that is
    # slow with its first (pre-READY) state must not see it land after READY.
    channel = lc_channel(addresses(backends(2)))
    log = StateLog()
    first = threading.Event()

    def slow(state: grpc.ChannelConnectivity) -> None:
        if not first.is_set():
            first.set()
            wait_until(lambda: any(s.eligible for s in channel.backends()), RPC_TIMEOUT)
        log(state)

    channel.subscribe(slow, try_to_connect=True)
    wait_until(lambda: any(s.eligible for s in channel.backends()), RPC_TIMEOUT)
    assert log.wait_for(lambda states: READY in states), log.states
    assert log.wait_for(lambda states: len(states) >= 2 or states == [READY]), log.states
    assert log.states[-1] == READY, [s.name for s in log.states]


# -- unreachable backends -------------------------------------------------------


@pytest.mark.parametrize("method", ["Ping", "Join", "Upload", "Chat"])
def test_only_backend_down_fails_fast_with_unavailable(
    lc_channel: Callable[..., Any], method: str
) -> None:
    channel = lc_channel(f"127.0.0.1:{closed_port()}")
    stub = conference_pb2_grpc.ConferenceStub(channel)
    calls: dict[str, Callable[[], Any]] = {
        "Ping": lambda: stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT),
        "Join": lambda: next(stub.Join(pb.JoinRequest(), timeout=RPC_TIMEOUT)),
        "Upload": lambda: stub.Upload(frames(1), timeout=RPC_TIMEOUT),
        "Chat": lambda: next(stub.Chat(chat_messages("a"), timeout=RPC_TIMEOUT)),
    }
    for _ in range(2):  # once while connecting, once after the failure is known
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            calls[method]()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 3.0
        wait_until(lambda: not any(channel.connection_table().values()), 1.0)
    assert list(channel.connection_table().values()) == [0]


def test_dead_backend_is_skipped_once_detected(
    backends: BackendFactory, lc_channel: Callable[..., Any]
) -> None:
    servers = backends(3)
    dead = f"127.0.0.1:{closed_port()}"
    channel = lc_channel([dead, *addresses(servers)])
    stub = conference_pb2_grpc.ConferenceStub(channel)
    wait_until(lambda: state_of(channel, dead).connectivity == TRANSIENT_FAILURE, RPC_TIMEOUT)
    wait_until(lambda: all(state_of(channel, s.address).eligible for s in servers), RPC_TIMEOUT)
    for i in range(30):
        assert stub.Ping(pb.PingRequest(payload=str(i)), timeout=RPC_TIMEOUT).payload == str(i)
    streams = [stub.Join(pb.JoinRequest(duration_ms=0), timeout=30.0) for _ in range(6)]
    for stream in streams:
        next(stream)
    table = channel.connection_table()
    assert table == {dead: 0, **dict.fromkeys(addresses(servers), 2)}
    for stream in streams:
        stream.cancel()
    wait_idle(channel, servers)
    assert sum(s.servicer.started for s in servers) == 36


def test_backend_that_goes_away_stops_being_picked(
    backends: BackendFactory, lc_channel: Callable[..., Any]
) -> None:
    # A backend channel's round_robin policy reconnects a connection that
    # drops to IDLE at once, so a stopped backend is found to be down without
    # any RPC being sent to it. An IDLE backend channel left alone stays
    # eligible and, with the
    # fewest RPCs in flight, is exactly where least-connection sends the next
    # one.
    servers = backends(4)
    channel = lc_channel(addresses(servers))
    stub = conference_pb2_grpc.ConferenceStub(channel)
    for _ in range(8):
        stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT)
    wait_until(lambda: all(s.connectivity == READY for s in channel.backends()))
    gone = servers[0].address
    servers[0].stop(None)
    wait_until(lambda: not state_of(channel, gone).eligible, 3.0, message=gone)
    for i in range(12):
        assert stub.Ping(pb.PingRequest(payload=str(i)), timeout=RPC_TIMEOUT).payload == str(i)


# -- connections ----------------------------------------------------------------


def test_two_channels_do_not_share_a_connection(
    backend: example_server.Backend, lc_channel: Callable[..., Any]
) -> None:
    for _ in range(2):
        channel = lc_channel(backend.address)
        conference_pb2_grpc.ConferenceStub(channel).Ping(pb.PingRequest(), timeout=RPC_TIMEOUT)
    assert len(backend.servicer.peers) == 2, backend.servicer.peers


def test_each_backend_has_its_own_connection_carrying_what_the_table_says(
    backends: BackendFactory, lc_channel: Callable[..., Any]
) -> None:
    servers = backends(3)
    channel = lc_channel(addresses(servers))
    stub = conference_pb2_grpc.ConferenceStub(channel)
    wait_eligible(channel)
    streams = [stub.Join(pb.JoinRequest(duration_ms=0), timeout=30.0) for _ in range(7)]
    # Every reply names the backend that produced it.
    served_by = Counter(next(stream).backend for stream in streams)
    for _ in range(6):
        served_by[stub.Ping(pb.PingRequest(), timeout=RPC_TIMEOUT).backend] += 1
    table = channel.connection_table()
    assert sorted(table.values()) == [2, 2, 3]
    for server in servers:
        assert server.servicer.live_streams == table[server.address]
        assert server.servicer.started == served_by[server.address]
        assert len(server.servicer.peers) == 1, server.servicer.peers
    peers = [next(iter(s.servicer.peers)) for s in servers]
    assert len(set(peers)) == 3
    for stream in streams:
        stream.cancel()
    del streams, stream
    gc.collect()
    wait_idle(channel, servers)
