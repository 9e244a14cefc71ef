"""Example ``conference.Conference`` backend, usable as a module and as a CLI.

As a module it gives tests and benchmarks real in-process gRPC backends that
count their own in-flight RPCs, so a balancer's decisions can be checked from
the server side::

    backend = start_backend()
    ...  # send RPCs to backend.address
    backend.servicer.wait_until(lambda s: s.live == 0, timeout=1.0)
    backend.stop()

With ``load_reporter=grpc_leastconn.LoadReporter()`` a backend reports its
in-flight RPCs and load (ORCA) per call and out of band, for clients with
``server_load=True`` and for gRPC's own ``weighted_round_robin``.

As a CLI it runs several backends in one process, each reporting its load
(unless ``--no-report-load``, or without the ``orca`` extra)::

    python examples/server.py --port 50051 --port 50052 --table
    python examples/server.py --count 3 --base-port 50051

It prints one JSON object per line: the listening addresses first, then (with
``--table``) the live RPCs per backend every ``--interval`` seconds. SIGINT and
SIGTERM stop it cleanly.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import HealthServicer

import grpc_leastconn

# The generated modules import each other as top-level modules, so this
# directory has to be importable however this file was loaded.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import conference_pb2  # noqa: E402
import conference_pb2_grpc  # noqa: E402

__all__ = [
    "SERVICE_NAME",
    "Backend",
    "BackendBindError",
    "ConferenceServicer",
    "ServicerStats",
    "add_servicer_to_server",
    "main",
    "start_backend",
    "stop_backends",
]

SERVICE_NAME = "conference.Conference"
DEFAULT_FRAME_INTERVAL_MS = 100
STREAM_METHODS = frozenset({"Join", "Upload", "Chat"})


class BackendBindError(RuntimeError):
    """The backend could not listen on the requested address."""


@dataclass(frozen=True)
class ServicerStats:
    """A consistent snapshot of a servicer's counters."""

    name: str
    live: int
    live_streams: int
    max_live: int
    started: int
    finished: int
    cancelled: int
    started_by_method: dict[str, int]


class _Call:
    """Per-RPC bookkeeping shared by a handler and its termination callback."""

    __slots__ = ("completed", "context", "ended", "method")

    def __init__(self, method: str, context: grpc.ServicerContext) -> None:
        self.method = method
        self.context = context
        # Set once the RPC has terminated for any reason; handlers wait on it
        # instead of sleeping so that a cancelled RPC releases its thread
        # immediately.
        self.ended = threading.Event()
        # Set by the handler when it produced its full response; the
        # fallback for telling a normal end from a cancellation.
        self.completed = False


