"""In-flight accounting (gRFC A48) of the asyncio channel, seen from both ends.

Every RPC counts +1 on its backend when it is picked and -1 exactly once when
it ends, whatever its status. Each test checks that the channel's
``connection_table()`` and the servers' own count of live handlers agree while
RPCs run, that both are back to zero once they have ended, and (the ledger)
that every pick was released exactly once.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
from collections import Counter

import conference_pb2 as pb
import grpc
import pytest
from aio_support import (
    RPC_TIMEOUT,
    SETTLE_S,
    RequestFeed,
    balanced,
    endless_join,
    eventually,
    failing_backends,
    run,
    server_until,
)
from helpers import BackendFactory, observed_aio_channel

# -- unary ------------------------------------------------------------------------


def test_unary_success_is_counted_and_released(backends: BackendFactory) -> None:
    async def body() -> None:
        async with balanced(backends(4)) as c:
            for i in range(8):
                call = c.stub.Ping(pb.PingRequest(payload=str(i)), timeout=RPC_TIMEOUT)
                assert isinstance(call, grpc.aio.UnaryUnaryCall)
                assert (await call).payload == str(i)
                assert await call.code() is grpc.StatusCode.OK
                assert call.done() and not call.cancelled()
                await c.assert_idle()
            assert [s.servicer.started for s in c.servers] == [2, 2, 2, 2]

    run(body)


def test_unary_counts_while_running(backends: BackendFactory) -> None:
    async def body() -> None:
        async with balanced(backends(3)) as c:
            call = c.stub.Ping(pb.PingRequest(delay_ms=300), timeout=RPC_TIMEOUT)
            assert sorted((await c.in_flight(1)).values()) == [0, 0, 1]
            await call
            await c.assert_idle()

    run(body)


@pytest.mark.parametrize("code", ["NOT_FOUND", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "INTERNAL"])
def test_unary_error_status_is_released(code: str) -> None:
    async def body() -> None:
        with failing_backends(2) as servers:
            channel, ledger = observed_aio_channel([s.address for s in servers])
            fail = channel.unary_unary("/test.Failing/Fail")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await fail(code.encode(), timeout=RPC_TIMEOUT)
            assert info.value.code() is grpc.StatusCode[code]
            await eventually(lambda: not any(channel.connection_table().values()))
            for s in servers:
                assert await server_until(s.servicer, lambda v: v.live == 0, SETTLE_S)
            assert sum(s.servicer.started for s in servers) == 1
            ledger.check()
            await channel.close()

    run(body)


def test_unary_unknown_method_is_released(backends: BackendFactory) -> None:
    async def body() -> None:
        async with balanced(backends(2)) as c:
            call = c.channel.unary_unary("/conference.Conference/NoSuchMethod")(b"")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
            assert await call.code() is grpc.StatusCode.UNIMPLEMENTED
            await c.assert_idle()

    run(body)


def test_unary_deadline_exceeded(backends: BackendFactory) -> None:
    async def body() -> None:
        async with balanced(backends(2)) as c:
            call = c.stub.Ping(pb.PingRequest(delay_ms=10_000), timeout=0.3)
            await c.in_flight(1)
            assert 0 < call.time_remaining() <= 0.3
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            await c.assert_idle()
            assert c.cancelled() == 1

    run(body)


def test_unary_cancelled(backends: BackendFactory) -> None:
    async def body() -> None:
        async with balanced(backends(2)) as c:
            call = c.stub.Ping(pb.PingRequest(delay_ms=10_000), timeout=RPC_TIMEOUT)
            await c.in_flight(1)
            assert call.cancel()
            assert call.done() and call.cancelled()
            assert not call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert await call.code() is grpc.StatusCode.CANCELLED
            await c.assert_idle()
            assert c.cancelled() == 1

    run(body)


def test_unary_cancelled_while_awaited_is_done_at_once(backends: BackendFactory) -> None:
    async def body() -> None:
        async with balanced(backends(2)) as c:
            call = c.stub.Ping(pb.PingRequest(delay_ms=10_000), timeout=RPC_TIMEOUT)

            async def wait() -> object:
                return await call

            awaiting = asyncio.ensure_future(wait())
            await c.in_flight(1)
            seen: list[object] = []
            call.add_done_callback(seen.append)
            assert call.cancel()
            # As grpc.aio's own calls: done, and the callbacks run, inside cancel().
            assert seen == [call] and call.done() and call.cancelled()
            with pytest.raises(asyncio.CancelledError):
                await awaiting
            await c.assert_idle()
            assert c.cancelled() == 1

    run(body)


def test_unary_awaiting_task_cancelled(backends: BackendFactory) -> None:
    async def body() -> None:
        async with balanced(backends(2)) as c:
            task = asyncio.ensure_future(
                c.stub.Ping(pb.PingRequest(delay_ms=10_000), timeout=RPC_TIMEOUT)
            )
            await c.in_flight(1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await c.assert_idle()
            assert c.cancelled() == 1

    run(body)


def test_unary_done_callback_gets_the_call(backends: BackendFactory) -> None:
    async def body() -> None:
        async with balanced(backends(2)) as c:
            done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            call = c.stub.Ping(pb.PingRequest(payload="x"), timeout=RPC_TIMEOUT)
            call.add_done_callback(done.set_result)
            assert await done is call
            assert (await call).payload == "x"
            await c.assert_idle()

    run(body)


# -- server streaming ---------------------------------------------------------------


def test_server_stream_read_to_the_end(backends: BackendFactory) -> None:
    async def body() -> None:
        async with balanced(backends(3)) as c:
            stream = c.stub.Join(
                pb.JoinRequest(duration_ms=500, frame_interval_ms=100), timeout=RPC_TIMEOUT
            )
            assert isinstance(stream, grpc.aio.UnaryStreamCall)
            frames = aiter(stream)
            first = await anext(frames)
            await c.in_flight(1)
            rest = [frame.seq async for frame in frames]
            assert [first.seq, *rest] == [0, 1, 2, 3, 4]
            assert await stream.code() is grpc.StatusCode.OK
            await c.assert_idle()
            assert c.cancelled() == 0

    run(body)


def test_server_stream_read_api_to_eof(backends: BackendFactory) -> None:
    async def body() -> None:
        async with balanced(backends(2)) as c:
            stream = c.stub.Join(
                pb.JoinRequest(duration_ms=200, frame_interval_ms=100), timeout=RPC_TIMEOUT
            )
            frames = []
            while (frame := await stream.read()) is not grpc.aio.EOF:
                frames.append(frame.seq)
            assert frames == [0, 1]
            await c.assert_idle()

    run(body)


def test_server_stream_cancelled(backends: BackendFactory) -> None:
    async def body() -> None:
        async with balanced(backends(3)) as c:
            stream = endless_join(c.stub)
            await stream.read()
            await c.in_flight(1)
            assert stream.cancel()
            assert stream.cancelled()
            with pytest.raises(asyncio.CancelledError):
                await stream.read()
            await c.assert_idle()
            assert c.cancelled() == 1

    run(body)


def test_server_stream_deadline_exceeded(backends: BackendFactory) -> None:
    async def body() -> None:
        async with balanced(backends(3)) as c:
            stream = endless_join(c.stub, timeout=0.5)
            await stream.read()
            await c.in_flight(1)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                while True:
                    await stream.read()
            assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            await c.assert_idle()
            assert c.cancelled() == 1

    run(body)


@pytest.mark.parametrize("how", ["read", "async for"])
def test_server_stream_abandoned_is_cancelled_and_released(
    backends: BackendFactory, how: str
) -> None:
    async def body() -> None:
        async with balanced(backends(3)) as c:
            stream = endless_join(c.stub, timeout=30.0)
            if how == "read":
                await stream.read()
            else:
                async for _ in stream:
                    break
            (busy,) = [a for a, n in (await c.in_flight(1)).items() if n]
            del stream
            gc.collect()
            dropped_at = time.monotonic()
            await c.assert_idle()
            assert time.monotonic() - dropped_at < SETTLE_S
            (server,) = [s for s in c.servers if s.address == busy]
            assert server.servicer.cancelled == 1

    run(body)


def test_server_stream_reading_task_cancelled(backends: BackendFactory) -> None:
    async def body() -> None:
        async with balanced(backends(2)) as c:
            stream = endless_join(c.stub, timeout=30.0)
            frames = 0

            async def reader() -> None:
                nonlocal frames
                async for _ in stream:
                    frames += 1

            task = asyncio.create_task(reader())
            await c.in_flight(1)
            await eventually(lambda: frames > 0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await c.assert_idle()
            assert c.cancelled() == 1

    run(body)


@pytest.mark.parametrize("code", ["NOT_FOUND", "INTERNAL"])
def test_server_stream_error_status_after_a_message(code: str) -> None:
    async def body() -> None:
        with failing_backends(2) as servers:
            channel, ledger = observed_aio_channel([s.address for s in servers])
            stream = channel.unary_stream("/test.Failing/FailAfterOne")(
                code.encode(), timeout=RPC_TIMEOUT
            )
            assert await stream.read() == b"one"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stream.read()
            assert info.value.code() is grpc.StatusCode[code]
            await eventually(lambda: not any(channel.connection_table().values()))
            ledger.check()
            await channel.close()

    run(body)


# -- client streaming -------------------------------------------------------------


def test_client_stream_success(backends: BackendFactory) -> None:
    async def body() -> None:
        async with balanced(backends(3)) as c:
            requests = RequestFeed()
            requests.put(pb.Frame(seq=0), pb.Frame(seq=1))
            call = c.stub.Upload(requests, timeout=RPC_TIMEOUT)
            assert isinstance(call, grpc.aio.StreamUnaryCall)
            await c.in_flight(1)
            requests.put(pb.Frame(seq=2))
            requests.close()
            assert (await call).frames == 3
            await c.assert_idle()

    run(body)


def test_client_stream_writer_api(backends: BackendFactory) -> None:
    async def body() -> None:
        async with balanced(backends(3)) as c:
            call = c.stub.Upload(timeout=RPC_TIMEOUT)
            await call.wait_for_connection()
            for seq in range(3):
                await call.write(pb.Frame(seq=seq))
            await c.in_flight(1)
            await call.done_writing()
            assert (await call).frames == 3
            await c.assert_idle()

    run(body)


def test_client_stream_request_iterator_raises(backends: BackendFactory) -> None:
    async def body() -> None:
        async with balanced(backends(3)) as c:
            requests = RequestFeed(fail=True)
            requests.put(pb.Frame(seq=0))
            call = c.stub.Upload(requests, timeout=RPC_TIMEOUT)
            await c.in_flight(1)
            requests.close()
            # grpc.aio cancels a call whose request iterator raises.
            with pytest.raises(asyncio.CancelledError):
                await call
            assert await call.code() is grpc.StatusCode.CANCELLED
            await c.assert_idle()
            assert c.cancelled() == 1

    run(body)


def test_client_stream_deadline_exceeded(backends: BackendFactory) -> None:
    async def body() -> None:
        async with balanced(backends(2)) as c:
            requests = RequestFeed()
            requests.put(pb.Frame(seq=0))
            call = c.stub.Upload(requests, timeout=0.3)
            await c.in_flight(1)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            await c.assert_idle()
            # grpc.aio keeps reading the iterator of a call that timed out.
            requests.close()

    run(body)


def test_client_stream_abandoned_is_cancelled_and_released(backends: BackendFactory) -> None:
    async def body() -> None:
        async with balanced(backends(2)) as c:
            call = c.stub.Upload(timeout=30.0)
            await call.write(pb.Frame(seq=0))
            await c.in_flight(1)
            del call
            gc.collect()
            dropped_at = time.monotonic()
            await c.assert_idle()
            assert time.monotonic() - dropped_at < SETTLE_S
            assert c.cancelled() == 1

    run(body)


# -- bidirectional streaming --------------------------------------------------------


def test_bidi_read_to_the_end(backends: BackendFactory) -> None:
    async def body() -> None:
        async with balanced(backends(3)) as c:
            requests = RequestFeed()
            chat = c.stub.Chat(requests, timeout=RPC_TIMEOUT)
            assert isinstance(chat, grpc.aio.StreamStreamCall)
            requests.put(pb.ChatMessage(text="a"))
            replies = aiter(chat)
            assert (await anext(replies)).text == "a"
            await c.in_flight(1)
            requests.put(pb.ChatMessage(text="b"), pb.ChatMessage(text="c"))
            requests.close()
            assert [m.text async for m in replies] == ["b", "c"]
            assert await chat.code() is grpc.StatusCode.OK
            await c.assert_idle()

    run(body)


def test_bidi_write_read(backends: BackendFactory) -> None:
    async def body() -> None:
        async with balanced(backends(3)) as c:
            chat = c.stub.Chat(timeout=RPC_TIMEOUT)
            for text in "abc":
                await chat.write(pb.ChatMessage(text=text))
                assert (await chat.read()).text == text
            await c.in_flight(1)
            await chat.done_writing()
            assert await chat.read() is grpc.aio.EOF
            await c.assert_idle()

    run(body)


def test_bidi_abandoned_is_cancelled_and_released(backends: BackendFactory) -> None:
    async def body() -> None:
        async with balanced(backends(3)) as c:
            chat = c.stub.Chat(timeout=30.0)
            await chat.write(pb.ChatMessage(text="a"))
            await chat.read()
            await c.in_flight(1)
            del chat
            gc.collect()
            dropped_at = time.monotonic()
            await c.assert_idle()
            assert time.monotonic() - dropped_at < SETTLE_S
            assert c.cancelled() == 1

    run(body)


def test_bidi_request_iterator_raises(backends: BackendFactory) -> None:
    async def body() -> None:
        async with balanced(backends(3)) as c:
            requests = RequestFeed(fail=True)
            chat = c.stub.Chat(requests, timeout=RPC_TIMEOUT)
            requests.put(pb.ChatMessage(text="a"))
            await chat.read()
            await c.in_flight(1)
            requests.close()
            with pytest.raises(asyncio.CancelledError):
                while True:
                    await chat.read()
            assert await chat.code() is grpc.StatusCode.CANCELLED
            await c.assert_idle()
            assert c.cancelled() == 1

    run(body)


def test_bidi_cancelled(backends: BackendFactory) -> None:
    async def body() -> None:
        async with balanced(backends(2)) as c:
            chat = c.stub.Chat(timeout=RPC_TIMEOUT)
            await chat.write(pb.ChatMessage(text="a"))
            await chat.read()
            await c.in_flight(1)
            assert chat.cancel()
            await c.assert_idle()
            assert c.cancelled() == 1

    run(body)


# -- many RPCs at once --------------------------------------------------------------


def test_many_tasks_many_calls_counts_back_to_zero_and_even(backends: BackendFactory) -> None:
    async def body() -> None:
        async with balanced(backends(4)) as c:
            samples: list[dict[str, int]] = []
            kinds: Counter[str] = Counter()

            async def caller(seed: int) -> None:
                rng = random.Random(seed)
                for _ in range(4):
                    roll = rng.random()
                    if roll < 0.6:
                        reply = await c.stub.Ping(
                            pb.PingRequest(payload="p", delay_ms=rng.choice((0, 5, 20))),
                            timeout=RPC_TIMEOUT,
                        )
                        assert reply.payload == "p"
                        kinds["ping"] += 1
                    elif roll < 0.8:
                        stream = c.stub.Join(
                            pb.JoinRequest(duration_ms=20, frame_interval_ms=10),
                            timeout=RPC_TIMEOUT,
                        )
                        assert len([f async for f in stream]) == 2
                        kinds["join"] += 1
                    else:
                        chat = c.stub.Chat(
                            [pb.ChatMessage(text=str(i)) for i in range(3)], timeout=RPC_TIMEOUT
                        )
                        assert [m.text async for m in chat] == ["0", "1", "2"]
                        kinds["chat"] += 1
                    samples.append(c.client())

            await asyncio.gather(*(caller(seed) for seed in range(50)))
            assert sum(kinds.values()) == 200
            await c.assert_idle()
            assert all(n >= 0 for table in samples for n in table.values())
            assert max(sum(table.values()) for table in samples) > 4, "no concurrency seen"
            started = [s.servicer.started for s in c.servers]
            assert sum(started) == 200
            assert max(started) - min(started) <= 0.5 * 200 / 4, started

    run(body)


def test_open_streams_are_spread_exactly(backends: BackendFactory) -> None:
    async def body() -> None:
        async with balanced(backends(4)) as c:
            streams = [endless_join(c.stub, timeout=30.0) for _ in range(8)]
            first = {id(s): (await s.read()).backend for s in streams}
            assert await c.in_flight(8) == dict.fromkeys(c.client(), 2)
            assert [s.servicer.live_streams for s in c.servers] == [2, 2, 2, 2]

            # Emptying one backend makes it the only least-loaded one: the
            # next two streams must both go there.
            emptied = c.servers[1].address
            for stream in [s for s in streams if first[id(s)] == emptied]:
                stream.cancel()
                streams.remove(stream)
            await c.in_flight(6)
            for _ in range(2):
                stream = endless_join(c.stub, timeout=30.0)
                assert (await stream.read()).backend == emptied
                streams.append(stream)
            assert await c.in_flight(8) == dict.fromkeys(c.client(), 2)
            for stream in streams:
                stream.cancel()
            await c.assert_idle()

    run(body)
