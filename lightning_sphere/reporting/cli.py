"""The ``lightning-sphere`` command: ``lightning-sphere plot LOGDIR [-o OUTDIR]``
(see :mod:`lightning_sphere.reporting.plot`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="lightning-sphere", description="Tools for the logs of lightning_sphere.")
    commands = main.add_subparsers(dest="command", required=True)
    plot = commands.add_parser(
        "plot",
        help="PNG figures of the sphere/ metrics in TensorBoard event files",
        description="Write one PNG per logged sphere/ metric (every run a colour, every layer a panel), heat maps of "
        "the logged histograms, and an index.md listing them. Needs the plot extra: "
        'pip install -e ".[plot]" from a clone of the repository.',
    )
    plot.add_argument("logdir", type=Path, help="a TensorBoard log directory: one run, or many in subdirectories")
    plot.add_argument(
        "-o", "--outdir", type=Path, default=None, help="where the figures go (default: LOGDIR/sphere_plots)"
    )
    plot.add_argument("--metric", action="append", help="only this metric (repeatable), e.g. angular_update")
    plot.add_argument("--layer", action="append", help='only this layer\'s panels (repeatable), e.g. "all"')
    plot.add_argument("--no-progress", action="store_true", help="no progress bar")
    return main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 with a message on stderr for a bad directory)."""
    args = parser().parse_args(argv)
    from lightning_sphere.reporting.plot import plot

    outdir = args.outdir if args.outdir is not None else args.logdir / "sphere_plots"
    try:
        written = plot(args.logdir, outdir, metrics=args.metric, layers=args.layer, progress=not args.no_progress)
    except (ImportError, OSError, ValueError) as err:
        print(f"lightning-sphere plot: error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
