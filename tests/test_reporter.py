"""LoadReporter on a sync ``grpc.server``: counts, trailers, the out-of-band stream.

Real servers on loopback and plain grpcio clients. The probe service takes
raw bytes: a request (the first message of a request stream) names what
the handler does at its end (return, set a code, abort, raise, block until
the client gives up). gRPC C-core clients take ``endpoint-load-metrics-bin``
out of the trailers they show, so the client side reads the reporter's copy
under ``grpc-leastconn-load-bin``; a spy interceptor outside the reporter's
records what the server really sent under both keys.
"""

from __future__ import annotations

import gc
import itertools
import math
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import conference_pb2 as pb
import conference_pb2_grpc
import grpc
import pytest
import server as example_server
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from helpers import ROOT, wait_until
from xds.data.orca.v3.orca_load_report_pb2 import OrcaLoadReport
from xds.service.orca.v3.orca_pb2 import OrcaLoadReportRequest

import grpc_leastconn
from grpc_leastconn import LoadReporter
from grpc_leastconn._reporter import load as load_module
from grpc_leastconn._reporter import orca

RPC_TIMEOUT = 5.0
ORCA_KEY = "endpoint-load-metrics-bin"
MIRROR_KEY = "grpc-leastconn-load-bin"
IN_FLIGHT = "grpc_leastconn.in_flight"
OOB = "/xds.service.orca.v3.OpenRcaService/StreamCoreMetrics"
APP_REPORT = OrcaLoadReport(application_utilization=0.77).SerializeToString()


# -- the probe service -------------------------------------------------------------


class _Status(NamedTuple):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


class Probe:
    """Handlers of every kind; the request says how each one ends."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._released = False

    def release(self) -> None:
        with self._cond:
            self._released = True
            self._cond.notify_all()

    def _block(self, context: grpc.ServicerContext) -> None:
        """Until the test releases us or the RPC ends (no busy wait: the callback wakes us)."""

        def wake() -> None:
            with self._cond:
                self._cond.notify_all()

        context.add_callback(wake)
        with self._cond:
            self._cond.wait_for(lambda: self._released or not context.is_active(), 10.0)

    def act(self, mode: bytes, context: grpc.ServicerContext) -> None:
        if mode == b"code":
            context.set_code(grpc.StatusCode.NOT_FOUND)
            context.set_details("not here")
        elif mode == b"abort":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "denied")
        elif mode == b"abort_status":
            status = _Status(grpc.StatusCode.UNAVAILABLE, "gone", (("x-app", "status"),))
            context.abort_with_status(status)  # type: ignore[arg-type]
        elif mode == b"raise":
            raise RuntimeError("handler failed")
        elif mode == b"block":
            self._block(context)
        elif mode == b"trailers":
            context.set_trailing_metadata((("x-app", "kept"), ("x-app-bin", b"\x00\x01")))
        elif mode == b"trailers_abort":
            context.set_trailing_metadata((("x-app", "kept"),))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "after trailers")
        elif mode == b"own_orca":
            context.set_trailing_metadata(((ORCA_KEY, APP_REPORT), ("x-app", "kept")))

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.act(request, context)
        return b"reply"

    def server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"one"
        self.act(request, context)
        yield b"two"

    def client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        mode = next(requests)
        self.act(mode, context)
        return b"%d" % sum(1 for _ in requests)

    def bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        mode = next(requests)
        yield b"first"
        self.act(mode, context)
        yield from requests

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "test.Probe",
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
                "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
                "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
            },
        )


class Spy(grpc.ServerInterceptor):
    """Outside the reporter: records the trailers each call finally set on the server."""

    def __init__(self) -> None:
        self.trailers: list[tuple[tuple[str, Any], ...]] = []

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None or not details.method.startswith("/test."):
            return handler
        spy = self

        class Context:
            def __init__(self, context: Any) -> None:
                self._context = context
                self._index: int | None = None

            def set_trailing_metadata(self, metadata: Any) -> None:
                if self._index is None:
                    self._index = len(spy.trailers)
                    spy.trailers.append(())
                spy.trailers[self._index] = tuple(metadata)
                self._context.set_trailing_metadata(metadata)

            def __getattr__(self, name: str) -> Any:
                return getattr(self._context, name)

        def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
            return lambda request, context: behavior(request, Context(context))

        kinds = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
        return handler._replace(
            **{kind: wrap(getattr(handler, kind)) for kind in kinds if getattr(handler, kind)}
        )


@dataclass
class Served:
    reporter: LoadReporter
    address: str
    channel: grpc.Channel
    probe: Probe
    spy: Spy
    server: grpc.Server

    def method(self, kind: str) -> Any:
        make = {
            "unary": self.channel.unary_unary,
            "server_stream": self.channel.unary_stream,
            "client_stream": self.channel.stream_unary,
            "bidi": self.channel.stream_stream,
        }[kind]
        name = "".join(part.title() for part in kind.split("_"))
        return make(f"/test.Probe/{'Unary' if kind == 'unary' else name}")

    def ping_in_flight(self) -> float:
        """A fresh unary call's own trailer: the in-flight count including it."""
        _, call = self.method("unary").with_call(b"ok", timeout=RPC_TIMEOUT)
        return report_of(call.trailing_metadata()).named_metrics[IN_FLIGHT]

    def settle(self) -> None:
        """Back to idle, and every past call ended exactly once."""
        wait_until(lambda: self.reporter.in_flight == 0, message="in-flight back to 0")
        assert self.ping_in_flight() == 1.0
        wait_until(lambda: self.reporter.in_flight == 0)


