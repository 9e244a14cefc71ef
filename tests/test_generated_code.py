"""The committed example code must match protos/conference.proto."""

from __future__ import annotations

import subprocess
import sys

import conference_pb2
import pytest
from helpers import ROOT

pytest.importorskip("grpc_tools", reason="grpcio-tools is needed to regenerate the code")


def test_generated_code_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_service_shape() -> None:
    service = conference_pb2.DESCRIPTOR.services_by_name["Conference"]
    assert service.full_name == "conference.Conference"
    shapes = {
        method.name: (method.client_streaming, method.server_streaming)
        for method in service.methods
    }
    assert shapes == {
        "Ping": (False, False),
        "Join": (False, True),
        "Upload": (True, False),
        "Chat": (True, True),
    }
