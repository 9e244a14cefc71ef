"""Concurrency: many threads picking, releasing and calling through one channel.

The balancer is not thread-safe by itself; the sync front end serializes it with
one lock. These tests hammer that lock from many threads, first without RPCs (so
a broken invariant shows up within microseconds of the race that broke it), then
with real RPCs against real backends.
"""

from __future__ import annotations

import itertools
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import conference_pb2 as pb
import conference_pb2_grpc
import grpc
import pytest
from helpers import BackendFactory, Ledger, all_eligible, observed_channel, wait_until
from seams import TIE_BREAKS, Address, Balancer

import grpc_leastconn

RPC_TIMEOUT = 10.0
# A channel, its backends and the Ledger observing its balancer.
Fixture = tuple[grpc_leastconn.LeastConnChannel, list[Any], Ledger]
JOIN_TIMEOUT_S = 30.0
READY = grpc.ChannelConnectivity.READY
TRANSIENT_FAILURE = grpc.ChannelConnectivity.TRANSIENT_FAILURE


def run_threads(targets: list[Callable[[], None]], timeout: float) -> None:
    """Run each target on its own thread; re-raise the first failure."""
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not [t for t in threads if t.is_alive()], "threads still running"
    if errors:
        raise errors[0]


@pytest.fixture
def channel_to(backends: BackendFactory) -> Iterator[Callable[[int], Fixture]]:
    channels: list[grpc_leastconn.LeastConnChannel] = []

    def make(n: int) -> Fixture:
        servers = backends(n)
        channel, ledger = observed_channel([s.address for s in servers])
        channels.append(channel)
        return channel, servers, ledger

    yield make
    for channel in channels:
        channel.close()


def wait_all_ready(channel: grpc_leastconn.LeastConnChannel) -> None:
    # Until every backend can take calls, the first ready one takes them all.
    wait_until(lambda: all_eligible(channel), timeout=RPC_TIMEOUT)


def assert_idle(channel: grpc_leastconn.LeastConnChannel, servers: list[Any]) -> None:
    for server in servers:
        assert server.servicer.wait_until(lambda s: s.live == 0, 2.0), server.servicer.stats()
        assert server.servicer.started == server.servicer.finished
    wait_until(lambda: not any(channel.connection_table().values()), 2.0)
    assert channel.connection_table() == dict.fromkeys((s.address for s in servers), 0)


# -- (a) the lock-protected core, no RPCs ---------------------------------------


@pytest.mark.parametrize("tie_break", TIE_BREAKS)
def test_balancer_under_an_external_lock_stays_exact(tie_break: str) -> None:
    balancer: Balancer[None] = Balancer(
        "stress",
        tie_break=tie_break,  # type: ignore[arg-type]
        rng=random.Random(7),
        health_checking=False,
    )
    change = balancer.set_addresses(Address("127.0.0.1", 40000 + i) for i in range(5))
    for backend in change.added:
        balancer.set_connectivity(backend, READY)
    lock = threading.Lock()
    picks: Counter[str] = Counter()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        held: list[Any] = []
        for _ in range(3000):
            if held and (len(held) >= 6 or rng.random() < 0.5):
                victim = held.pop(rng.randrange(len(held)))
                with lock:
                    balancer.release(victim)
                continue
            with lock:
                floor = min(b.in_flight for b in balancer.backends)
                backend = balancer.pick()
                assert backend is not None
                # Exactness under contention: the pick came from the minimum.
                assert backend.in_flight - 1 == floor
                picks[backend.key] += 1
            held.append(backend)
        with lock:
            for backend in held:
                balancer.release(backend)

    def observer() -> None:
        for _ in range(2000):
            with lock:
                balancer.check_invariants()

    run_threads([*(lambda s=s: worker(s) for s in range(8)), observer], timeout=60)
    balancer.check_invariants()
    assert balancer.connection_table() == dict.fromkeys((b.key for b in balancer.backends), 0)
    assert sum(picks.values()) > 8 * 1000


def test_core_acquire_release_with_connectivity_churn(
    channel_to: Callable[[int], Fixture],
) -> None:
    channel, servers, ledger = channel_to(4)
    wait_all_ready(channel)
    core = ledger.core
    backends = [ledger.backend(s.address) for s in servers]
    picked: Counter[str] = Counter()
    picked_lock = threading.Lock()
    done = threading.Event()
    flips_during_work = 0

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        held: list[Any] = []
        for _ in range(2000):
            if held and (len(held) >= 4 or rng.random() < 0.5):
                core.release(held.pop(rng.randrange(len(held))))
            else:
                # wait_for_ready: the churn below may leave nothing eligible
                # for a moment; waiters must be woken when a backend returns.
                backend = core.acquire(wait_for_ready=True, timeout=RPC_TIMEOUT)
                with picked_lock:
                    picked[backend.key] += 1
                held.append(backend)
        for backend in held:
            core.release(backend)

    def churn() -> None:
        nonlocal flips_during_work
        rng = random.Random(99)
        for _ in range(300):
            if done.is_set():
                break
            flips_during_work += 1
            victims = rng.sample(backends, rng.randint(1, len(backends)))
            for backend in victims:
                core.on_connectivity(backend, TRANSIENT_FAILURE)
            ledger.check_invariants()
            for backend in victims:
                core.on_connectivity(backend, READY)

    def observer() -> None:
        for _ in range(2000):
            if done.is_set():
                break
            ledger.check_invariants()

    workers = [lambda s=s: worker(s) for s in range(8)]

    def workers_then_done() -> None:
        try:
            run_threads(workers, timeout=60)
        finally:
            done.set()

    run_threads([workers_then_done, churn, observer], timeout=90)
    ledger.check_invariants()
    assert channel.connection_table() == dict.fromkeys((s.address for s in servers), 0)
    assert sum(picked.values()) > 8 * 1000
    assert flips_during_work > 10, "the churn did not overlap the picks"
    # The real backend channels never left READY; the core must agree again.
    assert all(b.eligible for b in backends)


