"""Server-reported load (ORCA, gRFC A51): other clients' calls, added to this channel's.

Counts are per channel: a channel sees only its own calls, so many client
processes each see idle backends and herd. A backend running
``grpc_leastconn.LoadReporter`` (or any ORCA reporter that sets the
``grpc_leastconn.in_flight`` named metric) reports its in-flight RPCs, all
clients' together, in each call's trailer (``endpoint-load-metrics-bin``,
which grpcio does not show its clients, and the same report as
``grpc-leastconn-load-bin``, which it does) and on an out-of-band stream. The backend's load here is

    load = this channel's RPCs in flight now + others
    others = reported in-flight - this channel's in flight when the report came

so this channel's own picks count at once and other clients' within one
report. ``others`` enters the picker as whole calls of ``extra`` load, next
to the failure penalty. A report expires when none followed it for
``STALE_AFTER_S`` or three of the backend's own gaps between reports,
whichever is longer (grpc-go's ORCA service, for one, sends at most one
report every 30 s): the backend is judged by local counts again (logged). A backend that does
not serve the report stream (UNIMPLEMENTED) is judged by its trailers, or by
local counts, and that is logged once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Final

import grpc

from .backend import Backend
from .backoff import Backoff
from .health import WatchEnd, WatchSpec

log = logging.getLogger("grpc_leastconn")

TRAILER: Final = "endpoint-load-metrics-bin"
# gRPC C-core parses ORCA's trailer itself and does not hand it to Python
# clients (grpcio 1.85, measured), so grpc_leastconn's reporter sends the
# same report under this key too, which they can read.
MIRROR_TRAILER: Final = "grpc-leastconn-load-bin"
_TRAILERS: Final = (TRAILER, MIRROR_TRAILER)
IN_FLIGHT_METRIC: Final = "grpc_leastconn.in_flight"
OOB_METHOD: Final = "/xds.service.orca.v3.OpenRcaService/StreamCoreMetrics"
# Asked of the out-of-band stream; servers floor it (grpc_leastconn's
# reporter at its min_report_interval).
REPORT_INTERVAL_S: Final = 1.0
# A report this old no longer says anything: local counts serve again...
STALE_AFTER_S: Final = 5.0
# ... unless the backend reports less often: then this many of its gaps.
STALE_AFTER_GAPS: Final = 3.0
_INSTALL_HINT = "server_load needs the ORCA messages: pip install 'grpc-leastconn[orca]'"


def report_messages() -> tuple[Any, Any]:
    """(OrcaLoadReport, OrcaLoadReportRequest) from xds-protos; ImportError with a hint."""
    try:
        from xds.data.orca.v3 import orca_load_report_pb2
        from xds.service.orca.v3 import orca_pb2
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return orca_load_report_pb2.OrcaLoadReport, orca_pb2.OrcaLoadReportRequest


def in_flight_of(report: Any) -> float | None:
    """The reported in-flight RPCs of an OrcaLoadReport, None if it does not say."""
    value = report.named_metrics.get(IN_FLIGHT_METRIC)
    return None if value is None or not math.isfinite(value) else float(value)


def trailer_in_flight(metadata: Sequence[tuple[str, Any]] | None) -> float | None:
    """The in-flight count of a call's ORCA trailer, if it carries one."""
    for key, value in metadata or ():
        if key in _TRAILERS:
            report_type, _ = report_messages()
            try:
                report = report_type.FromString(value)
            except Exception:
                return None
            return in_flight_of(report)
    return None


class Unreported:
    """What a report stream that is UNIMPLEMENTED reports: the backend serves none."""


UNREPORTED: Final = Unreported()


