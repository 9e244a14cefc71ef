"""Naming the backend in tracing spans (OpenTelemetry, when it is installed).

A user's client span (OpenTelemetry's gRPC instrumentation, on the backend
channels or on top of the balanced channel) is current while grpcio
serializes the request of the call it traces. Each backend's inner
multicallable serializes through ``traced``, which sets the semantic
conventions' ``server.address`` and ``server.port`` on that span: the
backend this call went to. Nothing is wrapped when OpenTelemetry is not
installed, or when no tracer provider is set yet as a backend's first call
of a method is made (its spans could not record: a look at the current
span on every call would be spent for nothing); with one, a call whose
current span is not its own RPC's (no tracing, or an application span) is
left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .target import Address

try:
    from opentelemetry import trace
except ImportError:  # pragma: no cover - the extra is not installed
    trace = None  # type: ignore[assignment]

Serializer = Callable[[Any], bytes] | None


def traced(serializer: Serializer, method: str, address: Address) -> Serializer:
    """``serializer``, tagging the current span of ``method`` with ``address``."""
    if trace is None or isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider
    ):
        return serializer
    current_span = trace.get_current_span
    host, port = address.host, address.port

    def serialize(request: Any) -> bytes:
        span = current_span()
        # OpenTelemetry names a gRPC client span after the full method.
        if span.is_recording() and getattr(span, "name", None) == method:
            span.set_attribute("server.address", host)
            span.set_attribute("server.port", port)
        return request if serializer is None else serializer(request)

    return serialize
