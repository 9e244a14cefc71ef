"""A finished grpc.aio call and the snapshot that takes its place answer alike.

When a backend's backend channel closes, the asyncio channel swaps each finished
call that went there for a ``FinishedCall``, so that calls the application
keeps do not hold the backend's connection open. Every case here makes a
real call through a raw grpc.aio channel to a real server, lets it finish
(succeed, fail on the server, exceed its deadline, be cancelled here), then
asks the call and its snapshot the same questions.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from collections.abc import Awaitable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from aio_support import RPC_TIMEOUT, SETTLE_S, eventually, run
from seams import FinishedCall

SERVICE = "test.Outcomes"
# Each call type; request streams both from an iterator and written.
CASES = (
    ("unary_unary", "iterator"),
    ("unary_stream", "iterator"),
    ("stream_unary", "iterator"),
    ("stream_unary", "writer"),
    ("stream_stream", "iterator"),
    ("stream_stream", "writer"),
)
HOWS = ("ok", "fail", "deadline", "cancel")
EXPECTED_CODE = {
    "ok": grpc.StatusCode.OK,
    "fail": grpc.StatusCode.FAILED_PRECONDITION,
    "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
    "cancel": grpc.StatusCode.CANCELLED,
}
INITIAL = (("hello", "there"),)
TRAILING = (("bye", "now"), ("reason-bin", b"\x00\x01"))
# Set while the server holds an RPC open for the client to end (tests run one at a time).
lingering = threading.Event()


def _begin(context: grpc.ServicerContext) -> None:
    context.send_initial_metadata(INITIAL)
    context.set_trailing_metadata(TRAILING)


def _end(how: bytes, context: grpc.ServicerContext) -> None:
    if how == b"fail":
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "told to fail")
    if how in (b"deadline", b"cancel"):
        # Until the client's deadline or cancellation ends the RPC.
        ended = threading.Event()
        context.add_callback(ended.set)
        lingering.set()
        ended.wait(RPC_TIMEOUT)


def _unary_unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    _begin(context)
    _end(request, context)
    return b"reply:" + request


def _unary_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    _begin(context)
    yield b"first"
    yield b"second"
    _end(request, context)


def _stream_unary(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    _begin(context)
    received = list(requests)
    _end(received[-1], context)
    return b",".join(received)


def _stream_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    _begin(context)
    received = list(requests)
    yield from received
    _end(received[-1], context)


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    handlers = {
        "unary_unary": grpc.unary_unary_rpc_method_handler(_unary_unary),
        "unary_stream": grpc.unary_stream_rpc_method_handler(_unary_stream),
        "stream_unary": grpc.stream_unary_rpc_method_handler(_stream_unary),
        "stream_stream": grpc.stream_stream_rpc_method_handler(_stream_stream),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


async def finished_call(channel: grpc.aio.Channel, kind: str, style: str, how: str) -> Any:
    """A real call of ``kind``, its requests sent in ``style``, ended as ``how`` says."""
    multicallable = getattr(channel, kind)(f"/{SERVICE}/{kind}")
    requests = [b"a", how.encode()]
    timeout = 0.3 if how == "deadline" else RPC_TIMEOUT
    lingering.clear()
    if kind.startswith("unary"):
        call = multicallable(requests[-1], timeout=timeout)
    elif style == "iterator":
        call = multicallable(iter(requests), timeout=timeout)
    else:
        call = multicallable(timeout=timeout)
        for request in requests:
            await call.write(request)
        await call.done_writing()
    if how == "cancel":
        assert await asyncio.to_thread(lingering.wait, RPC_TIMEOUT)
        call.cancel()
    try:
        if kind.endswith("unary"):
            await call
        else:
            async for _ in call:
                pass
    except (grpc.aio.AioRpcError, asyncio.CancelledError):
        pass
    await call.code()
    return call


async def outcome(awaitable: Awaitable[Any]) -> tuple[Any, ...]:
    try:
        return ("returned", await awaitable)
    except grpc.aio.AioRpcError as error:
        return (
            "raised AioRpcError",
            error.code(),
            error.details(),
            tuple(error.initial_metadata()),
            tuple(error.trailing_metadata()),
            error.debug_error_string(),
        )
    except (asyncio.CancelledError, asyncio.InvalidStateError, grpc.aio.UsageError) as error:
        return ("raised", type(error).__name__, str(error))


async def answers(call: Any, kind: str) -> dict[str, Any]:
    """Everything the application can ask a finished call of ``kind``."""
    got: dict[str, Any] = {
        "code": await call.code(),
        "details": await call.details(),
        "initial": tuple(await call.initial_metadata()),
        "trailing": tuple(await call.trailing_metadata()),
        "debug": await call.debug_error_string(),
        "done": call.done(),
        "cancelled": call.cancelled(),
        "cancel": call.cancel(),
    }
    if kind.endswith("unary"):
        got["await"] = await outcome(call)
        got["await again"] = await outcome(call)
    else:
        got["read"] = await outcome(call.read())
    if kind.startswith("stream"):
        got["write"] = await outcome(call.write(b"late"))
        got["done_writing"] = await outcome(call.done_writing())
    return got


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize(("kind", "style"), CASES)
def test_snapshot_answers_as_the_call_did(address: str, kind: str, style: str, how: str) -> None:
    async def body() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            call = await finished_call(channel, kind, style, how)
            snapshot = await FinishedCall.of(
                call,
                unary_response=kind.endswith("unary"),
                requests_iterated=kind.startswith("stream") and style == "iterator",
            )
            real = await answers(call, kind)
            assert real["code"] is EXPECTED_CODE[how]
            if how != "cancel":
                assert real["initial"] == INITIAL
            if how in ("ok", "fail"):
                # Trailers come with the server's status only.
                assert real["trailing"][0] == TRAILING[0]
            if how == "ok" and kind.endswith("unary"):
                assert real["await"][0] == "returned" and real["await"][1]
            assert await answers(snapshot, kind) == real

            # The snapshot keeps nothing of the call: that is its purpose.
            # (grpc.aio's own tasks may hold a cancelled call a little longer.)
            collected = weakref.ref(call)
            del call
            await eventually(lambda: gc.collect() is not None and collected() is None, SETTLE_S)
            assert snapshot.done()

    run(body)


def test_snapshot_of_an_unfinished_call_is_refused(address: str) -> None:
    async def body() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.unary_unary(f"/{SERVICE}/unary_unary")(b"deadline", timeout=RPC_TIMEOUT)
            with pytest.raises(ValueError, match="not finished"):
                await FinishedCall.of(call, unary_response=True)
            call.cancel()

    run(body)
