"""Least-connection load balancing for Python gRPC clients.

``insecure_channel()`` and ``secure_channel()`` return a real ``grpc.Channel``
that opens one sub-channel per resolved backend and sends every new RPC to
the eligible backend with the fewest RPCs in flight. ``grpc_leastconn.aio``
offers the same for ``grpc.aio``.
"""

from . import aio
from ._channel import LeastConnChannel, insecure_channel, secure_channel

__all__ = ["LeastConnChannel", "aio", "insecure_channel", "secure_channel"]
__version__ = "0.1.0"