class ConferenceServicer(conference_pb2_grpc.ConferenceServicer):
    """``conference.Conference`` implementation with server-side accounting.

    Counters (all read under the servicer's lock, so each read is consistent):

    * ``live``: RPCs of any kind whose handler has started and that have not
      terminated yet. It rises when the handler starts, not when the request
      arrives, so RPCs queued behind a saturated thread pool are not counted.
    * ``live_streams``: the subset of ``live`` that are Join, Upload or Chat.
    * ``max_live``: the highest ``live`` seen so far.
    * ``started`` / ``finished``: RPCs started / terminated; ``live`` always
      equals ``started - finished``.
    * ``cancelled``: finished RPCs that were cancelled rather than completed:
      client cancellation, deadline expiry or server shutdown.
    * ``started_by_method``: ``started`` per method name (``"Ping"``, ...).
    * ``peers``: ``context.peer()`` of every RPC, e.g. ``"ipv4:127.0.0.1:51234"``.
    * ``authorities``: the ``:authority`` of every RPC, e.g. ``"127.0.0.1:50051"``.
      Stays empty unless registered with ``observe_authority=True`` (the
      default of :func:`start_backend` and :func:`add_servicer_to_server`).

    The decrement happens in a ``context.add_callback`` callback, which gRPC
    runs exactly once when the RPC terminates for any reason. It can fire a
    moment after the client has seen the final status, so tests should use
    :meth:`wait_until` rather than asserting on ``live`` right away.
    """

    def __init__(self, name: str = "conference") -> None:
        self.name = name
        self._cond = threading.Condition()
        self._live = 0
        self._live_streams = 0
        self._max_live = 0
        self._started = 0
        self._finished = 0
        self._cancelled = 0
        self._started_by_method: dict[str, int] = {}
        self._peers: set[str] = set()
        self._authorities: set[str] = set()
        # Failure injection (fail_calls): the code, every how many calls, and
        # how many calls began since it was set.
        self._failure: grpc.StatusCode | None = None
        self._fail_every = 1
        self._since_failure_set = 0

    # Counters ---------------------------------------------------------------

    @property
    def live(self) -> int:
        with self._cond:
            return self._live

    @property
    def live_streams(self) -> int:
        with self._cond:
            return self._live_streams

    @property
    def max_live(self) -> int:
        with self._cond:
            return self._max_live

    @property
    def started(self) -> int:
        with self._cond:
            return self._started

    @property
    def finished(self) -> int:
        with self._cond:
            return self._finished

    @property
    def cancelled(self) -> int:
        with self._cond:
            return self._cancelled

    @property
    def started_by_method(self) -> dict[str, int]:
        with self._cond:
            return dict(self._started_by_method)

    @property
    def peers(self) -> set[str]:
        with self._cond:
            return set(self._peers)

    @property
    def authorities(self) -> set[str]:
        with self._cond:
            return set(self._authorities)

    def stats(self) -> ServicerStats:
        with self._cond:
            return ServicerStats(
                name=self.name,
                live=self._live,
                live_streams=self._live_streams,
                max_live=self._max_live,
                started=self._started,
                finished=self._finished,
                cancelled=self._cancelled,
                started_by_method=dict(self._started_by_method),
            )

    def wait_until(self, predicate: Callable[[ConferenceServicer], bool], timeout: float) -> bool:
        """Block until ``predicate(self)`` is true or ``timeout`` seconds pass.

        The predicate is re-evaluated whenever a counter changes, under the
        servicer's lock (it is re-entrant, so the properties may be used).
        Returns the predicate's final value.
        """
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def fail_calls(self, code: grpc.StatusCode | None, every: int = 1) -> None:
        """Answer every ``every``-th new call at once with ``code`` (None: answer normally).

        A backend whose database is down: its health service may still say
        SERVING while every call fails fast.
        """
        if every < 1:
            raise ValueError(f"every must be >= 1, not {every}")
        with self._cond:
            self._failure = code
            self._fail_every = every
            self._since_failure_set = 0

    # Accounting -------------------------------------------------------------

    def _begin(self, method: str, context: grpc.ServicerContext) -> _Call:
        call = _Call(method, context)
        peer = context.peer()
        authority = _authority(context)
        with self._cond:
            self._live += 1
            if method in STREAM_METHODS:
                self._live_streams += 1
            self._max_live = max(self._max_live, self._live)
            self._started += 1
            self._started_by_method[method] = self._started_by_method.get(method, 0) + 1
            self._peers.add(peer)
            if authority:
                self._authorities.add(authority)
            self._cond.notify_all()
        # add_callback returns False when the RPC has already terminated (the
        # client gave up before the handler ran); the callback would then
        # never fire, so account for the end right here.
        if not context.add_callback(lambda: self._end(call)):
            self._end(call)
        with self._cond:
            failure = self._failure
            if failure is not None:
                self._since_failure_set += 1
                if self._since_failure_set % self._fail_every:
                    failure = None
        if failure is not None:
            context.abort(failure, f"{self.name}: injected {failure.name}")
        return call

    def _end(self, call: _Call) -> None:
        with self._cond:
            if call.ended.is_set():
                return
            self._live -= 1
            if call.method in STREAM_METHODS:
                self._live_streams -= 1
            self._finished += 1
            if _was_cancelled(call):
                self._cancelled += 1
            call.ended.set()
            self._cond.notify_all()

    # RPC handlers -----------------------------------------------------------

    def Ping(
        self, request: conference_pb2.PingRequest, context: grpc.ServicerContext
    ) -> conference_pb2.PingReply:
        call = self._begin("Ping", context)
        reply = conference_pb2.PingReply(backend=self.name, payload=request.payload)
        if request.delay_ms > 0 and call.ended.wait(request.delay_ms / 1000):
            return reply  # the RPC is over; gRPC discards this
        call.completed = True
        return reply

    def Join(
        self, request: conference_pb2.JoinRequest, context: grpc.ServicerContext
    ) -> Iterator[conference_pb2.Frame]:
        call = self._begin("Join", context)
        interval = (request.frame_interval_ms or DEFAULT_FRAME_INTERVAL_MS) / 1000
        start = time.monotonic()
        end = start + request.duration_ms / 1000 if request.duration_ms > 0 else None
        seq = 0
        while True:
            # Frames are scheduled from the start time so that slow sends do
            # not make the stream drift past its duration.
            due = start + seq * interval
            if end is not None and due >= end:
                break
            if call.ended.wait(max(0.0, due - time.monotonic())):
                return
            yield conference_pb2.Frame(session_id=request.session_id, seq=seq, backend=self.name)
            seq += 1
        # The stream lasts the full duration even if the last frame was
        # emitted earlier.
        if end is not None and call.ended.wait(max(0.0, end - time.monotonic())):
            return
        call.completed = True

    def Upload(
        self, request_iterator: Iterator[conference_pb2.Frame], context: grpc.ServicerContext
    ) -> conference_pb2.UploadSummary:
        call = self._begin("Upload", context)
        frames = 0
        try:
            for _frame in request_iterator:
                frames += 1
        except grpc.RpcError:
            # Raised when the cancellation is seen before the end of the stream.
            return conference_pb2.UploadSummary(frames=frames, backend=self.name)
        call.completed = True
        return conference_pb2.UploadSummary(frames=frames, backend=self.name)

    def Chat(
        self, request_iterator: Iterator[conference_pb2.ChatMessage], context: grpc.ServicerContext
    ) -> Iterator[conference_pb2.ChatMessage]:
        call = self._begin("Chat", context)
        try:
            for message in request_iterator:
                yield conference_pb2.ChatMessage(text=message.text, backend=self.name)
        except grpc.RpcError:
            return
        call.completed = True