@dataclass
class ServerFactory:
    made: list[Served] = field(default_factory=list)

    def __call__(
        self,
        reporter: LoadReporter | None = None,
        *,
        oob: bool = True,
        max_workers: int = 16,
        register: Callable[[grpc.Server], None] | None = None,
    ) -> Served:
        reporter = reporter or LoadReporter(min_report_interval=0.2)
        probe, spy = Probe(), Spy()
        pool = futures.ThreadPoolExecutor(max_workers=max_workers)
        server = grpc.server(pool, interceptors=[spy, reporter.interceptor()])
        server.add_generic_rpc_handlers((probe.handler(),))
        if register is not None:
            register(server)
        if oob:
            reporter.add_to_server(server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        address = f"127.0.0.1:{port}"
        served = Served(reporter, address, grpc.insecure_channel(address), probe, spy, server)
        self.made.append(served)
        return served

    def close(self) -> None:
        for served in self.made:
            served.probe.release()
            served.channel.close()
            served.server.stop(None).wait(5)


@pytest.fixture
def serve() -> Iterator[ServerFactory]:
    factory = ServerFactory()
    yield factory
    factory.close()


def report_of(metadata: Any) -> Any:
    (value,) = [v for k, v in metadata or () if k == MIRROR_KEY]
    return OrcaLoadReport.FromString(value)


class RequestQueue:
    """A request stream the test feeds and closes."""

    _DONE = object()

    def __init__(self, *first: bytes) -> None:
        self._queue: queue.Queue[object] = queue.Queue()
        for message in first:
            self._queue.put(message)

    def close(self) -> None:
        self._queue.put(self._DONE)

    def __iter__(self) -> Iterator[Any]:
        while (item := self._queue.get(timeout=RPC_TIMEOUT)) is not self._DONE:
            yield item


# -- construction and the recorder -----------------------------------------------


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("1", TypeError),
        (None, TypeError),
        (True, TypeError),
        (0, ValueError),
        (-1.0, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
    ],
)
def test_min_report_interval_is_validated(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="min_report_interval"):
        LoadReporter(min_report_interval=value)


