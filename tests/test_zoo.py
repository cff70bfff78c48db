"""Detection on the architectures users bring, against groups counted by hand."""

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lightning_sphere import SphereMonitor, find_invariant_groups
from lightning_sphere.detection.gradient_test import gradient_cosines
from tests import zoo


def build(name):
    torch.manual_seed(0)
    factory, shape, expected, rejected = zoo.ZOO[name]
    return factory(), torch.randn(shape), expected, rejected


def real_gradients(model, x):
    """Gradients of a real classification loss on random labels, in training mode."""
    model.train()
    model.zero_grad()
    F.cross_entropy(model(x), torch.randint(0, 10, (x.shape[0],))).backward()


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_detects_exactly_the_hand_counted_groups(name):
    model, x, expected, rejected = build(name)
    groups = find_invariant_groups(model, x)
    got = {g.module_name: (g.num_groups, g.group_size, g.norm_name, g.granularity) for g in groups}
    assert got == {n: (e.num_groups, e.dim, e.norm, e.granularity) for n, e in expected.items()}
    for module, reason in rejected.items():
        assert reason in groups.rejected[module], (module, groups.rejected[module])


@pytest.mark.parametrize("name", [n for n in zoo.ZOO if zoo.ZOO[n][2]])
def test_every_tracked_group_is_orthogonal_to_its_gradient_on_a_real_batch(name):
    model, x, expected, _ = build(name)
    groups = {g.module_name: g for g in find_invariant_groups(model, x)}
    real_gradients(model, x)
    for module, spec in expected.items():  # float32, as trained
        weights, grads = spec.rows(model, lambda p: p.detach()), spec.rows(model, lambda p: p.grad)
        cos = ((weights * grads).sum(1) / (weights.norm(dim=1) * grads.norm(dim=1))).abs()
        assert cos.max() <= 1e-3, module  # invariant groups show 1e-7…1e-4 in float32
    model.double()
    real_gradients(model, x.double())
    for module, spec in expected.items():
        weights = spec.rows(model, lambda p: p.detach())
        grads = spec.rows(model, lambda p: p.grad)
        assert weights.shape == (spec.num_groups, spec.dim)
        cos = ((weights * grads).sum(1) / (weights.norm(dim=1) * grads.norm(dim=1))).abs()
        # The package's groups are the same sets of entries: the same cosines from the same gradients.
        entry = groups[module]
        package = gradient_cosines([entry], {p: p.grad for p in entry.params})[0]
        assert package == pytest.approx(cos.max().item(), rel=1e-6), module


@pytest.mark.parametrize("name", ["resnet", "transformer", "control-flow"])
def test_detection_in_training_costs_no_extra_pass_and_nothing_per_step(name, tmp_path):
    model, x, expected, _ = build(name)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model
            self.forwards = 0
            model.register_forward_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.model(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self):
            data = torch.utils.data.TensorDataset(
                x.repeat(3, *[1] * (x.dim() - 1)), torch.randint(0, 10, (3 * len(x),))
            )
            return torch.utils.data.DataLoader(data, batch_size=len(x))

    class HooksGone(pl.Callback):
        """After the first step, no module carries a forward hook but the counter on the root and the layers
        not called yet, whose hook never runs (the first call is recorded, issue 10)."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx > 0:
                hooks = {n: len(m._forward_hooks) for n, m in pl_module.named_modules() if m._forward_hooks}
                lines = monitor.summary().splitlines()
                waiting = {line.split(": ")[0].strip() for line in lines if line.endswith(": not called yet")}
                assert hooks == {"model": 1} | dict.fromkeys(waiting, 1), hooks

    module = Module()
    monitor = SphereMonitor(log_every_n_steps=1)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, callbacks=[monitor, HooksGone()], default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="no logger"):
        trainer.fit(module)
    assert module.forwards == 3  # one per step: detection rode on the first real step
    assert {g.module_name.removeprefix("model.") for g in monitor.groups} == set(expected)


def test_find_invariant_groups_runs_one_forward_pass():
    model, x, _, _ = build("resnet")
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    find_invariant_groups(model, x)
    assert len(calls) == 1
