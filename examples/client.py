"""Example client: video-conference sessions through a least-connection channel.

Each session is a ``Join`` server stream that lasts as long as the client
asks. Sessions of mixed length are opened one after another on ONE channel;
``grpc_leastconn`` sends each to the backend with the fewest live sessions.

    python examples/server.py --count 4 --base-port 50051 &
    python examples/client.py --target ipv4:127.0.0.1:50051,127.0.0.1:50052,\\
127.0.0.1:50053,127.0.0.1:50054 --sessions 20

It prints the channel's live connection table while the sessions run.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import conference_pb2  # noqa: E402
import conference_pb2_grpc  # noqa: E402

import grpc_leastconn  # noqa: E402


def mixed_durations(sessions: int, long_s: float, short_s: float) -> list[float]:
    """Long and short sessions alternating, like calls of 2 hours and 2 minutes."""
    return [long_s if i % 2 == 0 else short_s for i in range(sessions)]


def run_sessions(
    channel: grpc.Channel,
    durations_s: Sequence[float],
    open_interval_s: float,
    *,
    on_tick: Callable[[float], None] | None = None,
    tick_s: float = 0.25,
) -> dict[str, int]:
    """Open one Join stream per duration, ``open_interval_s`` apart, read each to its end.

    Calls ``on_tick(elapsed)`` every ``tick_s`` until all sessions ended, and
    returns how many sessions each backend served (from the frames' backend).
    """
    stub = conference_pb2_grpc.ConferenceStub(channel)
    served: dict[str, int] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def session(index: int, duration_s: float) -> None:
        request = conference_pb2.JoinRequest(
            session_id=f"session-{index}",
            duration_ms=int(duration_s * 1000),
            frame_interval_ms=100,
        )
        backend = None
        try:
            for frame in stub.Join(request, timeout=duration_s + 30):
                backend = frame.backend
        except grpc.RpcError as exc:
            errors.append(exc)
        if backend is not None:
            with lock:
                served[backend] = served.get(backend, 0) + 1

    start = time.monotonic()
    finished = threading.Event()

    def tick() -> None:
        while on_tick is not None and not finished.wait(tick_s):
            on_tick(time.monotonic() - start)

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    threads = []
    for index, duration in enumerate(durations_s):
        time.sleep(max(0.0, start + index * open_interval_s - time.monotonic()))
        thread = threading.Thread(target=session, args=(index, duration), daemon=True)
        thread.start()
        threads.append(thread)
    # Every session carries a deadline, so these joins are bounded too.
    for thread in threads:
        thread.join()
    finished.set()
    ticker.join()
    if errors:
        raise errors[0]
    return served


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="e.g. ipv4:127.0.0.1:50051,127.0.0.1:50052")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--long", type=float, default=6.0, help="long session, seconds")
    parser.add_argument("--short", type=float, default=0.6, help="short session, seconds")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between opens")
    parser.add_argument(
        "--tie-break", default="youngest", choices=["youngest", "round_robin", "random"]
    )
    args = parser.parse_args(argv)

    with grpc_leastconn.insecure_channel(args.target, tie_break=args.tie_break) as channel:

        def show(elapsed: float) -> None:
            print(f"t={elapsed:5.2f}s {json.dumps(channel.connection_table())}", flush=True)

        served = run_sessions(
            channel,
            mixed_durations(args.sessions, args.long, args.short),
            args.interval,
            on_tick=show,
            tick_s=0.5,
        )
    print("sessions served per backend:", json.dumps(served, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
