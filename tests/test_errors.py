"""Pure tests of the rule that decides whether a failed RPC may be sent again."""

from __future__ import annotations

import grpc
import pytest
from seams import Address, FailedCall, never_sent

V4 = Address("127.0.0.1", 5001)
V6 = Address("::1", 5001)


@pytest.mark.parametrize(
    ("address", "code", "details", "expected"),
    [
        # C-core's own pick failures on the backend channel: never sent.
        (
            V4,
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:5001: "
            "Failed to connect to remote host: Connection refused",
            True,
        ),
        (
            V4,
            grpc.StatusCode.UNAVAILABLE,
            "connections to all backends failing; last error: UNKNOWN: ipv4:127.0.0.1:5001: "
            "Failed to connect to remote host: Connection refused",
            True,
        ),
        (
            V6,
            grpc.StatusCode.UNAVAILABLE,
            "connections to all backends failing; last error: UNKNOWN: ipv6:%5B::1%5D:5001: "
            "Failed to connect to remote host: Connection refused",
            True,
        ),
        # The same words relayed by a backend about its own upstream: sent.
        (
            V4,
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.7:50051: x",
            False,
        ),
        # A port that merely starts with ours is another address.
        (
            V4,
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:50011: x",
            False,
        ),
        # Failures after the stream started may have been processed.
        (V4, grpc.StatusCode.UNAVAILABLE, "Socket closed", False),
        (V4, grpc.StatusCode.UNAVAILABLE, "GOAWAY received", False),
        (
            V4,
            grpc.StatusCode.INTERNAL,
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:5001: x",
            False,
        ),
    ],
)
def test_never_sent(address: Address, code: grpc.StatusCode, details: str, expected: bool) -> None:
    assert never_sent(FailedCall(code, details), address) is expected


def test_errors_without_status_are_never_resent() -> None:
    assert never_sent(grpc.RpcError("no status"), V4) is False


def test_failed_call_behaves_like_grpcio_failures() -> None:
    failure = FailedCall(grpc.StatusCode.UNAVAILABLE, "no healthy backend")
    assert isinstance(failure, grpc.RpcError)
    assert isinstance(failure, grpc.Call)
    assert isinstance(failure, grpc.Future)
    assert (failure.code(), failure.details()) == (
        grpc.StatusCode.UNAVAILABLE,
        "no healthy backend",
    )
    assert failure.done() and not failure.running() and not failure.cancelled()
    assert failure.exception() is failure
    with pytest.raises(grpc.RpcError):
        failure.result()
    with pytest.raises(grpc.RpcError):
        next(iter(failure))
    seen: list[object] = []
    failure.add_done_callback(seen.append)
    assert seen == [failure]
