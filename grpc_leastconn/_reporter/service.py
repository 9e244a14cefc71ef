"""The out-of-band reports: ``xds.service.orca.v3.OpenRcaService/StreamCoreMetrics``.

A client asks for reports every ``report_interval``; the stream sends one at
once, then one every ``max(report_interval, min_report_interval)`` seconds
(an unset or zero interval means the minimum) until the client cancels or
the server stops. Registered as a generic handler, so it works on
``grpc.Server`` and ``grpc.aio.Server`` alike; responses are the report's
serialized bytes (no response serializer).

Sync: a generator that waits between reports on an event the RPC's
``add_callback`` sets, so a cancelled stream returns at once. Each open
stream holds one of the server's worker threads (size ``max_workers`` for
the handlers plus the clients' streams). grpc.aio: an async generator that
sleeps between reports; grpc.aio cancels its task when the call ends.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc

from .orca import METHOD, SERVICE, Protos, requested_interval


def _interval(request: Any, minimum: float) -> float:
    return max(requested_interval(request), minimum)


def sync_handler(
    protos: Protos, report: Callable[[], bytes], minimum: float
) -> grpc.GenericRpcHandler:
    """The service for a ``grpc.Server``."""

    def stream(request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
        interval = _interval(request, minimum)
        ended = threading.Event()
        if not context.add_callback(ended.set):
            return
        while True:
            yield report()
            if ended.wait(interval):
                return

    return _generic(protos, stream)


def aio_handler(
    protos: Protos, report: Callable[[], bytes], minimum: float
) -> grpc.GenericRpcHandler:
    """The service for a ``grpc.aio.Server``."""

    async def stream(request: Any, context: Any) -> AsyncIterator[bytes]:
        interval = _interval(request, minimum)
        while True:
            yield report()
            await asyncio.sleep(interval)

    return _generic(protos, stream)


def _generic(protos: Protos, stream: Callable[..., Any]) -> grpc.GenericRpcHandler:
    handler: grpc.RpcMethodHandler[Any, bytes] = grpc.unary_stream_rpc_method_handler(
        stream, request_deserializer=protos.OrcaLoadReportRequest.FromString
    )
    return grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler})
