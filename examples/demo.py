"""Why least-connection beats round-robin for long-lived streams.

Starts 4 local backends, then opens the same mix of video-conference sessions
(long and short ``Join`` streams, alternating, one every 0.1 s) three times
on one channel each: grpcio's own ``round_robin``, and ``grpc_leastconn``
with its two deterministic tie-breaks (``youngest``, the default, and
``round_robin``). While the sessions run it prints the
live connection table as each backend counts it; at the end it compares the
spread (busiest minus idlest backend) side by side.

    python examples/demo.py [--sessions 24] [--long 6] [--short 0.6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import client as example_client  # noqa: E402
import server as example_server  # noqa: E402

import grpc_leastconn  # noqa: E402

ROUND_ROBIN_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


@dataclass
class Outcome:
    policy: str
    spreads: list[int] = field(default_factory=list)
    peak: dict[str, int] = field(default_factory=dict)

    @property
    def mean_spread(self) -> float:
        return statistics.fmean(self.spreads) if self.spreads else 0.0

    @property
    def max_spread(self) -> int:
        return max(self.spreads, default=0)


def run_policy(
    policy: str,
    make_channel: Callable[[], grpc.Channel],
    backends: Sequence[example_server.Backend],
    durations: Sequence[float],
    interval: float,
) -> Outcome:
    outcome = Outcome(policy)
    names = {b.address: f"Server {i + 1}" for i, b in enumerate(backends)}
    print(f"\n== {policy} ==")

    def sample(elapsed: float) -> None:
        live = {names[b.address]: b.servicer.live_streams for b in backends}
        for name, count in live.items():
            outcome.peak[name] = max(outcome.peak.get(name, 0), count)
        # As in the seed scenario's metric: compare only once there is
        # enough load for every backend to have a stream.
        if sum(live.values()) >= len(backends):
            outcome.spreads.append(max(live.values()) - min(live.values()))
        print(f"  t={elapsed:4.1f}s live streams {json.dumps(live)}", flush=True)

    with make_channel() as channel:
        example_client.run_sessions(channel, durations, interval, on_tick=sample, tick_s=0.5)
    return outcome


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=24)
    parser.add_argument("--long", type=float, default=6.0, help="long session, seconds")
    parser.add_argument("--short", type=float, default=0.6, help="short session, seconds")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between opens")
    args = parser.parse_args(argv)

    backends = [example_server.start_backend() for _ in range(4)]
    target = "ipv4:" + ",".join(b.address for b in backends)
    durations = example_client.mixed_durations(args.sessions, args.long, args.short)
    print(f"4 backends: {target}")
    print(
        f"{args.sessions} sessions, one every {args.interval}s, "
        f"alternating {args.long}s and {args.short}s"
    )
    policies: list[tuple[str, Callable[[], grpc.Channel]]] = [
        (
            "grpcio round_robin",
            lambda: grpc.insecure_channel(
                target, options=[("grpc.service_config", ROUND_ROBIN_CONFIG)]
            ),
        ),
        ("grpc_leastconn", lambda: grpc_leastconn.insecure_channel(target)),
        (
            "grpc_leastconn round_robin ties",
            lambda: grpc_leastconn.insecure_channel(target, tie_break="round_robin"),
        ),
    ]
    try:
        outcomes = [
            run_policy(name, make, backends, durations, args.interval) for name, make in policies
        ]
    finally:
        example_server.stop_backends(backends, grace=0.5, timeout=10)

    print("\n== summary: live streams per backend (spread = busiest - idlest) ==")
    print(f"  {'policy':<26}{'mean spread':>12}{'max spread':>12}   peak live per backend")
    for outcome in outcomes:
        print(
            f"  {outcome.policy:<26}{outcome.mean_spread:>12.2f}{outcome.max_spread:>12d}"
            f"   {json.dumps(outcome.peak)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
