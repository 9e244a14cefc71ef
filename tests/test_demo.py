"""examples/demo.py: a real run end to end, its picture, and its live table."""

from __future__ import annotations

import importlib.util
import json
import re
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo.py"
# Small enough that the three policies finish in a few seconds.
QUICK = ["--sessions", "8", "--long", "1.5", "--short", "0.3", "--interval", "0.05"]
RUN_TIMEOUT_S = 60
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ESCAPE = "\x1b"


def _load_demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("examples_demo", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


demo = _load_demo()


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEMO), *QUICK, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def _summary(stdout: str) -> str:
    assert "== summary" in stdout, stdout
    return stdout[stdout.index("== summary") :]


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_demo_runs_and_draws_the_picture(tmp_path: Path) -> None:
    picture = tmp_path / "out" / "demo.png"
    result = _run("--picture", str(picture), cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    lines = result.stdout.splitlines()
    printed = [line for line in lines if line.startswith("picture: ")]
    assert len(printed) == 1, result.stdout
    assert Path(printed[0].removeprefix("picture: ")) == picture.resolve()
    assert picture.is_file()

    width, height = _png_size(picture.read_bytes())
    assert width > 200 and height > 200

    summary = _summary(result.stdout)
    assert {"grpcio round_robin", "grpc_leastconn"} <= set(demo.POLICY_NAMES)
    for policy in demo.POLICY_NAMES:
        assert re.search(rf"^\s+{re.escape(policy)}\s+\d+\.\d\d\s+\d+\s", summary, re.M), summary

    # Not a terminal: plain lines as before, no cursor movement.
    assert ESCAPE not in result.stdout
    assert any(" live streams {" in line for line in lines)


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_no_picture_skips_it(tmp_path: Path) -> None:
    result = _run("--no-picture", "--sessions", "4", "--long", "0.4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "picture:" not in result.stdout
    assert not (tmp_path / "demo.png").exists()
    for policy in demo.POLICY_NAMES:
        assert policy in _summary(result.stdout)


def _outcomes() -> list[object]:
    outcome = demo.Outcome("grpcio round_robin", spreads=[1, 2], peak={"Server 1": 2})
    outcome.samples = [(0.5, {"Server 1": 2, "Server 2": 0}), (1.0, {"Server 1": 0, "Server 2": 0})]
    return [outcome]


def test_without_matplotlib_the_demo_notes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    assert demo.save_picture(_outcomes(), tmp_path / "demo.png") is False
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "matplotlib is not installed" in out
    assert "picture:" not in out
    assert not (tmp_path / "demo.png").exists()


LIVE = {"Server 1": 3, "Server 2": 0, "Server 3": 1, "Server 4": 2}


def test_plain_table_is_one_line_without_escapes() -> None:
    text = demo.render_table(1.5, LIVE, tty=False)
    assert ESCAPE not in text and "\r" not in text
    assert text.endswith("\n") and text.count("\n") == 1
    assert text == f"  t= 1.5s live streams {json.dumps(LIVE)}\n"
    # The same with redraw: a plain line never moves the cursor.
    assert demo.render_table(1.5, LIVE, tty=False, redraw=True) == text


def test_terminal_table_redraws_in_place() -> None:
    first = demo.render_table(1.5, LIVE, tty=True)
    table_lines = first.count("\n")
    assert table_lines == 1 + len(LIVE)  # a header, then one line per backend
    assert "\x1b[" not in first.replace("\x1b[K", "")  # no cursor movement the first time
    for name, count in LIVE.items():
        assert re.search(rf"{name}\s+{count}\s+{'#' * count}\x1b\[K", first)

    again = demo.render_table(2.0, LIVE, tty=True, redraw=True)
    assert again.startswith(f"\x1b[{table_lines}A")
    rest = again.removeprefix(f"\x1b[{table_lines}A")
    assert rest.count("\n") == table_lines
    # Every line starts at the left margin and clears what the old one left.
    assert all(line.startswith("\r") and line.endswith("\x1b[K") for line in rest.split("\n")[:-1])


def test_live_table_gives_the_cursor_back() -> None:
    class Terminal:
        def __init__(self) -> None:
            self.text = ""

        def write(self, text: str) -> int:
            self.text += text
            return len(text)

        def flush(self) -> None:
            pass

    terminal = Terminal()
    table = demo.LiveTable(terminal, tty=True)
    table.show(0.5, LIVE)
    table.show(1.0, LIVE)
    table.close()
    assert terminal.text.startswith("\x1b[?25l")  # hidden while it redraws
    assert terminal.text.endswith("\n\x1b[?25h")  # shown again, on a fresh line
    assert terminal.text.count(f"\x1b[{1 + len(LIVE)}A") == 1
