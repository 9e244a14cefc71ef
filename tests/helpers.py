"""Small utilities shared by the test modules."""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc

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
