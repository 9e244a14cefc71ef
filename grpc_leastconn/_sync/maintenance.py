"""The sync channel's timer thread: it follows the maintenance plan.

Re-resolution and drain timeouts are planned by ``_core.maintenance``; this
thread sleeps until the next step is due (or it is woken), has the core
carry the step out, and runs each resolution on a short-lived thread of its
own, so that a DNS server that does not answer cannot hold up drain
deadlines.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .core import Core


class Timer:
    """One daemon thread per channel, holding its core only weakly."""

    def __init__(self, core: Core) -> None:
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(
            target=self._run,
            args=(weakref.ref(core),),
            name=f"grpc_leastconn timer {core.target}",
            daemon=True,
        )
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    def _run(self, core_ref: weakref.ref[Core]) -> None:
        while not self._stopped:
            core = core_ref()
            if core is None:
                return
            step = core.maintain()
            if step.resolve:
                threading.Thread(target=self._resolve, args=(core,), daemon=True).start()
            del core
            self._wake.wait(step.wait)
            self._wake.clear()

    def _resolve(self, core: Core) -> None:
        try:
            core.resolve_now()
        finally:
            self._wake.set()
