"""Least-connection load balancing for Python gRPC clients.

``insecure_channel()`` and ``secure_channel()`` return a real ``grpc.Channel``
that opens one backend channel per resolved address and sends every new RPC
to the eligible backend with the fewest RPCs in flight; ``channel.backends()``
shows each backend's state. ``grpc_leastconn.aio`` offers the same for
``grpc.aio``. On the server side, ``LoadReporter`` reports a backend's load
(ORCA) to balancers that weigh backends by it.
"""

from . import aio
from ._core.backend import BackendState, Health
from ._core.failures import DEFAULT_FAILURE_CODES
from ._core.outlier import FailurePercentageEjection, OutlierDetection, SuccessRateEjection
from ._core.slowstart import SlowStart
from ._reporter import LoadReporter
from ._sync.channel import LeastConnChannel, insecure_channel, secure_channel

__all__ = [
    "DEFAULT_FAILURE_CODES",
    "BackendState",
    "FailurePercentageEjection",
    "Health",
    "LeastConnChannel",
    "LoadReporter",
    "OutlierDetection",
    "SlowStart",
    "SuccessRateEjection",
    "aio",
    "insecure_channel",
    "secure_channel",
]
__version__ = "0.1.0"
