"""Steps that are not logging steps cost no host synchronization: the monitor only checks a flag."""

import pytest
import pytorch_lightning as pl
import torch

from lightning_sphere import SphereMonitor
from tests.lightning_helpers import Net, fit

#: Tensor methods that copy device data to the host (or wait for it).
SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__array__")


class SyncCounter:
    """Counts calls to host-syncing tensor methods while ``active``."""

    def __init__(self, monkeypatch):
        self.active = False
        self.calls: dict[str, int] = {}
        for name in SYNCING:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(tensor, *args, **kwargs):
            if self.active:
                self.calls[name] = self.calls.get(name, 0) + 1
            return original(tensor, *args, **kwargs)

        return counted


class Window(pl.Callback):
    """Opens (first in the callback list) or closes (last) a window around the non-logging steps from step 2 on.

    ``switch`` is anything with an ``active`` flag: a :class:`SyncCounter`, or CUDA's sync debug mode. The
    opening end notes the steps it opened at.
    """

    def __init__(self, switch, opens, log_every=None):
        self.switch, self.opens, self.log_every = switch, opens, log_every
        self.opened: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        # logging steps, and the last step of fit, which the monitor measures too
        logging = self.log_every is not None and ((step + 1) % self.log_every == 0 or step + 1 == trainer.max_steps)
        if self.opens and step >= 2 and not logging:  # the first steps include one-time group detection
            self.switch.active = True
            self.opened.append(step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.opens:
            self.switch.active = False

    def on_exception(self, trainer, pl_module, exception):
        self.switch.active = False


def fit_windowed(
    tmp_path, switch, optimizer, monitors, log_every=1000, max_steps=6, module=Net, **trainer_options
):  # fmt: skip
    """Fit ``module`` (a ``Net`` class) with ``monitors`` inside a :class:`Window` on ``switch``; Lightning logs
    every ``log_every`` steps. Returns the trainer and the steps the window opened at."""
    opening = Window(switch, opens=True, log_every=log_every)
    callbacks = [opening, *monitors, Window(switch, opens=False)]
    options = dict(max_steps=max_steps, log_every_n_steps=log_every) | trainer_options
    trainer = fit(module(optimizer=optimizer), tmp_path, callbacks, **options)
    return trainer, opening.opened


OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("correction", [False, True])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS.values()), ids=list(OPTIMIZERS))
def test_non_logging_steps_add_no_host_sync(tmp_path, monkeypatch, optimizer, correction):
    """Also while the spherical correction rewrites every step."""
    counts = []
    for with_monitor in (False, True):
        counter = SyncCounter(monkeypatch)
        monitors = [SphereMonitor(log_every_n_steps=1000, spherical_correction=correction)] if with_monitor else []
        fit_windowed(tmp_path, counter, optimizer, monitors)
        counts.append(counter.calls)
        monkeypatch.undo()
    without, with_ = counts
    assert with_ == without
    assert monitors[0].groups  # the monitor was really tracking groups during those steps
    assert ("correction" in monitors[0].summary()) == correction  # and correcting them, when asked


@pytest.mark.parametrize(
    "optimizer, correction",
    [("sgd-momentum", "rotational"), ("adamw", "rotational"), ("adamw", "hyperball")],
)
def test_rotational_and_hyperball_steps_add_no_host_sync(tmp_path, monkeypatch, optimizer, correction):
    """§9's modes: the copy of x_k, the per-group sums, the state and a learning rate held constant stay on the
    device (a scheduled one costs a non-blocking copy, not a sync)."""
    counts = []
    for with_monitor in (False, True):
        counter = SyncCounter(monkeypatch)
        monitors = [SphereMonitor(log_every_n_steps=1000, spherical_correction=correction)] if with_monitor else []
        fit_windowed(tmp_path, counter, OPTIMIZERS[optimizer], monitors)
        counts.append(counter.calls)
        monkeypatch.undo()
    without, with_ = counts
    assert with_ == without
    assert correction in monitors[0].summary()


@pytest.mark.parametrize("correction", [False, True])
def test_steps_between_logging_steps_add_no_host_sync(tmp_path, monkeypatch, correction):
    """Measuring every third step: the steps right after a measured one cost no sync either."""
    counts = []
    for with_monitor in (False, True):
        counter = SyncCounter(monkeypatch)
        monitors = [SphereMonitor(log_every_n_steps=3, spherical_correction=correction)] if with_monitor else []
        trainer, opened = fit_windowed(tmp_path, counter, OPTIMIZERS["adamw"], monitors, log_every=3, max_steps=9)
        counts.append(counter.calls)
        monkeypatch.undo()
    without, with_ = counts
    assert with_ == without
    assert opened == [3, 4, 6, 7]  # steps 2, 5 and 8 log
    assert sorted(trainer.logger.sphere()) == [2, 5, 8]  # and were measured


def test_the_counter_sees_syncs(monkeypatch):
    counter = SyncCounter(monkeypatch)
    counter.active = True
    torch.ones(2).sum().item()
    torch.ones(2).tolist()
    assert counter.calls == {"item": 1, "tolist": 1}
