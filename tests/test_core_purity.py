"""The package's shape, read from its source: pure core, short modules, twin front ends.

The core must stay free of threads, event loops and grpc calls, so that both
front ends can share it and tests can drive it with a fake clock. These tests
parse the source (nothing is imported) and fail on the first module that
breaks a rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "grpc_leastconn"
CORE = PACKAGE / "_core"

# Concurrency and I/O the core must not use.
FORBIDDEN_MODULES = frozenset(
    {"threading", "asyncio", "concurrent", "queue", "selectors", "multiprocessing", "socket"}
)
# The one module that resolves names, through socket.getaddrinfo.
SOCKET_ALLOWED_IN = frozenset({"resolver.py"})
# grpc types and enums only: no channels, no calls, no servers.
GRPC_ALLOWED = frozenset(
    {
        "StatusCode",
        "ChannelConnectivity",
        "Compression",
        "ChannelCredentials",
        "CallCredentials",
        "RpcError",
    }
)
MAX_LINES = 500


def _module_problems(name: str, filename: str) -> list[str]:
    problems = []
    top = name.split(".")[0]
    if top in FORBIDDEN_MODULES and not (top == "socket" and filename in SOCKET_ALLOWED_IN):
        problems.append(f"imports {name}")
    if name == "grpc.aio" or name.startswith(("grpc.aio.", "grpc._")):
        problems.append(f"imports {name}")
    return problems


def purity_problems(source: str, filename: str) -> list[str]:
    """Every rule of the pure core that ``source`` (the module ``filename``) breaks."""
    tree = ast.parse(source, filename=filename)
    problems: list[str] = []
    grpc_names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                problems += _module_problems(alias.name, filename)
                if alias.name == "grpc":
                    grpc_names.add(alias.asname or "grpc")
                elif alias.name.startswith("grpc.") and alias.asname is None:
                    # ``import grpc.x`` binds ``grpc`` too.
                    grpc_names.add("grpc")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            problems += _module_problems(node.module, filename)
            if node.module == "grpc":
                for alias in node.names:
                    if alias.name not in GRPC_ALLOWED:
                        problems.append(f"imports grpc.{alias.name}")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in grpc_names
            and node.attr not in GRPC_ALLOWED
        ):
            problems.append(f"line {node.lineno}: uses grpc.{node.attr}")
    return problems


def _core_modules() -> list[Path]:
    return sorted(CORE.glob("*.py"))


def _package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_modules_are_found() -> None:
    core = {path.name for path in _core_modules()}
    assert {"balancer.py", "maintenance.py", "resolver.py", "health.py", "rules.py"} <= core
    package = {path.relative_to(PACKAGE).as_posix() for path in _package_modules()}
    assert {"__init__.py", "aio.py", "_sync/channel.py", "_aio/channel.py"} <= package


@pytest.mark.parametrize("path", _core_modules(), ids=lambda path: path.name)
def test_core_module_is_pure(path: Path) -> None:
    assert purity_problems(path.read_text(encoding="utf-8"), path.name) == []


@pytest.mark.parametrize(
    ("source", "filename"),
    [
        ("import threading", "balancer.py"),
        ("import asyncio.events", "balancer.py"),
        ("from concurrent.futures import ThreadPoolExecutor", "balancer.py"),
        ("from queue import SimpleQueue", "balancer.py"),
        ("import selectors", "balancer.py"),
        ("import multiprocessing as mp", "balancer.py"),
        ("import socket", "balancer.py"),
        ("from socket import getaddrinfo", "maintenance.py"),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import threading", "x.py"),
        ("def f():\n    import asyncio", "x.py"),
        ("import grpc.aio", "x.py"),
        ("from grpc import aio", "x.py"),
        ("from grpc.aio import Channel", "x.py"),
        ("from grpc._channel import _InactiveRpcError", "x.py"),
        ("import grpc._cython.cygrpc", "x.py"),
        ("import grpc\nchannel = grpc.insecure_channel('x')", "x.py"),
        ("import grpc\ngrpc.channel_ready_future(c)", "x.py"),
        ("import grpc as g\ng.secure_channel('x', c)", "x.py"),
        ("import grpc\ndef f(c: grpc.Channel) -> None: ...", "x.py"),
        ("from grpc import insecure_channel", "x.py"),
    ],
)
def test_the_purity_check_catches(source: str, filename: str) -> None:
    assert purity_problems(source, filename) != []


@pytest.mark.parametrize(
    ("source", "filename"),
    [
        ("import socket", "resolver.py"),
        ("from socket import getaddrinfo", "resolver.py"),
        ("import grpc\ncode = grpc.StatusCode.UNAVAILABLE", "x.py"),
        ("import grpc\nstate = grpc.ChannelConnectivity.READY", "x.py"),
        ("import grpc\ndef f(e: grpc.RpcError, c: grpc.ChannelCredentials) -> None: ...", "x.py"),
        ("from grpc import StatusCode, Compression, CallCredentials", "x.py"),
        ("from grpc_health.v1 import health_pb2", "x.py"),
        ("from . import threading_free\nimport weakref", "x.py"),
        ("text = 'grpc.insecure_channel and threading'", "x.py"),
    ],
)
def test_the_purity_check_allows(source: str, filename: str) -> None:
    assert purity_problems(source, filename) == []


@pytest.mark.parametrize(
    "path", _package_modules(), ids=lambda path: path.relative_to(PACKAGE).as_posix()
)
def test_every_module_is_short_and_documented(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    lines = len(source.splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines"
    docstring = ast.get_docstring(ast.parse(source))
    assert docstring, f"{path.name} has no module docstring"


def _module_names(folder: str) -> set[str]:
    return {path.name for path in (PACKAGE / folder).glob("*.py")}


def test_the_front_ends_are_twins() -> None:
    sync, aio = _module_names("_sync"), _module_names("_aio")
    assert {"__init__.py", "channel.py", "core.py", "calls.py"} <= sync & aio
    assert aio - sync == {"rpc.py", "finished.py"}
    assert sync - aio == {"failed.py", "streams.py"}
