"""Small utilities shared by the test modules."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc

if TYPE_CHECKING:
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
