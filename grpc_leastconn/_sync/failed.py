"""An RPC that failed before any backend channel was involved, as a grpc call object."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any, NoReturn

import grpc


class FailedCall(grpc.RpcError, grpc.Call, grpc.Future):  # type: ignore[type-arg]
    """An RPC that failed before it started (no eligible backend, deadline).

    It behaves like grpcio's own failed call objects: raised by blocking
    calls, returned by ``future()`` and streaming calls, where ``result()``
    and iteration raise it. Users' ``except grpc.RpcError`` and ``e.code()``
    work unchanged.
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def __repr__(self) -> str:
        return f"<FailedCall code={self._code.name} details={self._details!r}>"

    __str__ = __repr__

    # grpc.Call
    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> tuple[()]:
        return ()

    def trailing_metadata(self) -> tuple[()]:
        return ()

    def debug_error_string(self) -> str:
        return self._details

    # grpc.RpcContext
    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:  # type: ignore[override]
        return None

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False

    # grpc.Future
    def cancel(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> NoReturn:
        raise self

    def exception(self, timeout: float | None = None) -> FailedCall:
        return self

    def traceback(self, timeout: float | None = None) -> types.TracebackType | None:
        try:
            raise self
        except FailedCall:
            return sys.exc_info()[2]

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        fn(self)

    # response iterator
    def __iter__(self) -> FailedCall:
        return self

    def __next__(self) -> NoReturn:
        raise self
