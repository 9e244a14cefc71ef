"""OpenTelemetry metrics: what every channel's balancer counts, read when collected.

Shared by both front ends, which hand each channel's balancer to
``observe``; outside the pure core because the SDK reads on threads of its
own (a lock guards the registry).

Through the OpenTelemetry API only (the ``otel`` extra); the application's
SDK decides where they go. With a global MeterProvider set, metrics flow
with no code change (``meter_provider=`` picks another, ``False`` turns them
off). Every instrument is observable: the balancer keeps plain counters it
needs anyway (``Counts``, each backend's count of released calls) and the
SDK's reader asks for them at collection time, so a call costs nothing
more with metrics than without, SDK or not.

Names follow the gRPC ecosystem where it has them (gRFC A94's
``grpc.subchannel.*``: a backend channel is this library's subchannel) and
``grpc_leastconn.*`` for the rest. Every series carries ``grpc.target``
and ``grpc_leastconn.channel`` (the channel's number in this process, so
two channels to one target stay apart); the per-backend ones also
``grpc_leastconn.backend`` (``host:port``) and, for a backend still
draining after its address came back, ``grpc_leastconn.backend.draining``.
Connection attempts are counted from the backend channel's state changes:
while C-core retries in TRANSIENT_FAILURE, its repeated attempts show no
new state, and are not counted. To
limit cardinality with many backends, drop that attribute with an SDK View,
e.g. ``View(instrument_name="grpc_leastconn.backend.*",
attribute_keys={"grpc.target"})``, which sums over backends.

The callbacks run on the reader's thread: they read a snapshot taken in
one C-level step (``Balancer.snapshot``), never the balancer's live dicts.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ._core.failures import decayed_penalty

if TYPE_CHECKING:
    from ._core.balancer import Balancer

try:
    from opentelemetry import metrics as otel_metrics
except ImportError:  # pragma: no cover - the extra is not installed
    otel_metrics = None  # type: ignore[assignment]

TARGET = "grpc.target"
BACKEND = "grpc_leastconn.backend"
# Two channels to one target in one process keep their series apart.
CHANNEL = "grpc_leastconn.channel"
DRAINING = "grpc_leastconn.backend.draining"


# (kind, name, unit, description, what to observe): per channel (``channel``)
# or per backend (``backend``).
_Reading = Callable[["Balancer[Any]"], Iterable[tuple[float, dict[str, Any]]]]


def _per_channel(value: Callable[[Balancer[Any]], float]) -> _Reading:
    return lambda balancer: [(value(balancer), _labels(balancer))]


def _per_backend(value: Callable[[Any, float], float]) -> _Reading:
    """``value(backend, now)`` for every backend of the channel."""

    def read(balancer: Balancer[Any]) -> Iterator[tuple[float, dict[str, Any]]]:
        now = balancer.clock()
        for backend in balancer.snapshot():
            labels = {**_labels(balancer), BACKEND: backend.key}
            if backend.removed:
                # An address back before its old backend drained has two.
                labels[DRAINING] = True
            yield value(backend, now), labels

    return read


def _count(field: str) -> _Reading:
    return _per_channel(lambda balancer: getattr(balancer.counts, field))


_INSTRUMENTS: tuple[tuple[str, str, str, str, _Reading], ...] = (
    (
        "counter",
        "grpc.subchannel.connection_attempts_succeeded",
        "{attempt}",
        "Backend channel connections that became READY (gRFC A94).",
        _count("connection_attempts_succeeded"),
    ),
    (
        "counter",
        "grpc.subchannel.connection_attempts_failed",
        "{attempt}",
        "Backend channel connection attempts that failed (gRFC A94).",
        _count("connection_attempts_failed"),
    ),
    (
        "counter",
        "grpc.subchannel.disconnections",
        "{disconnection}",
        "READY backend channels that lost their connection (gRFC A94).",
        _count("disconnections"),
    ),
    (
        "updown",
        "grpc.subchannel.open_connections",
        "{connection}",
        "Backend channels that are READY now (gRFC A94).",
        _per_channel(lambda b: sum(1 for x in b.snapshot() if x.connectivity.name == "READY")),
    ),
    (
        "gauge",
        "grpc_leastconn.backend.in_flight",
        "{call}",
        "RPCs in flight on each backend.",
        _per_backend(lambda backend, _: backend.in_flight),
    ),
    (
        "counter",
        "grpc_leastconn.backend.picks",
        "{call}",
        "RPCs sent to each backend.",
        _per_backend(lambda backend, _: backend.released + backend.in_flight),
    ),
    (
        "gauge",
        "grpc_leastconn.backend.penalty",
        "{call}",
        "Each backend's failure penalty, in calls counted as if in flight.",
        _per_backend(decayed_penalty),
    ),
    (
        "gauge",
        "grpc_leastconn.backend.weight",
        "1",
        "Each backend's weight now (static weight times slow-start factor).",
        _per_backend(lambda backend, _: backend.weight),
    ),
    (
        "gauge",
        "grpc_leastconn.backends.eligible",
        "{backend}",
        "Backends that take new calls now.",
        _per_channel(lambda b: sum(1 for backend in b.snapshot() if backend.eligible)),
    ),
    (
        "gauge",
        "grpc_leastconn.backends.ejected",
        "{backend}",
        "Backends outlier detection holds out now.",
        _per_channel(lambda b: sum(1 for x in b.snapshot() if x.ejected_at is not None)),
    ),
    (
        "counter",
        "grpc_leastconn.ejections",
        "{ejection}",
        "Backends ejected by outlier detection (gRFC A50).",
        _count("ejections"),
    ),
    (
        "counter",
        "grpc_leastconn.health_changes",
        "{change}",
        "Health reports that changed a backend's health.",
        _count("health_changes"),
    ),
    (
        "counter",
        "grpc_leastconn.resolutions",
        "{resolution}",
        "Re-resolutions of the target that answered.",
        _count("resolutions"),
    ),
    (
        "counter",
        "grpc_leastconn.resolution_failures",
        "{resolution}",
        "Re-resolutions of the target that failed (the last good set stays).",
        _count("resolution_failures"),
    ),
    (
        "counter",
        "grpc_leastconn.repicks",
        "{call}",
        "Calls sent again elsewhere because they never left the process.",
        _count("repicks"),
    ),
    (
        "counter",
        "grpc_leastconn.fail_fast",
        "{call}",
        "Calls failed at once with UNAVAILABLE: no backend could serve.",
        _count("fail_fast"),
    ),
)


class _Registry:
    """One meter's instruments, observing every live channel that uses it."""

    def __init__(self, meter: Any) -> None:
        self._balancers: weakref.WeakSet[Balancer[Any]] = weakref.WeakSet()
        self._lock = threading.Lock()
        makers = {
            "counter": meter.create_observable_counter,
            "updown": meter.create_observable_up_down_counter,
            "gauge": meter.create_observable_gauge,
        }
        for kind, name, unit, description, reading in _INSTRUMENTS:
            makers[kind](
                name, callbacks=[self._callback(reading)], unit=unit, description=description
            )

    def add(self, balancer: Balancer[Any]) -> None:
        with self._lock:
            self._balancers.add(balancer)

    def _callback(self, reading: _Reading) -> Callable[[Any], Iterable[Any]]:
        def observe(_options: Any) -> Iterator[Any]:
            with self._lock:
                balancers = list(self._balancers)
            for balancer in balancers:
                if balancer.closed:
                    continue
                for value, attributes in reading(balancer):
                    yield otel_metrics.Observation(value, attributes)

        return observe


