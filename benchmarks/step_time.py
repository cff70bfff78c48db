"""Training-step time with SphereMonitor / without, in real ``pytorch_lightning`` Trainers."""

from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from benchmarks.measure import Row
from benchmarks.models import Classifier, ResNet18, synthetic_cifar
from benchmarks.settings import Settings
from lightning_sphere import SphereMonitor

#: A Trainer logging cadence longer than any benchmark: the monitor never measures.
NEVER = 10**9


@dataclass(frozen=True)
class Run:
    """One Trainer configuration: its logging cadence, and whether SphereMonitor is attached (same cadence)."""

    log_every_n_steps: int
    monitor: bool
    compiled: bool = False  # the network under torch.compile (the warm-up steps compile it)


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
    if run.compiled:
        torch._dynamo.reset()  # each run compiles afresh, as a new process would
        model.net = torch.compile(model.net)
    batches = settings.warmup + settings.steps + 1  # the last batch only ends the last timed step
    # An iterable of unknown length: the monitor, which also measures the last step of fit when the Trainer
    # knows it, then measures on logging steps only (the timed steps end before the last batch all the same).
    loader = _Unsized(DataLoader(synthetic_cifar(batches * settings.batch_size), batch_size=settings.batch_size))
    timer = StepTimer()
    monitor = SphereMonitor(log_every_n_steps=run.log_every_n_steps, histogram_every_n_steps=0) if run.monitor else None
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator=settings.device,
            devices=1,
            max_epochs=1,
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


class _Unsized:
    """A loader's batches, with no ``len``: fit's last step is then unknown to the Trainer."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Any:
        return iter(self.loader)


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
        print(f"step_time: repeat {repeat + 1}/{settings.repeats} done", file=sys.stderr, flush=True)
    return medians


def step_time_ratios(settings: Settings) -> list[Row]:
    """Step time with SphereMonitor / without, on non-logging and on logging steps (SGD-M, real logger).

    Each pair of Trainers differs only by the monitor: on logging steps both log the loss to TensorBoard
    every step and the monitor measures and logs every step (scalars; histograms off); on non-logging steps
    neither logs and the monitor is attached but never measures; the compiled pair is the non-logging one
    with the network under ``torch.compile`` (detection's step runs eagerly, the graphs compiled after it
    must be those of the run without the monitor). Each value is the ratio of the two runs' median step
    times within one repeat.
    """
    pairs = {
        "non-logging steps: step time with SphereMonitor / without": (NEVER, "≤ 1.01", False),
        "logging steps (monitor measures every step): step time with / without": (1, "", False),
        "non-logging steps, torch.compile'd network: step time with / without": (NEVER, "≤ 1.01", True),
    }
    runs = [Run(every, monitor, compiled) for every, _, compiled in pairs.values() for monitor in (False, True)]
    medians = measure(runs, settings)
    rows = []
    for name, (every, target, compiled) in pairs.items():
        without, with_ = medians[Run(every, False, compiled)], medians[Run(every, True, compiled)]
        ratios = [a / b for a, b in zip(with_, without, strict=True)]
        detail = f"{1e3 * statistics.median(with_):.1f} ms / {1e3 * statistics.median(without):.1f} ms"
        rows.append(Row(name, ratios, target, detail))
    return rows
