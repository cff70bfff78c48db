"""What the examples share: the BatchNorm conv block, a fresh log folder per invocation, the commands that show
it, reading a logged series back, a mean ± std over seeds and quieting Lightning's informational lines. Plain
PyTorch only (TensorBoard's reader imported where it is used), so that ``plain_torch.py`` stays free of
Lightning."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from torch import nn


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Conv → BatchNorm → ReLU: each output channel of the conv is a radially invariant group."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(out_channels),
            relu=nn.ReLU(),
        )
    )


def default_logdir(prefix: str, root: str | Path = "lightning_logs") -> Path:
    """A new folder ``<root>/<prefix>-YYYYmmdd-HHMMSS`` (``-2``, ``-3``, … if one exists): one per invocation."""
    stem = Path(root) / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    logdir, number = stem, 1
    while logdir.exists():
        number += 1
        logdir = stem.with_name(f"{stem.name}-{number}")
    return logdir


def _next_to_python(program: str) -> str:
    """``program`` as installed next to this Python (a venv's), relative when below the working directory; else
    the bare name, found on PATH."""
    executable = Path(sys.executable).parent / program
    if not executable.exists():
        return program
    relative = os.path.relpath(executable)
    return str(executable) if relative.startswith("..") else relative


def tensorboard_command(logdir: Path) -> str:
    """The command that shows ``logdir`` in TensorBoard."""
    return f"{_next_to_python('tensorboard')} --logdir {logdir}"


def plot_command(logdir: Path) -> str:
    """The command that draws ``logdir``'s figures into ``<logdir>/figures`` (the ``plot`` extra: matplotlib)."""
    return f"{_next_to_python('lightning-sphere')} plot {logdir} -o {logdir / 'figures'}"


def logged_series(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every point of one scalar in a run's TensorBoard event files, read by TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def final_angular_update(run_dir: Path, steps: int, share: float) -> float:
    """RMS of the logged ``sphere/angular_update/all`` over the last ``share`` of ``steps`` (rad); NaN if none."""
    series = logged_series(run_dir, "sphere/angular_update/all")
    tail = [value for step, value in series if step >= (1 - share) * steps]
    return math.sqrt(sum(value * value for value in tail) / len(tail)) if tail else math.nan


def mean_std(values: list[float], fmt: str) -> str:
    """``mean ± std`` (the sample standard deviation) of ``values`` in ``fmt`` (the std without a sign ``fmt``
    may ask for); the value alone for one seed, "–" if any is NaN."""
    if any(math.isnan(v) for v in values):
        return "–"
    if len(values) == 1:  # one seed: no spread to show
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt.replace('+', ''))}"


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Drop Lightning's informational lines (devices, tips, "fit stopped"), printed once per run; the levels are
    restored on exit, for a caller that imports the example."""
    names = ("pytorch_lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
