"""How grpc_leastconn scales with the number of backends: threads, memory, start-up, close, calls/s.

One server subprocess (this script with ``--serve``) runs ONE grpc.server
listening on N loopback ports (127.0.0.1:0 each); every port is one backend.
It serves grpc.health.v1 (SERVING; grpc_leastconn watches it by default) and
the example ``conference.Conference`` servicer of examples/server.py, whose
``Ping`` answers at once. It prints its ports as one JSON line and runs until
its stdin closes.

For N = 4 (the baseline) and every N of --sizes (default 10,100,1000), each
client kind is measured in a fresh client subprocess of its own (this script
with ``--client KIND``), so the RSS and thread counts of one measurement are
not polluted by an earlier one:

  sync         grpc_leastconn.insecure_channel("ipv4:p1,p2,...")
  sync_grpc_health
               the same with health_checker="grpc": C-core checks health inside each
               backend channel, no Watch stream of ours
  aio          grpc_leastconn.aio.insecure_channel, on the subprocess's own event loop
  aio_grpc_health
               the same with health_checker="grpc"
  round_robin  grpc.insecure_channel with round_robin and health checking, the
               grpcio reference (its ``ipv4:`` target is also its :authority, so at
               large N every call can exceed the metadata limit: reported "n/a")

In each client, after a throw-away grpcio channel (grpc.aio's for aio) has made
one call; it stays open and idle to the end, so that the process-wide threads
C-core (and grpc.aio) start with their first channel, and stop with their last,
are part of the baseline:

  before     threads (threading.active_count(); the OS count, /proc/self/status
             Threads:), asyncio tasks (aio) and RSS (VmRSS), just before the factory;
  first      time from the factory call to the first successful Ping (timeout 10 s;
             the call may wait for a backend) and how long the factory itself took;
  eligible   time until every backend is eligible: channel.backends() polled
             (bounded at 60 s); for round_robin every subchannel READY by channelz;
             then threads, tasks and RSS again (after gc.collect()), the increase
             per backend, and the Python threads grouped by name;
  calls/s    Ping in a closed loop, 8 threads (sync, round_robin) or 16 in flight
             (aio), counted for --window seconds after a short warm-up, and the ratio
             to the same kind at N=4;
  close      channel.close() (await channel.close() for aio), then a bounded wait
             (5 s, gc.collect() at every look) for Python threads, tasks and OS
             threads to return to the baseline: what is left after it is reported.
             C-core's own thread pool (threads named "event_engine") is left out
             and shown apart: it grows under load and shrinks on its own schedule,
             whatever the channel does.

Targets: sync adds at most 4 threads for any N (or, failing that, at most 1 per
backend); at most 100 KiB of RSS per backend for sync and aio (at the largest N);
first call under 1 s at N=1000 (sync and aio); close under 2 s at N=1000 with
nothing left behind (sync and aio). Threads added are judged by the OS count,
which includes the threads C-core starts for the channel. Each target is judged
for both health checkers (the kinds sync, sync_grpc_health, aio, aio_grpc_health).

Run:  python bench/scale.py [--sizes 10,100,1000] [--window 2.0] [--quick]
A default run takes about 3-4 minutes (5 kinds x 4 sizes); --quick (sizes 10,100,
0.5 s windows) well under a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from _common import ServerProcess as BenchServer
from _common import (
    load_average,
    print_machine,
    print_summary,
    serve_until_stopped,
    setup_paths,
    table,
)

setup_paths()
# C-core logs the server's GOAWAY at INFO when a client ends; keep the output readable.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import conference_pb2  # noqa: E402
import conference_pb2_grpc  # noqa: E402
import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_health.v1.health import HealthServicer  # noqa: E402

import grpc_leastconn  # noqa: E402
import grpc_leastconn.aio  # noqa: E402

KINDS = ("sync", "sync_grpc_health", "aio", "aio_grpc_health", "round_robin")
SYNC_KINDS = ("sync", "sync_grpc_health")
AIO_KINDS = ("aio", "aio_grpc_health")
# health_checker of each grpc_leastconn kind.
HEALTH_CHECKER = {
    "sync": "watch",
    "sync_grpc_health": "grpc",
    "aio": "watch",
    "aio_grpc_health": "grpc",
}
BASE_N = 4
DEFAULT_SIZES = "10,100,1000"
QUICK_SIZES = "10,100"
THREADS = 8
IN_FLIGHT = 16
ROUND_ROBIN_CONFIG = json.dumps(
    {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}}
)
# Without health checking a call that cannot be sent fails, and says why, instead of
# waiting for a subchannel whose health check fails without telling.
DIAGNOSIS_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

# Targets.
TARGET_SYNC_THREADS_TOTAL = 4
TARGET_SYNC_THREADS_PER_BACKEND = 1.0
TARGET_KIB_PER_BACKEND = 100.0
TARGET_FIRST_CALL_S = 1.0
TARGET_CLOSE_S = 2.0
TARGET_AT_N = 1000

# Bounds on every wait.
CALL_TIMEOUT_S = 10.0
FIRST_CALL_TIMEOUT_S = 10.0
DIAGNOSIS_TIMEOUT_S = 5.0
ELIGIBLE_TIMEOUT_S = 60.0
ELIGIBLE_POLL_S = 0.05
CHANNELZ_POLL_S = 0.2
SETTLE_TIMEOUT_S = 5.0
SETTLE_POLL_S = 0.05
SERVER_START_TIMEOUT_S = 60.0
# A client subprocess ends itself (SIGALRM) after this, plus its load windows.
CLIENT_BOUND_S = (
    FIRST_CALL_TIMEOUT_S
    + DIAGNOSIS_TIMEOUT_S
    + ELIGIBLE_TIMEOUT_S
    + 2 * CALL_TIMEOUT_S
    + SETTLE_TIMEOUT_S
    + 30
)


# -- the backends (run in a subprocess: python bench/scale.py --serve --count N) ---------


def serve(count: int) -> int:
    from server import ConferenceServicer, add_servicer_to_server

    # Every Watch stream (one per backend and client, round_robin's included) holds a
    # worker thread for as long as it is open; a client that has just ended may still
    # hold some while the next one opens its own.
    workers = 2 * count + 2 * IN_FLIGHT + 32
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scale"),
        options=[("grpc.so_reuseport", 0)],
    )
    ports = []
    for _ in range(count):
        port = server.add_insecure_port("127.0.0.1:0")
        if port == 0:
            raise RuntimeError("cannot listen on 127.0.0.1")
        ports.append(port)
    add_servicer_to_server(ConferenceServicer("scale"), server, observe_authority=False)
    health = HealthServicer()
    health.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.start()
    print(json.dumps({"ports": ports}), flush=True)
    serve_until_stopped()
    server.stop(None).wait(5)
    return 0


class ServerProcess(BenchServer):
    """The backends' process, listening on ``ports``."""

    def __init__(self, count: int) -> None:
        super().__init__(__file__, ["--count", str(count)], timeout=SERVER_START_TIMEOUT_S)
        self.ports: list[int] = self.ready["ports"]
        if len(self.ports) != count:
            self.stop()
            raise RuntimeError(f"the benchmark server reported {self.ready}")