def _was_cancelled(call: _Call) -> bool:
    """Whether a terminated RPC was cancelled rather than completed.

    The handler's own view is not enough: when a client cancels a
    client-streaming call, grpcio's request iterator can end as if the client
    had half-closed, so the handler believes it completed normally. grpcio
    only records the real outcome in private state, which is final by the time
    termination callbacks run; fall back to the handler's view without it.
    """
    client = getattr(getattr(call.context, "_state", None), "client", None)
    if isinstance(client, str):
        return client == "cancelled"
    return not call.completed


def _authority(context: grpc.ServicerContext) -> str:
    """The call's ``:authority``, or ``""`` when it cannot be observed.

    grpcio has no public API for this. The private ``call_details.host`` is
    only filled in for calls dispatched through generic handlers; calls to
    methods registered with ``add_registered_method_handlers`` leave it empty.
    """
    try:
        host = context._rpc_event.call_details.host  # type: ignore[attr-defined]
    except AttributeError:
        return ""
    if isinstance(host, bytes):
        return host.decode("utf-8", "replace")
    return host if isinstance(host, str) else ""


class _GenericHandlersOnly:
    """Server facade that drops registered-method handlers.

    Registered methods are a lookup optimisation, but calls dispatched through
    them do not expose ``:authority`` to the handler. Passing this facade to
    the generated ``add_ConferenceServicer_to_server`` keeps the generated
    handler table while registering it only as a generic handler.
    """

    def __init__(self, server: grpc.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(handlers))

    def add_registered_method_handlers(self, service_name: str, handlers: object) -> None:
        pass


