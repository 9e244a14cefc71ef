"""Least-connection load balancing for Python ``grpc.aio`` clients.

``insecure_channel()`` and ``secure_channel()`` return a real
``grpc.aio.Channel`` that opens one backend channel per resolved address and
sends every new RPC to the eligible backend with the fewest RPCs in flight.
The balancer is the one of the sync ``grpc_leastconn`` channel; only how
events reach it differs (tasks on the event loop instead of threads).
"""

from ._aio.channel import LeastConnChannel, insecure_channel, secure_channel

__all__ = ["LeastConnChannel", "insecure_channel", "secure_channel"]
