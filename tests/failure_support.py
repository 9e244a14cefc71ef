"""Closed-loop load over real backends, with each call's backend and outcome.

Shared by the sync and asyncio failure tests: which backend served or
failed each call (the example server names itself by its address, and its
injected failures say so in their details), and shares per backend.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import conference_pb2 as pb
import grpc

RPC_TIMEOUT = 10.0


@dataclass
class Tally:
    """Calls per backend: served and failed; errors the callers saw."""

    served: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    codes: Counter[grpc.StatusCode] = field(default_factory=Counter)
    details: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record_reply(self, backend: str) -> None:
        with self.lock:
            self.served[backend] += 1

    def record_error(self, error: grpc.RpcError) -> None:
        code, details = error.code(), error.details() or ""
        with self.lock:
            self.codes[code] += 1
            self.details.append(details)
            self.failed[details.split(": injected", 1)[0]] += 1

    @property
    def total(self) -> int:
        return sum(self.served.values()) + sum(self.failed.values())

    def calls_to(self, backend: str) -> int:
        return self.served[backend] + self.failed[backend]

    def share(self, backend: str) -> float:
        return self.calls_to(backend) / max(1, self.total)

    def failed_share(self) -> float:
        return sum(self.failed.values()) / max(1, self.total)


def ping_once(stub: object, tally: Tally, delay_ms: int) -> None:
    try:
        reply = stub.Ping(pb.PingRequest(delay_ms=delay_ms), timeout=RPC_TIMEOUT)  # type: ignore[attr-defined]
    except grpc.RpcError as error:
        tally.record_error(error)
    else:
        tally.record_reply(reply.backend)


def closed_loop(
    stub: object,
    *,
    threads: int,
    calls: int,
    delay_ms: int = 5,
    until: Callable[[], bool] | None = None,
    timeout: float = 60.0,
) -> Tally:
    """``threads`` callers share ``calls`` Pings, or stop once ``until()`` (bounded)."""
    tally = Tally()
    left = [calls]
    lock = threading.Lock()
    deadline = time.monotonic() + timeout

    def caller() -> None:
        while time.monotonic() < deadline:
            with lock:
                if left[0] <= 0 or (until is not None and until()):
                    return
                left[0] -= 1
            ping_once(stub, tally, delay_ms)

    workers = [threading.Thread(target=caller, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout + 5)
    assert not any(worker.is_alive() for worker in workers), "callers still running"
    return tally


async def closed_loop_aio(
    stub: object,
    *,
    in_flight: int,
    calls: int,
    delay_ms: int = 5,
    until: Callable[[], bool] | None = None,
    timeout: float = 60.0,
) -> Tally:
    """``closed_loop`` for a grpc.aio stub: ``in_flight`` coroutines share ``calls`` Pings."""
    tally = Tally()
    left = [calls]

    async def caller() -> None:
        while left[0] > 0 and not (until is not None and until()):
            left[0] -= 1
            try:
                reply = await stub.Ping(  # type: ignore[attr-defined]
                    pb.PingRequest(delay_ms=delay_ms), timeout=RPC_TIMEOUT
                )
            except grpc.aio.AioRpcError as error:
                tally.record_error(error)
            else:
                tally.record_reply(reply.backend)

    async with asyncio.timeout(timeout):
        await asyncio.gather(*(caller() for _ in range(in_flight)))
    return tally