def test_min_report_interval_is_keyword_only_and_kept() -> None:
    with pytest.raises(TypeError):
        LoadReporter(0.5)  # type: ignore[misc]
    assert LoadReporter(min_report_interval=2).min_report_interval == 2.0
    assert LoadReporter().min_report_interval == 1.0


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda r: r.set_application_utilization(-0.1), ValueError),
        (lambda r: r.set_application_utilization(math.nan), ValueError),
        (lambda r: r.set_application_utilization("0.5"), TypeError),
        (lambda r: r.set_utilization("disk", 1.5), ValueError),
        (lambda r: r.set_utilization("", 0.5), ValueError),
        (lambda r: r.set_utilization(b"disk", 0.5), TypeError),
        (lambda r: r.set_named_metric("queue", math.inf), ValueError),
        (lambda r: r.set_named_metric("queue", True), TypeError),
        (lambda r: r.set_named_metric(IN_FLIGHT, 3.0), ValueError),
    ],
)
def test_recorder_rejects_bad_values(call: Callable[[LoadReporter], None], error: type) -> None:
    with pytest.raises(error):
        call(LoadReporter())


def test_report_holds_what_the_application_records() -> None:
    reporter = LoadReporter()
    assert reporter.IN_FLIGHT_METRIC == IN_FLIGHT == grpc_leastconn._reporter.IN_FLIGHT_METRIC
    report = reporter.report()
    assert isinstance(report, OrcaLoadReport)
    assert dict(report.named_metrics) == {IN_FLIGHT: 0.0}
    assert report.application_utilization == 0.0 and not report.utilization
    reporter.set_application_utilization(1.5)
    reporter.set_utilization("disk", 0.25)
    reporter.set_utilization("net", 1)
    reporter.set_named_metric("queue", -3)
    report = reporter.report()
    assert report.application_utilization == 1.5
    assert dict(report.utilization) == {"disk": 0.25, "net": 1.0}
    assert dict(report.named_metrics) == {"queue": -3.0, IN_FLIGHT: 0.0}
    reporter.remove_utilization("net")
    reporter.remove_utilization("absent")
    reporter.remove_named_metric("queue")
    reporter.clear_application_utilization()
    report = reporter.report()
    assert dict(report.utilization) == {"disk": 0.25}
    assert dict(report.named_metrics) == {IN_FLIGHT: 0.0}
    assert report.application_utilization == 0.0
    reporter.set_named_metric("a", 1)
    reporter.clear_named_metrics()
    reporter.clear_utilization()
    assert dict(reporter.report().named_metrics) == {IN_FLIGHT: 0.0}
    assert not reporter.report().utilization
    assert "in_flight=0" in repr(reporter)


def test_hand_encoded_fields_parse_as_protobuf_writes_them() -> None:
    protos = orca.protos()
    for cpu, rps, eps, in_flight in [(0.0, 0.0, 0.0, 0), (0.5, 12.25, 0.5, 7), (1e-9, 1e9, 3, 300)]:
        parsed = OrcaLoadReport.FromString(protos.dynamic_fields(cpu, rps, eps, in_flight))
        expected = OrcaLoadReport(cpu_utilization=cpu, rps_fractional=rps, eps=eps)
        expected.named_metrics[IN_FLIGHT] = in_flight
        assert parsed == expected


def test_rates_decay_exponentially_with_a_one_second_time_constant() -> None:
    now = [100.0]
    load = load_module.Load(orca.protos(), 1.0, clock=lambda: now[0], cpu_clock=lambda: 0.0)
    for i in range(1000):  # 100 calls per second for 10 s, every 5th an error
        now[0] = 100.0 + i / 100
        call = load.begin()
        call.code = grpc.StatusCode.INTERNAL if i % 5 == 0 else grpc.StatusCode.OK
        load.end(call)
        load.end(call)  # a second end changes nothing
    assert load.in_flight == 0
    report = OrcaLoadReport.FromString(load.report_bytes())
    assert report.rps_fractional == pytest.approx(100.0, rel=0.01)
    assert report.eps == pytest.approx(20.0, rel=0.05)
    now[0] += 2.0
    report = OrcaLoadReport.FromString(load.report_bytes())
    assert report.rps_fractional == pytest.approx(100.0 * math.exp(-2.0), rel=0.02)
    cancelled = load.begin()  # ended before its handler finished: an error
    load.end(cancelled)
    assert OrcaLoadReport.FromString(load.report_bytes()).eps > report.eps


