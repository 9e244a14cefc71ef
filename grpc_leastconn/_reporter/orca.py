"""The ORCA wire (gRFC A51): names, xds-protos loaded on first use, the per-report fields.

The names are the client side's (``_core.server_load``), so both ends agree.
A call's report goes out twice: under ORCA's ``endpoint-load-metrics-bin``,
which gRPC C-core clients (``weighted_round_robin``) read and which C-core
then hides from the application (grpcio 1.85: a Python client never sees
it), and under ``grpc-leastconn-load-bin``, the same bytes, which Python
clients, ``grpc_leastconn``'s ``server_load`` among them, can read.

xds-protos (the ``orca`` extra) is imported only when a ``LoadReporter`` is
built, so ``grpc_leastconn`` imports without it. The fields that change on
every call (CPU, rates, in-flight RPCs) are written to protobuf wire format
here by hand, in one ``struct.pack`` with field numbers read from the loaded
descriptor, and appended to the cached serialization of what the
application set: concatenated protobuf messages parse as their merge, and
no hand-written field appears in the cached part, so the result parses as
one ``OrcaLoadReport``. A report costs about a microsecond that way, against
about seven for building and serializing the message.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from .._core import server_load

# The named metric carrying the server's in-flight RPCs.
IN_FLIGHT_METRIC: Final = server_load.IN_FLIGHT_METRIC
# The trailing metadata key of per-call reports (grpcio sends ``-bin`` values
# as raw bytes), and the key of the copy Python clients can read.
TRAILER_KEY: Final = server_load.TRAILER
MIRROR_TRAILER_KEY: Final = server_load.MIRROR_TRAILER

SERVICE = "xds.service.orca.v3.OpenRcaService"
METHOD = "StreamCoreMetrics"

# Methods the interceptors pass through uncounted: the out-of-band reports
# themselves, and the health service, whose Watch streams are long-lived and
# idle and are opened by clients' health checking outside their balancers
# (no balancer counts them either).
UNCOUNTED_PREFIXES = (f"/{SERVICE}/", "/grpc.health.v1.Health/")

INSTALL_HINT = (
    "grpc_leastconn.LoadReporter needs the ORCA protos of the xds-protos package; "
    "install them with: pip install grpc-leastconn[orca]"
)

Metadata = tuple[tuple[str, str | bytes], ...]

_DOUBLE = struct.Struct("<d")
_DOUBLE_FIELD = 1  # wire type 64-bit
_LENGTH_FIELD = 2  # wire type length-delimited
_DOUBLES = ("cpu_utilization", "rps_fractional", "eps")


@dataclass(frozen=True)
class Protos:
    """The loaded ORCA messages and the hand-encoding's constant prefixes."""

    OrcaLoadReport: Any
    OrcaLoadReportRequest: Any
    cpu_tag: bytes
    rps_tag: bytes
    eps_tag: bytes
    in_flight_prefix: bytes
    layout: struct.Struct

    def dynamic_fields(self, cpu: float, rps: float, eps: float, in_flight: int) -> bytes:
        """``cpu_utilization``, ``rps_fractional``, ``eps`` and the in-flight entry.

        All four are always written, zeros too: an explicit zero parses as
        the default protobuf would have left out.
        """
        return self.layout.pack(
            self.in_flight_prefix,
            float(in_flight),
            self.cpu_tag,
            cpu,
            self.rps_tag,
            rps,
            self.eps_tag,
            eps,
        )


_loaded: Protos | None = None


def protos() -> Protos:
    """The ORCA protos, imported on first use; ImportError naming the extra without them."""
    global _loaded
    if _loaded is None:
        try:
            from xds.data.orca.v3 import orca_load_report_pb2
            from xds.service.orca.v3 import orca_pb2
        except ImportError as exc:
            raise ImportError(INSTALL_HINT) from exc
        _loaded = _build(orca_load_report_pb2.OrcaLoadReport, orca_pb2.OrcaLoadReportRequest)
    return _loaded


def _build(report: Any, request: Any) -> Protos:
    fields = report.DESCRIPTOR.fields_by_name
    named = fields["named_metrics"]
    key = IN_FLIGHT_METRIC.encode()
    # A map entry is a message {1: key, 2: value}; the value is a double.
    entry_head = b"\x0a" + _varint(len(key)) + key + b"\x11"
    entry_length = len(entry_head) + _DOUBLE.size
    in_flight_prefix = _tag(named.number, _LENGTH_FIELD) + _varint(entry_length) + entry_head
    tags = [_tag(fields[name].number, _DOUBLE_FIELD) for name in _DOUBLES]
    # Each part is written whole: bytes of their own length, then a double.
    layout = "<" + "".join(f"{len(part)}sd" for part in [in_flight_prefix, *tags])
    return Protos(
        OrcaLoadReport=report,
        OrcaLoadReportRequest=request,
        cpu_tag=tags[0],
        rps_tag=tags[1],
        eps_tag=tags[2],
        in_flight_prefix=in_flight_prefix,
        layout=struct.Struct(layout),
    )


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def merged_trailers(application: Sequence[tuple[str, Any]] | None, report: bytes) -> Metadata:
    """The application's trailing metadata with the report appended under both keys.

    Never replaces what the application set: a key it set itself
    (``TRAILER_KEY`` or ``MIRROR_TRAILER_KEY``) keeps its value, and ours is
    left out for that key only.
    """
    if not application:
        return ((TRAILER_KEY, report), (MIRROR_TRAILER_KEY, report))
    kept = tuple((key, value) for key, value in application)
    keys = {key for key, _ in kept}
    ours = tuple((key, report) for key in (TRAILER_KEY, MIRROR_TRAILER_KEY) if key not in keys)
    return kept + ours


def counted(method: str | None) -> bool:
    """Whether the interceptors count calls of ``method`` (a ``/service/method`` path)."""
    return method is not None and not method.startswith(UNCOUNTED_PREFIXES)


def requested_interval(request: Any) -> float:
    """``report_interval`` of an ``OrcaLoadReportRequest`` in seconds (0 when unset)."""
    duration = request.report_interval
    return float(duration.seconds) + float(duration.nanos) / 1e9
