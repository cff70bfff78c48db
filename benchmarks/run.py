"""Measure what lightning_sphere costs, side by side in one run, and print a markdown table.

Each benchmark in :data:`BENCHMARKS` takes the :class:`~benchmarks.settings.Settings` and returns table
rows, one value per repeat; configurations are interleaved and repeated so that a drift of the
machine's speed hits all of them alike. Nothing here runs in CI.

Usage::

    python benchmarks/run.py                      # CPU, a few minutes
    python benchmarks/run.py --quick              # smoke run
    python benchmarks/run.py --device cuda        # see also benchmarks/gpu_check.py
    python benchmarks/run.py --only logging_step correction
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pytorch_lightning as pl
import torch

if not __package__:  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning_sphere
from benchmarks.correction import end_to_end, optimizer_step
from benchmarks.logging_step import host_syncs, monitor_work
from benchmarks.measure import Row
from benchmarks.settings import Settings
from benchmarks.step_time import step_time_ratios

#: Benchmark name → function of the settings returning its rows.
BENCHMARKS: dict[str, Callable[[Settings], list[Row]]] = {
    "step_time": step_time_ratios,
    "logging_step": monitor_work,
    "host_syncs": host_syncs,
    "correction": end_to_end,
    "optimizer_step": optimizer_step,
}


def machine(device: str) -> str:
    """The accelerator or CPU model, core count and torch threads."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} cores, torch threads: {torch.get_num_threads()}"


def header(settings: Settings) -> str:
    """Machine, versions and settings, as markdown lines."""
    return "\n".join(
        [
            f"**Machine:** {machine(settings.device)}  ",
            f"**Versions:** torch {torch.__version__}, pytorch_lightning {pl.__version__}, "
            f"lightning_sphere {lightning_sphere.__version__}, Python {platform.python_version()}  ",
            f"**Workload:** ResNet-18 (CIFAR variant, 11.2M parameters, 20 tracked modules, 4,800 groups) on "
            f"32×32 inputs, {settings.device}; Trainer rows at batch {settings.batch_size}; {settings.steps} "
            f"timed steps or calls after {settings.warmup} warm-up ones per run, {settings.repeats} repeats",
        ]
    )


def markdown_table(rows: Sequence[Row]) -> str:
    """One line per row: median over repeats, the target and whether it is met, the spread, the numbers behind."""
    lines = [
        "| measurement | target | median | met | spread (min–max) | repeats | numbers behind it |",
        "|---|---|---:|---|---:|---:|---|",
    ]
    for row in rows:
        spread = f"{min(row.values):.3f}–{max(row.values):.3f}"
        cells = (row.name, row.target, f"{row.median:.3f}", row.met, spread, str(len(row.values)), row.detail)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, list[str]]:
    """The settings and the names of the benchmarks to run, from the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default: cpu")
    parser.add_argument("--batch-size", type=int, help="Trainer benchmarks' batch (default: 16 CPU, 64 CUDA)")
    parser.add_argument("--warmup", type=int, help="untimed steps at the start of each run (default: 3 CPU, 10 CUDA)")
    parser.add_argument("--steps", type=int, help="timed steps per run (default: 10 CPU, 50 CUDA)")
    parser.add_argument("--repeats", type=int, help="rounds of interleaved runs (default: 5 CPU, 7 CUDA)")
    parser.add_argument("--quick", action="store_true", help="tiny defaults for a smoke run")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(BENCHMARKS),
        default=list(BENCHMARKS),
        metavar="NAME",
        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    overrides = {
        name: value
        for name in ("batch_size", "warmup", "steps", "repeats")
        if (value := getattr(args, name)) is not None
    }
    if any(value < 1 for value in overrides.values()):
        parser.error("--batch-size, --warmup, --steps and --repeats must be at least 1")
    return replace(Settings.defaults(args.device, args.quick), **overrides), args.only


def quiet() -> None:
    """Trainer banners and the monitor's summary would repeat for every run."""
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", ".*has no logger.*")


def main(argv: Sequence[str] | None = None) -> list[Row]:
    settings, names = parse_args(argv)
    quiet()
    start = time.perf_counter()
    rows = [row for name in names for row in BENCHMARKS[name](settings)]
    print(header(settings), end="\n\n")
    print(markdown_table(rows), end="\n\n")
    print(
        "Ratios are taken within each repeat between configurations run in turn (order reversed every other "
        f"repeat); median and min–max over repeats. Measured in {time.perf_counter() - start:.0f} s."
    )
    return rows


if __name__ == "__main__":
    main()