class ReportPolicy:
    """The ORCA out-of-band report stream of one backend, as a watched stream.

    Every report's in-flight count is reported; an UNIMPLEMENTED stream is
    not asked again on that connection (gRFC A51), only on the next; any
    other end is retried with the same backoff as the health Watch.
    """

    __slots__ = ("_attempt", "_backoff", "request")

    def __init__(self, backoff: Backoff) -> None:
        _, request_type = report_messages()
        self.request = request_type()
        self.request.report_interval.FromTimedelta(timedelta(seconds=REPORT_INTERVAL_S))
        self._backoff = backoff
        self._attempt = 0

    def answered(self, report: Any) -> float | None:
        self._attempt = 0
        return in_flight_of(report)

    def ended(self, code: grpc.StatusCode) -> WatchEnd:
        if code is grpc.StatusCode.UNIMPLEMENTED:
            return WatchEnd(UNREPORTED, None)
        delay = self._backoff.delay(self._attempt)
        self._attempt += 1
        return WatchEnd(None, delay)

    def reconnected(self) -> None:
        self._attempt = 0


class ServerLoad:
    """What the backends of one channel report of their load."""

    __slots__ = ("_clock", "_expires", "_set_extra", "_target", "refresh_at", "reporting")

    def __init__(
        self,
        *,
        target: str,
        clock: Callable[[], float],
        set_extra: Callable[[Backend[Any]], None],
    ) -> None:
        self._target = target
        self._clock = clock
        # Puts the backend's extra load (penalty + others) in the picker.
        self._set_extra = set_extra
        # Backends whose report counts now -> when it came.
        self.reporting: dict[Backend[Any], float] = {}
        # ... -> when it expires (see the module's docstring).
        self._expires: dict[Backend[Any], float] = {}
        self.refresh_at = math.inf

    def reported(self, backend: Backend[Any], in_flight: float, ours: int) -> None:
        """A report of ``in_flight`` RPCs, while this channel had ``ours`` there."""
        now = self._clock()
        others = max(0, round(in_flight) - ours)
        last = self.reporting.get(backend)
        if last is None:
            if backend.load_reports_stale:
                log.info("backend %s of %r reports its load again", backend.key, self._target)
            backend.load_reports_stale = False
        gap = 0.0 if last is None else now - last
        self.reporting[backend] = now
        self._expires[backend] = expires = now + max(STALE_AFTER_S, STALE_AFTER_GAPS * gap)
        self.refresh_at = min(self.refresh_at, expires)
        if others != backend.others:
            backend.others = others
            self._set_extra(backend)

    def unimplemented(self, backend: Backend[Any]) -> None:
        """The backend serves no report stream: trailers, or local counts, will do."""
        if not backend.warned_no_reports:
            backend.warned_no_reports = True
            log.info(
                "backend %s of %r serves no ORCA load reports (UNIMPLEMENTED): "
                "judged by call trailers if it sends them, else by local counts",
                backend.key,
                self._target,
            )

    def forget(self, backend: Backend[Any]) -> None:
        self.reporting.pop(backend, None)
        self._expires.pop(backend, None)
        backend.others = 0

    def refresh(self, now: float) -> None:
        """Expire stale reports (called when the first of them is due, see refresh_at)."""
        for backend, expires in list(self._expires.items()):
            if now >= expires:
                at = self.reporting.pop(backend)
                del self._expires[backend]
                backend.load_reports_stale = True
                log.info(
                    "backend %s of %r: no load report for %.1f s, judged by local counts",
                    backend.key,
                    self._target,
                    now - at,
                )
                if backend.others:
                    backend.others = 0
                    self._set_extra(backend)
        self.refresh_at = min(self._expires.values(), default=math.inf)


def load_watch(backoff: Backoff, report: Callable[[Any], None]) -> WatchSpec:
    """The ORCA out-of-band report stream of one backend (server_load=True)."""
    report_type, request_type = report_messages()
    return WatchSpec(
        kind="load reports",
        method=OOB_METHOD,
        serializer=request_type.SerializeToString,
        deserializer=report_type.FromString,
        policy=ReportPolicy(backoff),
        report=report,
        on_error=None,
    )
