"""Measure what SphereMonitor costs a training step, and print the ratios as a markdown table.

Each benchmark in :data:`BENCHMARKS` takes the :class:`Settings` and returns table :class:`Row` objects,
one value per repeat. Step times come from real ``pytorch_lightning`` Trainers whose configurations
(:class:`Run`) are interleaved and repeated, so that drift in the machine's speed hits all of them alike.

Usage::

    python benchmarks/run.py              # CPU, a few minutes
    python benchmarks/run.py --quick      # smoke run, seconds
    python benchmarks/run.py --device cuda

Reuse::

    from benchmarks.run import Settings, step_time_ratios, markdown_table
    print(markdown_table(step_time_ratios(Settings.defaults("cpu", quick=True))))
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

if not __package__:  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning_sphere
from benchmarks.models import IMAGE_SHAPE, Classifier, ResNet18, synthetic_cifar
from lightning_sphere import SphereMonitor, find_invariant_groups

#: A Trainer logging cadence longer than any benchmark: the monitor never measures.
NEVER = 10**9


@dataclass(frozen=True)
class Settings:
    """How much to measure, and where."""

    device: str = "cpu"
    batch_size: int = 16
    warmup: int = 3  # steps discarded at the start of each run; the first also finds the groups
    steps: int = 10  # timed steps per run
    repeats: int = 5  # rounds of interleaved runs

    @classmethod
    def defaults(cls, device: str = "cpu", quick: bool = False) -> Settings:
        """Defaults for ``device``: a few minutes on a 2-core CPU; ``quick`` is a smoke run of seconds."""
        if quick:
            return cls(device, batch_size=4 if device == "cpu" else 16, warmup=1, steps=3, repeats=2)
        if device == "cuda":
            return cls(device, batch_size=64, warmup=10, steps=50, repeats=7)
        return cls(device)


@dataclass(frozen=True)
class Run:
    """One Trainer configuration: its logging cadence, and whether SphereMonitor is attached (same cadence)."""

    log_every_n_steps: int
    monitor: bool


@dataclass(frozen=True)
class Row:
    """A table row: one measured ratio per repeat, and the medians behind it as text."""

    name: str
    values: list[float]
    detail: str = ""


class StepTimer(pl.Callback):
    """Records the time at the start of every training batch; its durations span whole loop iterations.

    Start-to-start intervals include everything a step costs, whichever hook it runs in: data fetching,
    every callback, and Lightning's own logging after ``on_train_batch_end``. Put it first in the callbacks.
    """

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.starts.append(time.perf_counter())

    @property
    def durations(self) -> list[float]:
        """Seconds from each batch start to the next."""
        return [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)]


def time_steps(run: Run, settings: Settings) -> list[float]:
    """Train a fresh ResNet-18 for ``warmup + steps`` steps under ``run``; the durations of the timed steps (s).

    Raises:
        RuntimeError: if the monitor measured nothing on logging steps, or something on non-logging steps.
    """
    torch.manual_seed(0)
    model = Classifier(ResNet18())
    batches = settings.warmup + settings.steps + 1  # the last batch only ends the last timed step
    loader = DataLoader(synthetic_cifar(batches * settings.batch_size), batch_size=settings.batch_size)
    timer = StepTimer()
    monitor = SphereMonitor(log_every_n_steps=run.log_every_n_steps, histogram_every_n_steps=0) if run.monitor else None
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator=settings.device,
            devices=1,
            max_steps=batches,
            logger=TensorBoardLogger(root, name="", version=""),
            log_every_n_steps=run.log_every_n_steps,
            callbacks=[timer] if monitor is None else [timer, monitor],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
        )
        trainer.fit(model, loader)
    if monitor is not None and bool(monitor.metrics) != (run.log_every_n_steps != NEVER):
        raise RuntimeError(f"SphereMonitor logged {len(monitor.metrics)} values under {run}: not what was planned")
    return timer.durations[settings.warmup :]


def measure(runs: Sequence[Run], settings: Settings) -> dict[Run, list[float]]:
    """The median step time of each run in each repeat (s), running them in turn: A B C D, D C B A, A B C D, …

    Reversing the order every other repeat keeps neighbours neighbours (compare runs adjacent in ``runs``)
    while no run always goes first.
    """
    medians: dict[Run, list[float]] = {run: [] for run in runs}
    for repeat in range(settings.repeats):
        for run in runs if repeat % 2 == 0 else runs[::-1]:
            gc.collect()
            medians[run].append(statistics.median(time_steps(run, settings)))
        print(f"repeat {repeat + 1}/{settings.repeats} done", file=sys.stderr, flush=True)
    return medians


def step_time_ratios(settings: Settings) -> list[Row]:
    """Step time with SphereMonitor / without, on non-logging and on logging steps.

    Each pair of Trainers differs only by the monitor: on logging steps both log the loss to TensorBoard
    every step and the monitor measures and logs every step (scalars; histograms off); on non-logging steps
    neither logs and the monitor is attached but never measures. Each value is the ratio of the two runs'
    median step times within one repeat.
    """
    pairs = {
        "non-logging steps: step time with SphereMonitor / without": NEVER,
        "logging steps: step time with SphereMonitor / without": 1,
    }
    runs = [Run(every, monitor) for every in pairs.values() for monitor in (False, True)]
    medians = measure(runs, settings)
    rows = []
    for name, every in pairs.items():
        without, with_ = medians[Run(every, False)], medians[Run(every, True)]
        ratios = [a / b for a, b in zip(with_, without, strict=True)]
        detail = f"{1e3 * statistics.median(with_):.1f} ms / {1e3 * statistics.median(without):.1f} ms"
        rows.append(Row(name, ratios, detail))
    return rows


#: Benchmark name → function of the settings returning its rows.
BENCHMARKS: dict[str, Callable[[Settings], list[Row]]] = {
    "step_time": step_time_ratios,
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
    """Machine, versions, workload and settings, as markdown lines."""
    model = ResNet18()
    groups = find_invariant_groups(model, torch.randn(2, *IMAGE_SHAPE))
    params = sum(p.numel() for p in model.parameters())
    return "\n".join(
        [
            f"**Machine:** {machine(settings.device)}  ",
            f"**Versions:** torch {torch.__version__}, pytorch_lightning {pl.__version__}, "
            f"lightning_sphere {lightning_sphere.__version__}, Python {platform.python_version()}  ",
            f"**Workload:** ResNet-18 (CIFAR, {params / 1e6:.1f}M parameters; SphereMonitor tracks {len(groups)} "
            f"modules, {sum(g.num_groups for g in groups):,} groups), SGD, batch {settings.batch_size} of 32×32 on "
            f"{settings.device}; {settings.steps} timed steps after {settings.warmup} warm-up steps per run",
        ]
    )


def markdown_table(rows: Sequence[Row]) -> str:
    """One line per row: median over repeats, min–max spread, number of repeats, the medians behind it."""
    lines = [
        "| measurement | ratio (median) | spread (min–max) | repeats | medians behind the ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        spread = f"{min(row.values):.3f}–{max(row.values):.3f}"
        lines.append(
            f"| {row.name} | {statistics.median(row.values):.3f} | {spread} | {len(row.values)} | {row.detail} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, list[str]]:
    """The settings and the names of the benchmarks to run, from the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default: cpu")
    parser.add_argument("--batch-size", type=int, help="default: 16 on CPU, 64 on CUDA")
    parser.add_argument("--warmup", type=int, help="untimed steps at the start of each run (default: 3 CPU, 10 CUDA)")
    parser.add_argument("--steps", type=int, help="timed steps per run (default: 10 CPU, 50 CUDA)")
    parser.add_argument("--repeats", type=int, help="rounds of interleaved runs (default: 5 CPU, 7 CUDA)")
    parser.add_argument("--quick", action="store_true", help="tiny defaults for a smoke run of seconds")
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


def main(argv: Sequence[str] | None = None) -> None:
    settings, names = parse_args(argv)
    for name in ("pytorch_lightning", "lightning_fabric"):  # Trainer banners and the monitor's summary, per run
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    start = time.perf_counter()
    rows = [row for name in names for row in BENCHMARKS[name](settings)]
    print(header(settings), end="\n\n")
    print(markdown_table(rows), end="\n\n")
    print(
        f"Each value: ratio of the two runs' median step times within one repeat (runs interleaved, order reversed "
        f"every other repeat); median and min–max over repeats. Measured in {time.perf_counter() - start:.0f} s."
    )


if __name__ == "__main__":
    main()
