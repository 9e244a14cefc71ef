"""Declared seams: what tests and benchmarks may replace or watch, and how.

A channel's core takes a ``Seams`` at construction (the factories pass the
default one): the resolver, the clock and an observer of the balancer's
picks and releases. Nothing else of a channel is meant to be reached from
outside; randomness is a public keyword already (``rng=``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from .resolver import Resolution

if TYPE_CHECKING:
    from .backend import Backend, Health


class ResolverLike(Protocol):
    """Target -> addresses, as ``Resolver`` does; may block (the front ends allow for it)."""

    def resolve(self) -> Resolution: ...


class Observer:
    """Sees what a channel's balancer does. Subclass it and override what you need.

    Every hook runs inside the balancer's critical section (the sync front
    end's lock, or the event loop), ``on_pick`` and ``on_release`` on the hot
    path: they must be quick and must not call back into the channel.
    """

    def watches(self, hook: str) -> bool:
        """Whether a subclass overrides ``hook``: the hot path skips the others."""
        return getattr(type(self), hook) is not getattr(Observer, hook)

    def on_attach(self, core: Any) -> None:
        """The front end's core, once built, for a test to drive through its methods."""

    def on_pick(self, backend: Backend[Any]) -> None:
        """An RPC was counted on ``backend``."""

    def on_release(self, backend: Backend[Any]) -> None:
        """An RPC of ``backend`` ended (its count is about to go down)."""

    def on_connectivity(self, backend: Backend[Any], state: grpc.ChannelConnectivity) -> None:
        """The balancer took a new connectivity state of ``backend``'s channel."""

    def on_health(self, backend: Backend[Any], health: Health) -> None:
        """The balancer took a new health report of ``backend``."""


@dataclass(frozen=True, slots=True)
class Seams:
    resolver: ResolverLike | None = None
    """Replaces the DNS/literal resolver built from the target."""
    clock: Any = time.monotonic
    """``() -> float`` seconds: drain deadlines and re-resolution timing."""
    observer: Observer | None = None
    two_choices: bool | None = None
    """Pick the better of two random backends (True) or the lowest (False);
    None: two choices exactly when server_load is on (choice.py)."""


DEFAULT_SEAMS = Seams()
