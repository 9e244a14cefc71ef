"""Utilities for the asyncio front end's tests.

Each test is a plain function that runs one coroutine with ``run()``,
bounded by ``asyncio.timeout``. Channels are built inside that coroutine,
since a ``grpc_leastconn.aio`` channel belongs to the loop that built it.
Backends are the in-process sync servers of ``conftest.py``.

All tests share one event loop, as an application does. grpc.aio binds its
completion queue to every loop it has seen, and an operation that completes
after its loop closed (a call a test still referenced from a traceback,
collected under the next test's loop) is reported as an error by that loop.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, TypeVar

import conference_pb2 as pb
import conference_pb2_grpc
import grpc
import helpers
from helpers import Ledger, observed_aio_channel

import grpc_leastconn.aio

T = TypeVar("T")

TEST_TIMEOUT_S = 30.0
RPC_TIMEOUT = 5.0
# The promise for a dropped call, and the bound for a count to settle after
# an RPC has ended (each end learns of it on its own).
SETTLE_S = 1.0


_runner: asyncio.Runner | None = None


def run(body: Callable[[], Coroutine[Any, Any, T]], timeout: float = TEST_TIMEOUT_S) -> T:
    """Run ``body()`` on the tests' event loop, failing it after ``timeout`` seconds."""
    global _runner
    if _runner is None:
        _runner = asyncio.Runner()
        atexit.register(_runner.close)

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await body()

    return _runner.run(bounded())


async def eventually(
    predicate: Callable[[], T], timeout: float = RPC_TIMEOUT, message: str = ""
) -> T:
    """Poll a condition nothing notifies us about until it holds; return its value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() >= deadline:
            raise AssertionError(f"not within {timeout:g}s: {message or predicate}: {value!r}")
        await asyncio.sleep(0.005)


async def server_until(servicer: Any, predicate: Callable[[Any], bool], timeout: float) -> bool:
    """A servicer's blocking ``wait_until``, off the loop so client callbacks keep running."""
    return bool(await asyncio.to_thread(servicer.wait_until, predicate, timeout))


@dataclass
class Cluster:
    """A balanced aio channel over example backends, and both ends' counts."""

    servers: list[Any]
    channel: grpc_leastconn.aio.LeastConnChannel
    stub: conference_pb2_grpc.ConferenceStub
    ledger: Ledger

    def client(self) -> dict[str, int]:
        return self.channel.connection_table()

    def server(self) -> dict[str, int]:
        return {s.address: s.servicer.live for s in self.servers}

    async def in_flight(self, total: int) -> dict[str, int]:
        """Wait for ``total`` live handlers and the client's table to match them."""

        def agreed() -> dict[str, int] | None:
            server = self.server()
            if sum(server.values()) != total or self.client() != server:
                return None
            return server

        return await eventually(agreed, message=f"{total} in flight on both ends")

    async def assert_idle(self) -> None:
        for s in self.servers:
            assert await server_until(s.servicer, lambda v: v.live == 0, SETTLE_S), s.address
        await eventually(lambda: not any(self.client().values()), SETTLE_S, "client idle")
        assert set(self.client()) == {s.address for s in self.servers}
        for s in self.servers:
            assert s.servicer.started == s.servicer.finished
        self.ledger.check()

    def cancelled(self) -> int:
        return sum(s.servicer.cancelled for s in self.servers)


@contextlib.asynccontextmanager
async def balanced(servers: Sequence[Any], **kwargs: Any) -> AsyncIterator[Cluster]:
    """A ready balanced channel over ``servers``; closed on exit."""
    channel, ledger = observed_aio_channel([s.address for s in servers], **kwargs)
    try:
        cluster = Cluster(
            list(servers), channel, conference_pb2_grpc.ConferenceStub(channel), ledger
        )
        await all_eligible(channel)
        yield cluster
    finally:
        await channel.close()


async def all_eligible(channel: grpc_leastconn.aio.LeastConnChannel) -> None:
    await eventually(lambda: helpers.all_eligible(channel), message="all eligible")


