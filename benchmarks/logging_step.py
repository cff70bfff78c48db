"""What a logging step costs the monitor: its own work against one copy of the tracked weights, its extra
peak memory against their size, and its host syncs."""

from __future__ import annotations

import statistics
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from benchmarks.measure import SYNCING, Row, count_syncs, interleaved, peak_memory
from benchmarks.models import IMAGE_SHAPE, Classifier, ResNet18, synthetic_cifar
from benchmarks.settings import Settings
from lightning_sphere import SphereMonitor, SphereTracker, find_invariant_groups

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "SGD-M": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=5e-4),
    # outside the registry: its step may change the gradient, which a logging step therefore copies first
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, weight_decay=5e-4),
}
#: The targets (work, memory) per optimizer: the registered ones read the gradient in place.
TARGETS = {"SGD-M": ("≤ 3", "≤ 1.1"), "Adam": ("≤ 3", "≤ 1.1"), "RMSprop": ("≤ 4", "≤ 2.1")}


def _setup(settings: Settings, optimizer: str) -> tuple[torch.optim.Optimizer, SphereTracker, list[torch.Tensor]]:
    """A ResNet-18 with gradients, its optimizer (stepped once) and a tracker of its groups."""
    device = settings.torch_device
    torch.manual_seed(0)
    model = ResNet18().to(device)
    x = torch.randn(settings.batch_size, *IMAGE_SHAPE, device=device)
    groups = find_invariant_groups(model, x)
    F.cross_entropy(model(x), torch.randint(10, (len(x),), device=device)).backward()
    opt = OPTIMIZERS[optimizer](model.parameters())
    opt.step()
    return opt, SphereTracker(groups, [opt]), [p for g in groups for p in g.params]


def monitor_work(settings: Settings) -> list[Row]:
    """The monitor's work on a logging step (snapshot, per-group sums, metrics, one transfer: an armed
    optimizer step plus ``collect``, less a plain step) / one ``_foreach_copy_`` of the tracked weights;
    and its extra peak memory (the snapshot plus temporaries) / the tracked weights' size."""
    rows = [row for name in OPTIMIZERS for row in _monitor_work(settings, name)]
    print("logging_step: done", file=sys.stderr, flush=True)
    return rows


def _monitor_work(settings: Settings, optimizer: str) -> list[Row]:
    opt, tracker, params = _setup(settings, optimizer)
    buffers = [torch.empty_like(p) for p in params]

    def measured() -> None:
        tracker.arm()
        opt.step()
        tracker.collect()

    for _ in range(max(settings.warmup, 2)):  # compiles the kernels, allocates the snapshot buffers
        measured()
    calls = {"copy": lambda: torch._foreach_copy_(buffers, params), "plain": opt.step, "measured": measured}
    times = interleaved(calls, settings.repeats, settings.steps, settings.torch_device)
    work = [m - p for m, p in zip(times["measured"], times["plain"], strict=True)]
    ratios = [w / c for w, c in zip(work, times["copy"], strict=True)]
    detail = f"{1e3 * statistics.median(work):.2f} ms / {1e3 * statistics.median(times['copy']):.2f} ms"
    name = f"logging step ({optimizer}): monitor's work / one copy of the tracked weights"
    rows = [Row(name, ratios, TARGETS[optimizer][0], detail)]

    tracked = sum(p.numel() * p.element_size() for p in params)
    kept = [b for probe in tracker._probes for b in (*probe.buffers, *probe.gradient_buffers)]
    snapshot = sum(b.numel() * b.element_size() for b in kept)  # x_k, and g_k where it is copied
    temporaries = max(0, peak_memory(measured, settings.torch_device) - peak_memory(opt.step, settings.torch_device))
    detail = f"{snapshot / 2**20:.1f} MiB snapshot + {temporaries / 2**20:.1f} MiB / {tracked / 2**20:.1f} MiB"
    name = f"logging step ({optimizer}): extra peak memory / tracked weights"
    rows.append(Row(name, [(snapshot + temporaries) / tracked], TARGETS[optimizer][1], detail))
    tracker.close()
    return rows


class _Counting:
    """Counts host syncs from ``open`` to ``close``, one count per window."""

    def __init__(self) -> None:
        self.counts: list[dict[str, int]] = []
        self._window: Any = None

    def open(self) -> None:
        self._window = count_syncs()
        self.counts.append(self._window.__enter__())

    def close(self) -> None:
        if self._window is not None:
            self._window.__exit__(None, None, None)
            self._window = None


class _Opens(pl.Callback):
    """First in the callbacks: opens a window at each batch after the first two (one-time detection)."""

    def __init__(self, counting: _Counting) -> None:
        self.counting = counting

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= 2:
            self.counting.open()


class _Closes(pl.Callback):
    """Last in the callbacks: closes the window after every other callback's ``on_train_batch_end``."""

    def __init__(self, counting: _Counting) -> None:
        self.counting = counting

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.counting.close()


def host_syncs(settings: Settings) -> list[Row]:
    """Host syncs the monitor adds to a training step, counted as calls of syncing tensor methods with and
    without it (a CPU run counts what would sync on a GPU): any such call on non-logging steps; calls of
    ``.cpu()`` and ``.item()`` on logging steps, where its one device→host transfer is expected."""
    rows = []
    for label, every, methods, target in (
        ("non-logging", 10**9, SYNCING, "≤ 0"),
        ("logging", 1, ("cpu", "item"), "≤ 1"),
    ):
        per_step = {}
        for monitored in (False, True):
            counting = _Counting()
            monitor = [SphereMonitor(log_every_n_steps=every, histogram_every_n_steps=0)] if monitored else []
            steps = 2 + settings.steps
            loader = DataLoader(synthetic_cifar(steps * 2), batch_size=2)
            with tempfile.TemporaryDirectory() as root:
                trainer = pl.Trainer(
                    accelerator=settings.device, devices=1, max_steps=steps, logger=False,
                    callbacks=[_Opens(counting), *monitor, _Closes(counting)], log_every_n_steps=every,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=root,
                )  # fmt: skip
                trainer.fit(Classifier(ResNet18()), loader)
            per_step[monitored] = [sum(c.get(m, 0) for m in methods) for c in counting.counts]
        added = [a - b for a, b in zip(per_step[True], per_step[False], strict=True)]
        rows.append(Row(f"host syncs the monitor adds per {label} step", added, target, f"{len(added)} steps"))
    return rows
