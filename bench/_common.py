"""Shared by the benchmark scripts: import paths, machine description, output,
and the benchmark's own server subprocess."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def setup_paths() -> None:
    """Make grpc_leastconn and the example modules importable from a plain checkout.

    The generated conference modules import each other as top-level modules,
    so examples/ itself has to be on the path, not just the repository root.
    """
    for path in (ROOT, EXAMPLES):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


# -- the benchmark's server, run as a subprocess of the script ---------------------------


def serve_until_stopped() -> None:
    """Block a server subprocess until SIGTERM or SIGINT, or until EOF on its
    stdin: the benchmark is gone, however it died."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def watch_parent() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_parent, daemon=True).start()
    stop.wait()


class ServerProcess:
    """``script --serve ARGS...`` in a subprocess, ready once it has printed one
    JSON object (kept as ``ready``); stop() ends that process only, by its PID."""

    def __init__(self, script: str, args: Sequence[str] = (), timeout: float = 30.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(script), "--serve", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.read_line(timeout)
        if not line:
            self.stop()
            raise RuntimeError(f"the benchmark server did not start within {timeout:.0f} s")
        self.ready: dict[str, Any] = json.loads(line)

    def read_line(self, timeout: float) -> str:
        """The next line the server prints, "" if none came within ``timeout``."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline() if ready else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def parse_list(value: str, allowed: Sequence[str], what: str) -> list[str]:
    """An argparse type: a comma-separated, non-empty subset of ``allowed``."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(bad) or '(none)'}; choose from {', '.join(allowed)}"
        )
    return items


# -- the machine ---------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    import grpc

    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "ram_gib": _ram_gib(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "load_avg": load_average(),
    }


def print_machine(title: str) -> dict[str, Any]:
    info = machine()
    print(f"== {title}")
    print(
        f"   {info['nproc']} CPUs ({info['cpu']}), {info['ram_gib']} GiB RAM, "
        f"Python {info['python']}, grpcio {info['grpcio']}, load avg {info['load_avg']}"
    )
    return info


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in cells[1:]]
    return "\n".join(out)


def print_summary(summary: dict[str, Any]) -> None:
    """The last line of every benchmark: one JSON object, for scripts to parse."""
    print(json.dumps(summary, sort_keys=False), flush=True)


# -- the declared seams the benchmarks use ---------------------------------------


def seams() -> Any:
    """grpc_leastconn's declared seams and pure core, for the benchmarks that need them.

    One import, here: the benchmarks otherwise use the public API only.
    """
    setup_paths()
    import types

    from grpc_leastconn._aio.channel import open_channel as open_aio_channel
    from grpc_leastconn._aio.finished import FinishedCall
    from grpc_leastconn._core import balancer, picker, seams, target, weights
    from grpc_leastconn._sync.channel import open_channel

    class Attach(seams.Observer):
        """An observer that keeps the channel's core (to time or inspect it)."""

        core: Any = None

        def on_attach(self, core: Any) -> None:
            self.core = core

    def observed(open_: Any, target_: Any, **kwargs: Any) -> tuple[Any, Any]:
        attach = Attach()
        return open_(target_, seams=seams.Seams(observer=attach), **kwargs), attach.core

    def set_inner(multicallable: Any, core: Any, inner: Any) -> None:
        # Private reach, on purpose: the overhead benchmarks swap grpcio's
        # multicallable under ours for a stand-in, to time our layers alone.
        (backend,) = core.inspect(lambda b: b.backends)
        multicallable._inner[backend] = inner

    return types.SimpleNamespace(
        Address=target.Address,
        Balancer=balancer.Balancer,
        Seams=seams.Seams,
        open_channel=open_channel,
        FinishedCall=FinishedCall,
        TIE_BREAKS=picker.TIE_BREAKS,
        steps_for=weights.steps_for,
        observed_channel=lambda t, **kw: observed(open_channel, t, **kw),
        observed_aio_channel=lambda t, **kw: observed(open_aio_channel, t, **kw),
        set_inner=set_inner,
    )
