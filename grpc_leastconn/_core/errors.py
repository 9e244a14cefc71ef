"""How RPC failures read, and which ones never reached a backend.

The texts and the rule are shared by both front ends, so a failure looks
the same whichever one raised it.
"""

from __future__ import annotations

import grpc

from .target import Address

# C-core's details when a backend channel's own load-balancing pick fails
# (pick_first and round_robin): the RPC never got a stream, so the request
# never left this process.
_PICK_FAILURES = ("failed to connect to all addresses", "connections to all backends failing")


def never_sent(error: grpc.RpcError, address: Address) -> bool:
    """True when the RPC failed before any byte of it reached ``address``.

    Only then is it safe to send the same request to another backend: a
    failure after the stream started (reset, GOAWAY, server crash) may have
    been processed, and is left to the caller. A backend can relay the same
    words from its own upstream channel, so the details must also name the
    backend channel's own address, as C-core's "last error" does
    ("...; last error: UNKNOWN: ipv4:10.0.0.7:50051: Connection refused").
    """
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    if not callable(code) or not callable(details):
        return False
    return code() is grpc.StatusCode.UNAVAILABLE and never_sent_details(
        str(details() or ""), address
    )


def never_sent_details(text: str, address: Address) -> bool:
    """The details test of never_sent, for an UNAVAILABLE status already known."""
    if not text.startswith(_PICK_FAILURES):
        return False
    # C-core percent-encodes the brackets of an IPv6 target.
    own = address.channel_target()
    names = (f"{own}: ", f"{own.replace('[', '%5B').replace(']', '%5D')}: ")
    return any(name in text for name in names)
