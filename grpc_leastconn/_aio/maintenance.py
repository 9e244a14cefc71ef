"""The asyncio channel's timer task: it follows the maintenance plan.

Re-resolution and drain timeouts are planned by ``_core.maintenance``; this
task sleeps until the next step is due (or it is woken) and has the core
carry the step out. A resolution runs in a task of its own, the resolver
itself in a thread: a slow or dead DNS server must not hold up drain
timeouts, which this task keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import TYPE_CHECKING

from .._core.maintenance import resolve_again
from .._core.seams import ResolverLike

if TYPE_CHECKING:
    from .core import Core


class Timer:
    """One task per channel, holding its core only weakly."""

    def __init__(self, core: Core) -> None:
        self._core_ref = weakref.ref(core)
        self._wake = asyncio.Event()
        self._stopped = False
        self._resolving: asyncio.Task[None] | None = None
        self._task = core.loop.create_task(self._run(), name=f"grpc_leastconn timer {core.target}")

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        # Woken rather than cancelled, so that the task ends cleanly (see
        # BackendChannel.close); an answer still on its way is dropped.
        self._stopped = True
        self._wake.set()

    async def _run(self) -> None:
        while not self._stopped:
            core = self._core_ref()
            if core is None:
                return
            step = core.maintain()
            if step.resolve:
                self._resolving = core.loop.create_task(self._resolve(core.resolver, core.target))
            del core
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(step.wait):
                    await self._wake.wait()
            self._wake.clear()

    async def _resolve(self, resolver: ResolverLike, target: str) -> None:
        try:
            # The resolver blocks (getaddrinfo, DNS queries): off the loop.
            resolution = await asyncio.to_thread(resolve_again, resolver, target)
            core = self._core_ref()
            if core is not None and not self._stopped:
                core.resolved(resolution)
        finally:
            self._resolving = None
            self._wake.set()
