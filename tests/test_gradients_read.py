"""Issue 18, items 1 and 5: gradient metrics come from the gradient the update consumed, read when it is about
to consume it — after Lightning's closure (training step, backward, clipping), before the optimizer may change
or drop it — and not at all for a group that had none.

Before: the post-step hook read ``p.grad``. schedule-free AdamW divides it in place, so ``effective_lr`` read
−83% and ``grad_cos`` 0.40 where the truth is 2.6e-5 (a false "not radially invariant" warning followed);
heavyball drops it, so ``sphere_grad_norm`` read 0.0 on every step and the others were missing; a step with
no gradient logged ``sphere_grad_norm`` 0.0. Each expected value here comes from ``tests/reference.py`` on a
capture taken by the test itself (``Capture``), or from the tensors the test computes by hand.
"""

from __future__ import annotations

import warnings

import pytest
import schedulefree
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_sphere import OptimizerRule, SphereMonitor, SphereTracker, find_invariant_groups, register_optimizer
from lightning_sphere.optimizers.registry import OPTIMIZERS
from tests import reference
from tests.conftest import bn_net
from tests.lightning_helpers import Capture, MemoryLogger, Net, assert_scalars_match, dataset, expected, fit

try:
    import heavyball  # needs numpy >= 2.3, so Python >= 3.11 (the floor job runs 3.10)
except ImportError:
    heavyball = None
HEAVYBALL = pytest.mark.skipif(heavyball is None, reason="heavyball is not installed (Python >= 3.11)")

GRADIENT_METRICS = ("effective_lr", "grad_cos", "sphere_grad_norm", "direction_cos")


@pytest.fixture(autouse=True)
def _heavyball_eager(monkeypatch):
    if heavyball is not None:
        monkeypatch.setattr(heavyball.utils, "compile_mode", None)  # heavyball compiles its kernels otherwise


class TrainMode(Net):
    """schedule-free optimizers must be put in training mode by the user."""

    def on_train_start(self):
        for optimizer in self.trainer.optimizers:
            getattr(optimizer, "train", lambda: None)()


