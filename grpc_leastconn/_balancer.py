"""Balancer: owns every backend's state and applies events one at a time.

Events are address sets from the resolver, connectivity changes of each
sub-channel, health changes, picks and releases. The balancer decides which
backends are eligible and keeps the picker in step; it never does I/O, never
starts threads and never blocks. Each front end serializes calls into it (a
lock in the sync front end, the event loop in the asyncio one) and carries out
what the return values ask for: open a sub-channel, close one.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, TypeVar

import grpc

from ._picker import LeastConnPicker, Node, TieBreak
from ._target import Address

Leaf = TypeVar("Leaf")

_Connectivity = grpc.ChannelConnectivity
# A sub-channel in these states cannot carry a new RPC; C-core keeps
# reconnecting with backoff and reports READY again by itself.
_UNUSABLE = frozenset({_Connectivity.TRANSIENT_FAILURE, _Connectivity.SHUTDOWN})


class Health(Enum):
    """grpc.health.v1 view of a backend (gRFC A17)."""

    UNKNOWN = "UNKNOWN"  # no answer yet: eligible, as gRFC A17 starts CONNECTING
    SERVING = "SERVING"
    NOT_SERVING = "NOT_SERVING"
    UNIMPLEMENTED = "UNIMPLEMENTED"  # the server has no health service: healthy

    @property
    def healthy(self) -> bool:
        return self is not Health.NOT_SERVING


class Backend(Node, Generic[Leaf]):
    """One backend address, its in-flight count and its sub-channel."""

    __slots__ = ("address", "connectivity", "health", "key", "leaf", "removed")

    def __init__(self, address: Address) -> None:
        super().__init__()
        self.address = address
        self.key = str(address)
        self.connectivity = _Connectivity.IDLE
        self.health = Health.UNKNOWN
        self.removed = False
        self.leaf: Leaf | None = None

    @property
    def eligible(self) -> bool:
        return not self.removed and self.health.healthy and self.connectivity not in _UNUSABLE

    def problem(self) -> str:
        if self.removed:
            return "DRAINING"
        if not self.health.healthy:
            return self.health.value
        return self.connectivity.name

    def __repr__(self) -> str:
        return f"Backend({self.key}, in_flight={self.in_flight}, {self.problem()})"


@dataclass(slots=True)
class AddressChange(Generic[Leaf]):
    """What the front end must do after a new address set."""

    added: list[Backend[Leaf]] = field(default_factory=list)
    # Removed backends with nothing in flight: close their sub-channels now.
    # The others drain: each is returned by release() once its last RPC ends.
    to_close: list[Backend[Leaf]] = field(default_factory=list)


class Balancer(Generic[Leaf]):
    def __init__(
        self,
        target: str,
        *,
        tie_break: TieBreak = "round_robin",
        rng: random.Random | None = None,
    ) -> None:
        self.target = target
        self._picker = LeastConnPicker(tie_break, rng)
        self._backends: dict[Address, Backend[Leaf]] = {}
        # Removed from the address set, with RPCs still running: no new picks.
        self._draining: dict[Backend[Leaf], None] = {}
        self.closed = False

    # -- events from the resolver and the sub-channels ---------------------

    def set_addresses(self, addresses: Iterable[Address]) -> AddressChange[Leaf]:
        wanted = dict.fromkeys(addresses)
        change: AddressChange[Leaf] = AddressChange()
        for address in [a for a in self._backends if a not in wanted]:
            backend = self._backends.pop(address)
            backend.removed = True
            self._picker.remove(backend)
            if backend.in_flight:
                self._draining[backend] = None
            else:
                change.to_close.append(backend)
        for address in wanted:
            if address not in self._backends:
                # An address back before its old backend finished draining
                # gets a fresh backend; the old one still closes when idle.
                backend = Backend(address)
                self._backends[address] = backend
                change.added.append(backend)
                self._picker.add(backend)
        return change

    def set_connectivity(self, backend: Backend[Leaf], state: grpc.ChannelConnectivity) -> bool:
        """Record a sub-channel's state; True when eligibility changed."""
        before = backend.eligible
        backend.connectivity = state
        return self._refresh(backend, before)

    def set_health(self, backend: Backend[Leaf], health: Health) -> bool:
        """Record a health-check result; True when eligibility changed."""
        before = backend.eligible
        backend.health = health
        return self._refresh(backend, before)

    def _refresh(self, backend: Backend[Leaf], was_eligible: bool) -> bool:
        now = backend.eligible
        if now and not was_eligible:
            self._picker.add(backend)
        elif was_eligible and not now:
            self._picker.remove(backend)
        return now != was_eligible

    # -- the hot path -------------------------------------------------------

    def pick(self) -> Backend[Leaf] | None:
        """The eligible backend with the fewest in-flight RPCs, counted +1."""
        return self._picker.pick()  # type: ignore[return-value]

    def release(self, backend: Backend[Leaf]) -> bool:
        """gRFC A48: count an RPC as ended, whatever its status.

        True when the backend was draining and this was its last RPC: the
        front end closes its sub-channel now.
        """
        self._picker.release(backend)
        if backend.removed and backend.in_flight == 0 and backend in self._draining:
            del self._draining[backend]
            return True
        return False

    # -- views ----------------------------------------------------------------

    @property
    def backends(self) -> list[Backend[Leaf]]:
        return list(self._backends.values())

    @property
    def has_eligible(self) -> bool:
        return self._picker.size > 0

    def connection_table(self) -> dict[str, int]:
        """Every known backend (draining ones too) -> RPCs in flight now."""
        table = {backend.key: backend.in_flight for backend in self._backends.values()}
        for backend in self._draining:
            table[backend.key] = table.get(backend.key, 0) + backend.in_flight
        return table

    def aggregate_state(self) -> grpc.ChannelConnectivity:
        """The channel's state as round_robin reports it: best of the eligible."""
        if self.closed:
            return _Connectivity.SHUTDOWN
        states = {b.connectivity for b in self._backends.values() if b.eligible}
        for state in (_Connectivity.READY, _Connectivity.CONNECTING, _Connectivity.IDLE):
            if state in states:
                return state
        return _Connectivity.TRANSIENT_FAILURE

    def unavailable_details(self) -> str:
        backends = self._backends.values()
        listed = ", ".join(f"{b.key} {b.problem()}" for b in backends)
        return f"no healthy backend for {self.target!r} ({len(backends)} known: {listed})"

    def close(self) -> list[Backend[Leaf]]:
        """Forget every backend; the front end closes all their sub-channels."""
        self.closed = True
        backends = [*self._backends.values(), *self._draining]
        for backend in backends:
            backend.removed = True
            self._picker.remove(backend)
        self._backends.clear()
        self._draining.clear()
        return backends
