"""What each backend channel is built from: its target, options and credentials.

Both front ends build a backend channel from the same ``BackendChannelSpec``
(grpc.insecure_channel / grpc.secure_channel, or their grpc.aio twins); the
options that make one grpc channel behave as one backend of a balanced
channel are decided here, once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from .target import Address

Option = tuple[str, Any]

# round_robin over the one address: after a disconnect it reconnects by
# itself with backoff, where pick_first would go IDLE and wait for a call
# that least-connection will never send to a backend that is not READY.
_BACKEND_POLICY: list[dict[str, Any]] = [{"round_robin": {}}]
_BACKEND_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": _BACKEND_POLICY})
_HEALTH_CHECK_CONFIG = "healthCheckConfig"
# Reconnect within seconds of a backend's return; gRPC's default backoff
# ceiling is 120 s.
_MAX_RECONNECT_BACKOFF_MS = 10_000


@dataclass(frozen=True, slots=True)
class BackendChannelSpec:
    """Everything a front end passes to grpcio to open one backend channel."""

    target: str
    options: tuple[Option, ...]
    credentials: grpc.ChannelCredentials | None
    compression: grpc.Compression | None


def backend_channel_spec(
    address: Address,
    options: Sequence[Option],
    credentials: grpc.ChannelCredentials | None,
    compression: grpc.Compression | None,
    health_check_service: str | None = None,
) -> BackendChannelSpec:
    return BackendChannelSpec(
        address.channel_target(),
        channel_options(options, address, health_check_service),
        credentials,
        compression,
    )


def channel_options(
    options: Sequence[Option] | None,
    address: Address,
    health_check_service: str | None = None,
) -> tuple[Option, ...]:
    """The user's channel options plus what each backend channel needs.

    ``health_check_service`` (health_checker="grpc"): the backend channel
    checks that grpc.health.v1 service itself, C-core's client-side health
    checking (``healthCheckConfig`` in its service config, which the
    round_robin policy honours); its connectivity is then READY only while
    the backend serves.
    """
    merged = list(options or ())
    given = {name for name, _ in merged}
    # C-core shares connections between channels with equal arguments through
    # a global pool; a local pool keeps this balanced channel's connections
    # its own, so its counts describe connections nothing else loads.
    if "grpc.use_local_subchannel_pool" not in given:
        merged.append(("grpc.use_local_subchannel_pool", 1))
    # The channel dials an IP, but :authority and TLS hostname verification
    # must use the name the user asked for, as with grpcio's dns resolver.
    # C-core verifies the server certificate against the default authority.
    if address.authority is not None and "grpc.default_authority" not in given:
        merged.append(("grpc.default_authority", address.authority))
    if "grpc.max_reconnect_backoff_ms" not in given:
        merged.append(("grpc.max_reconnect_backoff_ms", _MAX_RECONNECT_BACKOFF_MS))
    if "grpc.service_config" not in given:
        merged.append(("grpc.service_config", _BACKEND_SERVICE_CONFIG))
    merged = [with_reconnecting_policy(option) for option in merged]
    if health_check_service is not None:
        merged = [with_health_check(option, health_check_service) for option in merged]
    return tuple(merged)


def with_health_check(option: Option, service: str) -> Option:
    """A backend channel's grpc.service_config, with C-core health checking of
    ``service`` unless the user's config has a healthCheckConfig of its own."""
    name, value = option
    if name != "grpc.service_config":
        return option
    config = json.loads(value)
    if _HEALTH_CHECK_CONFIG in config:
        return option
    return name, json.dumps({**config, _HEALTH_CHECK_CONFIG: {"serviceName": service}})


def with_reconnecting_policy(option: Option) -> Option:
    """A user's grpc.service_config, given the backend policy unless it names one.

    Raises ValueError for a service config that is not a JSON object, so a
    malformed option fails at construction.
    """
    name, value = option
    if name != "grpc.service_config":
        return option
    try:
        config = json.loads(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"option grpc.service_config is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError("option grpc.service_config must be a JSON object")
    if "loadBalancingConfig" in config or "loadBalancingPolicy" in config:
        return option
    return name, json.dumps({**config, "loadBalancingConfig": _BACKEND_POLICY})
