"""Server-side load reporting (ORCA, gRFC A51) for backends behind load balancers.

``LoadReporter`` counts a server's in-flight RPCs, measures its request and
error rates and CPU, and reports them with what the application records,
per call in trailing metadata and out of band on the OpenRcaService stream,
the reports gRPC's ``weighted_round_robin`` policy balances on. Needs the
``orca`` extra (xds-protos), imported when a reporter is built.
"""

from .orca import IN_FLIGHT_METRIC, MIRROR_TRAILER_KEY, TRAILER_KEY
from .reporter import LoadReporter

__all__ = ["IN_FLIGHT_METRIC", "MIRROR_TRAILER_KEY", "TRAILER_KEY", "LoadReporter"]