def add_servicer_to_server(
    servicer: ConferenceServicer, server: grpc.Server, *, observe_authority: bool = True
) -> None:
    """Register ``servicer`` on ``server``.

    With ``observe_authority`` the servicer can record each call's
    ``:authority`` (see :attr:`ConferenceServicer.authorities`), at the cost of
    gRPC's registered-method fast path.
    """
    target: Any = _GenericHandlersOnly(server) if observe_authority else server
    conference_pb2_grpc.add_ConferenceServicer_to_server(servicer, target)  # type: ignore[no-untyped-call]


@dataclass
class Backend:
    """A running in-process backend. Stop it with :meth:`stop`."""

    server: grpc.Server
    port: int
    address: str
    servicer: ConferenceServicer
    health: HealthServicer | None
    executor: ThreadPoolExecutor = field(repr=False)
    # The backend's ORCA load reporter, when it was started with one.
    reporter: grpc_leastconn.LoadReporter | None = None

    @property
    def name(self) -> str:
        return self.servicer.name

    def set_serving(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING for both "" and ``conference.Conference``."""
        if self.health is None:
            raise RuntimeError(f"backend {self.address} was started without a health service")
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)

    def stop(self, grace: float | None = None, timeout: float | None = 10.0) -> bool:
        """Stop serving; see :func:`stop_backends`."""
        return stop_backends([self], grace=grace, timeout=timeout)


def stop_backends(
    backends: Iterable[Backend], grace: float | None = None, timeout: float | None = 10.0
) -> bool:
    """Stop several backends concurrently.

    In-flight RPCs get ``grace`` seconds (``None``: none) before they are
    cancelled; health watchers are told NOT_SERVING first. Waits at most
    ``timeout`` seconds in total (``None``: no limit) and returns whether every
    server finished shutting down. Stopping a backend twice is harmless.
    """
    backends = list(backends)
    for backend in backends:
        if backend.health is not None:
            backend.health.enter_graceful_shutdown()
    events = [backend.server.stop(grace) for backend in backends]
    deadline = None if timeout is None else time.monotonic() + timeout
    done = True
    for event in events:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        done = event.wait(remaining) and done
    for backend in backends:
        # grpc.server() does not own the executor it was given; without this
        # every stopped backend would keep its idle worker threads alive.
        backend.executor.shutdown(wait=False, cancel_futures=True)
    return done


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def start_backend(
    host: str = "127.0.0.1",
    port: int = 0,
    name: str | None = None,
    health: bool = True,
    max_workers: int = 64,
    server_credentials: grpc.ServerCredentials | None = None,
    *,
    options: Sequence[tuple[str, Any]] = (),
    observe_authority: bool = True,
    load_reporter: grpc_leastconn.LoadReporter | None = None,
) -> Backend:
    """Start a ``conference.Conference`` backend listening on ``host:port``.

    ``port=0`` picks a free port. ``name`` defaults to the bound address and
    is what the backend reports in its replies. Every handler occupies one of
    the ``max_workers`` threads for its whole duration, so open streams beyond
    that number queue. With ``health`` a ``grpc.health.v1.Health`` service
    reports SERVING for "" and ``conference.Conference``. With
    ``load_reporter`` every call is counted and reported (ORCA), and the
    server serves the out-of-band report stream.

    Raises :class:`BackendBindError` if the address cannot be bound.
    """
    # Without this, gRPC binds with SO_REUSEPORT and a second server on a busy
    # port silently shares it instead of failing.
    server_options = [("grpc.so_reuseport", 0), *options]
    executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="conference")
    interceptors = [] if load_reporter is None else [load_reporter.interceptor()]
    server = grpc.server(executor, options=server_options, interceptors=interceptors)
    bind_address = _format_address(host, port)
    try:
        if server_credentials is None:
            bound_port = server.add_insecure_port(bind_address)
        else:
            bound_port = server.add_secure_port(bind_address, server_credentials)
    except RuntimeError as exc:
        bound_port = 0
        cause: BaseException | None = exc
    else:
        cause = None
    if bound_port == 0:
        server.stop(None)
        executor.shutdown(wait=False)
        raise BackendBindError(
            f"cannot listen on {bind_address}: the port is in use or the address is not local"
        ) from cause

    address = _format_address(host, bound_port)
    servicer = ConferenceServicer(name if name is not None else address)
    add_servicer_to_server(servicer, server, observe_authority=observe_authority)

    health_servicer: HealthServicer | None = None
    if health:
        health_servicer = _make_health_servicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if load_reporter is not None:
        load_reporter.add_to_server(server)

    server.start()
    return Backend(
        server=server,
        port=bound_port,
        address=address,
        servicer=servicer,
        health=health_servicer,
        executor=executor,
        reporter=load_reporter,
    )


def _make_health_servicer() -> HealthServicer:
    servicer = HealthServicer()
    for service in ("", SERVICE_NAME):
        servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return servicer


# Command line ---------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run example conference.Conference backends in one process."
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port",
        type=int,
        action="append",
        default=[],
        help="port of one backend; repeat for more backends (0 picks a free port)",
    )
    parser.add_argument("--count", type=int, help="number of backends on consecutive ports")
    parser.add_argument(
        "--base-port",
        type=int,
        default=50051,
        help="first port used with --count (default: %(default)s; 0 picks free ports)",
    )
    parser.add_argument(
        "--table", action="store_true", help="print live RPCs per backend periodically"
    )
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between --table lines")
    parser.add_argument(
        "--grace", type=float, default=1.0, help="seconds in-flight RPCs get on shutdown"
    )
    parser.add_argument("--max-workers", type=int, default=64, help="handler threads per backend")
    parser.add_argument("--no-health", action="store_true", help="do not serve grpc.health.v1")
    parser.add_argument(
        "--no-report-load", action="store_true", help="do not report load (ORCA) to clients"
    )
    args = parser.parse_args(argv)
    if args.port and args.count is not None:
        parser.error("use either --port or --count, not both")
    if args.count is not None:
        if args.count < 1:
            parser.error("--count must be at least 1")
        args.ports = [0 if args.base_port == 0 else args.base_port + i for i in range(args.count)]
    else:
        args.ports = args.port or [50051]
    if args.interval <= 0:
        parser.error("--interval must be positive")
    return args


def _emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    backends: list[Backend] = []
    report_load = not args.no_report_load
    try:
        for port in args.ports:
            reporter = None
            if report_load:
                try:
                    reporter = grpc_leastconn.LoadReporter()
                except ImportError as exc:
                    print(f"warning: not reporting load: {exc}", file=sys.stderr)
                    report_load = False
            backends.append(
                start_backend(
                    host=args.host,
                    port=port,
                    health=not args.no_health,
                    max_workers=args.max_workers,
                    load_reporter=reporter,
                )
            )
    except BackendBindError as exc:
        stop_backends(backends)
        print(f"error: {exc}", file=sys.stderr)
        return 1

    _emit({"event": "listening", "backends": [b.address for b in backends]})
    started_at = time.monotonic()
    while not stop.wait(args.interval):
        if args.table:
            stats = [b.servicer.stats() for b in backends]
            _emit(
                {
                    "t": round(time.monotonic() - started_at, 1),
                    "live": {s.name: s.live for s in stats},
                    "live_streams": {s.name: s.live_streams for s in stats},
                    "started": {s.name: s.started for s in stats},
                }
            )

    stop_backends(backends, grace=args.grace, timeout=args.grace + 10)
    _emit(
        {
            "event": "stopped",
            "totals": {b.name: asdict(b.servicer.stats()) for b in backends},
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
