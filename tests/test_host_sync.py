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
    """Opens (first in the callback list) or closes (last) the counting window around steps 2.."""

    def __init__(self, counter, opens):
        self.counter, self.opens = counter, opens

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.opens and trainer.global_step >= 2:  # the first steps include one-time group detection
            self.counter.active = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.opens:
            self.counter.active = False


@pytest.mark.parametrize("correction", [False, True])
@pytest.mark.parametrize(
    "optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    ],
)
def test_non_logging_steps_add_no_host_sync(tmp_path, monkeypatch, optimizer, correction):
    """Also while the spherical correction rewrites every step."""
    counts = []
    for with_monitor in (False, True):
        counter = SyncCounter(monkeypatch)
        monitors = [SphereMonitor(log_every_n_steps=1000, spherical_correction=correction)] if with_monitor else []
        callbacks = [Window(counter, opens=True), *monitors, Window(counter, opens=False)]
        fit(Net(optimizer=optimizer), tmp_path, callbacks, max_steps=6, log_every_n_steps=1000)
        counts.append(counter.calls)
        monkeypatch.undo()
    without, with_ = counts
    assert with_ == without
    assert monitors[0].groups  # the monitor was really tracking groups during those steps
    assert ("correction" in monitors[0].summary()) == correction  # and correcting them, when asked


def test_the_counter_sees_syncs(monkeypatch):
    counter = SyncCounter(monkeypatch)
    counter.active = True
    torch.ones(2).sum().item()
    torch.ones(2).tolist()
    assert counter.calls == {"item": 1, "tolist": 1}
