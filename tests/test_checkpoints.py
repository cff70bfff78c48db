"""Issue 18, item 4: every checkpoint written while the AdamG rewrite runs holds plain SGD's model.

The rewrite keeps each tracked group at unit norm and its real norm as a virtual radius r̂. Before, Lightning's
checkpoints saved the stored weights: row norms 1.0 where plain SGD's are about 0.6, so that fine-tuning such a
checkpoint without the monitor turned the filters r̂² ≈ 0.33 times as far as plain SGD would. Now every
``state_dict()`` of the model holds r̂ u and the BatchNorm statistics in that scale, whatever writes it; the
monitor's own state keeps the radii, from which a resumed run goes on with the rewrite as if never stopped.
The ground truth is plain SGD's run (eps = 1e-14: invariance, and so the rewrite, exact).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, OnExceptionCheckpoint

from lightning_sphere import SphereMonitor, SphereTracker, find_invariant_groups
from tests.conftest import bn_net
from tests.lightning_helpers import MemoryLogger, Net, dataset, fit


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, weight_decay=5e-3)  # no momentum: the AdamG rewrite


class SaveAt(pl.Callback):
    """``trainer.save_checkpoint`` in the middle of fit, whole and weights only, then an exception."""

    def __init__(self, folder: Path, step: int, fail_at: int) -> None:
        self.folder, self.step, self.fail_at = folder, step, fail_at

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.folder / "mid.ckpt")
            trainer.save_checkpoint(self.folder / "weights.ckpt", weights_only=True)
        if trainer.global_step == self.fail_at:
            raise RuntimeError("stop here")


def written(folder: Path, correction: bool) -> dict[str, dict[str, torch.Tensor]]:
    """Fit until an exception at step 5, writing every kind of checkpoint on the way; their state dicts."""
    callbacks = [
        ModelCheckpoint(dirpath=folder, every_n_train_steps=3, save_last=True, save_top_k=-1),
        OnExceptionCheckpoint(dirpath=folder),
        SaveAt(folder, step=3, fail_at=5),
    ]
    if correction:
        callbacks.insert(0, SphereMonitor(spherical_correction=True))
    with pytest.raises(RuntimeError, match="stop here"):
        fit(Net(optimizer=sgd, eps=1e-14), folder, callbacks, max_steps=8, enable_checkpointing=True)
    names = ("epoch=0-step=3.ckpt", "last.ckpt", "mid.ckpt", "weights.ckpt", "on_exception.ckpt")
    return {name: torch.load(folder / name, weights_only=False)["state_dict"] for name in names}


def test_every_checkpoint_written_under_the_rewrite_holds_plain_sgds_model(tmp_path):
    plain, rewritten = written(tmp_path / "plain", False), written(tmp_path / "rewritten", True)
    for name, state in plain.items():
        assert sorted(rewritten[name]) == sorted(state)
        for key, value in state.items():  # weights, biases, BatchNorm running statistics
            # round-off of the two runs, grown over five steps of lr 0.1 to 1e-10 at most
            torch.testing.assert_close(rewritten[name][key], value, rtol=1e-8, atol=1e-9, msg=f"{name}: {key}")
    rows = rewritten["mid.ckpt"]["net.0.weight"].flatten(1).norm(dim=1)
    assert (rows - 1).abs().min() > 0.05  # the real norms, not the stored unit ones


def test_a_checkpoint_written_under_the_rewrite_fine_tunes_as_plain_sgds(tmp_path):
    """Without the monitor: the same run as from plain SGD's checkpoint."""
    finals = {}
    for correction in (False, True):
        folder = tmp_path / str(correction)
        callbacks = [ModelCheckpoint(dirpath=folder, every_n_train_steps=4, save_top_k=-1)]
        callbacks += [SphereMonitor(spherical_correction=True)] if correction else []
        fit(Net(optimizer=sgd, eps=1e-14), folder, callbacks, max_steps=4, enable_checkpointing=True)
        model = Net(optimizer=sgd, eps=1e-14)
        model.load_state_dict(torch.load(folder / "epoch=0-step=4.ckpt", weights_only=False)["state_dict"])
        trainer = fit(model, folder, [], max_steps=6)
        finals[correction] = trainer.lightning_module.state_dict()
    for key, value in finals[False].items():
        torch.testing.assert_close(finals[True][key], value, rtol=1e-8, atol=1e-9, msg=key)


class StoredRows(pl.Callback):
    """The norms of net.0's stored rows at the end of every batch."""

    def __init__(self):
        self.norms = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.norms.append(pl_module.net[0].weight.detach().flatten(1).norm(dim=1).clone())


def test_resuming_goes_on_with_the_rewrite_as_if_never_stopped(tmp_path):
    """BatchNorm's eps = 1e-5: the rewrite and plain SGD differ by 1e-5 there, so only a rewrite that resumes
    from the same unit-norm weights before the first forward pass reproduces the uninterrupted run."""
    whole = fit(Net(optimizer=sgd), tmp_path / "whole", [SphereMonitor(spherical_correction=True)], max_steps=8)
    saving = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    fit(Net(optimizer=sgd), tmp_path / "first", [SphereMonitor(spherical_correction=True), saving], max_steps=4,
        enable_checkpointing=True)  # fmt: skip
    rows = StoredRows()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=8, logger=MemoryLogger(), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=[SphereMonitor(spherical_correction=True), rows],
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(Net(optimizer=sgd), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    for norms in rows.norms:  # the rewrite went on: unit rows during the resumed fit
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-12, atol=0)
    for key, value in whole.lightning_module.state_dict().items():
        torch.testing.assert_close(trainer.lightning_module.state_dict()[key], value, rtol=1e-12, atol=1e-14, msg=key)


def plain_loop(eps: float, correction: str | None, n: int, model=None, radii=None):
    """``n`` steps of SGD on one batch in a plain PyTorch loop, with a tracker (resuming ``radii`` if given)."""
    x, y = dataset(16)[:16]
    model = model or bn_net(eps=eps)
    optimizer = sgd(model.parameters())
    tracker = SphereTracker(find_invariant_groups(model, x), [optimizer], correction=correction, model=model)
    resumed = tracker.resume(radii) if radii is not None else []
    for _ in range(n):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model, tracker, resumed


def test_plain_pytorch_state_dicts_hold_the_real_weights():
    plain, _, _ = plain_loop(1e-14, None, 5)
    rewritten, tracker, _ = plain_loop(1e-14, "srt", 5)
    assert (rewritten[0].weight.detach().flatten(1).norm(dim=1) - 1).abs().max() < 1e-12  # stored: unit rows
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(rewritten.state_dict()[key], value, rtol=1e-8, atol=1e-9, msg=key)
    tracker.close()


def test_plain_pytorch_resumes_the_rewrite_from_the_real_weights_and_the_radii():
    """BatchNorm's eps = 1e-5: only the same unit-norm weights give the uninterrupted run's next steps."""
    whole, tracker, _ = plain_loop(1e-5, "srt", 8)
    tracker.close()
    model, tracker, _ = plain_loop(1e-5, "srt", 5)
    saved, radii = model.state_dict(), {k: r.clone() for k, r in tracker.radii().items()}
    tracker.close()
    resumed = bn_net()
    resumed.load_state_dict(saved)
    resumed, again, names = plain_loop(1e-5, "srt", 3, model=resumed, radii=radii)
    assert sorted(names) == ["0", "3"]
    again.close()
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-12, atol=1e-14, msg=key)
