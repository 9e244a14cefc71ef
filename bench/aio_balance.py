"""How evenly grpc_leastconn.aio spreads long-lived streams: balance.py's scenario on asyncio.

The scenario, sampling, metric and report are those of bench/balance.py: four
in-process backends, 40 ``Join`` server streams opened 0.1 s apart on ONE
channel, half lasting 10 s and half 1 s (``alternating`` or ``shuffled``), the
servers' live streams sampled every 0.25 s, spread = max - min over samples with
at least 4 live. Only the client differs: a grpc_leastconn.aio channel on an
event loop in the main thread, each stream read to its end by its own task, the
opens and samples made by one coroutine. The backends are sync grpcio servers in
this process, serving from their own threads.

Policies, interleaved run by run:

  aio_round_robin        grpc_leastconn.aio.insecure_channel(tie_break="round_robin")
  aio_youngest           ... tie_break="youngest"
  aio_random             ... tie_break="random"
  leastconn_<tie_break>  the sync grpc_leastconn channel, exactly as balance.py runs it
                         (not by default): the same scenario under the same load

Run:  python bench/aio_balance.py [--runs 3] [--policies a,b] [--patterns shuffled] [--quick]
A full run takes about 15 s per (policy, pattern, run): 4.5 minutes for the default 18.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from typing import Any

import balance
from _common import print_machine, print_summary, setup_paths

setup_paths()

import conference_pb2_grpc  # noqa: E402
import grpc  # noqa: E402
import server as example_server  # noqa: E402

import grpc_leastconn.aio  # noqa: E402

AIO = {
    "aio_round_robin": "round_robin",
    "aio_youngest": "youngest",
    "aio_random": "random",
}
POLICIES = (*AIO, *balance.LEASTCONN)


async def wait_until_balanced(channel: grpc_leastconn.aio.LeastConnChannel) -> None:
    """Return once all four backends are eligible, as balance.py does for the sync channel."""
    async with asyncio.timeout(15):
        await channel.channel_ready()
        while not all(state.eligible for state in channel.backends()):
            await asyncio.sleep(0.01)


async def consume(call: Any, stream: balance.Stream, finished: list[int]) -> None:
    try:
        async for frame in call:
            if stream.backend is None:
                stream.backend = frame.backend
    except grpc.RpcError as exc:
        stream.error = f"{exc.code().name}: {exc.details()}"
    finally:
        finished[0] += 1


async def run_once(
    policy: str, pattern: str, seed: int, backends: list[Any], scale: float, show_table: bool
) -> balance.Run:
    plan = balance.make_plan(pattern, seed, scale, show_table)
    channel = grpc_leastconn.aio.insecure_channel(
        [b.address for b in backends], tie_break=AIO[policy], rng=random.Random(seed)
    )
    loop = asyncio.get_running_loop()
    calls: list[Any] = []
    tasks: list[asyncio.Task[None]] = []
    # A list so the consumer tasks can count into it.
    finished = [0]
    sampler = balance.Sampler(plan, backends, channel.connection_table)
    try:
        await wait_until_balanced(channel)
        join = conference_pb2_grpc.ConferenceStub(channel).Join
        t0 = loop.time() + 0.05
        for when, index, k in balance.timeline(plan, t0):
            await asyncio.sleep(max(0.0, when - loop.time()))
            if index is not None:
                call = join(plan.request(index), timeout=plan.limit_s)
                calls.append(call)
                tasks.append(loop.create_task(consume(call, plan.streams[index], finished)))
                continue
            assert k is not None
            sampler.sample(k, len(calls))
            if finished[0] == balance.N_STREAMS:
                break
            if loop.time() - t0 > plan.limit_s:
                raise RuntimeError(f"streams still open after {plan.limit_s:.0f} s")
        elapsed = loop.time() - t0
    finally:
        for call in calls:
            call.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await channel.close()
        await asyncio.to_thread(balance.check_idle, backends)
    return sampler.run(policy, pattern, seed, elapsed)


async def run_all(args: Any, backends: list[Any]) -> list[balance.Run]:
    names = [b.servicer.name for b in backends]
    runs: list[balance.Run] = []
    shown_table = False
    for r in range(args.runs):
        for pattern in args.patterns:
            for policy in args.policies:
                show = not shown_table and policy in AIO
                seed = args.seed + r
                if policy in AIO:
                    run = await run_once(policy, pattern, seed, backends, args.scale, show)
                else:
                    # Its blocking loop runs in a thread; this loop just waits for it.
                    run = await asyncio.to_thread(
                        balance.run_once, policy, pattern, seed, backends, args.scale, False
                    )
                shown_table = shown_table or bool(run.tables)
                runs.append(run)
                balance.print_run(run, r, args.runs, names, args.scale)
    return runs


def main() -> int:
    args = balance.parse_args(__doc__.splitlines()[0], POLICIES, tuple(AIO))
    info = print_machine(
        "aio_balance: spread of live streams over 4 backends, one grpc_leastconn.aio channel"
    )
    balance.print_plan(args)
    backends = [example_server.start_backend("127.0.0.1", 0) for _ in range(balance.N_BACKENDS)]
    print(f"   backends: {', '.join(b.servicer.name for b in backends)}")
    started = time.monotonic()
    try:
        runs = asyncio.run(run_all(args, backends))
    finally:
        example_server.stop_backends(backends, grace=None, timeout=10)
    print(f"   {time.monotonic() - started:.0f} s")

    graded = [*AIO, *balance.LEASTCONN]
    results, all_met = balance.report(runs, args.policies, args.patterns, graded)
    print_summary(
        {"bench": "aio_balance", **balance.summary(args, results, all_met, info["load_avg"])}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