def test_cpu_utilization_is_process_cpu_over_wall_time_over_cpus() -> None:
    now, cpu = [0.0], [0.0]
    load = load_module.Load(
        orca.protos(), 1.0, clock=lambda: now[0], cpu_clock=lambda: cpu[0], cpu_count=4
    )
    now[0], cpu[0] = 0.5, 1.0  # the first window is still open: since the start
    assert OrcaLoadReport.FromString(load.report_bytes()).cpu_utilization == 0.5
    now[0], cpu[0] = 1.0, 1.2
    assert OrcaLoadReport.FromString(load.report_bytes()).cpu_utilization == pytest.approx(0.3)
    now[0], cpu[0] = 1.5, 3.0  # within the window: the last value stays
    assert OrcaLoadReport.FromString(load.report_bytes()).cpu_utilization == pytest.approx(0.3)
    now[0], cpu[0] = 2.0, 3.2
    assert OrcaLoadReport.FromString(load.report_bytes()).cpu_utilization == pytest.approx(0.5)


def test_real_cpu_utilization_is_a_fraction() -> None:
    reporter = LoadReporter(min_report_interval=0.05)
    deadline = time.monotonic() + 0.2
    while time.monotonic() < deadline:
        pass  # burn CPU: one busy thread
    value = reporter.report().cpu_utilization
    assert 0.0 < value <= 1.0


