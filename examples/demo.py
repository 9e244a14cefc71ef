"""Why least-connection beats round-robin for long-lived streams.

Starts 4 local backends, then opens the same mix of video-conference sessions
(long and short ``Join`` streams, alternating, one every 0.1 s) three times
on one channel each: grpcio's own ``round_robin``, and ``grpc_leastconn``
with its two deterministic tie-breaks (``youngest``, the default, and
``round_robin``). While the sessions run it shows the live connection table
as each backend counts it (updated in place on a terminal, one line per
reading otherwise); at the end it compares the spread (busiest minus idlest
backend) side by side and draws the live streams per backend over time, one
panel per policy, into a PNG (needs matplotlib: ``pip install -e '.[examples]'``).

    python examples/demo.py [--sessions 24] [--long 6] [--short 0.6]
                            [--picture demo.png | --no-picture]

Sampling: the backends' counters are read every ``--sample`` seconds (0.1 by
default) for the live table and the picture. The spread statistics use only
the readings about every 0.5 s (``SPREAD_EVERY_S``), as before the picture
was added, so their numbers stay comparable with earlier runs; the peaks use
every reading.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import grpc

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import client as example_client  # noqa: E402
import server as example_server  # noqa: E402

import grpc_leastconn  # noqa: E402

ROUND_ROBIN_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
BACKENDS = 4
# The spread statistics' cadence; the live table and the picture may sample
# more often (--sample).
SPREAD_EVERY_S = 0.5
# A reading counts for the spread once it is at most this early for its mark:
# Event.wait may return a hair before its timeout.
_SPREAD_SLACK_S = 0.02
POLICY_NAMES = (
    "grpcio round_robin",
    "grpc_leastconn",
    "grpc_leastconn round_robin ties",
)


@dataclass
class Outcome:
    policy: str
    spreads: list[int] = field(default_factory=list)
    peak: dict[str, int] = field(default_factory=dict)
    # (seconds since the first session opened, live streams per backend)
    samples: list[tuple[float, dict[str, int]]] = field(default_factory=list)

    @property
    def mean_spread(self) -> float:
        return statistics.fmean(self.spreads) if self.spreads else 0.0

    @property
    def max_spread(self) -> int:
        return max(self.spreads, default=0)


# Live table -----------------------------------------------------------------

_CURSOR_HIDE = "\x1b[?25l"
_CURSOR_SHOW = "\x1b[?25h"
_CLEAR_TO_EOL = "\x1b[K"
_BAR_MAX = 40


def render_table(
    elapsed: float, live: Mapping[str, int], *, tty: bool, redraw: bool = False
) -> str:
    """The live table as text, ending with a newline.

    Not on a terminal: one plain line, ``  t= 1.5s live streams {...}``.
    On a terminal: a header line and one line per backend with a bar; with
    ``redraw`` it first moves the cursor up over the table drawn before (the
    same number of lines), and every line clears what is left of the old one.
    """
    if not tty:
        return f"  t={elapsed:4.1f}s live streams {json.dumps(dict(live))}\n"
    lines = [f"  t={elapsed:4.1f}s  live streams per backend"]
    for name, count in live.items():
        bar = "#" * min(count, _BAR_MAX)
        lines.append(f"    {name:<10}{count:>3}  {bar}")
    text = "".join(f"\r{line}{_CLEAR_TO_EOL}\n" for line in lines)
    return f"\x1b[{len(lines)}A{text}" if redraw else text


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


class LiveTable:
    """Shows the table in place on a terminal, or as plain lines elsewhere."""

    def __init__(self, stream: TextIO, tty: bool) -> None:
        self._stream = stream
        self._tty = tty
        self._drawn = False

    def show(self, elapsed: float, live: Mapping[str, int]) -> None:
        text = render_table(elapsed, live, tty=self._tty, redraw=self._drawn)
        if self._tty and not self._drawn:
            text = _CURSOR_HIDE + text
        self._drawn = True
        self._stream.write(text)
        self._stream.flush()

    def close(self) -> None:
        """Give the cursor back; the table always ends with a newline."""
        if self._tty and self._drawn:
            self._stream.write(_CURSOR_SHOW)
            self._stream.flush()


# Running the sessions ---------------------------------------------------------


def run_policy(
    policy: str,
    make_channel: Callable[[], grpc.Channel],
    backends: Sequence[example_server.Backend],
    durations: Sequence[float],
    interval: float,
    *,
    sample_s: float = 0.1,
    tty: bool = False,
) -> Outcome:
    outcome = Outcome(policy)
    names = {b.address: f"Server {i + 1}" for i, b in enumerate(backends)}
    table = LiveTable(sys.stdout, tty)
    next_spread_at = SPREAD_EVERY_S
    print(f"\n== {policy} ==", flush=True)

    def read() -> dict[str, int]:
        return {names[b.address]: b.servicer.live_streams for b in backends}

    def sample(elapsed: float) -> None:
        nonlocal next_spread_at
        live = read()
        outcome.samples.append((elapsed, live))
        for name, count in live.items():
            outcome.peak[name] = max(outcome.peak.get(name, 0), count)
        on_mark = elapsed >= next_spread_at - _SPREAD_SLACK_S
        if on_mark:
            while next_spread_at <= elapsed + _SPREAD_SLACK_S:
                next_spread_at += SPREAD_EVERY_S
            # As in the seed scenario's metric: compare only once there is
            # enough load for every backend to have a stream.
            if sum(live.values()) >= len(backends):
                outcome.spreads.append(max(live.values()) - min(live.values()))
        if tty or on_mark:
            table.show(elapsed, live)

    start = time.monotonic()
    try:
        with make_channel() as channel:
            example_client.run_sessions(
                channel, durations, interval, on_tick=sample, tick_s=sample_s
            )
        # A last reading once the backends have counted every end, so the
        # picture's lines come down to zero; it never counts for the spread.
        for backend in backends:
            backend.servicer.wait_until(lambda s: s.live_streams == 0, timeout=1.0)
        live = read()
        outcome.samples.append((time.monotonic() - start, live))
        if tty:
            table.show(outcome.samples[-1][0], live)
    finally:
        table.close()
    return outcome


# Picture --------------------------------------------------------------------


def save_picture(outcomes: Sequence[Outcome], path: Path, *, sessions_note: str = "") -> bool:
    """Draw live streams per backend over time, one panel per policy, into ``path``.

    Returns False (and prints a note) when matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        print("note: matplotlib is not installed, so no picture (pip install -e '.[examples]')")
        return False
    matplotlib.use("Agg")  # headless, before pyplot is imported
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = list(outcomes[0].peak) if outcomes else []
    colors = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(
        len(outcomes),
        1,
        sharex=True,
        sharey=True,
        figsize=(10, 2.6 * len(outcomes) + 1.2),
        layout="constrained",
        squeeze=False,
    )
    # Equal counts would hide one line under another: each backend's line is
    # drawn a little above or below the true value (at most +-0.1).
    offsets = [0.07 * (index - (len(names) - 1) / 2) for index in range(len(names))]
    for ax, outcome in zip(axes[:, 0], outcomes, strict=True):
        times = [0.0] + [t for t, _ in outcome.samples]
        for index, name in enumerate(names):
            counts = [offsets[index]] + [
                live.get(name, 0) + offsets[index] for _, live in outcome.samples
            ]
            ax.step(
                times,
                counts,
                where="post",
                color=colors[index % len(colors)],
                linewidth=1.8,
                label=name,
            )
        lows = [0] + [min(live.values(), default=0) for _, live in outcome.samples]
        highs = [0] + [max(live.values(), default=0) for _, live in outcome.samples]
        ax.fill_between(
            times,
            lows,
            highs,
            step="post",
            color="0.85",
            linewidth=0,
            zorder=0,
            label="spread (busiest - idlest)",
        )
        ax.set_title(outcome.policy, loc="left", fontweight="bold")
        ax.set_title(
            f"spread: mean {outcome.mean_spread:.2f}, max {outcome.max_spread}",
            loc="right",
        )
        ax.set_ylabel("live streams")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, axis="y", color="0.9", linewidth=0.8)
        ax.set_axisbelow(True)
        ax.margins(x=0.01)
    axes[-1, 0].set_xlabel(
        "seconds since the first session opened"
        " (lines are offset slightly so that equal counts stay visible)"
    )
    axes[0, 0].set_ylim(bottom=-0.3)
    title = "Live streams per backend over time"
    fig.suptitle(f"{title}\n{sessions_note}" if sessions_note else title)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# Command line ---------------------------------------------------------------


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=24)
    parser.add_argument("--long", type=_positive, default=6.0, help="long session, seconds")
    parser.add_argument("--short", type=_positive, default=0.6, help="short session, seconds")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between opens")
    parser.add_argument(
        "--sample",
        type=_positive,
        default=0.1,
        help="seconds between readings of the backends' counters for the table and the "
        f"picture (the spread statistics use one reading about every {SPREAD_EVERY_S}s)",
    )
    picture = parser.add_mutually_exclusive_group()
    picture.add_argument(
        "--picture",
        type=Path,
        default=Path("demo.png"),
        metavar="PATH",
        help="where to save the PNG (default: %(default)s in the current directory)",
    )
    picture.add_argument("--no-picture", action="store_true", help="do not draw the picture")
    args = parser.parse_args(argv)
    if args.sessions < 1:
        parser.error("--sessions must be at least 1")
    if args.interval < 0:
        parser.error("--interval must not be negative")

    tty = is_terminal(sys.stdout)
    backends = [example_server.start_backend() for _ in range(BACKENDS)]
    target = "ipv4:" + ",".join(b.address for b in backends)
    durations = example_client.mixed_durations(args.sessions, args.long, args.short)
    sessions_note = (
        f"{args.sessions} sessions, one every {args.interval}s, "
        f"alternating {args.long}s and {args.short}s"
    )
    print(f"{BACKENDS} backends: {target}")
    print(sessions_note)
    makers: list[Callable[[], grpc.Channel]] = [
        lambda: grpc.insecure_channel(
            target, options=[("grpc.service_config", ROUND_ROBIN_CONFIG)]
        ),
        lambda: grpc_leastconn.insecure_channel(target),
        lambda: grpc_leastconn.insecure_channel(target, tie_break="round_robin"),
    ]
    try:
        outcomes = [
            run_policy(
                name,
                make,
                backends,
                durations,
                args.interval,
                sample_s=args.sample,
                tty=tty,
            )
            for name, make in zip(POLICY_NAMES, makers, strict=True)
        ]
    finally:
        example_server.stop_backends(backends, grace=0.5, timeout=10)

    width = max(len("policy"), *(len(o.policy) for o in outcomes)) + 2
    print(
        f"\n== summary: live streams per backend (spread = busiest - idlest, "
        f"every {SPREAD_EVERY_S}s) =="
    )
    print(f"  {'policy':<{width}}{'mean spread':>12}{'max spread':>12}   peak live per backend")
    for outcome in outcomes:
        print(
            f"  {outcome.policy:<{width}}{outcome.mean_spread:>12.2f}{outcome.max_spread:>12d}"
            f"   {json.dumps(outcome.peak)}"
        )
    if not args.no_picture and save_picture(outcomes, args.picture, sessions_note=sessions_note):
        print(f"picture: {args.picture.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