# -- what a client process measures of itself ------------------------------------------


def proc_status() -> tuple[int, int]:
    """(OS threads, RSS in KiB) of this process."""
    threads = rss = 0
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return threads, rss


def os_thread_names() -> list[str]:
    """Every OS thread's name (comm): C-core names its own, Python's are all "python"."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm", encoding="utf-8") as f:
                names.append(f.read().strip())
        except OSError:
            pass  # ended meanwhile
    return names


# C-core's own thread pool: it grows under load and shrinks on its own schedule, whatever
# the channels do, so it is reported apart from what a channel leaves behind.
CCORE_POOL = "event_engine"


def os_threads_own() -> tuple[int, int]:
    """(OS threads outside C-core's pool, threads in it)."""
    names = os_thread_names()
    pool = sum(name == CCORE_POOL for name in names)
    return len(names) - pool, pool


_ADDRESS = re.compile(r"\d+\.\d+\.\d+\.\d+:\d+")
_TARGET = re.compile(r"ipv4:\S+")
_NUMBER = re.compile(r"\d+")


def name_prefix(name: str) -> str:
    """A thread's name without what differs between backends: addresses, targets, numbers."""
    name = _TARGET.sub("<target>", name)
    name = _ADDRESS.sub("<addr>", name)
    return _NUMBER.sub("N", name)


def grouped(names: list[str]) -> dict[str, int]:
    counts = collections.Counter(name_prefix(name) for name in names)
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def snapshot(tasks: int | None) -> dict[str, Any]:
    gc.collect()
    os_threads, rss = proc_status()
    return {
        "py_threads": threading.active_count(),
        "os_threads": os_threads,
        "tasks": tasks,
        "rss_kib": rss,
    }


def runs(frame: Any) -> str:
    """The outermost function a thread runs (below threading's own frames), "file:function"."""
    chain = []
    while frame is not None:
        chain.append(frame)
        frame = frame.f_back
    for outer in reversed(chain):
        filename = os.path.basename(outer.f_code.co_filename)
        if filename != "threading.py":
            return f"{filename}:{outer.f_code.co_name}"
    return "(no Python frame)"


def composition() -> dict[str, Any]:
    """Python threads grouped by name prefix and what they run; OS threads by name."""
    frames = sys._current_frames()
    python = collections.Counter(
        (name_prefix(t.name), runs(frames.get(t.ident or 0))) for t in threading.enumerate()
    )
    return {
        "py": [
            [name, what, count]
            for (name, what), count in sorted(python.items(), key=lambda i: (-i[1], i[0]))
        ],
        "os": grouped(os_thread_names()),
    }


class Baseline:
    """What the process had before the channel, to tell what the channel left behind."""

    def __init__(self, tasks: int | None, task_set: set[Any] | None = None) -> None:
        self.state = snapshot(tasks)
        self.own, self.pool = os_threads_own()
        self.idents = {t.ident for t in threading.enumerate()}
        self.os_names = collections.Counter(name_prefix(n) for n in os_thread_names())
        self.task_set = task_set or set()

    def settled(self, tasks: int | None) -> bool:
        # Collectable cycles (grpc.aio's channels are in some) are not left behind.
        gc.collect()
        own, _ = os_threads_own()
        before = self.state
        return (
            threading.active_count() <= before["py_threads"]
            and own <= self.own
            and (tasks is None or tasks <= before["tasks"])
        )

    def leftovers(self, waited: float, settled: bool, tasks: Any = None) -> dict[str, Any]:
        now = snapshot(None if tasks is None else len(tasks))
        extra_os = collections.Counter(name_prefix(n) for n in os_thread_names()) - self.os_names
        own, pool = os_threads_own()
        out = {
            "settle_s": round(waited, 3),
            "settled": settled,
            **now,
            "py_threads_left": now["py_threads"] - self.state["py_threads"],
            "os_threads_left": now["os_threads"] - self.state["os_threads"],
            # What the channel left: OS threads outside C-core's pool.
            "own_os_threads_left": own - self.own,
            "pool_before": self.pool,
            "pool_after": pool,
            "py_left": grouped(
                [t.name for t in threading.enumerate() if t.ident not in self.idents]
            ),
            "os_left": dict(extra_os),
        }
        if tasks is not None:
            out["tasks_left"] = len(tasks) - self.state["tasks"]
            out["tasks_left_names"] = grouped(
                [t.get_name() for t in tasks if t not in self.task_set]
            )
        return out


def channelz_ready(target: str) -> int | None:
    """READY subchannels of grpcio's channel for ``target`` (channelz); None: not visible."""
    try:
        from grpc._cython import cygrpc  # private, but the only in-process view of subchannels
    except ImportError:
        return None
    start = 0
    for _ in range(1000):  # pages of top channels; bounded
        page = json.loads(cygrpc.channelz_get_top_channels(start))
        channels = page.get("channel", [])
        for channel in channels:
            if channel.get("data", {}).get("target") == target:
                ready = 0
                for ref in channel.get("subchannelRef", []):
                    sub = json.loads(cygrpc.channelz_get_subchannel(int(ref["subchannelId"])))
                    state = sub.get("subchannel", {}).get("data", {}).get("state", {})
                    ready += state.get("state") == "READY"
                return ready
            start = max(start, int(channel["ref"]["channelId"]) + 1)
        if page.get("end", False) or not channels:
            return None
    return None


def rpc_error(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    name = code.name if code is not None else type(exc).__name__
    return f"{name}: {details}"


def short(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- the sync clients: sync (grpc_leastconn) and round_robin (grpcio) --------------------


def make_sync_channel(kind: str, target: str) -> Any:
    if kind in SYNC_KINDS:
        return grpc_leastconn.insecure_channel(target, health_checker=HEALTH_CHECKER[kind])
    return grpc.insecure_channel(target, options=[("grpc.service_config", ROUND_ROBIN_CONFIG)])


def diagnose_round_robin(target: str, request: Any) -> str:
    """Why grpcio's round_robin could not call: the same target without health checking."""
    channel = grpc.insecure_channel(target, options=[("grpc.service_config", DIAGNOSIS_CONFIG)])
    try:
        stub = conference_pb2_grpc.ConferenceStub(channel)  # type: ignore[no-untyped-call]
        stub.Ping(request, timeout=DIAGNOSIS_TIMEOUT_S)
        return "a call without health checking succeeds: the health checks fail"
    except grpc.RpcError as exc:
        return rpc_error(exc)
    finally:
        channel.close()


def wait_eligible_sync(kind: str, channel: Any, target: str, n: int, t0: float) -> dict[str, Any]:
    deadline = time.monotonic() + ELIGIBLE_TIMEOUT_S
    while True:
        if kind in SYNC_KINDS:
            states = channel.backends()
            count: int | None = sum(s.eligible for s in states)
            done = len(states) == n and count == n
            poll = ELIGIBLE_POLL_S
        else:
            count = channelz_ready(target)
            done = count == n
            poll = CHANNELZ_POLL_S
        if done or count is None or time.monotonic() > deadline:
            elapsed = time.perf_counter() - t0
            return {"eligible_s": round(elapsed, 3) if done else None, "eligible_count": count}
        time.sleep(poll)


def sync_load(
    call: Callable[..., Any], request: Any, warmup: float, window: float
) -> dict[str, Any]:
    """THREADS threads calling in a closed loop; calls ending within the window count."""
    start = time.perf_counter()
    counted_from = start + warmup
    end = counted_from + window
    counts = [0] * THREADS
    errors: list[str] = []

    def work(i: int) -> None:
        n = 0
        try:
            while time.perf_counter() < end:
                call(request, timeout=CALL_TIMEOUT_S)
                if counted_from <= time.perf_counter() <= end:
                    n += 1
        except grpc.RpcError as exc:
            errors.append(rpc_error(exc))
        counts[i] = n

    threads = [
        threading.Thread(target=work, args=(i,), name=f"load-{i}", daemon=True)
        for i in range(THREADS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(warmup + window + CALL_TIMEOUT_S + 5)
    return {
        "calls_per_s": round(sum(counts) / window),
        "errors": len(errors),
        "error": short(errors[0]) if errors else None,
    }


def warm_up_sync(address: str, request: Any) -> grpc.Channel:
    """A grpcio channel that has made one call, to keep open (idle) through the measurement.

    C-core starts its process-wide threads (event engine, timer) with the first
    channel and stops them when the last one is gone: kept open, they are part
    of the baseline and not counted against the measured channel.
    """
    channel = grpc.insecure_channel(address)
    try:
        stub = conference_pb2_grpc.ConferenceStub(channel)  # type: ignore[no-untyped-call]
        stub.Ping(request, timeout=CALL_TIMEOUT_S, wait_for_ready=True)
    except BaseException:
        channel.close()
        raise
    return channel


def client_sync(kind: str, addresses: list[str], args: Any) -> dict[str, Any]:
    request = conference_pb2.PingRequest(payload="x")
    n = len(addresses)
    target = "ipv4:" + ",".join(addresses)
    warm = warm_up_sync(addresses[0], request)
    try:
        return measure_sync(kind, target, n, request, args)
    finally:
        warm.close()


def measure_sync(kind: str, target: str, n: int, request: Any, args: Any) -> dict[str, Any]:
    time.sleep(0.2)
    baseline = Baseline(None)
    out: dict[str, Any] = {"kind": kind, "n": n, "before": baseline.state}
    t0 = time.perf_counter()
    channel = make_sync_channel(kind, target)
    out["factory_s"] = round(time.perf_counter() - t0, 4)
    try:
        stub = conference_pb2_grpc.ConferenceStub(channel)  # type: ignore[no-untyped-call]
        try:
            stub.Ping(request, timeout=FIRST_CALL_TIMEOUT_S)
            out["first_call_s"] = round(time.perf_counter() - t0, 4)
        except grpc.RpcError as exc:
            out["first_call_error"] = short(rpc_error(exc))
            if kind == "round_robin":
                out["reason"] = short(diagnose_round_robin(target, request))
        if "first_call_error" not in out:
            out |= wait_eligible_sync(kind, channel, target, n, t0)
            out["at_eligible"] = snapshot(None)
            out["composition"] = composition()
            out["throughput"] = sync_load(stub.Ping, request, args.warmup, args.window)
    finally:
        out["pool_at_close"] = os_threads_own()[1]
        t = time.perf_counter()
        channel.close()
        out["close_s"] = round(time.perf_counter() - t, 4)
    del stub, channel
    t = time.monotonic()
    while not (settled := baseline.settled(None)) and time.monotonic() - t < SETTLE_TIMEOUT_S:
        time.sleep(SETTLE_POLL_S)
    out["after_close"] = baseline.leftovers(time.monotonic() - t, settled)
    return out


# -- the asyncio client: aio (grpc_leastconn.aio) ----------------------------------------


async def aio_load(
    call: Callable[..., Awaitable[Any]], request: Any, warmup: float, window: float
) -> dict[str, Any]:
    """IN_FLIGHT coroutines calling in a closed loop; calls ending within the window count."""
    start = time.perf_counter()
    counted_from = start + warmup
    end = counted_from + window
    errors: list[str] = []

    async def caller() -> int:
        n = 0
        try:
            while time.perf_counter() < end:
                await call(request, timeout=CALL_TIMEOUT_S)
                if counted_from <= time.perf_counter() <= end:
                    n += 1
        except grpc.RpcError as exc:
            errors.append(rpc_error(exc))
        return n

    counts = await asyncio.wait_for(
        asyncio.gather(*(caller() for _ in range(IN_FLIGHT))), warmup + window + CALL_TIMEOUT_S + 5
    )
    return {
        "calls_per_s": round(sum(counts) / window),
        "errors": len(errors),
        "error": short(errors[0]) if errors else None,
    }


async def client_aio(kind: str, addresses: list[str], args: Any) -> dict[str, Any]:
    request = conference_pb2.PingRequest(payload="x")
    n = len(addresses)
    target = "ipv4:" + ",".join(addresses)
    # A channel that has made one call, kept open (idle) through the measurement:
    # grpc.aio's and C-core's process-wide threads are then part of the baseline.
    async with grpc.aio.insecure_channel(addresses[0]) as warm:
        stub = conference_pb2_grpc.ConferenceStub(warm)  # type: ignore[no-untyped-call]
        await stub.Ping(request, timeout=CALL_TIMEOUT_S, wait_for_ready=True)
        return await measure_aio(kind, target, n, request, args)


async def measure_aio(kind: str, target: str, n: int, request: Any, args: Any) -> dict[str, Any]:
    await asyncio.sleep(0.2)
    tasks = asyncio.all_tasks()
    baseline = Baseline(len(tasks), tasks)
    del tasks
    out: dict[str, Any] = {"kind": kind, "n": n, "before": baseline.state}
    t0 = time.perf_counter()
    channel = grpc_leastconn.aio.insecure_channel(target, health_checker=HEALTH_CHECKER[kind])
    out["factory_s"] = round(time.perf_counter() - t0, 4)
    try:
        stub = conference_pb2_grpc.ConferenceStub(channel)  # type: ignore[no-untyped-call]
        try:
            await stub.Ping(request, timeout=FIRST_CALL_TIMEOUT_S)
            out["first_call_s"] = round(time.perf_counter() - t0, 4)
        except grpc.RpcError as exc:
            out["first_call_error"] = short(rpc_error(exc))
        if "first_call_error" not in out:
            deadline = time.monotonic() + ELIGIBLE_TIMEOUT_S
            while True:
                states = channel.backends()
                count = sum(s.eligible for s in states)
                done = len(states) == n and count == n
                if done or time.monotonic() > deadline:
                    break
                await asyncio.sleep(ELIGIBLE_POLL_S)
            out["eligible_s"] = round(time.perf_counter() - t0, 3) if done else None
            out["eligible_count"] = count
            out["at_eligible"] = snapshot(len(asyncio.all_tasks()))
            out["composition"] = composition()
            out["composition"]["tasks"] = grouped([t.get_name() for t in asyncio.all_tasks()])
            out["throughput"] = await aio_load(stub.Ping, request, args.warmup, args.window)
    finally:
        out["pool_at_close"] = os_threads_own()[1]
        t = time.perf_counter()
        await channel.close()
        out["close_s"] = round(time.perf_counter() - t, 4)
    del stub, channel
    t = time.monotonic()
    while True:
        settled = baseline.settled(len(asyncio.all_tasks()))
        if settled or time.monotonic() - t >= SETTLE_TIMEOUT_S:
            break
        await asyncio.sleep(SETTLE_POLL_S)
    out["after_close"] = baseline.leftovers(time.monotonic() - t, settled, asyncio.all_tasks())
    return out


def client_main(kind: str, ports: list[int], args: Any) -> int:
    # Whatever happens, this process ends itself: the default action of SIGALRM.
    signal.alarm(int(CLIENT_BOUND_S + args.warmup + args.window))
    addresses = [f"127.0.0.1:{port}" for port in ports]
    if kind in AIO_KINDS:
        result = asyncio.run(client_aio(kind, addresses, args))
    else:
        result = client_sync(kind, addresses, args)
    print(json.dumps(result), flush=True)
    return 0


# -- the driver ----------------------------------------------------------------------------


def run_client(kind: str, ports: list[int], args: Any) -> dict[str, Any]:
    """One measurement in a fresh client subprocess; it is killed (by its PID) if it hangs."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--client",
        kind,
        "--ports",
        ",".join(map(str, ports)),
        "--window",
        str(args.window),
        "--warmup",
        str(args.warmup),
    ]
    failure: dict[str, Any] = {"kind": kind, "n": len(ports)}
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=CLIENT_BOUND_S + args.warmup + args.window + 15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
        return failure | {"error": "the client subprocess did not finish in time"}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(err.strip().splitlines()[-3:])
        return failure | {"error": short(f"client exited {proc.returncode}: {tail}")}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def derive(result: dict[str, Any]) -> None:
    """Deltas and per-backend figures, in place."""
    n, before, at = result["n"], result["before"], result.get("at_eligible")
    if at is not None:
        result["py_threads_added"] = at["py_threads"] - before["py_threads"]
        result["os_threads_added"] = at["os_threads"] - before["os_threads"]
        result["os_threads_per_backend"] = round(result["os_threads_added"] / n, 3)
        result["rss_added_kib"] = at["rss_kib"] - before["rss_kib"]
        result["kib_per_backend"] = round(result["rss_added_kib"] / n, 1)
        if at["tasks"] is not None:
            result["tasks_added"] = at["tasks"] - before["tasks"]


def fmt(value: Any, spec: str = "", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def progress(r: dict[str, Any]) -> str:
    head = f"   {r['kind']:<16} N={r['n']:<5}"
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    if "first_call_error" in r:
        why = r.get("reason", r["first_call_error"])
        return f"{head} first call failed ({r['first_call_error'][:60]}); {short(why, 120)}"
    tp = r.get("throughput", {})
    return (
        f"{head} first call {fmt(r.get('first_call_s'), '.3f')} s, all eligible "
        f"{fmt(r.get('eligible_s'), '.2f')} s, +{fmt(r.get('os_threads_added'))} OS threads, "
        f"{fmt(r.get('kib_per_backend'), '.1f')} KiB/backend, close {r['close_s']:.3f} s, "
        f"{fmt(tp.get('calls_per_s'))} calls/s"
    )


def print_tables(results: dict[str, dict[int, dict[str, Any]]], sizes: list[int]) -> None:
    all_n = [BASE_N, *sizes]

    def rows(make: Callable[[str, int, dict[str, Any]], list[Any]]) -> list[list[Any]]:
        return [[kind, n, *make(kind, n, results[kind][n])] for kind in KINDS for n in all_n]

    def unavailable(r: dict[str, Any]) -> str | None:
        if "error" in r:
            return "error"
        if "first_call_error" in r:
            return "n/a"
        return None

    def threads_row(kind: str, n: int, r: dict[str, Any]) -> list[Any]:
        na = unavailable(r)
        if na or "at_eligible" not in r:
            return [na or "n/a"] * 9
        b, a = r["before"], r["at_eligible"]
        tasks = f"{b['tasks']} -> {a['tasks']}" if a["tasks"] is not None else ""
        return [
            b["py_threads"],
            a["py_threads"],
            f"{r['py_threads_added']:+d}",
            b["os_threads"],
            a["os_threads"],
            f"{r['os_threads_added']:+d}",
            f"{r['os_threads_per_backend']:.2f}",
            tasks,
            f"{r['tasks_added']:+d}" if "tasks_added" in r else "",
        ]

    print("\nthreads and tasks: before the factory -> every backend eligible")
    print(
        table(
            [
                "kind",
                "N",
                "py before",
                "py eligible",
                "py added",
                "OS before",
                "OS eligible",
                "OS added",
                "OS added/backend",
                "tasks",
                "tasks added",
            ],
            rows(threads_row),
        )
    )

    def memory_row(kind: str, n: int, r: dict[str, Any]) -> list[Any]:
        na = unavailable(r)
        if na or "at_eligible" not in r:
            return [na or "n/a"] * 5
        prev = [m for m in all_n if m < n and "kib_per_backend" in results[kind][m]]
        marginal = ""
        if prev:
            p = results[kind][prev[-1]]
            grown = r["at_eligible"]["rss_kib"] - p["at_eligible"]["rss_kib"]
            marginal = f"{grown / (n - prev[-1]):.1f}"
        return [
            f"{r['before']['rss_kib'] / 1024:.1f}",
            f"{r['at_eligible']['rss_kib'] / 1024:.1f}",
            f"{r['rss_added_kib'] / 1024:+.1f}",
            f"{r['kib_per_backend']:.1f}",
            marginal,
        ]

    print("\nmemory (VmRSS): before the factory -> every backend eligible")
    print(
        table(
            [
                "kind",
                "N",
                "MiB before",
                "MiB eligible",
                "MiB added",
                "KiB/backend",
                "marginal KiB/backend (vs previous N's process)",
            ],
            rows(memory_row),
        )
    )

    def start_row(kind: str, n: int, r: dict[str, Any]) -> list[Any]:
        if "error" in r:
            return ["error"] * 4
        if "first_call_error" in r:
            return [f"{r['factory_s'] * 1000:.1f}", "failed", "n/a", "n/a"]
        count = r.get("eligible_count")
        return [
            f"{r['factory_s'] * 1000:.1f}",
            f"{r['first_call_s']:.3f}",
            fmt(r.get("eligible_s"), ".3f", none="timed out"),
            f"{fmt(count)}/{n}",
        ]

    print("\nstart-up: from the factory call (seconds unless stated)")
    print(
        table(
            ["kind", "N", "factory ms", "first call", "all eligible", "eligible"], rows(start_row)
        )
    )

    def close_row(kind: str, n: int, r: dict[str, Any]) -> list[Any]:
        if "error" in r:
            return ["error"] * 7
        after = r["after_close"]
        os_left = {k: v for k, v in after["os_left"].items() if k != CCORE_POOL}
        left = {**after["py_left"], **{f"os:{k}": v for k, v in os_left.items()}}
        left |= {f"task:{k}": v for k, v in after.get("tasks_left_names", {}).items()}
        return [
            f"{r['close_s']:.3f}",
            f"{after['settle_s']:.2f}" if after["settled"] else f">{after['settle_s']:.1f}",
            f"{after['py_threads_left']:+d}",
            f"{after['own_os_threads_left']:+d}",
            f"{after['tasks_left']:+d}" if "tasks_left" in after else "",
            f"{after['pool_before']} -> {r.get('pool_at_close', '?')} -> {after['pool_after']}",
            ", ".join(f"{k} x{v}" for k, v in left.items()) or "-",
        ]

    print(
        "\nclose: channel.close(), then up to 5 s for threads and tasks to return to the baseline"
    )
    print(
        table(
            [
                "kind",
                "N",
                "close s",
                "settled in s",
                "py left",
                "OS left (not pool)",
                "tasks left",
                f"C-core {CCORE_POOL} pool: before -> at close -> after",
                "what is left",
            ],
            rows(close_row),
        )
    )

    def throughput_row(kind: str, n: int, r: dict[str, Any]) -> list[Any]:
        na = unavailable(r)
        tp = r.get("throughput")
        if na or tp is None:
            return [na or "n/a"] * 3
        base = results[kind][BASE_N].get("throughput")
        ratio = (
            f"{tp['calls_per_s'] / base['calls_per_s']:.3f}"
            if base and base["calls_per_s"]
            else "n/a"
        )
        errors = f"{tp['errors']} ({tp['error'][:60]})" if tp["errors"] else "0"
        return [tp["calls_per_s"], ratio, errors]

    print(
        f"\nunary throughput: Ping in a closed loop ({THREADS} threads sync/round_robin, "
        f"{IN_FLIGHT} in flight aio)"
    )
    print(table(["kind", "N", "calls/s", f"vs N={BASE_N}", "errors"], rows(throughput_row)))

    reasons = [
        (kind, n, results[kind][n])
        for kind in KINDS
        for n in all_n
        if "first_call_error" in results[kind][n] or "error" in results[kind][n]
    ]
    if reasons:
        print("\nn/a and errors:")
        for kind, n, r in reasons:
            if "error" in r:
                print(f"   {kind} N={n}: {r['error']}")
            else:
                print(f"   {kind} N={n}: first call: {r['first_call_error']}")
                if "reason" in r:
                    print(f"      reason (same target without health checking): {r['reason']}")


def print_composition(results: dict[str, dict[int, dict[str, Any]]], n: int) -> None:
    for kind in KINDS:
        r = results[kind].get(n, {})
        comp = r.get("composition")
        if comp is None:
            continue
        before = r["before"]
        print(
            f"\nthreads of the {kind} client at N={n}, every backend eligible "
            f"(before the factory: {before['py_threads']} Python, {before['os_threads']} OS)"
        )
        py_rows = [["python", name, what, count] for name, what, count in comp["py"]]
        os_rows = [["OS (comm)", name, "", count] for name, count in comp["os"].items()]
        tasks = comp.get("tasks", {})
        task_rows = [["asyncio task", name, "", count] for name, count in tasks.items()]
        print(table(["view", "name prefix", "runs", "count"], py_rows + os_rows + task_rows))


def evaluate(
    results: dict[str, dict[int, dict[str, Any]]], sizes: list[int]
) -> tuple[dict[str, Any], list[str]]:
    """Each target: met (True), missed (False) or not measurable (None), with a line each."""
    lines = []
    met: dict[str, Any] = {}
    all_n = [BASE_N, *sizes]
    at_n = TARGET_AT_N if TARGET_AT_N in sizes else max(sizes)
    note = "" if at_n == TARGET_AT_N else f" (N={TARGET_AT_N} not run: judged at N={at_n})"

    def word(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "MISSED")

    for kind in SYNC_KINDS:
        added = {n: results[kind][n].get("os_threads_added") for n in all_n}
        known = {n: a for n, a in added.items() if a is not None}
        total_ok = all(a <= TARGET_SYNC_THREADS_TOTAL for a in known.values()) if known else None
        per_ok = (
            all(a / n <= TARGET_SYNC_THREADS_PER_BACKEND for n, a in known.items())
            if known
            else None
        )
        met[f"{kind}_threads_total"] = total_ok
        met[f"{kind}_threads_per_backend"] = per_ok
        shown = ", ".join(f"N={n}: {a:+d}" for n, a in known.items())
        lines.append(
            f"{kind} threads added (OS count) at most {TARGET_SYNC_THREADS_TOTAL} for any N: "
            f"{word(total_ok)}; at most {TARGET_SYNC_THREADS_PER_BACKEND:g} per backend: "
            f"{word(per_ok)}  ({shown})"
        )
    biggest = max(sizes)
    for kind in (*SYNC_KINDS, *AIO_KINDS):
        kib = results[kind][biggest].get("kib_per_backend")
        ok = None if kib is None else kib <= TARGET_KIB_PER_BACKEND
        met[f"{kind}_memory"] = ok
        lines.append(
            f"{kind} memory <= {TARGET_KIB_PER_BACKEND:g} KiB per backend at N={biggest}: "
            f"{word(ok)}  ({fmt(kib, '.1f')} KiB)"
        )
    for kind in (*SYNC_KINDS, *AIO_KINDS):
        first = results[kind][at_n].get("first_call_s")
        ok = None if first is None else first < TARGET_FIRST_CALL_S
        met[f"{kind}_first_call"] = ok
        lines.append(
            f"{kind} first call < {TARGET_FIRST_CALL_S:g} s at N={at_n}{note}: {word(ok)}  "
            f"({fmt(first, '.3f')} s)"
        )
    for kind in (*SYNC_KINDS, *AIO_KINDS):
        r = results[kind][at_n]
        close_s = r.get("close_s")
        after = r.get("after_close")
        clean = None if after is None else after["settled"]
        ok = None if close_s is None or clean is None else close_s < TARGET_CLOSE_S and clean
        met[f"{kind}_close"] = ok
        left = (
            ""
            if after is None
            else (
                f"py {after['py_threads_left']:+d}, OS {after['own_os_threads_left']:+d}"
                + (f", tasks {after['tasks_left']:+d}" if "tasks_left" in after else "")
            )
        )
        lines.append(
            f"{kind} close < {TARGET_CLOSE_S:g} s at N={at_n} with nothing left behind{note}: "
            f"{word(ok)}  ({fmt(close_s, '.3f')} s; left after "
            f"{fmt(after and after['settle_s'], '.2f')} s: {left})"
        )
    met["all"] = all(v is True for v in met.values())
    return met, lines


def compact(r: dict[str, Any]) -> dict[str, Any]:
    """One measurement for the JSON summary."""
    keep = [
        "factory_s",
        "first_call_s",
        "first_call_error",
        "reason",
        "error",
        "eligible_s",
        "eligible_count",
        "py_threads_added",
        "os_threads_added",
        "os_threads_per_backend",
        "tasks_added",
        "rss_added_kib",
        "kib_per_backend",
        "close_s",
        "pool_at_close",
    ]
    out = {k: r[k] for k in keep if k in r}
    out["before"] = r.get("before")
    out["at_eligible"] = r.get("at_eligible")
    if "throughput" in r:
        out["calls_per_s"] = r["throughput"]["calls_per_s"]
        out["load_errors"] = r["throughput"]["errors"]
    if "after_close" in r:
        a = r["after_close"]
        out["after_close"] = {
            k: a[k]
            for k in [
                "settle_s",
                "settled",
                "py_threads_left",
                "os_threads_left",
                "own_os_threads_left",
                "pool_before",
                "pool_after",
                "tasks_left",
                "py_left",
                "os_left",
                "tasks_left_names",
                "rss_kib",
            ]
            if k in a
        }
    if "composition" in r:
        out["composition"] = r["composition"]
    return out


def parse_sizes(text: str) -> list[int]:
    sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    if not sizes or sizes[0] < 1:
        raise ValueError(text)
    return sizes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--sizes",
        default=None,
        help=f"backend counts (default {DEFAULT_SIZES}; --quick {QUICK_SIZES})",
    )
    ap.add_argument(
        "--window",
        type=float,
        default=None,
        help="seconds of counted calls (default 2; --quick 0.5)",
    )
    ap.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="uncounted seconds first (default 0.5; --quick 0.2)",
    )
    ap.add_argument("--quick", action="store_true", help="short run: sizes 10,100, 0.5 s windows")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=BASE_N, help=argparse.SUPPRESS)
    ap.add_argument("--client", choices=KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--ports", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args.count)
    args.window = args.window or (0.5 if args.quick else 2.0)
    args.warmup = args.warmup or (0.2 if args.quick else 0.5)
    if args.client:
        return client_main(args.client, [int(p) for p in args.ports.split(",")], args)
    try:
        sizes = parse_sizes(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))
    except ValueError:
        ap.error("--sizes: comma-separated backend counts, each at least 1")
    if args.window <= 0 or args.warmup <= 0:
        ap.error("need --window > 0 and --warmup > 0")
    sizes = [n for n in sizes if n != BASE_N]
    if not sizes:
        ap.error(f"--sizes: give at least one backend count other than the baseline {BASE_N}")

    info = print_machine(
        f"scale: one channel over N backends, N in {[BASE_N, *sizes]} (N={BASE_N}: baseline), "
        f"kinds {', '.join(KINDS)}, a fresh client process per measurement"
    )
    # SIGTERM must unwind through the finally below, or the server would outlive us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    results: dict[str, dict[int, dict[str, Any]]] = {kind: {} for kind in KINDS}
    server = ServerProcess(max(sizes))
    try:
        print(
            f"   server pid {server.proc.pid}: {len(server.ports)} ports on 127.0.0.1", flush=True
        )
        for kind in KINDS:
            for n in [BASE_N, *sizes]:
                result = run_client(kind, server.ports[:n], args)
                derive(result)
                results[kind][n] = result
                print(progress(result), flush=True)
    finally:
        server.stop()
    elapsed = time.monotonic() - started

    print_tables(results, sizes)
    print_composition(results, min(sizes))
    met, lines = evaluate(results, sizes)
    print("\ntargets:")
    for line in lines:
        print(f"   {line}")
    print(f"({elapsed:.0f} s)")
    print_summary(
        {
            "bench": "scale",
            "quick": args.quick,
            "sizes": sizes,
            "baseline_n": BASE_N,
            "window_s": args.window,
            "warmup_s": args.warmup,
            "threads": THREADS,
            "in_flight": IN_FLIGHT,
            "results": {
                kind: {str(n): compact(r) for n, r in results[kind].items()} for kind in KINDS
            },
            "targets": {
                "sync_threads_total": TARGET_SYNC_THREADS_TOTAL,
                "sync_threads_per_backend": TARGET_SYNC_THREADS_PER_BACKEND,
                "kib_per_backend": TARGET_KIB_PER_BACKEND,
                "first_call_s": TARGET_FIRST_CALL_S,
                "close_s": TARGET_CLOSE_S,
                "at_n": TARGET_AT_N,
            },
            "target_met": met,
            "elapsed_s": round(elapsed, 1),
            "machine": info,
            "load_avg_after": load_average(),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
