"""``LoadReporter``: the public face of server-side ORCA load reporting."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Final

import grpc
import grpc.aio

from . import service
from .aio_server import AioInterceptor
from .load import Load
from .orca import IN_FLIGHT_METRIC, MIRROR_TRAILER_KEY, TRAILER_KEY, protos
from .sync_server import SyncInterceptor

if TYPE_CHECKING:
    from xds.data.orca.v3.orca_load_report_pb2 import OrcaLoadReport


class LoadReporter:
    """Reports a gRPC server's load to its clients (ORCA, gRFC A51).

    Per call: every call's trailing metadata gets ``endpoint-load-metrics-bin``
    (``TRAILER_KEY``), a serialized ``xds.data.orca.v3.OrcaLoadReport``,
    appended to whatever trailers the handler set; a value of that key the
    handler set itself is kept instead. gRPC C-core clients take that key
    out of the trailers they show the application, so the same bytes also go
    out as ``grpc-leastconn-load-bin`` (``MIRROR_TRAILER_KEY``), which Python
    clients can read (``grpc_leastconn``'s ``server_load`` does). Out of
    band: :meth:`add_to_server` serves
    ``xds.service.orca.v3.OpenRcaService/StreamCoreMetrics``. gRPC's own
    ``weighted_round_robin`` policy reads either (gRFC A58)::

        reporter = grpc_leastconn.LoadReporter()
        server = grpc.server(pool, interceptors=[reporter.interceptor()])
        reporter.add_to_server(server)  # optional: the out-of-band stream
        reporter.set_application_utilization(0.4)

    A report (:meth:`report`) holds:

    * ``named_metrics[IN_FLIGHT_METRIC]``: the server's in-flight RPCs, the
      calls whose handler started and that have not ended, of every kind.
      In a call's own trailer the count includes that call (it is measured
      just before the call's status goes out); a client subtracts its own
      calls. The ORCA stream and ``grpc.health.v1.Health`` are not counted.
    * ``cpu_utilization``: this process's CPU time over wall time over
      ``os.cpu_count()``, averaged over the last ``min_report_interval``
      (about [0, 1]).
    * ``rps_fractional`` / ``eps``: calls ended / calls ended with a status
      other than OK (cancellations and deadlines included) per second, as
      rates decaying exponentially with a 1 s time constant.
    * what the application set: ``application_utilization``, the
      ``utilization`` map and further ``named_metrics``.

    Needs the ``orca`` extra (``pip install grpc-leastconn[orca]``); without
    it the constructor raises ImportError. Thread-safe; one reporter may
    serve a sync and an aio server at once (they then share the counts).
    """

    IN_FLIGHT_METRIC: Final = IN_FLIGHT_METRIC
    TRAILER_KEY: Final = TRAILER_KEY
    MIRROR_TRAILER_KEY: Final = MIRROR_TRAILER_KEY

    def __init__(self, *, min_report_interval: float = 1.0) -> None:
        if isinstance(min_report_interval, bool) or not isinstance(
            min_report_interval, int | float
        ):
            raise TypeError(
                f"min_report_interval must be a number of seconds, "
                f"not {type(min_report_interval).__name__}"
            )
        if not math.isfinite(min_report_interval) or min_report_interval <= 0:
            raise ValueError(
                f"min_report_interval must be a finite number of seconds > 0, "
                f"got {min_report_interval!r}"
            )
        self._protos = protos()
        self._min_report_interval = float(min_report_interval)
        self._load = Load(self._protos, self._min_report_interval)

    @property
    def min_report_interval(self) -> float:
        """The shortest time between two out-of-band reports; also the CPU window (s)."""
        return self._min_report_interval

    @property
    def in_flight(self) -> int:
        """The server's in-flight RPCs now (as counted by this reporter's interceptors)."""
        return self._load.in_flight

    # -- wiring -------------------------------------------------------------------

    def interceptor(self) -> grpc.ServerInterceptor:
        """For ``grpc.server(..., interceptors=[reporter.interceptor()])``.

        Put it first: the interceptors after it and the handler set their
        trailers through it, so the report is appended to theirs. Each call
        returns a new interceptor sharing this reporter's counts: install
        one per server (two on one server would count every call twice).
        """
        return SyncInterceptor(self._load)

    def aio_interceptor(self) -> grpc.aio.ServerInterceptor:
        """For ``grpc.aio.server(interceptors=[reporter.aio_interceptor()])``.

        As :meth:`interceptor`. It wraps async handlers (coroutines, async
        generators); sync handlers run in the aio server's
        ``migration_thread_pool`` pass through uncounted.
        """
        return AioInterceptor(self._load)

    def add_to_server(self, server: grpc.Server | grpc.aio.Server) -> None:
        """Serve ``OpenRcaService/StreamCoreMetrics`` on ``server`` (sync or aio).

        On a sync server every open stream holds a worker thread; give the
        server's pool enough ``max_workers`` for them and the handlers.
        Without this call clients asking for the stream get UNIMPLEMENTED.
        """
        make = service.aio_handler if isinstance(server, grpc.aio.Server) else service.sync_handler
        handler = make(self._protos, self._load.report_bytes, self._min_report_interval)
        server.add_generic_rpc_handlers((handler,))

    # -- the report -----------------------------------------------------------------

    def report(self) -> OrcaLoadReport:
        """The current report, as the next call's trailer or stream message would say."""
        return self._protos.OrcaLoadReport.FromString(self._load.report_bytes())

    # -- what the application reports ------------------------------------------------

    def set_application_utilization(self, value: float) -> None:
        """``application_utilization``: a utilization of the application's own choosing.

        ``weighted_round_robin`` prefers it to ``cpu_utilization`` when > 0.
        Any finite value >= 0 (a utilization of several resources may exceed 1).
        """
        self._load.set_application_utilization(_number("value", value, low=0.0))

    def clear_application_utilization(self) -> None:
        """Report no ``application_utilization`` (0, unset) again."""
        self._load.set_application_utilization(None)

    def set_utilization(self, name: str, value: float) -> None:
        """``utilization[name] = value``, a resource's utilization in [0, 1]."""
        self._load.set_utilization(_name(name), _number("value", value, low=0.0, high=1.0))

    def remove_utilization(self, name: str) -> None:
        """Drop ``utilization[name]`` (no error if it is not set)."""
        self._load.set_utilization(_name(name), None)

    def clear_utilization(self) -> None:
        """Drop every ``utilization`` entry."""
        self._load.clear_utilization()

    def set_named_metric(self, name: str, value: float) -> None:
        """``named_metrics[name] = value``, any finite number (not ``IN_FLIGHT_METRIC``)."""
        value = _number("value", value)
        self._load.set_named_metric(_name(name), value)

    def remove_named_metric(self, name: str) -> None:
        """Drop ``named_metrics[name]`` (no error if it is not set)."""
        self._load.set_named_metric(_name(name), None)

    def clear_named_metrics(self) -> None:
        """Drop every named metric the application set (the in-flight one stays)."""
        self._load.clear_named_metrics()

    def __repr__(self) -> str:
        return (
            f"LoadReporter(min_report_interval={self._min_report_interval!r}, "
            f"in_flight={self.in_flight})"
        )


def _number(what: str, value: Any, *, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number, not {type(value).__name__}")
    if not (math.isfinite(value) and low <= value <= high):
        if low == -math.inf:
            bounds = "a finite number"
        elif high == math.inf:
            bounds = f"a finite number >= {low:g}"
        else:
            bounds = f"in [{low:g}, {high:g}]"
        raise ValueError(f"{what} must be {bounds}, got {value!r}")
    return float(value)


def _name(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, not {type(name).__name__}")
    if not name:
        raise ValueError("name must not be empty")
    return name
