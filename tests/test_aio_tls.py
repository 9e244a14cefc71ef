"""TLS through the asyncio channel: backend channels dial IPs but verify the name.

The certificate (from test_tls) names only ``localhost``, so a backend channel
that verified against the IP it dials would fail the handshake.
"""

from __future__ import annotations

import conference_pb2 as pb
import conference_pb2_grpc
import grpc
import pytest
from aio_support import run
from helpers import BackendFactory
from test_tls import TEST_NAME, _make_pki

import grpc_leastconn.aio


def test_dns_target_verifies_the_certificate_against_the_name(backends: BackendFactory) -> None:
    ca, cert, key = _make_pki()
    (server,) = backends(1, server_credentials=grpc.ssl_server_credentials([(key, cert)]))
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)

    async def body() -> None:
        target = f"dns:///{TEST_NAME}:{server.port}"
        async with grpc_leastconn.aio.secure_channel(target, credentials) as channel:
            stub = conference_pb2_grpc.ConferenceStub(channel)
            reply = await stub.Ping(pb.PingRequest(payload="tls"), timeout=10)
            assert reply.payload == "tls"
            assert list(channel.connection_table()) == [f"127.0.0.1:{server.port}"]

        # The control: dialling the IP with no name gives the handshake nothing to match.
        target = f"ipv4:127.0.0.1:{server.port}"
        async with grpc_leastconn.aio.secure_channel(
            target, credentials, health_check_service=None
        ) as channel:
            stub = conference_pb2_grpc.ConferenceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Ping(pb.PingRequest(payload="x"), timeout=10)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE

    run(body)
    assert server.servicer.authorities == {f"{TEST_NAME}:{server.port}"}
