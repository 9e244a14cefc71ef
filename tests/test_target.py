"""Pure tests of target parsing and construction-time validation."""

from __future__ import annotations

import json
import types

import pytest
from seams import Address, Resolver, channel_options, parse_target

import grpc_leastconn


def _addresses(target: object) -> list[str]:
    return [str(a) for a in Resolver(parse_target(target)).resolve().addresses]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("ipv4:127.0.0.1:5001,127.0.0.1:5002", ["127.0.0.1:5001", "127.0.0.1:5002"]),
        ("ipv6:[::1]:5001,[::1]:5002", ["[::1]:5001", "[::1]:5002"]),
        ("ipv6:::1", ["[::1]:443"]),
        ("ipv4:127.0.0.1", ["127.0.0.1:443"]),
        ("127.0.0.1:5001", ["127.0.0.1:5001"]),
        ("dns:///127.0.0.1:5001", ["127.0.0.1:5001"]),
        ("dns:127.0.0.1:5001", ["127.0.0.1:5001"]),
        ("[::1]:5001", ["[::1]:5001"]),
        (["127.0.0.1:5001", "127.0.0.2:5001"], ["127.0.0.1:5001", "127.0.0.2:5001"]),
        (("127.0.0.1:5001", "127.0.0.1:5001"), ["127.0.0.1:5001"]),
        ("ipv4:127.0.0.1:5001,127.0.0.1:5001", ["127.0.0.1:5001"]),
    ],
)
def test_literal_targets(target: object, expected: list[str]) -> None:
    assert _addresses(target) == expected


def test_dns_name_resolves_through_the_system_resolver() -> None:
    found = _addresses("dns:///localhost:5001")
    assert "127.0.0.1:5001" in found or "[::1]:5001" in found
    assert _addresses("localhost:5001") == found


def test_dns_names_keep_their_authority() -> None:
    target = parse_target("dns:///localhost:5001")
    address = Resolver(target).resolve().addresses[0]
    assert address.authority == "localhost:5001"
    options = dict(channel_options(None, address))
    assert options["grpc.default_authority"] == "localhost:5001"


def test_literal_addresses_get_no_authority_override() -> None:
    options = dict(channel_options([("x", 1)], Address("127.0.0.1", 1)))
    assert options == {
        "x": 1,
        "grpc.use_local_subchannel_pool": 1,
        "grpc.max_reconnect_backoff_ms": 10_000,
        "grpc.service_config": '{"loadBalancingConfig": [{"round_robin": {}}]}',
    }


def test_user_options_win() -> None:
    address = Address("127.0.0.1", 1, "name:1")
    options = channel_options(
        [
            ("grpc.default_authority", "mine"),
            ("grpc.use_local_subchannel_pool", 0),
            ("grpc.max_reconnect_backoff_ms", 1),
            ("grpc.service_config", '{"loadBalancingConfig": [{"pick_first": {}}]}'),
        ],
        address,
    )
    assert dict(options) == {
        "grpc.default_authority": "mine",
        "grpc.use_local_subchannel_pool": 0,
        "grpc.max_reconnect_backoff_ms": 1,
        "grpc.service_config": '{"loadBalancingConfig": [{"pick_first": {}}]}',
    }


def test_user_service_config_keeps_its_settings_and_gains_a_reconnecting_policy() -> None:
    config = json.dumps({"methodConfig": [{"name": [{}], "timeout": "1s"}]})
    options = dict(channel_options([("grpc.service_config", config)], Address("127.0.0.1", 1)))
    assert json.loads(options["grpc.service_config"]) == {
        "methodConfig": [{"name": [{}], "timeout": "1s"}],
        "loadBalancingConfig": [{"round_robin": {}}],
    }


def test_malformed_service_config_is_refused() -> None:
    with pytest.raises(ValueError, match=r"grpc\.service_config"):
        grpc_leastconn.insecure_channel(
            "127.0.0.1:5001", options=[("grpc.service_config", "{not json")]
        )


def test_dns_authority_names_the_dns_server() -> None:
    target = parse_target("dns://127.0.0.1:5353/svc.test:50051")
    assert target.dns_server == Address("127.0.0.1", 5353)
    assert target.endpoints[0].host == "svc.test"
    assert target.endpoints[0].port == 50051


