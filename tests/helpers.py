"""Small utilities shared by the test modules."""

from __future__ import annotations

import inspect
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc
from seams import Observer, Seams, open_aio_channel, open_channel

import grpc_leastconn

if TYPE_CHECKING:
    import conference_pb2 as pb
    from server import Backend

ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")


class BackendFactory(Protocol):
    """Type of the ``backends`` fixture."""

    def __call__(self, n: int = 1, **kwargs: Any) -> list[Backend]: ...


class ChannelFactory(Protocol):
    """Type of the ``insecure_channel`` fixture."""

    def __call__(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel: ...


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 5.0,
    interval: float = 0.01,
    message: str | None = None,
) -> T:
    """Poll ``predicate`` until it returns a truthy value and return that value.

    For conditions nothing can notify us about (client-side state, other
    processes); prefer ``ConferenceServicer.wait_until`` for server counters.
    Raises AssertionError after ``timeout`` seconds, naming the condition and
    its last value. Exceptions from ``predicate`` propagate immediately.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))
    detail = f": {message}" if message else ""
    raise AssertionError(
        f"condition not met within {timeout:g}s{detail}\n"
        f"  condition: {_describe(predicate)}\n"
        f"  last value: {value!r}"
    )


def _describe(predicate: Callable[..., object]) -> str:
    try:
        source = inspect.getsource(predicate).strip()
    except (OSError, TypeError):
        return repr(predicate)
    # Long multi-line definitions are summarised by their first line.
    first_line = source.splitlines()[0]
    return first_line if len(first_line) <= 200 else first_line[:197] + "..."


@dataclass
class StreamReader:
    """Reads one Join stream to its end on a thread."""

    call: grpc.Call
    frames: list[pb.Frame] = field(default_factory=list)
    error: grpc.RpcError | None = None
    ended: float | None = None
    thread: threading.Thread | None = None

    def _run(self) -> None:
        try:
            for frame in self.call:
                self.frames.append(frame)
        except grpc.RpcError as error:
            self.error = error
        self.ended = time.monotonic()

    def start(self) -> StreamReader:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def join(self, timeout: float) -> None:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "stream did not end"

    @property
    def backend(self) -> str:
        wait_until(lambda: self.frames or self.ended, timeout=5.0)
        return self.frames[0].backend if self.frames else ""


# -- the declared seams: an observer of every pick and release ------------------


class Ledger(Observer):
    """Every pick and release a channel's balancer makes, per backend.

    Attached through ``Seams(observer=...)`` at construction, so it sees every
    path (first picks, re-picks, waits for a backend). A release without its
    pick would raise inside grpcio's callback thread, where the exception is
    only logged; recording it here lets the test fail on it. ``core`` is the
    front end's core, for tests that inject events (``on_connectivity``) or
    check the balancer's invariants (``inspect``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.picked: Counter[str] = Counter()
        self.released: Counter[str] = Counter()
        self.errors: list[str] = []
        # Every connectivity state the balancer took, per backend, in order.
        self.connectivity: dict[str, list[grpc.ChannelConnectivity]] = {}
        self.core: Any = None

    def on_attach(self, core: Any) -> None:
        self.core = core

    def on_pick(self, backend: Any) -> None:
        with self._lock:
            self.picked[backend.key] += 1

    def on_release(self, backend: Any) -> None:
        with self._lock:
            self.released[backend.key] += 1
            if self.released[backend.key] > self.picked[backend.key]:
                self.errors.append(f"{backend.key}: released more often than picked")

    def on_connectivity(self, backend: Any, state: grpc.ChannelConnectivity) -> None:
        with self._lock:
            self.connectivity.setdefault(backend.key, []).append(state)

    def check(self) -> None:
        with self._lock:
            assert not self.errors, self.errors
            assert self.picked == self.released, (self.picked, self.released)

    def check_invariants(self) -> None:
        """The balancer's own consistency check, run where the balancer is guarded."""
        self.core.inspect(lambda balancer: balancer.check_invariants())

    def backend(self, address: str) -> Any:
        """The balancer's record of ``address`` (for event injection)."""
        return self.core.inspect(lambda balancer: balancer.backend(address))


def observed_channel(
    target: Any, ledger: Ledger | None = None, **kwargs: Any
) -> tuple[grpc_leastconn.LeastConnChannel, Ledger]:
    """A sync channel built with a Ledger observing its balancer."""
    ledger = Ledger() if ledger is None else ledger
    return open_channel(target, seams=Seams(observer=ledger), **kwargs), ledger


def observed_aio_channel(
    target: Any, ledger: Ledger | None = None, **kwargs: Any
) -> tuple[grpc_leastconn.aio.LeastConnChannel, Ledger]:
    """An asyncio channel built with a Ledger observing its balancer (inside a coroutine)."""
    ledger = Ledger() if ledger is None else ledger
    return open_aio_channel(target, seams=Seams(observer=ledger), **kwargs), ledger


def all_eligible(channel: Any) -> bool:
    """Every backend of the current address set takes calls (draining ones aside)."""
    states = [state for state in channel.backends() if not state.draining]
    return bool(states) and all(state.eligible for state in states)


def state_of(channel: Any, address: str) -> grpc_leastconn.BackendState:
    """The current (not draining) backend state of ``address``."""
    (state,) = [s for s in channel.backends() if s.address == address and not s.draining]
    return state
