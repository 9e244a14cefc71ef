"""LoadReporter on a ``grpc.aio`` server: counts, trailers, the out-of-band stream.

The twin of ``test_reporter.py`` with async handlers (coroutines, async
generators and the ``context.write`` style) on a grpc.aio server, and
grpc.aio clients, all on the tests' one event loop (``aio_support.run``).
The client reads the report's copy under ``grpc-leastconn-load-bin``
(C-core hides ORCA's own key); a spy interceptor outside the reporter's
records what the server sent under both keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import time
from collections.abc import AsyncIterator, Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any, NamedTuple

import conference_pb2 as pb
import conference_pb2_grpc
import grpc
import grpc.aio
import pytest
import server as example_server
from aio_support import eventually, run
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from xds.data.orca.v3.orca_load_report_pb2 import OrcaLoadReport
from xds.service.orca.v3.orca_pb2 import OrcaLoadReportRequest

from grpc_leastconn import LoadReporter

RPC_TIMEOUT = 5.0
ORCA_KEY = "endpoint-load-metrics-bin"
MIRROR_KEY = "grpc-leastconn-load-bin"
IN_FLIGHT = "grpc_leastconn.in_flight"
OOB = "/xds.service.orca.v3.OpenRcaService/StreamCoreMetrics"
APP_REPORT = OrcaLoadReport(application_utilization=0.77).SerializeToString()


class _Status(NamedTuple):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


class Probe:
    """Async handlers of every kind; the request says how each one ends."""

    def __init__(self) -> None:
        self.released = asyncio.Event()

    async def act(self, mode: bytes, context: Any) -> None:
        if mode == b"code":
            context.set_code(grpc.StatusCode.NOT_FOUND)
            context.set_details("not here")
        elif mode == b"abort":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "denied")
        elif mode == b"abort_status":
            status = _Status(grpc.StatusCode.UNAVAILABLE, "gone", (("x-app", "status"),))
            await context.abort_with_status(status)
        elif mode == b"raise":
            raise RuntimeError("handler failed")
        elif mode == b"block":
            # grpc.aio cancels this task when the client gives up.
            await asyncio.wait_for(self.released.wait(), 10.0)
        elif mode == b"trailers":
            context.set_trailing_metadata((("x-app", "kept"), ("x-app-bin", b"\x00\x01")))
        elif mode == b"trailers_abort":
            context.set_trailing_metadata((("x-app", "kept"),))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "after trailers")
        elif mode == b"abort_with_trailers":
            trailers = (("x-app", "abort"),)
            await context.abort(grpc.StatusCode.ABORTED, "with trailers", trailers)
        elif mode == b"own_orca":
            context.set_trailing_metadata(((ORCA_KEY, APP_REPORT), ("x-app", "kept")))

    async def unary(self, request: bytes, context: Any) -> bytes:
        await self.act(request, context)
        return b"reply"

    async def server_stream(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield b"one"
        await self.act(request, context)
        yield b"two"

    async def server_writes(self, request: bytes, context: Any) -> None:
        await context.write(b"one")
        await self.act(request, context)
        await context.write(b"two")

    async def client_stream(self, requests: Any, context: Any) -> bytes:
        messages = aiter(requests)
        await self.act(await anext(messages), context)
        return b"%d" % len([m async for m in messages])

    async def bidi(self, requests: Any, context: Any) -> AsyncIterator[bytes]:
        messages = aiter(requests)
        mode = await anext(messages)
        yield b"first"
        await self.act(mode, context)
        async for message in messages:
            yield message

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "test.Probe",
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
                "ServerWrites": grpc.unary_stream_rpc_method_handler(self.server_writes),
                "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
                "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
                "SyncUnary": grpc.unary_unary_rpc_method_handler(lambda r, c: b"sync"),
            },
        )


class Spy(grpc.aio.ServerInterceptor):
    """Outside the reporter: the trailers each call sent (set, or given to abort)."""

    def __init__(self) -> None:
        self.trailers: list[tuple[tuple[str, Any], ...]] = []

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.startswith("/test."):
            return handler
        spy = self

        class Context:
            def __init__(self, context: Any) -> None:
                self._context = context
                self._index: int | None = None

            def _record(self, metadata: Any) -> None:
                if self._index is None:
                    self._index = len(spy.trailers)
                    spy.trailers.append(())
                spy.trailers[self._index] = tuple(metadata)

            def set_trailing_metadata(self, metadata: Any) -> None:
                self._record(metadata)
                self._context.set_trailing_metadata(metadata)

            async def abort(self, code: Any, details: str = "", trailers: Any = ()) -> None:
                self._record(trailers)
                await self._context.abort(code, details, trailers)

            def __getattr__(self, name: str) -> Any:
                return getattr(self._context, name)

        def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
            if asyncio.iscoroutinefunction(behavior):

                async def coroutine(request: Any, context: Any) -> Any:
                    return await behavior(request, Context(context))

                return coroutine
            if not inspect.isasyncgenfunction(behavior):
                return behavior  # a sync behavior: left alone

            async def generator(request: Any, context: Any) -> AsyncIterator[Any]:
                async for response in behavior(request, Context(context)):
                    yield response

            return generator

        kinds = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
        return handler._replace(
            **{kind: wrap(getattr(handler, kind)) for kind in kinds if getattr(handler, kind)}
        )


def report_of(metadata: Any) -> Any:
    (value,) = [v for k, v in metadata or () if k == MIRROR_KEY]
    return OrcaLoadReport.FromString(value)


@dataclass
class Served:
    reporter: LoadReporter
    address: str
    channel: grpc.aio.Channel
    probe: Probe
    spy: Spy
    server: grpc.aio.Server

    def method(self, kind: str) -> Any:
        name, make = {
            "unary": ("Unary", self.channel.unary_unary),
            "server_stream": ("ServerStream", self.channel.unary_stream),
            "server_writes": ("ServerWrites", self.channel.unary_stream),
            "client_stream": ("ClientStream", self.channel.stream_unary),
            "bidi": ("Bidi", self.channel.stream_stream),
            "sync_unary": ("SyncUnary", self.channel.unary_unary),
        }[kind]
        return make(f"/test.Probe/{name}")

    async def ping_in_flight(self) -> float:
        call = self.method("unary")(b"ok", timeout=RPC_TIMEOUT)
        await call
        return report_of(await call.trailing_metadata()).named_metrics[IN_FLIGHT]

    async def settle(self) -> None:
        """Back to idle, and every past call ended exactly once."""
        await eventually(lambda: self.reporter.in_flight == 0, message="in-flight back to 0")
        assert await self.ping_in_flight() == 1.0
        await eventually(lambda: self.reporter.in_flight == 0)


@contextlib.asynccontextmanager
async def serving(
    reporter: LoadReporter | None = None,
    *,
    oob: bool = True,
    register: Callable[[grpc.aio.Server], None] | None = None,
) -> AsyncIterator[Served]:
    reporter = reporter or LoadReporter(min_report_interval=0.2)
    probe, spy = Probe(), Spy()
    pool = futures.ThreadPoolExecutor(max_workers=4)
    server = grpc.aio.server(
        interceptors=[spy, reporter.aio_interceptor()], migration_thread_pool=pool
    )
    server.add_generic_rpc_handlers((probe.handler(),))
    if register is not None:
        register(server)
    if oob:
        reporter.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    served = Served(reporter, address, grpc.aio.insecure_channel(address), probe, spy, server)
    try:
        yield served
    finally:
        probe.released.set()
        await served.channel.close()
        await server.stop(None)
        pool.shutdown(wait=False)


# -- counting: every kind of call, every way it ends ---------------------------------

FINISHING = {
    "ok": grpc.StatusCode.OK,
    "code": grpc.StatusCode.NOT_FOUND,
    "abort": grpc.StatusCode.PERMISSION_DENIED,
    "abort_status": grpc.StatusCode.UNAVAILABLE,
    "raise": grpc.StatusCode.UNKNOWN,
}
KINDS = ["unary", "server_stream", "server_writes", "client_stream", "bidi"]


async def finish(served: Served, kind: str, mode: bytes) -> tuple[grpc.StatusCode, Any]:
    """Run one call to its end: its status code and the trailers the client saw."""
    method = served.method(kind)
    streaming_request = kind in ("client_stream", "bidi")
    call = method([mode, b"more"] if streaming_request else mode, timeout=RPC_TIMEOUT)
    with contextlib.suppress(grpc.RpcError):
        if kind in ("unary", "client_stream"):
            await call
        else:
            async for _ in call:
                pass
    return await call.code(), tuple(await call.trailing_metadata())


@pytest.mark.parametrize("mode", list(FINISHING))
@pytest.mark.parametrize("kind", KINDS)
def test_a_finished_call_reports_itself_and_is_released_once(kind: str, mode: str) -> None:
    async def body() -> None:
        async with serving() as served:
            code, trailers = await finish(served, kind, mode.encode())
            assert code == FINISHING[mode]
            report = report_of(trailers)
            assert report.named_metrics[IN_FLIGHT] == 1.0
            (sent,) = served.spy.trailers
            values = dict(sent)
            assert values[ORCA_KEY] == values[MIRROR_KEY]
            assert OrcaLoadReport.FromString(values[ORCA_KEY]) == report
            if mode == "abort_status":
                assert ("x-app", "status") in trailers
            await served.settle()
            assert (served.reporter.report().eps > 0) == (mode != "ok")

    run(body)


async def start_blocked(served: Served, kind: str, timeout: float) -> Any:
    """A call whose handler blocks (counted) until the client gives up."""
    method = served.method(kind)
    if kind == "unary":
        return method(b"block", timeout=timeout)
    if kind in ("server_stream", "server_writes"):
        call = method(b"block", timeout=timeout)
        assert await call.read() == b"one"
        return call
    call = method(timeout=timeout)
    await call.write(b"block")
    if kind == "bidi":
        assert await call.read() == b"first"
    return call


ENDINGS = [(kind, "cancel") for kind in KINDS] + [(kind, "deadline") for kind in KINDS]
# A dropped grpc.aio call keeps running (grpc.aio holds it until its channel
# closes), so the client going away here is closing its channel.
ENDINGS += [("server_stream", "close"), ("bidi", "close"), ("client_stream", "close")]


@pytest.mark.parametrize(("kind", "ending"), ENDINGS)
def test_a_call_the_client_gives_up_is_released_once(kind: str, ending: str) -> None:
    async def body() -> None:
        async with serving() as served:
            call = await start_blocked(served, kind, 0.5 if ending == "deadline" else 30.0)
            await eventually(lambda: served.reporter.in_flight == 1, message="the handler counts")
            if ending == "cancel":
                call.cancel()
            elif ending == "close":
                await served.channel.close()
                served.channel = grpc.aio.insecure_channel(served.address)
            else:
                with contextlib.suppress(grpc.RpcError):
                    await call.code()
            await served.settle()
            assert served.reporter.report().eps > 0

    run(body)


def test_calls_of_every_kind_count_together() -> None:
    async def body() -> None:
        async with serving() as served:
            calls = [(kind, await start_blocked(served, kind, 30.0)) for kind in KINDS]
            await eventually(lambda: served.reporter.in_flight == len(KINDS))
            assert await served.ping_in_flight() == len(KINDS) + 1
            served.probe.released.set()
            for kind, call in calls:
                if kind in ("client_stream", "bidi"):
                    await call.done_writing()
                if kind in ("unary", "client_stream"):
                    await call
                else:  # started with read(): the iterator API may not follow
                    while await call.read() is not grpc.aio.EOF:
                        pass
                assert report_of(await call.trailing_metadata()).named_metrics[IN_FLIGHT] >= 1
            await served.settle()

    run(body)


def test_sync_handlers_on_the_migration_pool_pass_through_uncounted() -> None:
    async def body() -> None:
        async with serving() as served:
            call = served.method("sync_unary")(b"x", timeout=RPC_TIMEOUT)
            assert await call == b"sync"
            assert MIRROR_KEY not in dict(tuple(await call.trailing_metadata()))
            assert served.reporter.report().rps_fractional == 0.0

    run(body)


# -- trailers: merged with the application's -------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_application_trailers_are_kept_and_the_report_appended(kind: str) -> None:
    async def body() -> None:
        async with serving() as served:
            code, trailers = await finish(served, kind, b"trailers")
            assert code == grpc.StatusCode.OK
            assert list(trailers[:2]) == [("x-app", "kept"), ("x-app-bin", b"\x00\x01")]
            assert report_of(trailers).named_metrics[IN_FLIGHT] == 1.0
            (sent,) = served.spy.trailers
            assert [key for key, _ in sent] == ["x-app", "x-app-bin", ORCA_KEY, MIRROR_KEY]

    run(body)


@pytest.mark.parametrize("mode", ["trailers_abort", "abort_with_trailers"])
def test_trailers_of_an_abort_are_kept(mode: str) -> None:
    async def body() -> None:
        async with serving() as served:
            code, trailers = await finish(served, "unary", mode.encode())
            assert code != grpc.StatusCode.OK
            assert trailers[0] == ("x-app", "kept" if mode == "trailers_abort" else "abort")
            assert report_of(trailers).named_metrics[IN_FLIGHT] == 1.0

    run(body)


def test_the_applications_own_orca_trailer_is_kept() -> None:
    async def body() -> None:
        async with serving() as served:
            code, trailers = await finish(served, "unary", b"own_orca")
            assert code == grpc.StatusCode.OK
            (sent,) = served.spy.trailers
            assert [key for key, _ in sent] == [ORCA_KEY, "x-app", MIRROR_KEY]
            assert dict(sent)[ORCA_KEY] == APP_REPORT
            assert report_of(trailers).named_metrics[IN_FLIGHT] == 1.0

    run(body)


def test_recorded_values_reach_trailers_and_the_stream() -> None:
    async def body() -> None:
        async with serving() as served:
            reporter = served.reporter
            reporter.set_application_utilization(0.9)
            reporter.set_utilization("gpu", 0.5)
            reporter.set_named_metric("queue_depth", 12)
            _, trailers = await finish(served, "bidi", b"ok")
            report = report_of(trailers)
            assert report.application_utilization == 0.9
            assert dict(report.utilization) == {"gpu": 0.5}
            assert report.named_metrics["queue_depth"] == 12.0
            stream = oob_stream(served.channel, 0.0)
            first = await stream.read()
            assert first.application_utilization == 0.9
            assert dict(first.named_metrics) == {"queue_depth": 12.0, IN_FLIGHT: 0.0}
            reporter.set_application_utilization(0.1)
            assert (await stream.read()).application_utilization == 0.1
            stream.cancel()

    run(body)


def test_rates_move_under_load() -> None:
    async def body() -> None:
        async with serving() as served:
            assert served.reporter.report().rps_fractional == 0.0
            for i in range(200):
                await finish(served, "unary", b"code" if i % 4 == 0 else b"ok")
            await eventually(lambda: served.reporter.in_flight == 0)
            report = served.reporter.report()
            assert report.rps_fractional > 10
            assert 0.1 * report.rps_fractional < report.eps < 0.5 * report.rps_fractional

    run(body)


# -- the out-of-band stream ---------------------------------------------------------


def oob_stream(channel: grpc.aio.Channel, interval: float, timeout: float = 30.0) -> Any:
    method = channel.unary_stream(
        OOB,
        request_serializer=OrcaLoadReportRequest.SerializeToString,
        response_deserializer=OrcaLoadReport.FromString,
    )
    request = OrcaLoadReportRequest()
    request.report_interval.FromNanoseconds(int(interval * 1e9))
    return method(request, timeout=timeout)


@pytest.mark.parametrize(
    ("requested", "floor"), [(0.05, 0.2), (0.0, 0.2), (0.35, 0.35)], ids=["short", "zero", "long"]
)
def test_oob_reports_every_floored_interval(requested: float, floor: float) -> None:
    async def body() -> None:
        async with serving(LoadReporter(min_report_interval=0.2)) as served:
            stream = oob_stream(served.channel, requested)
            times = []
            for _ in range(4):
                await stream.read()
                times.append(time.monotonic())
            stream.cancel()
            gaps = [b - a for a, b in itertools.pairwise(times)]
            # Never more often than the floor; on time, within a loaded machine's slack.
            assert all(floor - 0.02 <= gap < floor + 0.3 for gap in gaps), gaps

    run(body)


def test_the_first_oob_report_comes_at_once() -> None:
    async def body() -> None:
        async with serving(LoadReporter(min_report_interval=30.0)) as served:
            await served.channel.channel_ready()
            started = time.monotonic()
            stream = oob_stream(served.channel, 30.0)
            await stream.read()
            assert time.monotonic() - started < 2.0  # not after the 30 s interval
            stream.cancel()

    run(body)


def test_a_cancelled_oob_stream_leaves_no_task_behind() -> None:
    async def body() -> None:
        async with serving(LoadReporter(min_report_interval=30.0)) as served:
            await served.ping_in_flight()
            await eventually(lambda: served.reporter.in_flight == 0)
            baseline = len(asyncio.all_tasks())
            streams = [oob_stream(served.channel, 30.0) for _ in range(5)]
            for stream in streams:
                assert (await stream.read()).named_metrics[IN_FLIGHT] == 0.0
            assert len(asyncio.all_tasks()) > baseline
            for stream in streams:
                stream.cancel()
            await eventually(lambda: len(asyncio.all_tasks()) <= baseline, message="tasks")
            assert served.reporter.in_flight == 0

    run(body)


def test_a_server_stop_ends_open_oob_streams() -> None:
    async def body() -> None:
        async with serving(LoadReporter(min_report_interval=30.0)) as served:
            stream = oob_stream(served.channel, 30.0)
            await stream.read()
            started = time.monotonic()
            await served.server.stop(0.1)
            assert time.monotonic() - started < 2
            assert await stream.code() != grpc.StatusCode.OK

    run(body)


def test_oob_is_unimplemented_unless_added() -> None:
    async def body() -> None:
        async with serving(oob=False) as served:
            stream = oob_stream(served.channel, 0.0, timeout=RPC_TIMEOUT)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stream.read()
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED

    run(body)


def test_health_watches_are_not_counted() -> None:
    async def body() -> None:
        checker = health.aio.HealthServicer()
        await checker.set("", health_pb2.HealthCheckResponse.SERVING)

        def register(server: grpc.aio.Server) -> None:
            health_pb2_grpc.add_HealthServicer_to_server(checker, server)

        async with serving(register=register) as served:
            stub = health_pb2_grpc.HealthStub(served.channel)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            assert served.reporter.in_flight == 0
            assert await served.ping_in_flight() == 1.0
            watch.cancel()

    run(body)


def test_one_reporter_counts_a_sync_and_an_aio_server_together() -> None:
    async def body() -> None:
        reporter = LoadReporter(min_report_interval=0.2)
        servicer = example_server.ConferenceServicer("sync")
        sync_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8), interceptors=[reporter.interceptor()]
        )
        example_server.add_servicer_to_server(servicer, sync_server)
        port = sync_server.add_insecure_port("127.0.0.1:0")
        sync_server.start()
        try:
            async with (
                serving(reporter) as served,
                grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
            ):
                stub = conference_pb2_grpc.ConferenceStub(channel)
                join = stub.Join(pb.JoinRequest(duration_ms=0, frame_interval_ms=20), timeout=30)
                await join.read()
                await eventually(lambda: reporter.in_flight == 1)
                assert await served.ping_in_flight() == 2.0
                join.cancel()
                await served.settle()
        finally:
            sync_server.stop(None)

    run(body)