# -- (b) real RPCs --------------------------------------------------------------


def one_rpc(stub: conference_pb2_grpc.ConferenceStub, rng: random.Random) -> str:
    """A random RPC of any kind; returns what it was, for the tally."""
    roll = rng.random()
    if roll < 0.55:
        reply = stub.Ping(pb.PingRequest(payload="p", delay_ms=rng.choice((0, 0, 2))), timeout=5)
        assert reply.payload == "p"
        return "ping"
    if roll < 0.7:
        frames = list(
            itertools.islice(
                stub.Join(pb.JoinRequest(duration_ms=10, frame_interval_ms=5), timeout=5), 100
            )
        )
        assert len(frames) == 2
        return "join"
    if roll < 0.8:
        stream = stub.Join(pb.JoinRequest(duration_ms=0, frame_interval_ms=5), timeout=5)
        next(stream)
        stream.cancel()
        return "join-cancelled"
    if roll < 0.9:
        summary = stub.Upload(iter([pb.Frame(seq=i) for i in range(3)]), timeout=5)
        assert summary.frames == 3
        return "upload"
    replies = stub.Chat(iter([pb.ChatMessage(text=str(i)) for i in range(3)]), timeout=5)
    assert [m.text for m in itertools.islice(replies, 10)] == ["0", "1", "2"]
    return "chat"


def test_mixed_rpcs_from_many_threads(
    channel_to: Callable[[int], Fixture],
) -> None:
    channel, servers, ledger = channel_to(4)
    stub = conference_pb2_grpc.ConferenceStub(channel)
    kinds: Counter[str] = Counter()
    kinds_lock = threading.Lock()
    stop_sampling = threading.Event()
    samples: list[dict[str, int]] = []

    def caller(seed: int) -> None:
        rng = random.Random(seed)
        mine = Counter(one_rpc(stub, rng) for _ in range(200))
        with kinds_lock:
            kinds.update(mine)

    def sampler() -> None:
        for _ in range(100_000):
            if stop_sampling.wait(0.005):
                break
            samples.append(channel.connection_table())

    def callers_then_stop() -> None:
        try:
            run_threads([lambda s=s: caller(s) for s in range(16)], timeout=120)
        finally:
            stop_sampling.set()

    run_threads([callers_then_stop, sampler], timeout=150)

    assert sum(kinds.values()) == 16 * 200
    assert_idle(channel, servers)
    ledger.check()
    assert samples
    assert all(n >= 0 for table in samples for n in table.values())
    assert any(sum(table.values()) > 1 for table in samples), "no concurrency was observed"
    started = [s.servicer.started for s in servers]
    assert sum(started) == 16 * 200
    mean = sum(started) / len(started)
    assert all(abs(n - mean) <= 0.5 * mean for n in started), started


@pytest.mark.parametrize("n_streams", [14, 16])
def test_concurrently_opened_streams_are_level(
    channel_to: Callable[[int], Fixture], n_streams: int
) -> None:
    channel, servers, _ = channel_to(4)
    stub = conference_pb2_grpc.ConferenceStub(channel)
    wait_all_ready(channel)
    opened = threading.Barrier(n_streams + 1, timeout=RPC_TIMEOUT)
    checked = threading.Barrier(n_streams + 1, timeout=RPC_TIMEOUT)
    # Picks race each other, then everything is released, so the final
    # round starts from a clean zero and must end up exactly level.
    churned = threading.Barrier(
        n_streams,
        action=lambda: wait_until(lambda: not any(channel.connection_table().values()), 2.0),
        timeout=RPC_TIMEOUT,
    )

    def holder() -> None:
        for _ in range(5):
            stream = stub.Join(pb.JoinRequest(duration_ms=0), timeout=JOIN_TIMEOUT_S)
            next(stream)
            stream.cancel()
        churned.wait()
        stream = stub.Join(pb.JoinRequest(duration_ms=0), timeout=JOIN_TIMEOUT_S)
        next(stream)
        opened.wait()
        checked.wait()
        stream.cancel()

    def check() -> None:
        opened.wait()
        try:
            table = channel.connection_table()
            assert sum(table.values()) == n_streams
            assert max(table.values()) - min(table.values()) <= 1, table
            for server in servers:
                assert server.servicer.wait_until(
                    lambda s, want=table[server.address]: s.live_streams == want, 2.0
                ), (table, [s.servicer.live_streams for s in servers])
        finally:
            checked.wait()

    run_threads([check, *([holder] * n_streams)], timeout=60)
    assert_idle(channel, servers)