OPTIMIZERS_THAT_TOUCH_THE_GRADIENT = {
    "schedulefree.AdamWScheduleFree": lambda p: schedulefree.AdamWScheduleFree(p, lr=1e-2, warmup_steps=0),
    "schedulefree.SGDScheduleFree": lambda p: schedulefree.SGDScheduleFree(p, lr=0.1, weight_decay=1e-2),
    "heavyball.AdamW": lambda p: heavyball.AdamW(p, lr=1e-2),
}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=HEAVYBALL) if "heavyball" in n else n for n in OPTIMIZERS_THAT_TOUCH_THE_GRADIENT]
)
def test_optimizers_that_change_or_drop_the_gradient_are_measured_on_the_one_they_consumed(name, tmp_path):
    capture, logger = Capture(), MemoryLogger()
    monitor = SphereMonitor(log_every_n_steps=1, per_layer=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(TrainMode(optimizer=OPTIMIZERS_THAT_TOUCH_THE_GRADIENT[name]), tmp_path, [monitor, capture], max_steps=3,
            logger=logger)  # fmt: skip
    records = logger.sphere()
    assert sorted(records) == [0, 1, 2]
    for step, scalars in records.items():  # the first step included: its tracker is built during it
        assert_scalars_match(scalars, expected(capture.steps[step], measured=True))
    assert not [w for w in caught if "invariant any more" in str(w.message)]


def test_a_registered_optimizer_whose_step_changes_the_gradient_after_all_logs_none_of_it(tmp_path):
    """An entry that says ``gradient_intact=True`` is checked on every measured step: a step that changed the
    gradient in place logs no gradient metric, with one warning naming the class by its module path."""

    class Doubling(torch.optim.SGD):
        def step(self, closure=None):
            loss = super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(2)
            return loss

    torch.optim.SGD([nn.Parameter(torch.zeros(1))])  # torch hooks SGD.step too: the hooks fire twice per step,
    # inside SGD.step and around Doubling.step, whose end is the end of the step
    register_optimizer(Doubling, OptimizerRule("Doubling", gradient_intact=True))
    try:
        logger = MemoryLogger()
        with pytest.warns(UserWarning, match=r"Doubling changed or dropped p\.grad in step\(\)") as record:
            fit(Net(optimizer=lambda p: Doubling(p, lr=0.1)), tmp_path, [SphereMonitor(log_every_n_steps=1)],
                max_steps=2, logger=logger)  # fmt: skip
    finally:
        del OPTIMIZERS[Doubling]
    assert sum("changed or dropped" in str(w.message) for w in record) == 1
    assert "test_gradients_read." in str(next(w.message for w in record if "changed or dropped" in str(w.message)))
    for scalars in logger.sphere().values():
        assert not [k for k in scalars if k.split("/")[1] in GRADIENT_METRICS]
        assert scalars["sphere/angular_update/all"] > 0  # the step itself is still measured


class SkipsStepOne(Net):
    """Step 1 returns no loss: Lightning skips its backward, and torch's SGD steps nothing."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx == 1 else loss


def test_a_step_without_gradient_logs_no_gradient_metric(tmp_path):
    capture, logger = Capture(), MemoryLogger()
    plain_sgd = lambda p: torch.optim.SGD(p, lr=0.1)  # noqa: E731 - without momentum or decay: nothing moves
    fit(SkipsStepOne(optimizer=plain_sgd), tmp_path, [SphereMonitor(log_every_n_steps=1, per_layer=True), capture],
        max_steps=3, logger=logger)  # fmt: skip
    records = logger.sphere()
    assert sorted(records) == [0, 1, 2]
    assert not [k for k in records[1] if k.split("/")[1] in GRADIENT_METRICS]  # before: sphere_grad_norm 0.0
    assert records[1]["sphere/angular_update/all"] == 0.0 and records[1]["sphere/norm/net.0"] > 0
    for step in (0, 2):
        assert_scalars_match(records[step], expected(capture.steps[step]))


def test_the_gradient_a_grad_scaler_leaves_scaled_for_a_fused_optimizer_is_read_unscaled():
    """A fused optimizer unscales the gradient itself, inside its step (GradScaler hands it ``grad_scale``): the
    gradient the update consumes is p.grad / grad_scale, which the test computes from its own copies."""
    model = bn_net(torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    x, y = dataset(16, torch.float32)[:16]
    tracker = SphereTracker(find_invariant_groups(model, x), [optimizer])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    seen = {}

    def copy(optimizer, args, kwargs):
        seen["x0"] = model[0].weight.detach().flatten(1).double().clone()
        seen["g"] = (model[0].weight.grad.flatten(1).double() / float(optimizer.grad_scale)).clone()

    optimizer.register_step_pre_hook(copy)
    tracker.arm()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(optimizer)
    scaler.update()
    scalars = tracker.collect().scalars
    want = reference.group_metrics(seen["x0"], model[0].weight.detach().flatten(1).double(), seen["g"], 1e-2)
    for metric in ("grad_cos", "sphere_grad_norm", "direction_cos"):
        got, expected_value = scalars[f"sphere/{metric}/0"], reference.summarize(want[metric], reference.REDUCE[metric])
        assert got == pytest.approx(expected_value, rel=1e-4, abs=1e-6), metric  # float32 weights and kernels


def test_the_gradient_of_x_k_is_read_before_a_closure_evaluates_others():
    """LBFGS evaluates its closure at several points; the metrics are defined with ∇L(x_k), its first."""
    model = bn_net()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    x, y = dataset(16)[:16]
    tracker = SphereTracker(find_invariant_groups(model, x), [optimizer])
    grads = []

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        grads.append(model[0].weight.grad.flatten(1).clone())
        return loss

    x0 = model[0].weight.detach().flatten(1).clone()
    tracker.arm()
    optimizer.step(closure)
    assert len(grads) > 1  # the gradient of the last evaluation, which the post-step hook used to read, differs
    scalars = tracker.collect().scalars
    want = reference.group_metrics(x0, model[0].weight.detach().flatten(1), grads[0], 0.5, measured=True)
    for metric in GRADIENT_METRICS:
        assert scalars[f"sphere/{metric}/0"] == pytest.approx(
            reference.summarize(want[metric], reference.REDUCE[metric]), rel=1e-9
        ), metric


def test_the_first_step_is_measured_on_the_clipped_gradient(tmp_path):
    """The tracker is built during the first step (its groups are verified on that step's gradients), after the
    step's pre-hook: the monitor reads that step's gradient after Lightning's clipping all the same."""
    capture, logger = Capture(), MemoryLogger()
    fit(Net(), tmp_path, [SphereMonitor(log_every_n_steps=1, per_layer=True), capture], max_steps=1, logger=logger,
        gradient_clip_val=0.05, gradient_clip_algorithm="norm")  # fmt: skip
    raw = Capture()
    fit(Net(), tmp_path, [raw], max_steps=1, logger=MemoryLogger())
    clipped, unclipped = capture.steps[0]["net.0"]["grad"], raw.steps[0]["net.0"]["grad"]
    assert not torch.allclose(clipped, unclipped)  # the clipping acted: the capture is the clipped gradient
    assert_scalars_match(logger.sphere()[0], expected(capture.steps[0]))


@HEAVYBALL
def test_a_refusal_names_a_third_party_optimizer_by_its_module_path(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"heavyball\.AdamW has no spherical form here"):
        fit(Net(optimizer=lambda p: heavyball.AdamW(p, lr=1e-2)), tmp_path, [SphereMonitor(spherical_correction=True)])


def test_the_step_that_ends_swas_batchnorm_epoch_is_measured_as_it_was_taken(tmp_path):
    """StochasticWeightAveraging (Lightning 2.6) adds an epoch that only updates BatchNorm's statistics: it skips
    backward and ``zero_grad``, and its one optimizer step consumes the previous step's gradients again, at the
    averaged weights. The metrics describe that step (the capture's gradient), not a made-up zero."""
    from pytorch_lightning.callbacks import StochasticWeightAveraging

    capture, logger = Capture(), MemoryLogger()
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)
    fit(Net(optimizer=lambda p: torch.optim.SGD(p, lr=0.1)), tmp_path, [SphereMonitor(log_every_n_steps=1,
        per_layer=True), swa, capture], max_steps=-1, max_epochs=2, logger=logger)  # fmt: skip
    records = logger.sphere()
    last = max(records)
    assert last == 8 and len(capture.steps) == 9  # two epochs of 4 steps, and the BatchNorm epoch's one
    torch.testing.assert_close(capture.steps[8]["net.0"]["grad"], capture.steps[7]["net.0"]["grad"], rtol=0, atol=0)
    assert_scalars_match(records[last], expected(capture.steps[last]))
