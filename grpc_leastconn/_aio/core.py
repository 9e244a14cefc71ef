"""The asyncio channel's core: the balancer on the event loop, its backend channels, its events.

Everything runs on the event loop that built the channel: picks, releases,
connectivity and health reports, the answers of re-resolution. One thread,
and no await between reading the balancer and changing it, so the balancer
needs no lock.

Backend channels are opened by a short-lived opener task, a batch per turn
of the loop, so that neither the factory nor a re-resolution holds the loop
for them all; a backend counts as connecting until its channel reports.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from .._core.backend import Backend, Health
from .._core.foundation import Foundation
from .._core.maintenance import Step
from .._core.resolver import Resolution
from .._core.rules import Outcome, Report, no_backend, outcome
from .._core.seams import Seams
from .._core.settings import Settings
from .._core.target import Address
from .._core.weighted import UNIT
from .._metrics import observe
from .backend_channel import BackendChannel
from .maintenance import Timer

if TYPE_CHECKING:
    from .rpc import Rpc

_Backend = Backend[BackendChannel]
_T = TypeVar("_T")
Interceptors = Sequence[grpc.aio.ClientInterceptor] | None

_SHUTDOWN = grpc.ChannelConnectivity.SHUTDOWN
# grpc.aio's own words for this case, so callers see the same text.
CLOSED_DETAILS = "Channel is closed."
# Backend channels the opener task opens per turn of the event loop: each
# takes a fraction of a millisecond, so a batch holds the loop a few ms.
_OPEN_BATCH = 32


class Closed(Exception):
    """The channel closed while an RPC waited for a backend."""


def settled(ask: Callable[[], Coroutine[Any, Any, _T]]) -> _T | None:
    """The answer of a finished call's coroutine method (``code``, ``details``), now.

    In a done callback the status is known, so grpc.aio's coroutine returns
    without suspending; driving it by hand spares a task per call. None if it
    would wait after all (a wrapped call that is not done yet).
    """
    coroutine = ask()
    try:
        coroutine.send(None)
    except StopIteration as answer:
        return answer.value  # type: ignore[no-any-return]
    except Exception:
        return None
    coroutine.close()
    return None


class Core(Foundation[BackendChannel]):
    """Balancer + backend channels + tasks: what the channel and its calls share."""

    def __init__(
        self,
        settings: Settings,
        interceptors: Interceptors,
        loop: asyncio.AbstractEventLoop,
        seams: Seams,
    ) -> None:
        super().__init__(settings, seams)
        self.loop = loop
        self._interceptors = interceptors
        # The hot path's pick: a backend, counted, or None (see ``pick``).
        self.pick_now = self._balancer.pick
        # An awaited call's success, judged by its awaiter (calls.py).
        self.succeeded = self._balancer.succeeded
        # Replaced on every change that could make a backend eligible or
        # change the aggregate state, and on close: whoever waits on the old
        # one looks again.
        self._changed = asyncio.Event()
        # Backend channels being closed; the loop keeps only weak references to tasks.
        self._closing: set[asyncio.Task[None]] = set()
        self._timer: Timer | None = None
        # Backends whose channels are still to open, and the task opening
        # them (None: none is running).
        self._to_open: collections.deque[_Backend] = collections.deque()
        self._opener: asyncio.Task[None] | None = None
        observe(self._balancer, settings.meter_provider)
        if seams.observer is not None:
            seams.observer.on_attach(self)
        self.apply(self.first_addresses)
        if self.plan.needed:
            self._timer = Timer(self)

    def apply(self, addresses: Sequence[Address]) -> None:
        if self._balancer.closed:
            return
        change = self._balancer.set_addresses(addresses)
        if change.added:
            # Opened by a task, a batch per turn of the loop (the factory
            # returns at once); until a backend's channel reports, it counts
            # as connecting, so calls wait for it as during any start-up.
            self._to_open.extend(change.added)
            if self._opener is None:
                self._opener = self.loop.create_task(
                    self._open_queued(), name=f"grpc_leastconn opener {self.target}"
                )
        for backend in change.to_close:
            self._close_channel(backend)
        self._notify()

    async def _open_queued(self) -> None:
        """The opener task: open the queued backends' channels, then end."""
        try:
            while self._to_open and not self._balancer.closed:
                for _ in range(min(_OPEN_BATCH, len(self._to_open))):
                    backend = self._to_open.popleft()
                    if not backend.removed:
                        self._open(backend)
                # Calls, and the reports of the channels just opened, go on meanwhile.
                await asyncio.sleep(0)
        finally:
            self._opener = None

    def _open(self, backend: _Backend) -> None:
        backend.channel = BackendChannel(
            self._spec(backend),
            name=backend.key,
            interceptors=self._interceptors,
            watches=self._watches(backend),
            on_connectivity=Report(self.on_connectivity, backend),
        )

    def _close_channel(self, backend: _Backend) -> None:
        if backend.channel is None:
            return
        task = self.loop.create_task(self._retire(backend))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _retire(self, backend: _Backend, grace: float | None = None) -> None:
        """Close a backend's channel, then let go of the calls it carried.

        Calls the application still holds would keep the connection open
        (see FinishedCall); closing the channel has ended them all.
        """
        channel = backend.channel
        assert channel is not None
        await channel.close(grace)
        rpc: Rpc
        for rpc in channel.remembered():
            await rpc.settle(backend)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- hot path -------------------------------------------------------------

    def pick(
        self, wait_for_ready: bool | None, deadline: float | None, cost: int = UNIT
    ) -> _Backend | None:
        """A backend for one RPC of ``cost`` (counted), None to wait, or raise how it ends."""
        backend = self._balancer.pick(cost) or self._balancer.pick_fresh(cost)
        if backend is None:
            if self._balancer.closed:
                raise Closed
            remaining = None if deadline is None else deadline - self.loop.time()
            failure = no_backend(self._balancer, wait_for_ready, remaining)
            if failure is not None:
                code, details = failure
                raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)
        return backend

    async def acquire(
        self, wait_for_ready: bool | None, deadline: float | None, cost: int
    ) -> _Backend:
        """Wait until ``pick`` gives a backend or says how the RPC ends."""
        while True:
            changed = self._changed
            backend = self.pick(wait_for_ready, deadline, cost)
            if backend is not None:
                return backend
            # Woken by events; time alone can also make a backend eligible
            # (an ejection ends), so look again when that is due.
            due = self._balancer.seconds_until_due()
            wake = deadline if due is None else self.loop.time() + due
            if wake is not None and deadline is not None:
                wake = min(wake, deadline)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(wake):
                    await changed.wait()

    def pick_excluding(self, failed: Iterable[_Backend], cost: int) -> _Backend | None:
        return self._balancer.pick_excluding(failed, cost)

    def release(
        self,
        backend: _Backend,
        code: grpc.StatusCode | None = None,
        cost: int = UNIT,
        error: str | None = None,
        trailers: Any = None,
    ) -> None:
        """An RPC on ``backend`` ended with ``code`` (None: it never reached the backend)."""
        if self._balancer.release(backend, code, cost, error, trailers):
            self._close_channel(backend)

    def release_call(self, backend: _Backend, call: Any, cost: int = UNIT) -> None:
        """A call's done callback: release with the call's status."""
        code, error = self._outcome_of(backend, call)
        trailers = settled(call.trailing_metadata) if self.reads_load else None
        self.release(backend, code, cost, error, trailers)

    def _outcome_of(self, backend: _Backend, call: Any) -> Outcome:
        code = settled(call.code)
        if code is None:
            return None, None
        return outcome(code, lambda: settled(call.details), backend)

    def judge(self, backend: _Backend, error: grpc.aio.AioRpcError | None) -> None:
        """How an awaited call released before its status was read ended: its response
        (``error`` None) or its error, as its awaiter saw it."""
        if error is None:
            self._balancer.succeeded(backend)
        else:
            self._balancer.judge(backend, *outcome(error.code(), error.details, backend))

    def judge_call(self, backend: _Backend, call: Any) -> None:
        """As judge(), from the call's own status (its awaiter gave up before seeing it)."""
        self._balancer.judge(backend, *self._outcome_of(backend, call))

    # -- events ---------------------------------------------------------------

    def on_connectivity(self, backend: _Backend, state: grpc.ChannelConnectivity) -> None:
        """A backend channel's new connectivity state."""
        if not self._balancer.set_connectivity(backend, state):
            return
        self._notify()
        if self.plan.connectivity_changed(state) and self._timer is not None:
            self._timer.wake()

    def on_health(self, backend: _Backend, health: Health) -> None:
        """A backend's new health, from its Watch."""
        if self._balancer.set_health(backend, health):
            self._notify()

    # -- maintenance (the timer task) -------------------------------------------

    def maintain(self) -> Step[BackendChannel]:
        """Carry out what the maintenance plan says is due now."""
        if self._balancer.closed:
            return Step()
        step = self.plan.step(self._balancer)
        for backend in step.expired:
            self._close_channel(backend)
        return step

    def resolved(self, resolution: Resolution | None) -> None:
        """Apply a re-resolution's answer; a failure (None) keeps the last good set."""
        if resolution is not None:
            self.apply(resolution.addresses)
        self.plan.finished(resolution)

    # -- the channel's own API --------------------------------------------------

    def state(self, try_to_connect: bool) -> grpc.ChannelConnectivity:
        if try_to_connect:
            for backend in self._balancer.backends:
                if backend.channel is not None:
                    backend.channel.connect()
        return self._balancer.aggregate_state()

    async def wait_for_state_change(self, last_observed: grpc.ChannelConnectivity) -> None:
        while True:
            changed = self._changed
            state = self._balancer.aggregate_state()
            if state is not last_observed:
                return
            if state is _SHUTDOWN:
                raise grpc.aio.UsageError(CLOSED_DETAILS)
            await changed.wait()

    async def close(self, grace: float | None) -> None:
        if self._balancer.closed:
            return
        backends = self._balancer.close()
        self._to_open.clear()
        opener = () if self._opener is None else (self._opener,)
        self._notify()
        if self._timer is not None:
            self._timer.stop()
        channels = [self._retire(b, grace) for b in backends if b.channel is not None]
        # The opener opens nothing more once closed; it ends at its next turn.
        await asyncio.gather(*channels, *self._closing, *opener)

    def __del__(self) -> None:
        # Dropped without close(): close the backend channels on the loop, or
        # their watcher tasks would keep them open for as long as it runs.
        with contextlib.suppress(Exception):
            if not self._balancer.closed:
                channels = [b.channel for b in self._balancer.close() if b.channel is not None]
                self.loop.call_soon_threadsafe(_close_orphans, self.loop, channels, self._timer)


# Closing tasks of channels dropped unclosed; the loop keeps only weak
# references to tasks.
_orphans: set[asyncio.Task[None]] = set()


def _close_orphans(
    loop: asyncio.AbstractEventLoop, channels: list[BackendChannel], timer: Timer | None
) -> None:
    if timer is not None:
        timer.stop()
    for channel in channels:
        task = loop.create_task(channel.close())
        _orphans.add(task)
        task.add_done_callback(_orphans.discard)