def test_without_xds_protos_the_reporter_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orca, "_loaded", None)
    for name in [m for m in sys.modules if m == "xds" or m.startswith("xds.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "xds", None)  # type: ignore[arg-type]
    with pytest.raises(ImportError, match=r"pip install grpc-leastconn\[orca\]"):
        LoadReporter()


def test_the_library_imports_without_xds_protos() -> None:
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'xds' or name.startswith('xds.'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import grpc_leastconn\n"
        "try:\n"
        "    grpc_leastconn.LoadReporter()\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "pip install grpc-leastconn[orca]" in done.stdout


# -- counting: every kind of call, every way it ends ---------------------------------

FINISHING = {
    "ok": grpc.StatusCode.OK,
    "code": grpc.StatusCode.NOT_FOUND,
    "abort": grpc.StatusCode.PERMISSION_DENIED,
    "abort_status": grpc.StatusCode.UNAVAILABLE,
    "raise": grpc.StatusCode.UNKNOWN,
}
KINDS = ["unary", "server_stream", "client_stream", "bidi"]


def finish(served: Served, kind: str, mode: bytes) -> tuple[grpc.StatusCode, Any]:
    """Run one call to its end: its status code and the trailers the client saw."""
    method = served.method(kind)
    if kind in ("unary", "client_stream"):
        request = mode if kind == "unary" else iter([mode, b"more"])
        future = method.future(request, timeout=RPC_TIMEOUT)
        future.exception()
        return future.code(), future.trailing_metadata()
    call = method(mode if kind == "server_stream" else iter([mode, b"more"]), timeout=RPC_TIMEOUT)
    try:
        for _ in call:
            pass
    except grpc.RpcError:
        pass
    return call.code(), call.trailing_metadata()


@pytest.mark.parametrize("mode", list(FINISHING))
@pytest.mark.parametrize("kind", KINDS)
def test_a_finished_call_reports_itself_and_is_released_once(
    serve: ServerFactory, kind: str, mode: str
) -> None:
    served = serve()
    code, trailers = finish(served, kind, mode.encode())
    assert code == FINISHING[mode]
    report = report_of(trailers)
    assert report.named_metrics[IN_FLIGHT] == 1.0  # the call itself, before its release
    assert report.rps_fractional == 0.0  # no call had ended before this one
    (sent,) = served.spy.trailers  # what the server sent, ORCA's own key included
    values = dict(sent)
    assert values[ORCA_KEY] == values[MIRROR_KEY]
    assert OrcaLoadReport.FromString(values[ORCA_KEY]) == report
    if mode == "abort_status":
        assert ("x-app", "status") in trailers
    served.settle()
    after = served.reporter.report()
    assert after.rps_fractional > 0
    assert (after.eps > 0) == (mode != "ok")


def start_blocked(served: Served, kind: str, timeout: float) -> tuple[Any, RequestQueue | None]:
    """A call whose handler blocks (counted) until the client gives up."""
    method = served.method(kind)
    if kind == "unary":
        return method.future(b"block", timeout=timeout), None
    if kind == "client_stream":
        requests = RequestQueue(b"block")
        return method.future(iter(requests), timeout=timeout), requests
    if kind == "server_stream":
        call = method(b"block", timeout=timeout)
        assert next(call) == b"one"
        return call, None
    requests = RequestQueue(b"block")
    call = method(iter(requests), timeout=timeout)
    assert next(call) == b"first"
    return call, requests


ENDINGS = [(kind, "cancel") for kind in KINDS] + [(kind, "deadline") for kind in KINDS]
ENDINGS += [("server_stream", "drop"), ("bidi", "drop")]
ENDINGS += [("server_stream", "close"), ("bidi", "close"), ("client_stream", "close")]


@pytest.mark.parametrize(("kind", "ending"), ENDINGS)
def test_a_call_the_client_gives_up_is_released_once(
    serve: ServerFactory, kind: str, ending: str
) -> None:
    served = serve()
    call, requests = start_blocked(served, kind, 0.5 if ending == "deadline" else 30.0)
    wait_until(lambda: served.reporter.in_flight == 1, message="the handler counts")
    assert served.reporter.report().named_metrics[IN_FLIGHT] == 1.0
    if ending == "cancel":
        call.cancel()
    elif ending == "drop":  # grpcio cancels a call its caller dropped
        del call
        gc.collect()
    elif ending == "close":
        served.channel.close()
        served.channel = grpc.insecure_channel(served.address)
    served.settle()
    if requests is not None:
        requests.close()
    assert served.reporter.report().eps > 0


def test_calls_of_every_kind_count_together(serve: ServerFactory) -> None:
    served = serve()
    open_calls = [(kind, *start_blocked(served, kind, 30.0)) for kind in KINDS]
    wait_until(lambda: served.reporter.in_flight == 4)
    assert served.ping_in_flight() == 5.0
    served.probe.release()
    for kind, call, requests in open_calls:
        if requests is not None:
            requests.close()
        if kind in ("unary", "client_stream"):
            call.result(timeout=RPC_TIMEOUT)
        else:
            list(call)
        assert report_of(call.trailing_metadata()).named_metrics[IN_FLIGHT] >= 1.0
    served.settle()


# -- trailers: merged with the application's -------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_application_trailers_are_kept_and_the_report_appended(
    serve: ServerFactory, kind: str
) -> None:
    served = serve()
    code, trailers = finish(served, kind, b"trailers")
    assert code == grpc.StatusCode.OK
    assert list(trailers[:2]) == [("x-app", "kept"), ("x-app-bin", b"\x00\x01")]
    assert report_of(trailers).named_metrics[IN_FLIGHT] == 1.0
    (sent,) = served.spy.trailers
    assert [key for key, _ in sent] == ["x-app", "x-app-bin", ORCA_KEY, MIRROR_KEY]


def test_trailers_set_before_an_abort_are_kept(serve: ServerFactory) -> None:
    served = serve()
    code, trailers = finish(served, "unary", b"trailers_abort")
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert trailers[0] == ("x-app", "kept")
    assert report_of(trailers).named_metrics[IN_FLIGHT] == 1.0


def test_the_applications_own_orca_trailer_is_kept(serve: ServerFactory) -> None:
    served = serve()
    code, trailers = finish(served, "unary", b"own_orca")
    assert code == grpc.StatusCode.OK
    (sent,) = served.spy.trailers
    assert [key for key, _ in sent] == [ORCA_KEY, "x-app", MIRROR_KEY]
    assert dict(sent)[ORCA_KEY] == APP_REPORT  # the application's, not ours
    assert report_of(trailers).named_metrics[IN_FLIGHT] == 1.0


def test_the_orca_trailer_is_the_report(serve: ServerFactory) -> None:
    served = serve()
    served.reporter.set_application_utilization(0.4)
    finish(served, "unary", b"ok")
    (sent,) = served.spy.trailers
    values = dict(sent)
    assert values[ORCA_KEY] is values[MIRROR_KEY]
    report = OrcaLoadReport.FromString(values[ORCA_KEY])
    assert report.application_utilization == 0.4
    assert report.named_metrics[IN_FLIGHT] == 1.0


def test_recorded_values_reach_trailers_and_the_stream(serve: ServerFactory) -> None:
    served = serve()
    reporter = served.reporter
    reporter.set_application_utilization(0.9)
    reporter.set_utilization("gpu", 0.5)
    reporter.set_named_metric("queue_depth", 12)
    _, trailers = finish(served, "server_stream", b"ok")
    report = report_of(trailers)
    assert report.application_utilization == 0.9
    assert dict(report.utilization) == {"gpu": 0.5}
    assert report.named_metrics["queue_depth"] == 12.0
    stream = oob_stream(served.channel, 0.0)
    first = next(stream)
    assert first.application_utilization == 0.9
    assert dict(first.utilization) == {"gpu": 0.5}
    assert dict(first.named_metrics) == {"queue_depth": 12.0, IN_FLIGHT: 0.0}
    reporter.set_application_utilization(0.1)
    assert next(stream).application_utilization == 0.1
    stream.cancel()


def test_rates_move_under_load(serve: ServerFactory) -> None:
    served = serve()
    before = served.reporter.report()
    assert before.rps_fractional == 0.0 and before.eps == 0.0
    for i in range(200):
        finish(served, "unary", b"code" if i % 4 == 0 else b"ok")
    wait_until(lambda: served.reporter.in_flight == 0)
    report = served.reporter.report()
    assert report.rps_fractional > 10
    assert 0.1 * report.rps_fractional < report.eps < 0.5 * report.rps_fractional


# -- the out-of-band stream ---------------------------------------------------------


def oob_stream(channel: grpc.Channel, interval: float, timeout: float = 30.0) -> Any:
    method = channel.unary_stream(
        OOB,
        request_serializer=OrcaLoadReportRequest.SerializeToString,
        response_deserializer=OrcaLoadReport.FromString,
    )
    request = OrcaLoadReportRequest()
    request.report_interval.FromNanoseconds(int(interval * 1e9))
    return method(request, timeout=timeout)


def arrivals(stream: Any, n: int) -> list[float]:
    times = []
    for _ in range(n):
        next(stream)
        times.append(time.monotonic())
    stream.cancel()
    return times


@pytest.mark.parametrize(
    ("requested", "floor"), [(0.05, 0.2), (0.0, 0.2), (0.35, 0.35)], ids=["short", "zero", "long"]
)
def test_oob_reports_every_floored_interval(
    serve: ServerFactory, requested: float, floor: float
) -> None:
    served = serve(LoadReporter(min_report_interval=0.2))
    times = arrivals(oob_stream(served.channel, requested), 4)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Never more often than the floor; and on time, within a loaded machine's slack.
    assert all(floor - 0.02 <= gap < floor + 0.3 for gap in gaps), gaps


def test_the_first_oob_report_comes_at_once(serve: ServerFactory) -> None:
    served = serve(LoadReporter(min_report_interval=30.0))
    grpc.channel_ready_future(served.channel).result(timeout=RPC_TIMEOUT)
    started = time.monotonic()
    (arrived,) = arrivals(oob_stream(served.channel, 30.0), 1)
    assert arrived - started < 2.0  # not after the 30 s interval


def test_oob_stream_is_not_counted_and_shows_the_counts(serve: ServerFactory) -> None:
    served = serve(LoadReporter(min_report_interval=0.05))
    stream = oob_stream(served.channel, 0.05)
    assert next(stream).named_metrics[IN_FLIGHT] == 0.0
    call, _ = start_blocked(served, "server_stream", 30.0)
    assert wait_until(lambda: next(stream).named_metrics[IN_FLIGHT] == 1.0)
    call.cancel()
    assert wait_until(lambda: next(stream).named_metrics[IN_FLIGHT] == 0.0)
    assert served.reporter.in_flight == 0
    stream.cancel()


def test_a_cancelled_oob_stream_frees_its_worker_thread(serve: ServerFactory) -> None:
    served = serve(LoadReporter(min_report_interval=30.0), max_workers=1)
    threads = threading.active_count()
    for _ in range(5):
        stream = oob_stream(served.channel, 30.0)
        next(stream)
        stream.cancel()
        # The only worker must be back: this call needs it.
        assert served.ping_in_flight() == 1.0
    assert threading.active_count() <= threads + 1  # the pool's one worker at most


def test_a_server_stop_ends_open_oob_streams(serve: ServerFactory) -> None:
    served = serve(LoadReporter(min_report_interval=30.0))
    stream = oob_stream(served.channel, 30.0)
    next(stream)
    started = time.monotonic()
    assert served.server.stop(0.1).wait(5)
    assert time.monotonic() - started < 2
    with pytest.raises(grpc.RpcError):
        next(stream)


def test_oob_is_unimplemented_unless_added(serve: ServerFactory) -> None:
    served = serve(oob=False)
    with pytest.raises(grpc.RpcError) as info:
        next(oob_stream(served.channel, 0.0, timeout=RPC_TIMEOUT))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_health_watches_are_not_counted(serve: ServerFactory) -> None:
    checker = health.HealthServicer()
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    served = serve(
        register=lambda server: health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    )
    stub = health_pb2_grpc.HealthStub(served.channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    assert stub.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT).status == 1
    assert served.reporter.in_flight == 0
    assert served.ping_in_flight() == 1.0
    watch.cancel()


# -- the example service ----------------------------------------------------------------


def test_the_example_servicer_is_counted_as_it_counts_itself(serve: ServerFactory) -> None:
    servicer = example_server.ConferenceServicer("reported")
    served = serve(register=lambda server: example_server.add_servicer_to_server(servicer, server))
    stub = conference_pb2_grpc.ConferenceStub(served.channel)
    reply, call = stub.Ping.with_call(pb.PingRequest(payload="hi"), timeout=RPC_TIMEOUT)
    assert reply.payload == "hi"
    assert report_of(call.trailing_metadata()).named_metrics[IN_FLIGHT] == 1.0
    joins = [
        stub.Join(pb.JoinRequest(duration_ms=0, frame_interval_ms=20), timeout=30) for _ in range(3)
    ]
    for join in joins:
        next(join)
    assert servicer.wait_until(lambda s: s.live == 3, 5.0)
    wait_until(lambda: served.reporter.in_flight == 3)
    summary, call = stub.Upload.with_call(iter([pb.Frame(seq=i) for i in range(4)]), timeout=5)
    assert summary.frames == 4
    assert report_of(call.trailing_metadata()).named_metrics[IN_FLIGHT] == 4.0
    chat = stub.Chat(iter([pb.ChatMessage(text="a"), pb.ChatMessage(text="b")]), timeout=5)
    assert [m.text for m in chat] == ["a", "b"]
    assert report_of(chat.trailing_metadata()).named_metrics[IN_FLIGHT] == 4.0
    for join in joins:
        join.cancel()
    assert servicer.wait_until(lambda s: s.live == 0, 5.0)
    served.settle()
    assert servicer.stats().cancelled == 3
