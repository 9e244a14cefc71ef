"""The sync channel's core: the balancer behind one lock, its backend channels, its events.

One lock guards the balancer, held only to pick, to release and to apply an
event (microseconds, no I/O). Events arrive on grpcio's threads
(connectivity), on each backend's health thread (health_checker="watch"),
and on the timer's resolution thread; grpcio's connectivity subscribers are
called on one delivery thread of ours, in order, outside the lock.

Backend channels are opened by a short-lived opener thread, one after the
other, so that neither the factory nor a re-resolution waits for them all;
a backend counts as connecting until its channel reports. Closing stops
every backend channel's watching first, then closes them one by one: see
_close_channels.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from .._core.backend import Backend, Health
from .._core.balancer import log
from .._core.foundation import Foundation
from .._core.maintenance import Step, resolve_again
from .._core.rules import Report, no_backend, outcome
from .._core.seams import Seams
from .._core.settings import Settings
from .._core.target import Address
from .._core.weighted import UNIT
from .._metrics import observe
from .backend_channel import BackendChannel
from .failed import FailedCall
from .maintenance import Timer

_Backend = Backend[BackendChannel]
_Subscriber = Callable[[grpc.ChannelConnectivity], None]
# With our Watch, a backend costs three threads (grpcio's connectivity poller,
# its call thread for the stream, our reader); C-core's health checking leaves
# the poller only. Past this many backends, say so once.
MANY_WATCHED_BACKENDS = 100


class Core(Foundation[BackendChannel]):
    """Balancer + lock + backend channels + timer: what the channel and its calls share."""

    def __init__(self, settings: Settings, seams: Seams) -> None:
        super().__init__(settings, seams)
        self._lock = self._guard = threading.Lock()
        # Notified on every change that could make a backend eligible, and on
        # close: calls waiting for a backend re-check then.
        self._changed = threading.Condition(self._lock)
        self._subscribers: dict[_Subscriber, None] = {}
        self._reported_state: grpc.ChannelConnectivity | None = None
        self._deliveries: _Deliveries | None = None
        # Set before any backend channel exists: their reports read it.
        self._timer: Timer | None = None
        # Backends whose channels are still to open, and the thread opening
        # them (None: none is running).
        self._to_open: collections.deque[_Backend] = collections.deque()
        self._opener: threading.Thread | None = None
        self._warned_threads = False
        observe(self._balancer, settings.meter_provider)
        if seams.observer is not None:
            seams.observer.on_attach(self)
        self._apply(self.first_addresses)
        if self.plan.needed:
            self._timer = Timer(self)

    def _apply(self, addresses: Sequence[Address]) -> None:
        with self._lock:
            if self._balancer.closed:
                return
            change = self._balancer.set_addresses(addresses)
            if (
                len(addresses) > MANY_WATCHED_BACKENDS
                and self.settings.watches_health
                and not self._warned_threads
            ):
                self._warned_threads = True
                log.warning(
                    "%r has %d backends, each watched by 3 threads "
                    "(health_checker='watch'); health_checker='grpc' needs one per backend",
                    self.target,
                    len(addresses),
                )
            if change.added:
                # Opened off the caller's thread (the factory returns at
                # once); until a backend's channel reports, it counts as
                # connecting, so calls wait for it as during any start-up.
                self._to_open.extend(change.added)
                if self._opener is None:
                    self._opener = threading.Thread(
                        target=self._open_queued,
                        name=f"grpc_leastconn opener {self.target}",
                        daemon=True,
                    )
                    # Under the lock: close() joins only a started opener.
                    self._opener.start()
        self._close_channels(change.to_close)

    def _open_queued(self) -> None:
        """The opener thread: open the queued backends' channels, then end."""
        while True:
            with self._lock:
                if self._balancer.closed or not self._to_open:
                    self._opener = None
                    return
                backend = self._to_open.popleft()
                if backend.removed:
                    continue
            channel = BackendChannel(
                self._spec(backend),
                name=backend.key,
                watches=self._watches(backend),
                on_connectivity=Report(self.on_connectivity, backend),
            )
            with self._lock:
                # Known to its backend before its first report (start()):
                # an eligible backend always has its channel. Removed or
                # closed meanwhile: nobody else knows of this channel.
                keep = not backend.removed
                if keep:
                    backend.channel = channel
            if keep:
                channel.start()
            else:
                channel.close()

    @staticmethod
    def _close_channels(backends: Sequence[_Backend]) -> None:
        channels = [backend.channel for backend in backends if backend.channel is not None]
        # All stop watching first: each close waits for grpcio's connectivity
        # poller to look again (up to 0.2 s), and stopped together they all
        # look within the first close's wait; the others then close at once.
        for channel in channels:
            channel.stop_watching()
        for channel in channels:
            channel.close()

    # -- hot path -------------------------------------------------------------

    def acquire(
        self, wait_for_ready: bool | None, timeout: float | None, cost: int = UNIT
    ) -> _Backend:
        """Pick a backend for one RPC of ``cost`` (counted) or raise FailedCall."""
        with self._lock:
            backend = self._balancer.pick(cost)
            if backend is None:
                backend = self._wait_for_backend(wait_for_ready, timeout, cost)
        return backend

    def release(
        self,
        backend: _Backend,
        code: grpc.StatusCode | None = None,
        cost: int = UNIT,
        error: str | None = None,
        trailers: Any = None,
    ) -> None:
        """An RPC on ``backend`` ended with ``code`` (None: it never reached the backend)."""
        with self._lock:
            drained = self._balancer.release(backend, code, cost, error, trailers)
        if drained and backend.channel is not None:
            # This may run in the backend channel's own callback thread,
            # which closing the channel would wait for: close it on another.
            threading.Thread(target=backend.channel.close, daemon=True).start()

    def release_call(self, backend: _Backend, call: Any, cost: int = UNIT) -> None:
        """A call's done callback: release with the call's status."""
        trailers = None
        try:
            code, error = outcome(call.code(), call.details, backend)
            if self.reads_load:
                trailers = call.trailing_metadata()
        except Exception:
            # Not a grpc call we can ask (a wrapper of someone else's): count
            # the end, judge nothing.
            code, error = None, None
        self.release(backend, code, cost, error, trailers)

    def _wait_for_backend(
        self, wait_for_ready: bool | None, timeout: float | None, cost: int
    ) -> _Backend:
        # Called with the lock held; see no_backend for when to wait.
        balancer = self._balancer
        backend = balancer.pick_fresh(cost)
        if backend is not None:
            return backend
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if balancer.closed:
                raise ValueError(f"Cannot invoke RPC: channel for {self.target!r} is closed")
            remaining = None if deadline is None else deadline - time.monotonic()
            failure = no_backend(balancer, wait_for_ready, remaining)
            if failure is not None:
                raise FailedCall(*failure)
            # Woken by events; time alone can also make a backend eligible
            # (an ejection ends), so look again when that is due.
            self._changed.wait(_sooner(remaining, balancer.seconds_until_due()))
            backend = balancer.pick_fresh(cost)
            if backend is not None:
                return backend

    def repick(
        self,
        failed: Sequence[_Backend],
        wait_for_ready: bool | None,
        deadline: float | None,
        cost: int,
    ) -> _Backend:
        """Another backend for an RPC that never reached ``failed`` (see never_sent)."""
        with self._lock:
            backend = self._balancer.pick_excluding(failed, cost)
        if backend is not None:
            return backend
        timeout = None if deadline is None else deadline - time.monotonic()
        return self.acquire(wait_for_ready, timeout, cost)

    # -- events ---------------------------------------------------------------

    def on_connectivity(self, backend: _Backend, state: grpc.ChannelConnectivity) -> None:
        """A backend channel's new connectivity state."""
        with self._lock:
            if not self._balancer.set_connectivity(backend, state):
                return
            self._changed.notify_all()
            wake = self.plan.connectivity_changed(state)
        if wake and self._timer is not None:
            self._timer.wake()
        self._report_state()

    def on_health(self, backend: _Backend, health: Health) -> None:
        """A backend's new health, from its Watch."""
        with self._lock:
            if not self._balancer.set_health(backend, health):
                return
            self._changed.notify_all()
        self._report_state()

    def _report_state(self) -> None:
        with self._lock:
            state = self._balancer.aggregate_state()
            if state == self._reported_state:
                return
            self._reported_state = state
            if self._deliveries is not None:
                # Queued under the lock: subscribers see states in the order
                # they happened.
                for callback in self._subscribers:
                    self._deliveries.put(callback, state)

    # -- maintenance (the timer's thread) -------------------------------------

    def maintain(self) -> Step[BackendChannel]:
        """Carry out what the maintenance plan says is due now."""
        with self._lock:
            if self._balancer.closed:
                return Step()
            step = self.plan.step(self._balancer)
        self._close_channels(step.expired)
        return step

    def resolve_now(self) -> None:
        """Resolve the target and apply the answer; a failure keeps the last good set."""
        resolution = resolve_again(self.resolver, self.target)
        if resolution is not None:
            self._apply(resolution.addresses)
        with self._lock:
            self.plan.finished(resolution)

    # -- the channel's own API --------------------------------------------------

    def subscribe(self, callback: _Subscriber, try_to_connect: bool) -> None:
        # Backends connect as soon as they are known, so try_to_connect has
        # nothing left to ask for.
        with self._lock:
            if self._balancer.closed:
                return
            if self._deliveries is None:
                self._deliveries = _Deliveries(self.target)
            state = self._balancer.aggregate_state()
            # A change not reported yet goes to everyone now, so nobody is
            # left on a stale state; a new subscriber hears the current state
            # at once, on another thread, as with grpcio.
            if state != self._reported_state:
                self._reported_state = state
                for existing in self._subscribers:
                    self._deliveries.put(existing, state)
            self._subscribers[callback] = None
            self._deliveries.put(callback, state)

    def unsubscribe(self, callback: _Subscriber) -> None:
        with self._lock:
            self._subscribers.pop(callback, None)

    def close(self) -> None:
        with self._lock:
            if self._balancer.closed:
                return
            backends = self._balancer.close()
            self._to_open.clear()
            opener = self._opener
            self._subscribers.clear()
            if self._deliveries is not None:
                self._deliveries.stop()
            self._changed.notify_all()
        if self._timer is not None:
            self._timer.stop()
        self._close_channels(backends)
        # A channel the opener was opening meanwhile it closes itself; once
        # it has, nothing of this channel is left open.
        if opener is not None and opener is not threading.current_thread():
            opener.join()

    def __del__(self) -> None:
        # At interpreter exit grpcio's own threads are gone and closing a
        # channel would wait for them forever; the process ends anyway.
        if sys.is_finalizing():
            return
        with contextlib.suppress(Exception):
            self.close()


def _sooner(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else min(a, b)


class _Deliveries:
    """One thread that calls connectivity subscribers, in order, off our locks."""

    def __init__(self, target: str) -> None:
        self._queue: queue.SimpleQueue[tuple[_Subscriber, grpc.ChannelConnectivity] | None] = (
            queue.SimpleQueue()
        )
        threading.Thread(
            target=self._run, name=f"grpc_leastconn subscribers {target}", daemon=True
        ).start()

    def put(self, callback: _Subscriber, state: grpc.ChannelConnectivity) -> None:
        self._queue.put((callback, state))

    def stop(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            callback, state = item
            try:
                callback(state)
            except Exception:
                log.exception("connectivity callback failed")
