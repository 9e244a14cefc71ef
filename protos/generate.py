"""Regenerate the example service's Python code from protos/conference.proto.

Usage:
    python protos/generate.py          # write examples/conference_pb2*.py[i]
    python protos/generate.py --check  # exit 1 if the committed files are stale

The generated files are committed so that the examples run without
grpcio-tools installed; ``--check`` keeps them honest in CI.
"""

from __future__ import annotations

import argparse
import difflib
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = "protos"
OUT_DIR = "examples"
PROTO_FILES = ("conference.proto",)
GENERATED = ("conference_pb2.py", "conference_pb2_grpc.py", "conference_pb2.pyi")


def run_protoc(out_dir: Path) -> None:
    """Run grpc_tools.protoc with paths relative to the repo root.

    Running from the root with ``-Iprotos`` keeps the paths embedded in the
    generated descriptors independent of where the checkout lives.
    """
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *(f"{PROTO_DIR}/{name}" for name in PROTO_FILES),
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"protoc failed with exit code {result.returncode}: {' '.join(cmd)}")


def tool_versions() -> str:
    # protoc ships inside grpcio-tools, so its version pins the generated output.
    try:
        from importlib.metadata import version

        return f"grpcio-tools {version('grpcio-tools')}"
    except Exception:  # pragma: no cover - metadata lookups are best effort
        return "an unknown grpcio-tools version"


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        run_protoc(tmp_path)
        stale: list[str] = []
        for name in GENERATED:
            fresh = (tmp_path / name).read_text()
            committed_path = ROOT / OUT_DIR / name
            committed = committed_path.read_text() if committed_path.exists() else ""
            if fresh == committed:
                continue
            stale.append(name)
            diff = difflib.unified_diff(
                committed.splitlines(keepends=True),
                fresh.splitlines(keepends=True),
                fromfile=f"{OUT_DIR}/{name} (committed)",
                tofile=f"{OUT_DIR}/{name} (regenerated)",
                n=1,
            )
            sys.stderr.writelines(list(diff)[:40])
    if stale:
        sys.stderr.write(
            f"\nGenerated code is stale: {', '.join(f'{OUT_DIR}/{n}' for n in stale)}.\n"
            f"Run `python {PROTO_DIR}/generate.py` and commit the result "
            f"(regenerated with {tool_versions()}; a different grpcio-tools version "
            "also changes the output).\n"
        )
        return 1
    print(f"Generated code in {OUT_DIR}/ is up to date.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temporary directory and fail if the committed files differ",
    )
    args = parser.parse_args(argv)
    if args.check:
        return check()
    run_protoc(ROOT / OUT_DIR)
    print(f"Wrote {', '.join(f'{OUT_DIR}/{n}' for n in GENERATED)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
