"""Static weights and call costs: what a backend can carry, and what one call weighs.

``weights={"host:port": w}`` names backends of the target, as the target
names them: an address, or a host name whose every address gets that
weight (so weights survive re-resolution, keyed by name). Backends not
named weigh 1. ``call_costs={"/pkg.Service/Method": c}`` says what one call
of a method adds to its backend's load (default 1): an idle watch or a long
poll that holds a stream while doing little can count for 0.1. Both feed
the one cost of weighted.py; validation here fails at construction, naming
the bad entry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Final

from .stepped import MAX_STEP
from .target import Address, Target, parse_host_port
from .weighted import UNIT

# A call costs at least a thousandth of a call: loads are kept in milli-calls.
MIN_CALL_COST: Final = 1 / UNIT


@dataclass(frozen=True, slots=True)
class Weights:
    """A target's static weights, by the (host, port) the target names."""

    by_endpoint: Mapping[tuple[str, int], float] = field(default_factory=dict)
    # Whether backends weigh differently: with equal weights, the picks are
    # those of no weights at all, and the O(1) bucket picker serves.
    uneven: bool = False
    # Buckets per call by weight, when the weights' ratios are small whole
    # numbers (stepped.py); None: the weighted picker's heap serves.
    steps: Mapping[float, int] | None = None

    def of(self, address: Address) -> float:
        """The weight of a resolved address: its name's, or its own, or 1."""
        if address.authority is not None:
            named = parse_host_port(address.authority, context="weights")
            key = (named.host, named.port)
        else:
            key = (address.host, address.port)
        return self.by_endpoint.get(key, 1.0)

    def step_of(self, address: Address) -> int:
        """The address's step in the stepped picker (only when ``steps`` is set)."""
        assert self.steps is not None
        return self.steps[self.of(address)]


def check_weights(weights: object, target: Target) -> Weights:
    if weights is None:
        return Weights()
    if not isinstance(weights, Mapping):
        raise TypeError(
            f"weights must be a mapping of 'host:port' to a number, not {type(weights).__name__}"
        )
    named = {(endpoint.host, endpoint.port) for endpoint in target.endpoints}
    by_endpoint: dict[tuple[str, int], float] = {}
    for key, weight in weights.items():
        if not isinstance(key, str):
            raise TypeError(f"weights: key {key!r} must be a 'host:port' str")
        endpoint = parse_host_port(key, context=f"weights key {key!r}")
        if (endpoint.host, endpoint.port) not in named:
            raise ValueError(
                f"weights key {key!r} is not a backend of target {target.text!r} "
                "(name an address or host name as the target does)"
            )
        if (endpoint.host, endpoint.port) in by_endpoint:
            raise ValueError(f"weights names {key!r} twice (under another spelling)")
        by_endpoint[(endpoint.host, endpoint.port)] = _positive(f"weights[{key!r}]", weight)
    values = set(by_endpoint.values())
    if len(by_endpoint) < len(named):
        values.add(1.0)  # the backends not named
    return Weights(by_endpoint, uneven=len(values) > 1, steps=steps_for(values))


def steps_for(weights: set[float]) -> dict[float, int] | None:
    """Each weight's step: cost * M = (load + 1) * step, all whole (see stepped.py)."""
    fractions = {}
    for weight in weights:
        fraction = Fraction(weight).limit_denominator(1000)
        if float(fraction) != weight:
            return None
        fractions[weight] = fraction
    common = math.lcm(*(f.numerator for f in fractions.values()))
    steps = {w: common * f.denominator // f.numerator for w, f in fractions.items()}
    return steps if max(steps.values()) <= MAX_STEP else None


def check_call_costs(costs: object) -> dict[str, int]:
    """``call_costs`` in milli-calls, by full method name ("/pkg.Service/Method")."""
    if costs is None:
        return {}
    if not isinstance(costs, Mapping):
        raise TypeError(
            "call_costs must be a mapping of full method names to numbers, "
            f"not {type(costs).__name__}"
        )
    checked: dict[str, int] = {}
    for method, cost in costs.items():
        if not isinstance(method, str):
            raise TypeError(f"call_costs: key {method!r} must be a full method name str")
        if not (method.startswith("/") and method.count("/") == 2 and all(method.split("/")[1:])):
            raise ValueError(
                f"call_costs: {method!r} is not a full method name like '/pkg.Service/Method'"
            )
        value = _positive(f"call_costs[{method!r}]", cost)
        if value < MIN_CALL_COST:
            raise ValueError(f"call_costs[{method!r}] must be at least {MIN_CALL_COST:g}")
        checked[method] = round(value * UNIT)
    return checked


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a positive finite number; got {value!r}")
    return number
