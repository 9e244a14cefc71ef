"""In-flight accounting (gRFC A48) through the generated stub, seen from both ends.

Every RPC counts +1 on its backend when it is picked and -1 exactly once when it
ends, whatever its status. Each test checks that the channel's
``connection_table()`` and the servers' own count of live handlers agree while
RPCs run, and that both are back to zero once they have ended.
"""

from __future__ import annotations

import gc
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import conference_pb2 as pb
import conference_pb2_grpc
import grpc
import pytest
from helpers import BackendFactory, Ledger, all_eligible, observed_channel, wait_until

import grpc_leastconn

RPC_TIMEOUT = 5.0
# The library's promise for a dropped response iterator, and the bound for a
# count to settle after an RPC has ended (done callbacks run on grpcio's
# threads, a moment after the caller sees the status).
SETTLE_S = 1.0
# Upper bound for any server-side hold, so a failed test cannot wedge a worker.
HOLD_LIMIT_S = 10.0
OK = "OK"
RAISE = "RAISE"


# -- a backend whose RPCs wait for the test, then end with a chosen status ------


class GatedServicer:
    """``conference.Conference`` whose RPCs hold until ``open_gate()``.

    The outcome comes from the request: Ping's ``payload``, Join's
    ``session_id``, Upload's first frame's ``session_id``, Chat's first
    message's ``text``. It names a ``grpc.StatusCode`` to abort with
    (``"CODE:details"`` sets the details too), ``OK`` to succeed, or
    ``RAISE`` for a handler that raises. Holding lets a test
    look at both counts while the RPC is certainly in flight, without timing.
    Counters mirror ``ConferenceServicer``'s: ``live``, ``started``,
    ``finished``, ``wait_until``.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._live = 0
        self._started = 0
        self._finished = 0
        self._open = False
        self._holds: set[threading.Event] = set()

    @property
    def live(self) -> int:
        with self._cond:
            return self._live

    @property
    def started(self) -> int:
        with self._cond:
            return self._started

    @property
    def finished(self) -> int:
        with self._cond:
            return self._finished

    def wait_until(self, predicate: Callable[[GatedServicer], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def open_gate(self) -> None:
        with self._cond:
            self._open = True
            for hold in self._holds:
                hold.set()

    def _begin(self, context: grpc.ServicerContext) -> None:
        ended = threading.Event()

        def end() -> None:
            with self._cond:
                if ended.is_set():
                    return
                ended.set()
                self._live -= 1
                self._finished += 1
                self._cond.notify_all()

        with self._cond:
            self._live += 1
            self._started += 1
            self._cond.notify_all()
        if not context.add_callback(end):
            end()

    def _hold(self, context: grpc.ServicerContext) -> None:
        hold = threading.Event()
        with self._cond:
            if self._open:
                return
            self._holds.add(hold)
        # A cancelled RPC stops holding at once.
        if context.add_callback(hold.set):
            hold.wait(HOLD_LIMIT_S)
        with self._cond:
            self._holds.discard(hold)

    @staticmethod
    def _finish(context: grpc.ServicerContext, outcome: str) -> None:
        if outcome == RAISE:
            raise RuntimeError("handler failed on purpose")
        if outcome != OK:
            code, _, details = outcome.partition(":")
            context.abort(grpc.StatusCode[code], details or f"failed with {code} on purpose")

    def ping(self, request: pb.PingRequest, context: grpc.ServicerContext) -> pb.PingReply:
        self._begin(context)
        self._hold(context)
        self._finish(context, request.payload)
        return pb.PingReply(backend="gated", payload=request.payload)

    def join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> Iterator[pb.Frame]:
        self._begin(context)
        yield pb.Frame(session_id=request.session_id, seq=0, backend="gated")
        self._hold(context)
        self._finish(context, request.session_id)

    def upload(
        self, request_iterator: Iterator[pb.Frame], context: grpc.ServicerContext
    ) -> pb.UploadSummary:
        self._begin(context)
        first = next(request_iterator)
        self._hold(context)
        self._finish(context, first.session_id)
        return pb.UploadSummary(frames=1, backend="gated")

    def chat(
        self, request_iterator: Iterator[pb.ChatMessage], context: grpc.ServicerContext
    ) -> Iterator[pb.ChatMessage]:
        self._begin(context)
        first = next(request_iterator)
        yield pb.ChatMessage(text=first.text, backend="gated")
        self._hold(context)
        self._finish(context, first.text)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "conference.Conference",
            {
                "Ping": grpc.unary_unary_rpc_method_handler(
                    self.ping, pb.PingRequest.FromString, pb.PingReply.SerializeToString
                ),
                "Join": grpc.unary_stream_rpc_method_handler(
                    self.join, pb.JoinRequest.FromString, pb.Frame.SerializeToString
                ),
                "Upload": grpc.stream_unary_rpc_method_handler(
                    self.upload, pb.Frame.FromString, pb.UploadSummary.SerializeToString
                ),
                "Chat": grpc.stream_stream_rpc_method_handler(
                    self.chat, pb.ChatMessage.FromString, pb.ChatMessage.SerializeToString
                ),
            },
        )


@dataclass
class GatedBackend:
    server: grpc.Server
    address: str
    servicer: GatedServicer
    executor: futures.ThreadPoolExecutor


@pytest.fixture
def gated_backends() -> Iterator[Callable[[int], list[GatedBackend]]]:
    started: list[GatedBackend] = []

    def start(n: int) -> list[GatedBackend]:
        new = []
        for _ in range(n):
            servicer = GatedServicer()
            executor = futures.ThreadPoolExecutor(max_workers=16)
            server = grpc.server(executor, options=[("grpc.so_reuseport", 0)])
            server.add_generic_rpc_handlers((servicer.handler(),))
            port = server.add_insecure_port("127.0.0.1:0")
            server.start()
            backend = GatedBackend(server, f"127.0.0.1:{port}", servicer, executor)
            started.append(backend)
            new.append(backend)
        return new

    yield start
    for backend in started:
        backend.servicer.open_gate()
    for event in [backend.server.stop(None) for backend in started]:
        event.wait(10)
    for backend in started:
        backend.executor.shutdown(wait=False, cancel_futures=True)


# -- a balanced channel and the servers behind it -----------------------------


@dataclass
class Cluster:
    servers: list[Any]  # example Backends or GatedBackends: .address, .servicer
    channel: grpc_leastconn.LeastConnChannel
    stub: conference_pb2_grpc.ConferenceStub
    ledger: Ledger

    def client(self) -> dict[str, int]:
        return self.channel.connection_table()

    def server(self) -> dict[str, int]:
        return {s.address: s.servicer.live for s in self.servers}

    def in_flight(self, total: int) -> dict[str, int]:
        """Wait for ``total`` live handlers and the client's table to match them.

        Waiting on both, because each end learns of an RPC's end on its own
        thread: neither is guaranteed to get there first.
        """

        def agreed() -> dict[str, int] | None:
            server = self.server()
            if sum(server.values()) != total or self.client() != server:
                return None
            return server

        return wait_until(agreed, timeout=RPC_TIMEOUT, message=f"{self.client()} {self.server()}")

    def assert_idle(self) -> None:
        for s in self.servers:
            assert s.servicer.wait_until(lambda v: v.live == 0, SETTLE_S), (s.address, s.servicer)
        wait_until(lambda: not any(self.client().values()), SETTLE_S, message=str(self.client()))
        assert set(self.client()) == {s.address for s in self.servers}
        for s in self.servers:
            assert s.servicer.started == s.servicer.finished
        self.ledger.check()

    def open_gates(self) -> None:
        for s in self.servers:
            s.servicer.open_gate()


@pytest.fixture
def cluster(
    backends: BackendFactory, gated_backends: Callable[[int], list[GatedBackend]]
) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(n: int = 4, *, gated: bool = False) -> Cluster:
        servers: list[Any] = gated_backends(n) if gated else backends(n)
        channel, ledger = observed_channel([s.address for s in servers])
        made.append(Cluster(servers, channel, conference_pb2_grpc.ConferenceStub(channel), ledger))
        # Until every backend can take calls, the first ready one takes them
        # all; the counts below assume the whole set is in play.
        wait_until(lambda: all_eligible(channel), timeout=RPC_TIMEOUT)
        return made[-1]

    yield make
    try:
        for c in made:
            if isinstance(c.servers[0], GatedBackend):
                c.open_gates()
            c.assert_idle()
    finally:
        for c in made:
            c.channel.close()


@pytest.fixture
def pool() -> Iterator[futures.ThreadPoolExecutor]:
    with futures.ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


class RequestQueue:
    """A request iterator the test feeds one message at a time."""

    _END = object()

    def __init__(self, fail: bool = False) -> None:
        self._queue: queue.Queue[object] = queue.Queue()
        self._fail = fail

    def put(self, *messages: object) -> None:
        for message in messages:
            self._queue.put(message)

    def close(self) -> None:
        self._queue.put(self._END)

    def __iter__(self) -> Iterator[Any]:
        for _ in range(1000):
            item = self._queue.get(timeout=RPC_TIMEOUT)
            if item is self._END:
                if self._fail:
                    raise RuntimeError("request iterator failed on purpose")
                return
            yield item


def code_of(outcome: str) -> grpc.StatusCode:
    return grpc.StatusCode.UNKNOWN if outcome == RAISE else grpc.StatusCode[outcome]


def run_unary(
    entry: str, multicallable: Any, request: Any, pool: futures.ThreadPoolExecutor, **kwargs: Any
) -> futures.Future[Any] | grpc.Future:
    """Start a unary-response RPC through one entry point; a future of its reply."""
    if entry == "future":
        return multicallable.future(request, **kwargs)
    if entry == "with_call":
        return pool.submit(lambda: multicallable.with_call(request, **kwargs)[0])
    return pool.submit(multicallable, request, **kwargs)


def error_of(future: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        future.result(timeout=RPC_TIMEOUT)
    return info.value


UNARY_ENTRIES = ["__call__", "with_call", "future"]
OUTCOMES = [OK, "NOT_FOUND", "UNAVAILABLE", "RESOURCE_EXHAUSTED", RAISE]


# -- unary ----------------------------------------------------------------------


@pytest.mark.parametrize("entry", UNARY_ENTRIES)
def test_unary_success_on_example_backends(
    cluster: Callable[..., Cluster], pool: futures.ThreadPoolExecutor, entry: str
) -> None:
    c = cluster(4)
    for i in range(8):
        reply = run_unary(
            entry, c.stub.Ping, pb.PingRequest(payload=str(i)), pool, timeout=RPC_TIMEOUT
        ).result(timeout=RPC_TIMEOUT)
        assert reply.payload == str(i)
        c.assert_idle()
    assert sum(s.servicer.started for s in c.servers) == 8


@pytest.mark.parametrize("outcome", OUTCOMES)
@pytest.mark.parametrize("entry", UNARY_ENTRIES)
def test_unary_counts_while_running_and_after_any_status(
    cluster: Callable[..., Cluster], pool: futures.ThreadPoolExecutor, entry: str, outcome: str
) -> None:
    c = cluster(3, gated=True)
    pending = run_unary(
        entry, c.stub.Ping, pb.PingRequest(payload=outcome), pool, timeout=RPC_TIMEOUT
    )
    assert sorted(c.in_flight(1).values()) == [0, 0, 1]
    c.open_gates()
    if outcome == OK:
        assert pending.result(timeout=RPC_TIMEOUT).payload == OK
    else:
        assert error_of(pending).code() == code_of(outcome)
    c.assert_idle()


@pytest.mark.parametrize(
    "details",
    [
        # What a backend relays when its own upstream gRPC channel is down.
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.7:50051",
        "connections to all backends failing; last error: UNKNOWN: ipv4:10.0.0.7:50051",
    ],
)
@pytest.mark.parametrize("entry", UNARY_ENTRIES)
def test_unavailable_from_the_server_is_not_sent_again(
    cluster: Callable[..., Cluster], pool: futures.ThreadPoolExecutor, entry: str, details: str
) -> None:
    # The handler ran: sending the request to another backend would run it
    # twice. Only a call that never left this process may be re-picked.
    c = cluster(3, gated=True)
    pending = run_unary(
        entry, c.stub.Ping, pb.PingRequest(payload=f"UNAVAILABLE:{details}"), pool, timeout=5
    )
    c.in_flight(1)
    c.open_gates()
    error = error_of(pending)
    assert (error.code(), error.details()) == (grpc.StatusCode.UNAVAILABLE, details)
    c.assert_idle()
    executions = [s.servicer.started for s in c.servers]
    assert sum(executions) == 1, f"one call ran {sum(executions)} times: {executions}"


@pytest.mark.parametrize("entry", UNARY_ENTRIES)
def test_unary_deadline_exceeded(
    cluster: Callable[..., Cluster], pool: futures.ThreadPoolExecutor, entry: str
) -> None:
    c = cluster(2)
    pending = run_unary(entry, c.stub.Ping, pb.PingRequest(delay_ms=10_000), pool, timeout=0.3)
    c.in_flight(1)
    assert error_of(pending).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    c.assert_idle()
    assert sum(s.servicer.cancelled for s in c.servers) == 1


def test_unary_future_cancelled(cluster: Callable[..., Cluster]) -> None:
    c = cluster(2)
    future = c.stub.Ping.future(pb.PingRequest(delay_ms=10_000), timeout=RPC_TIMEOUT)
    c.in_flight(1)
    assert future.cancel()
    with pytest.raises(grpc.FutureCancelledError):
        future.result(timeout=RPC_TIMEOUT)
    c.assert_idle()
    assert sum(s.servicer.cancelled for s in c.servers) == 1


# -- server streaming -----------------------------------------------------------


def endless_join(c: Cluster, timeout: float = RPC_TIMEOUT) -> Any:
    return c.stub.Join(pb.JoinRequest(duration_ms=0, frame_interval_ms=20), timeout=timeout)


def test_server_stream_read_to_the_end(cluster: Callable[..., Cluster]) -> None:
    c = cluster(3)
    stream = c.stub.Join(
        pb.JoinRequest(duration_ms=500, frame_interval_ms=100), timeout=RPC_TIMEOUT
    )
    first = next(stream)
    c.in_flight(1)
    rest = list(itertools.islice(stream, 100))
    assert [f.seq for f in [first, *rest]] == [0, 1, 2, 3, 4]
    assert stream.code() == grpc.StatusCode.OK
    c.assert_idle()
    assert sum(s.servicer.cancelled for s in c.servers) == 0


def test_server_stream_cancelled(cluster: Callable[..., Cluster]) -> None:
    c = cluster(3)
    stream = endless_join(c)
    next(stream)
    c.in_flight(1)
    assert stream.cancel()
    with pytest.raises(grpc.RpcError) as info:
        list(itertools.islice(stream, 1000))
    assert info.value.code() == grpc.StatusCode.CANCELLED
    c.assert_idle()
    assert sum(s.servicer.cancelled for s in c.servers) == 1


def test_server_stream_deadline_exceeded(cluster: Callable[..., Cluster]) -> None:
    c = cluster(3)
    stream = endless_join(c, timeout=0.5)
    next(stream)
    c.in_flight(1)
    with pytest.raises(grpc.RpcError) as info:
        list(itertools.islice(stream, 1000))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    c.assert_idle()
    assert sum(s.servicer.cancelled for s in c.servers) == 1


def test_server_stream_abandoned_is_cancelled_and_released(
    cluster: Callable[..., Cluster],
) -> None:
    c = cluster(3)
    stream = endless_join(c, timeout=30.0)
    next(stream)
    (busy,) = [a for a, n in c.in_flight(1).items() if n]
    del stream
    gc.collect()
    dropped_at = time.monotonic()
    c.assert_idle()
    assert time.monotonic() - dropped_at < SETTLE_S
    (server,) = [s for s in c.servers if s.address == busy]
    assert server.servicer.cancelled == 1


@pytest.mark.parametrize("outcome", ["NOT_FOUND", "INTERNAL", RAISE])
def test_server_stream_error_status_after_a_message(
    cluster: Callable[..., Cluster], outcome: str
) -> None:
    c = cluster(2, gated=True)
    stream = c.stub.Join(pb.JoinRequest(session_id=outcome), timeout=RPC_TIMEOUT)
    assert next(stream).session_id == outcome
    c.in_flight(1)
    c.open_gates()
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == code_of(outcome)
    c.assert_idle()


# -- client streaming -----------------------------------------------------------


@pytest.mark.parametrize("entry", UNARY_ENTRIES)
def test_client_stream_success(
    cluster: Callable[..., Cluster], pool: futures.ThreadPoolExecutor, entry: str
) -> None:
    c = cluster(3)
    requests = RequestQueue()
    requests.put(pb.Frame(seq=0), pb.Frame(seq=1))
    pending = run_unary(entry, c.stub.Upload, iter(requests), pool, timeout=RPC_TIMEOUT)
    c.in_flight(1)
    requests.put(pb.Frame(seq=2))
    requests.close()
    assert pending.result(timeout=RPC_TIMEOUT).frames == 3
    c.assert_idle()


@pytest.mark.parametrize("entry", UNARY_ENTRIES)
def test_client_stream_request_iterator_raises(
    cluster: Callable[..., Cluster], pool: futures.ThreadPoolExecutor, entry: str
) -> None:
    c = cluster(3)
    requests = RequestQueue(fail=True)
    requests.put(pb.Frame(seq=0))
    pending = run_unary(entry, c.stub.Upload, iter(requests), pool, timeout=RPC_TIMEOUT)
    c.in_flight(1)
    requests.close()
    assert error_of(pending).code() == grpc.StatusCode.UNKNOWN
    c.assert_idle()
    assert sum(s.servicer.cancelled for s in c.servers) == 1


@pytest.mark.parametrize("outcome", OUTCOMES)
@pytest.mark.parametrize("entry", UNARY_ENTRIES)
def test_client_stream_any_status(
    cluster: Callable[..., Cluster], pool: futures.ThreadPoolExecutor, entry: str, outcome: str
) -> None:
    c = cluster(2, gated=True)
    requests = RequestQueue()
    requests.put(pb.Frame(session_id=outcome))
    pending = run_unary(entry, c.stub.Upload, iter(requests), pool, timeout=RPC_TIMEOUT)
    c.in_flight(1)
    c.open_gates()
    if outcome == OK:
        assert pending.result(timeout=RPC_TIMEOUT).frames == 1
    else:
        assert error_of(pending).code() == code_of(outcome)
    requests.close()
    c.assert_idle()


def test_client_stream_future_cancelled(cluster: Callable[..., Cluster]) -> None:
    c = cluster(2)
    requests = RequestQueue()
    requests.put(pb.Frame(seq=0))
    future = c.stub.Upload.future(iter(requests), timeout=RPC_TIMEOUT)
    c.in_flight(1)
    assert future.cancel()
    c.assert_idle()
    assert sum(s.servicer.cancelled for s in c.servers) == 1
    requests.close()


def test_client_stream_deadline_exceeded(cluster: Callable[..., Cluster]) -> None:
    c = cluster(2)
    requests = RequestQueue()
    requests.put(pb.Frame(seq=0))
    future = c.stub.Upload.future(iter(requests), timeout=0.3)
    c.in_flight(1)
    assert error_of(future).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    c.assert_idle()
    requests.close()


# -- bidirectional streaming ----------------------------------------------------


def open_chat(c: Cluster, requests: Iterable[Any], timeout: float = RPC_TIMEOUT) -> Any:
    chat = c.stub.Chat(iter(requests), timeout=timeout)
    return chat


def test_bidi_read_to_the_end(cluster: Callable[..., Cluster]) -> None:
    c = cluster(3)
    requests = RequestQueue()
    chat = open_chat(c, requests)
    requests.put(pb.ChatMessage(text="a"))
    assert next(chat).text == "a"
    c.in_flight(1)
    requests.put(pb.ChatMessage(text="b"), pb.ChatMessage(text="c"))
    requests.close()
    assert [m.text for m in itertools.islice(chat, 100)] == ["b", "c"]
    assert chat.code() == grpc.StatusCode.OK
    c.assert_idle()


def test_bidi_cancelled(cluster: Callable[..., Cluster]) -> None:
    c = cluster(3)
    requests = RequestQueue()
    chat = open_chat(c, requests)
    requests.put(pb.ChatMessage(text="a"))
    next(chat)
    c.in_flight(1)
    assert chat.cancel()
    c.assert_idle()
    assert sum(s.servicer.cancelled for s in c.servers) == 1
    requests.close()


def test_bidi_abandoned_is_cancelled_and_released(cluster: Callable[..., Cluster]) -> None:
    c = cluster(3)
    requests = RequestQueue()
    chat = open_chat(c, requests, timeout=30.0)
    requests.put(pb.ChatMessage(text="a"))
    next(chat)
    c.in_flight(1)
    del chat
    gc.collect()
    dropped_at = time.monotonic()
    c.assert_idle()
    assert time.monotonic() - dropped_at < SETTLE_S
    assert sum(s.servicer.cancelled for s in c.servers) == 1
    requests.close()


def test_bidi_request_iterator_raises(cluster: Callable[..., Cluster]) -> None:
    c = cluster(3)
    requests = RequestQueue(fail=True)
    chat = open_chat(c, requests)
    requests.put(pb.ChatMessage(text="a"))
    next(chat)
    c.in_flight(1)
    requests.close()
    with pytest.raises(grpc.RpcError) as info:
        list(itertools.islice(chat, 100))
    assert info.value.code() == grpc.StatusCode.UNKNOWN
    c.assert_idle()
    assert sum(s.servicer.cancelled for s in c.servers) == 1


def test_bidi_deadline_exceeded(cluster: Callable[..., Cluster]) -> None:
    c = cluster(2)
    requests = RequestQueue()
    chat = open_chat(c, requests, timeout=0.5)
    requests.put(pb.ChatMessage(text="a"))
    next(chat)
    c.in_flight(1)
    with pytest.raises(grpc.RpcError) as info:
        list(itertools.islice(chat, 100))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    c.assert_idle()
    requests.close()


@pytest.mark.parametrize("outcome", ["NOT_FOUND", "INTERNAL", RAISE])
def test_bidi_error_status_after_a_message(cluster: Callable[..., Cluster], outcome: str) -> None:
    c = cluster(2, gated=True)
    requests = RequestQueue()
    chat = open_chat(c, requests)
    requests.put(pb.ChatMessage(text=outcome))
    assert next(chat).text == outcome
    c.in_flight(1)
    c.open_gates()
    with pytest.raises(grpc.RpcError) as info:
        next(chat)
    assert info.value.code() == code_of(outcome)
    requests.close()
    c.assert_idle()


# -- many RPCs in flight at once ------------------------------------------------


def test_open_streams_are_spread_exactly(cluster: Callable[..., Cluster]) -> None:
    c = cluster(4)
    streams = [endless_join(c, timeout=30.0) for _ in range(8)]
    for stream in streams:
        next(stream)
    assert c.in_flight(8) == dict.fromkeys(c.client(), 2)
    assert [s.servicer.live_streams for s in c.servers] == [2, 2, 2, 2]

    # Emptying one backend makes it the only least-loaded one: the next two
    # streams must both go there.
    emptied = c.servers[1].address
    by_backend = {id(s): next(s).backend for s in streams}
    for stream in [s for s in streams if by_backend[id(s)] == emptied]:
        stream.cancel()
        streams.remove(stream)
    c.in_flight(6)
    assert c.client()[emptied] == 0
    for _ in range(2):
        stream = endless_join(c, timeout=30.0)
        assert next(stream).backend == emptied
        streams.append(stream)
    assert c.in_flight(8) == dict.fromkeys(c.client(), 2)

    for stream in streams:
        stream.cancel()
    c.assert_idle()


def test_every_call_type_in_flight_together(
    cluster: Callable[..., Cluster], pool: futures.ThreadPoolExecutor
) -> None:
    c = cluster(2)
    ping = c.stub.Ping.future(pb.PingRequest(delay_ms=10_000), timeout=RPC_TIMEOUT)
    c.in_flight(1)
    join = endless_join(c)
    next(join)
    c.in_flight(2)
    uploads = RequestQueue()
    uploads.put(pb.Frame(seq=0))
    upload = c.stub.Upload.future(iter(uploads), timeout=RPC_TIMEOUT)
    c.in_flight(3)
    chats = RequestQueue()
    chat = open_chat(c, chats)
    chats.put(pb.ChatMessage(text="a"))
    next(chat)
    assert c.in_flight(4) == dict.fromkeys(c.client(), 2)

    ping.cancel()
    join.cancel()
    uploads.close()
    chats.close()
    assert upload.result(timeout=RPC_TIMEOUT).frames == 1
    assert list(itertools.islice(chat, 100)) == []
    c.assert_idle()
