"""What a server's load report says: in-flight RPCs, rates, CPU and the application's values.

``Load`` is shared by every interceptor and out-of-band stream of one
``LoadReporter`` (threads of a sync server, the loop of a grpc.aio server,
or both), so each change happens under one lock. ``report_bytes`` is what
goes out, per call and out of band alike; ``OrcaLoadReport`` objects are
parsed from it, so both can never disagree.

* in flight: calls whose handler started and that have not ended; ``begin``
  counts a call, ``end`` releases it once whatever calls it how often.
* rates: requests and errors per second as exponentially decaying rates
  with a time constant of ``RATE_TIME_CONSTANT_S`` (an event ``t`` seconds
  ago weighs ``exp(-t / tau)``): a steady rate ``r`` reads ``r`` within a
  few seconds and an idle server decays towards 0. A request counts when
  its call ends; an error is a call that ended with a status other than OK
  (including CANCELLED and DEADLINE_EXCEEDED ends).
* CPU: this process's CPU time over wall time over ``os.cpu_count()``,
  averaged since the previous sample; samples are taken when a report is
  made and at least ``cpu_window`` seconds after the previous one (while
  the first window is open, since the ``Load`` was built).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable

import grpc

from .orca import IN_FLIGHT_METRIC, Protos

RATE_TIME_CONSTANT_S = 1.0
_OK = grpc.StatusCode.OK


class Call:
    """One counted call: ``code`` is its status once its handler finished (None before)."""

    __slots__ = ("code", "ended")

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.ended = False


class Load:
    """The counters and values behind one reporter's reports (thread-safe)."""

    def __init__(
        self,
        protos: Protos,
        cpu_window: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.process_time,
        cpu_count: int | None = None,
    ) -> None:
        self._protos = protos
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._cpu_count = cpu_count or os.cpu_count() or 1
        self._cpu_window = cpu_window
        self._lock = threading.Lock()
        now = clock()
        self._in_flight = 0
        # The decayed sums of ended calls and of errors, as of ``_rate_stamp``.
        self._requests = 0.0
        self._errors = 0.0
        self._rate_stamp = now
        self._cpu_stamp = now
        self._cpu_time = cpu_clock()
        self._cpu_value: float | None = None
        # What the application set, and its serialization (None: to redo).
        self._application_utilization = 0.0
        self._utilization: dict[str, float] = {}
        self._named: dict[str, float] = {}
        self._static: bytes | None = b""

    # -- calls ------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def begin(self) -> Call:
        call = Call()
        with self._lock:
            self._in_flight += 1
        return call

    def end(self, call: Call) -> None:
        """Release ``call`` (once; later calls do nothing) and count it in the rates."""
        code = call.code
        with self._lock:
            if call.ended:
                return
            call.ended = True
            self._in_flight -= 1
            now = self._clock()
            decay = self._decay(now)
            self._requests = self._requests * decay + 1.0
            self._errors = self._errors * decay + (code is not _OK)
            self._rate_stamp = now

    # -- the report -------------------------------------------------------------

    def report_bytes(self) -> bytes:
        """The current report, serialized ``OrcaLoadReport``."""
        with self._lock:
            now = self._clock()
            in_flight = self._in_flight
            per_second = self._decay(now) / RATE_TIME_CONSTANT_S
            rps = self._requests * per_second
            eps = self._errors * per_second
            cpu = self._cpu(now)
            static = self._static
            if static is None:
                static = self._static = self._serialize_static()
        return static + self._protos.dynamic_fields(cpu, rps, eps, in_flight)

    def _decay(self, now: float) -> float:
        """How much the sums have decayed since ``_rate_stamp``."""
        elapsed = now - self._rate_stamp
        return math.exp(-elapsed / RATE_TIME_CONSTANT_S) if elapsed > 0 else 1.0

    def _cpu(self, now: float) -> float:
        elapsed = now - self._cpu_stamp
        if self._cpu_value is not None and elapsed < self._cpu_window:
            return self._cpu_value
        cpu_time = self._cpu_clock()
        value = 0.0
        if elapsed > 0:
            value = max(0.0, (cpu_time - self._cpu_time) / elapsed / self._cpu_count)
        if elapsed >= self._cpu_window:
            self._cpu_stamp, self._cpu_time, self._cpu_value = now, cpu_time, value
        return value

    def _serialize_static(self) -> bytes:
        message = self._protos.OrcaLoadReport(
            application_utilization=self._application_utilization,
            utilization=self._utilization,
            named_metrics=self._named,
        )
        return bytes(message.SerializeToString(deterministic=True))

    # -- what the application sets ------------------------------------------------

    def set_application_utilization(self, value: float | None) -> None:
        with self._lock:
            self._application_utilization = 0.0 if value is None else value
            self._static = None

    def set_utilization(self, name: str, value: float | None) -> None:
        with self._lock:
            if value is None:
                if self._utilization.pop(name, None) is None:
                    return
            else:
                self._utilization[name] = value
            self._static = None

    def clear_utilization(self) -> None:
        with self._lock:
            self._utilization.clear()
            self._static = None

    def set_named_metric(self, name: str, value: float | None) -> None:
        if name == IN_FLIGHT_METRIC:
            raise ValueError(f"{IN_FLIGHT_METRIC!r} is the reporter's own metric")
        with self._lock:
            if value is None:
                if self._named.pop(name, None) is None:
                    return
            else:
                self._named[name] = value
            self._static = None

    def clear_named_metrics(self) -> None:
        with self._lock:
            self._named.clear()
            self._static = None
