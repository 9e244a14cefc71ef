"""Health checking: our Watch stream per backend vs C-core's healthCheckConfig.

Both are push-based. For each flip of a backend's grpc.health.v1 status this
measures how long each client takes to stop (NOT_SERVING) and resume
(SERVING) treating the backend as usable:

- watch: a grpc_leastconn channel (one Watch stream per backend, in Python);
  the time until the balancer's eligible set changes.
- grpc: a grpc_leastconn channel with ``health_checker="grpc"`` (C-core's
  health checking inside each backend channel, no Watch stream of ours); the
  time until the balancer's eligible set changes.
- c-core: a plain grpc channel to the same backend with round_robin and
  ``healthCheckConfig`` in its service config; the time until its
  connectivity state leaves / re-enters READY, as ``subscribe`` reports it.

It also counts the threads each approach adds per backend.

    python bench/health_reaction.py [--flips 20] [--backends 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import threading
import time

from _common import setup_paths

setup_paths()

import grpc  # noqa: E402
import server as example_server  # noqa: E402

import grpc_leastconn  # noqa: E402

C_CORE_HEALTH = json.dumps(
    {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}}
)


def _client_threads() -> int:
    # In-process backends run each Watch handler on a server thread; only
    # the client's own threads are the cost of the approach.
    return sum(not t.name.startswith("conference") for t in threading.enumerate())


def _wait(predicate: object, timeout: float = 5.0) -> float:
    """Seconds until ``predicate()`` holds (a tight bounded poll: the thing measured)."""
    start = time.perf_counter()
    deadline = start + timeout
    while not predicate():  # type: ignore[operator]
        if time.perf_counter() > deadline:
            raise TimeoutError("no reaction within the timeout")
        time.sleep(0.0002)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flips", type=int, default=20)
    parser.add_argument("--backends", type=int, default=8)
    args = parser.parse_args()
    # The flips are deliberate; their WARNINGs would drown the table.
    logging.getLogger("grpc_leastconn").setLevel(logging.ERROR)

    threads_before = _client_threads()
    backends = [example_server.start_backend() for _ in range(args.backends)]
    threads_servers = _client_threads()
    target = "ipv4:" + ",".join(b.address for b in backends)
    subject = backends[0]
    try:
        channel = grpc_leastconn.insecure_channel(target)

        # The balancer's view is what decides picks.
        def eligible() -> bool:
            return any(s.address == subject.address and s.eligible for s in channel.backends())

        _wait(lambda: all(s.eligible for s in channel.backends()))
        threads_watch = _client_threads()

        checked = grpc_leastconn.insecure_channel(target, health_checker="grpc")

        def eligible_checked() -> bool:
            return any(s.address == subject.address and s.eligible for s in checked.backends())

        _wait(lambda: all(s.eligible for s in checked.backends()))
        threads_checked = _client_threads()

        ccore_channels = [
            grpc.insecure_channel(b.address, options=[("grpc.service_config", C_CORE_HEALTH)])
            for b in backends
        ]
        state = {"value": None}
        ccore_channels[0].subscribe(lambda s: state.__setitem__("value", s), try_to_connect=True)
        for other in ccore_channels[1:]:
            other.subscribe(lambda s: None, try_to_connect=True)
        _wait(lambda: state["value"] is grpc.ChannelConnectivity.READY)
        threads_ccore = _client_threads()

        results: dict[str, list[float]] = {k: [] for k in ("watch", "grpc", "c-core")}
        for flip in range(args.flips * 2):
            serving = flip % 2 == 1
            flipped = time.perf_counter()
            subject.set_serving(serving)
            _wait(lambda s=serving: eligible() is s)
            watch = time.perf_counter() - flipped
            _wait(lambda s=serving: eligible_checked() is s)
            grpc_checker = time.perf_counter() - flipped
            _wait(lambda s=serving: (state["value"] is grpc.ChannelConnectivity.READY) is s)
            ccore = time.perf_counter() - flipped
            results["watch"].append(watch)
            results["grpc"].append(grpc_checker)
            results["c-core"].append(ccore)
        print(f"{args.flips * 2} flips, {args.backends} backends")
        print(
            f"{'approach':<8} {'median ms':>10} {'p90 ms':>8} {'max ms':>8} {'threads/backend':>16}"
        )
        per_backend = {
            "watch": (threads_watch - threads_servers) / args.backends,
            "grpc": (threads_checked - threads_watch) / args.backends,
            "c-core": (threads_ccore - threads_checked) / args.backends,
        }
        summary = {}
        for name, samples in results.items():
            samples.sort()
            median = statistics.median(samples) * 1e3
            p90 = samples[int(len(samples) * 0.9) - 1] * 1e3
            print(
                f"{name:<8} {median:>10.2f} {p90:>8.2f} {samples[-1] * 1e3:>8.2f}"
                f" {per_backend[name]:>16.1f}"
            )
            summary[name] = {
                "median_ms": round(median, 2),
                "threads_per_backend": per_backend[name],
            }
        print(json.dumps({"threads_before": threads_before, **summary}))
        channel.close()
        checked.close()
        for ch in ccore_channels:
            ch.close()
    finally:
        example_server.stop_backends(backends, grace=0.2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