# Registries by meter provider: instruments are made once per provider,
# whatever the number of channels; a provider dropped by the application
# takes its registry with it.
_registries: weakref.WeakKeyDictionary[Any, _Registry] = weakref.WeakKeyDictionary()
_registries_lock = threading.Lock()
# Channel numbers for the CHANNEL label, in the order channels are made.
_channel_numbers = itertools.count(1)
_numbered: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def _labels(balancer: Balancer[Any]) -> dict[str, Any]:
    return {TARGET: balancer.target, CHANNEL: _numbered.get(balancer, 0)}


def observe(balancer: Balancer[Any], meter_provider: object) -> None:
    """Report ``balancer``'s metrics through ``meter_provider`` (None: the global one)."""
    if otel_metrics is None or meter_provider is False:
        return
    provider = otel_metrics.get_meter_provider() if meter_provider is None else meter_provider
    with _registries_lock:
        registry = _registries.get(provider)
        if registry is None:
            meter = provider.get_meter("grpc_leastconn", _version())  # type: ignore[attr-defined]
            registry = _registries[provider] = _Registry(meter)
        _numbered[balancer] = next(_channel_numbers)
    registry.add(balancer)


def _version() -> str:
    try:
        return importlib.metadata.version("grpc-leastconn")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
        return "0"