@pytest.mark.parametrize(
    ("target", "error", "fragment"),
    [
        ("", ValueError, "empty"),
        ("   ", ValueError, "empty"),
        (" 127.0.0.1:1", ValueError, "whitespace"),
        ([], ValueError, "empty"),
        ((), ValueError, "empty"),
        (["127.0.0.1:1", 5], TypeError, "item 1"),
        (5001, TypeError, "int"),
        (None, TypeError, "NoneType"),
        (b"127.0.0.1:1", TypeError, "bytes"),
        ("127.0.0.1:0", ValueError, "out of range"),
        ("127.0.0.1:65536", ValueError, "out of range"),
        ("127.0.0.1:-1", ValueError, "not a number"),
        ("127.0.0.1:http", ValueError, "'http' is not a number"),
        ("127.0.0.1:", ValueError, "'' is not a number"),
        (":5001", ValueError, "missing host"),
        ("ipv4:", ValueError, "no address"),
        ("ipv4:[::1]:5001", ValueError, "not an IPv4"),
        ("ipv4:example.com:5001", ValueError, "not an IPv4"),
        ("ipv4:127.0.0.1:5001,,127.0.0.1:5002", ValueError, "empty address"),
        ("ipv6:127.0.0.1:5001", ValueError, "not an IPv6"),
        ("ipv6:[::1:5001", ValueError, "missing ']'"),
        ("ipv6:[::1]x", ValueError, "unexpected"),
        ("unix:/tmp/sock", ValueError, "unsupported scheme 'unix'"),
        ("xds:///svc", ValueError, "unsupported scheme 'xds'"),
        ("foo://bar/baz:1", ValueError, "unsupported scheme 'foo'"),
        ("dns://", ValueError, "expected 'dns://"),
        ("dns:///", ValueError, "no host name"),
        ("dns://example.com/svc:1", ValueError, "must be an IP address"),
        ("dns://127.0.0.1:99999/svc:1", ValueError, "out of range"),
        ("bad host:5001", ValueError, "not a valid host name"),
        ("host_-.:5001", ValueError, "not a valid host name"),
        ("-bad.example:5001", ValueError, "not a valid host name"),
    ],
)
def test_bad_targets_fail_at_construction(target: object, error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment if fragment.isalnum() else None) as info:
        grpc_leastconn.insecure_channel(target)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_unresolvable_name_fails_at_construction() -> None:
    with pytest.raises(ValueError, match=r"cannot resolve 'no-such-host\.invalid:5001'"):
        grpc_leastconn.insecure_channel("no-such-host.invalid:5001")


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"tie_break": "fastest"}, ValueError, "tie_break"),
        ({"tie_break": 1}, TypeError, "tie_break"),
        ({"options": "grpc.x=1"}, TypeError, "options"),
        ({"options": [("grpc.x",)]}, TypeError, "option"),
        ({"options": [(1, 2)]}, TypeError, "option"),
    ],
)
def test_bad_options_fail_at_construction(
    kwargs: dict[str, object], error: type, fragment: str
) -> None:
    with pytest.raises(error) as info:
        grpc_leastconn.insecure_channel("127.0.0.1:5001", **kwargs)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_secure_channel_wants_channel_credentials() -> None:
    with pytest.raises(TypeError, match="credentials"):
        grpc_leastconn.secure_channel("127.0.0.1:5001", None)  # type: ignore[arg-type]


def test_public_surface_is_exact() -> None:
    import grpc_leastconn.aio

    assert sorted(grpc_leastconn.__all__) == [
        "BackendState",
        "DEFAULT_FAILURE_CODES",
        "FailurePercentageEjection",
        "Health",
        "LeastConnChannel",
        "LoadReporter",
        "OutlierDetection",
        "SlowStart",
        "SuccessRateEjection",
        "aio",
        "insecure_channel",
        "secure_channel",
    ]
    assert sorted(grpc_leastconn.aio.__all__) == [
        "LeastConnChannel",
        "insecure_channel",
        "secure_channel",
    ]
    for module in (grpc_leastconn, grpc_leastconn.aio):
        public = {name for name in vars(module) if not name.startswith("_")}
        assert public == set(module.__all__), module.__name__
    assert isinstance(grpc_leastconn.aio, types.ModuleType)