def backend_of(channel: grpc_leastconn.aio.LeastConnChannel, address: str) -> Any:
    """The backend's state now (a snapshot: ask again to see it change)."""
    return helpers.state_of(channel, address)


def endless_join(stub: conference_pb2_grpc.ConferenceStub, timeout: float = RPC_TIMEOUT) -> Any:
    return stub.Join(pb.JoinRequest(duration_ms=0, frame_interval_ms=20), timeout=timeout)


@dataclass
class StreamTask:
    """Reads one response stream to its end in a task of its own.

    ``code`` is the call's final status: a call cancelled on the client side
    (by the caller or by the channel closing its backend) raises
    CancelledError from the read rather than an AioRpcError.
    """

    call: Any
    frames: list[Any] = field(default_factory=list)
    error: grpc.aio.AioRpcError | None = None
    code: grpc.StatusCode | None = None
    ended: float | None = None
    task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        try:
            async for frame in self.call:
                self.frames.append(frame)
        except grpc.aio.AioRpcError as error:
            self.error = error
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        self.code = await self.call.code()
        self.ended = time.monotonic()

    def start(self) -> StreamTask:
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def join(self, timeout: float) -> None:
        assert self.task is not None
        done, _ = await asyncio.wait({self.task}, timeout=timeout)
        assert self.task in done, "stream did not end"
        self.task.result()

    async def backend(self) -> str:
        await eventually(lambda: self.frames or self.ended, timeout=5.0)
        return str(self.frames[0].backend) if self.frames else ""


class RequestFeed:
    """An async request iterator the test feeds one message at a time."""

    _END = object()

    def __init__(self, fail: bool = False) -> None:
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._fail = fail

    def put(self, *messages: object) -> None:
        for message in messages:
            self._queue.put_nowait(message)

    def close(self) -> None:
        self._queue.put_nowait(self._END)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[Any]:
        for _ in range(1000):
            item = await self._queue.get()
            if item is self._END:
                if self._fail:
                    raise RuntimeError("request iterator failed on purpose")
                return
            yield item


# -- a backend that ends its RPCs with the status the request names -------------


class FailingServicer:
    """``/test.Failing/*`` over raw bytes: each RPC aborts with the code it names.

    Unary ``Fail`` aborts at once; ``FailAfterOne`` streams one message first.
    Counts its live handlers like the example servicer.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.live = 0
        self.started = 0
        self.finished = 0

    def wait_until(self, predicate: Callable[[FailingServicer], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def _begin(self, context: grpc.ServicerContext) -> None:
        with self._cond:
            self.live += 1
            self.started += 1
            self._cond.notify_all()
        ended = threading.Event()

        def end() -> None:
            with self._cond:
                if not ended.is_set():
                    ended.set()
                    self.live -= 1
                    self.finished += 1
                    self._cond.notify_all()

        if not context.add_callback(end):
            end()

    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._begin(context)
        context.abort(grpc.StatusCode[request.decode()], "failed on purpose")

    def fail_after_one(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._begin(context)
        yield b"one"
        context.abort(grpc.StatusCode[request.decode()], "failed on purpose")

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "test.Failing",
            {
                "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
                "FailAfterOne": grpc.unary_stream_rpc_method_handler(self.fail_after_one),
            },
        )


@dataclass
class FailingBackend:
    server: grpc.Server
    address: str
    servicer: FailingServicer
    executor: futures.ThreadPoolExecutor

    def stop(self) -> None:
        self.server.stop(None).wait(10)
        self.executor.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def failing_backends(n: int) -> Iterator[list[FailingBackend]]:
    started: list[FailingBackend] = []
    try:
        for _ in range(n):
            servicer = FailingServicer()
            executor = futures.ThreadPoolExecutor(max_workers=8)
            server = grpc.server(executor, options=[("grpc.so_reuseport", 0)])
            server.add_generic_rpc_handlers((servicer.handler(),))
            port = server.add_insecure_port("127.0.0.1:0")
            server.start()
            started.append(FailingBackend(server, f"127.0.0.1:{port}", servicer, executor))
        yield started
    finally:
        for backend in started:
            backend.stop()
