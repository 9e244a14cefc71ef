"""TLS with a DNS-name target: backend channels dial IPs but verify the name.

The server's certificate names only ``localhost`` (no IP SAN), so a
backend channel that verified against the IP it dials would fail the handshake.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator

import conference_pb2
import conference_pb2_grpc
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import BackendFactory
from server import Backend

import grpc_leastconn

TEST_NAME = "localhost"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _make_pki() -> tuple[bytes, bytes, bytes]:
    """A throwaway CA and a server certificate for TEST_NAME only."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "grpc_leastconn test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = _key()
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TEST_NAME)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(TEST_NAME)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return ca_cert.public_bytes(pem), server_cert.public_bytes(pem), _pem_key(server_key)


@pytest.fixture(scope="module")
def pki() -> tuple[bytes, bytes, bytes]:
    return _make_pki()


@pytest.fixture
def tls_backend(backends: BackendFactory, pki: tuple[bytes, bytes, bytes]) -> Iterator[Backend]:
    _, cert, key = pki
    credentials = grpc.ssl_server_credentials([(key, cert)])
    (backend,) = backends(1, host="127.0.0.1", server_credentials=credentials)
    yield backend


def test_dns_target_verifies_the_certificate_against_the_name(
    tls_backend: Backend, pki: tuple[bytes, bytes, bytes]
) -> None:
    ca, _, _ = pki
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    target = f"dns:///{TEST_NAME}:{tls_backend.port}"
    with grpc_leastconn.secure_channel(target, credentials) as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        reply = stub.Ping(conference_pb2.PingRequest(payload="tls"), timeout=10)
        assert reply.payload == "tls"
        assert list(channel.connection_table()) == [f"127.0.0.1:{tls_backend.port}"]
    authorities = tls_backend.servicer.authorities
    assert authorities == {f"{TEST_NAME}:{tls_backend.port}"}


def test_bare_host_port_target_also_uses_the_name(
    tls_backend: Backend, pki: tuple[bytes, bytes, bytes]
) -> None:
    ca, _, _ = pki
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    with grpc_leastconn.secure_channel([f"{TEST_NAME}:{tls_backend.port}"], credentials) as ch:
        stub = conference_pb2_grpc.ConferenceStub(ch)
        assert stub.Ping(conference_pb2.PingRequest(payload="x"), timeout=10).payload == "x"


def test_ip_target_fails_verification_against_a_name_only_certificate(
    tls_backend: Backend, pki: tuple[bytes, bytes, bytes]
) -> None:
    """The control: dialling the IP with no name gives the handshake nothing to match."""
    ca, _, _ = pki
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    target = f"ipv4:127.0.0.1:{tls_backend.port}"
    with grpc_leastconn.secure_channel(target, credentials) as channel:
        stub = conference_pb2_grpc.ConferenceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Ping(conference_pb2.PingRequest(payload="x"), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert channel.connection_table() == {f"127.0.0.1:{tls_backend.port}": 0}
