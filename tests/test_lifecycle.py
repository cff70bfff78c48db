"""Detection that follows real training code (issue 10): every layer tracked or listed with a true reason,
examined again when training changes what is trainable or called."""

import logging
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import BackboneFinetuning, ModelCheckpoint
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.utils.checkpoint import checkpoint

from lightning_sphere import SphereMonitor, find_invariant_groups
from tests.lightning_helpers import Capture, MemoryLogger, Net, assert_scalars_match, dataset, expected, fit


def layers(model: nn.Module) -> set[str]:
    """The modules the contract covers, from the model's structure: every Conv, ConvTranspose and Linear."""
    return {name for name, m in model.named_modules() if isinstance(m, _ConvNd | nn.Linear)}


def assert_contract(monitor: SphereMonitor, model: nn.Module) -> dict[str, str]:
    """Every layer is tracked or listed as not tracked, never both; returns the listed reasons."""
    tracked = {g.module_name for g in monitor.groups}
    listed = {}
    for line in monitor.summary().split("not tracked:\n")[-1].splitlines():
        if line.startswith("  ") and ": " in line:
            name, why = line.strip().split(": ", 1)
            listed[name] = why
    assert tracked.isdisjoint(listed)
    assert layers(model) <= tracked | set(listed)
    return listed


class Summaries(pl.Callback):
    """The monitor's summary at the end of every batch, by global step."""

    def __init__(self, monitor):
        self.monitor, self.at = monitor, {}

    def on_train_batch_end(self, trainer, *args):
        self.at[trainer.global_step] = self.monitor.summary()


def generator() -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(8, 8, 4, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.ConvTranspose2d(8, 1, 2, 2), nn.Tanh()
    ).double()


def discriminator() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(128, 1)
    ).double()


class GAN(pl.LightningModule):
    """DCGAN order in manual optimization: the discriminator's loss and step, then the generator's."""

    def __init__(self, toggle: bool = False, manual_backward: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.G, self.D = generator(), discriminator()
        self.automatic_optimization = False
        self.toggle, self.use_manual_backward = toggle, manual_backward

    def backward_(self, loss):
        if self.use_manual_backward:
            self.manual_backward(loss)
        else:
            loss.backward()

    def training_step(self, batch, batch_idx):
        og, od = self.optimizers()
        real = batch[0]
        z = torch.randn(real.shape[0], 8, 1, 1, dtype=real.dtype, generator=torch.Generator().manual_seed(batch_idx))
        fake = self.G(z)
        if self.toggle:
            self.toggle_optimizer(od)
        d_loss = F.softplus(-self.D(real)).mean() + F.softplus(self.D(fake.detach())).mean()
        self.backward_(d_loss)
        od.step()
        od.zero_grad()
        if self.toggle:
            self.untoggle_optimizer(od)
            self.toggle_optimizer(og)
        g_loss = F.softplus(-self.D(fake)).mean()
        self.backward_(g_loss)
        og.step()
        og.zero_grad()
        if self.toggle:
            self.untoggle_optimizer(og)

    def configure_optimizers(self):
        return torch.optim.SGD(self.G.parameters(), lr=0.05), torch.optim.SGD(self.D.parameters(), lr=0.05)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(dataset(), batch_size=16)


GAN_GROUPS = [("D.0", 8, 9), ("G.0", 8, 8 * 4 * 4)]  # one group per output channel: D 1·3·3, G (dim 1) 8·4·4


@pytest.mark.parametrize("toggle", [False, True], ids=["dcgan", "toggle_optimizer"])
def test_every_backward_of_the_first_step_is_read(tmp_path, toggle):
    """Before: only D.0 tracked, G.0 in neither list (toggle: "G.0: weight is frozen", though it trains)."""
    monitor, logger = SphereMonitor(), MemoryLogger()
    model = GAN(toggle=toggle)
    fit(model, tmp_path, [monitor], max_steps=4, logger=logger)
    assert sorted((g.module_name, g.num_groups, g.group_size) for g in monitor.groups) == GAN_GROUPS
    listed = assert_contract(monitor, model)
    assert "frozen" not in " ".join(listed.values())
    last = logger.sphere()[max(logger.sphere())]
    assert "sphere/norm/G.0" in last and "sphere/norm/D.0" in last


def test_loss_backward_without_manual_backward_is_detected_with_one_warning(tmp_path):
    """Before: nothing tracked, and the only warning said "no logger"."""
    monitor = SphereMonitor()
    model = GAN(manual_backward=False)
    with pytest.warns(UserWarning, match="manual_backward") as record:
        fit(model, tmp_path, [monitor], max_steps=4)
    assert sum("manual_backward" in str(w.message) for w in record) == 1
    assert sorted((g.module_name, g.num_groups, g.group_size) for g in monitor.groups) == GAN_GROUPS
    assert_contract(monitor, model)


class Late(Net):
    """A second conv → BN branch added to the logits from step 2 on."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.late = nn.Sequential(
            nn.Conv2d(1, 3, 3, bias=False), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(108, 10)
        ).double()

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        if self.global_step >= 2:
            logits = logits + self.late(x)
        return F.cross_entropy(logits, y)


def test_a_module_first_called_later_is_listed_then_tracked(tmp_path):
    """Before: late.0 in neither list, never tracked."""
    monitor, logger = SphereMonitor(per_layer=True), MemoryLogger()
    capture, snap = Capture({**TRACKED_NET, "late.0": (0, False)}), Summaries(monitor)
    model = Late()
    fit(model, tmp_path, [monitor, capture, snap], max_steps=5, logger=logger)
    assert "late.0: not called yet" in snap.at[1]
    assert [g.module_name for g in monitor.groups] == ["net.0", "net.3", "late.0"]
    assert monitor.groups[2].num_groups == 3 and monitor.groups[2].group_size == 9
    records = logger.sphere()
    assert not any("late.0" in k for s in (0, 1) for k in records[s])
    for step in (2, 3, 4):  # from the first step that calls it, the same numbers as a plain capture
        want = {k: v for k, v in expected(capture.steps[step]).items() if k.endswith("/late.0")}
        assert want and all(k in records[step] for k in want)
        assert_scalars_match(records[step], want)
    assert_contract(monitor, model)


TRACKED_NET = {"net.0": (0, False), "net.3": (3, True)}


class Finetuned(pl.LightningModule):
    """A backbone (conv → BN) frozen by BackboneFinetuning, unfrozen at epoch 1 with add_param_group."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()).double()
        self.head = nn.Sequential(nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(6 * 4 * 4, 10)).double()  # fmt: skip

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.head(self.backbone(batch[0])), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(dataset(32), batch_size=16)  # 2 steps per epoch


def test_a_layer_unfrozen_later_is_tracked_from_then_on(tmp_path, caplog):
    """Before: "backbone.0: weight is frozen" for good, and never measured."""
    monitor, logger = SphereMonitor(per_layer=True), MemoryLogger()
    snap = Summaries(monitor)
    capture = Capture({"backbone.0": (0, False), "head.0": (0, False)})
    model = Finetuned()
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, verbose=False)
    with caplog.at_level(logging.INFO):
        fit(model, tmp_path, [finetuning, monitor, capture, snap], max_steps=4, logger=logger)
    assert "backbone.0: weight is frozen" in snap.at[1]
    announced = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SphereMonitor: ")]
    assert announced == ["SphereMonitor: now tracking backbone.0: 4 groups of 9 (channel), backbone.1 (BatchNorm2d)"]
    assert [g.module_name for g in monitor.groups] == ["backbone.0", "head.0"]  # model order, not found order
    assert "frozen" not in monitor.summary()
    records = logger.sphere()
    assert not any("backbone.0" in k for s in (0, 1) for k in records[s])
    for step in (2, 3):
        want = {k: v for k, v in expected({"backbone.0": capture.steps[step]["backbone.0"]}).items() if "backbone" in k}
        assert_scalars_match(records[step], want)
    assert_contract(monitor, model)


class FreezeFirstConv(pl.Callback):
    """Freezes net.0 from step 2 on (a requires_grad flip, the optimizer unchanged)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            pl_module.net[0].weight.requires_grad_(False)


def test_a_tracked_layer_frozen_later_leaves_the_table(tmp_path, caplog):
    """Before: net.0 stayed in the table, called invariant and trained, while frozen."""
    monitor, capture, logger = SphereMonitor(per_layer=True), Capture(), MemoryLogger()
    with caplog.at_level(logging.INFO):
        fit(Net(), tmp_path, [FreezeFirstConv(), monitor, capture], max_steps=4, logger=logger)
    assert [g.module_name for g in monitor.groups] == ["net.3"]
    assert "net.0: weight is frozen" in monitor.summary()
    announced = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SphereMonitor: net.0")]
    assert announced == ["SphereMonitor: net.0 is not tracked any more: weight is frozen"]
    records = logger.sphere()
    assert "sphere/norm/net.0" in records[1] and not any("net.0" in k for k in records[2] | records[3])
    for step in (2, 3):  # net.3 alone, as a plain capture of the step sees it
        assert_scalars_match(records[step], expected({"net.3": capture.steps[step]["net.3"]}))


class FrozenFirstConv(Net):
    """net.0 starts frozen (in the optimizer all along) and is unfrozen at step 2: a requires_grad flip only."""

    def __init__(self):
        super().__init__()
        self.net[0].weight.requires_grad_(False)

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step == 2:
            self.net[0].weight.requires_grad_(True)


@pytest.mark.parametrize("groups", ["auto", "numeric"])
def test_a_requires_grad_flip_is_seen(tmp_path, groups):
    """Before: "net.0: weight is frozen" for good ("auto"), or net.0 in neither list ("numeric")."""
    monitor, capture, logger = SphereMonitor(per_layer=True, groups=groups), Capture(), MemoryLogger()
    snap = Summaries(monitor)
    model = FrozenFirstConv()
    fit(model, tmp_path, [monitor, capture, snap], max_steps=4, logger=logger)
    assert "net.0: weight is frozen" in snap.at[1]
    assert (monitor.groups[0].module_name, monitor.groups[0].num_groups) == ("net.0", 6)  # per channel; model order
    records = logger.sphere()
    assert "sphere/norm/net.0" not in records.get(1, {})
    want = {k: v for k, v in expected({"net.0": capture.steps[3]["net.0"]}).items() if k.endswith("/net.0")}
    assert_scalars_match(records[3], want)
    assert_contract(monitor, model)


def test_resuming_with_another_groups_setting_verifies_afresh(tmp_path):
    """Before: net.3 (weight and bias under "auto", weight alone under "numeric") kept the stored cosine."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    fit(Net(), tmp_path / "first", [SphereMonitor(), checkpoint], max_steps=4, enable_checkpointing=True)
    path = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    stored = torch.load(path, weights_only=False)
    # The independent value: the first resumed batch's gradient at the checkpoint's weights, per row.
    model = Net()
    model.load_state_dict(stored["state_dict"])
    x, y = dataset()[:16]
    F.cross_entropy(model.net(x), y).backward()
    weight, grad = model.net[3].weight.detach(), model.net[3].weight.grad
    whole = ((weight * grad).sum().abs() / (weight.norm() * grad.norm())).item()  # weight alone: bias is left out
    monitor = SphereMonitor(groups="numeric")
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=[monitor], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(Net(), ckpt_path=str(path))
    assert whole > 1e-3  # not invariant without its bias: must not be tracked on "auto"'s verdict
    assert [g.module_name for g in monitor.groups] == ["net.0"]
    assert f"max |cos(g, x)| = {whole:.1e}" in monitor.summary()
    # The identical candidate (net.0's weight per channel, under both settings) keeps its stored verdict.
    accepted = stored["callbacks"][type(monitor).__qualname__]["accepted"]
    assert monitor.groups[0].cosine == next(v for k, v in accepted.items() if k.startswith("net.0|"))


class EvalNorm(Net):
    """From step 2 on, net.5 (net.3's BatchNorm) normalizes with running statistics."""

    def training_step(self, batch, batch_idx):
        if self.global_step >= 2:
            self.net[5].eval()
        return super().training_step(batch, batch_idx)


class Penalty(Net):
    """From step 2 on, an L2 penalty on net.0's weights in the loss: its gradient gets a radial part."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss + (self.net[0].weight.square().sum() if self.global_step >= 2 else 0)


class Bypass(Net):
    """From step 2 on, net.3's channel means also reach the logits directly, around its BatchNorm (ordinary
    data-dependent control flow): the loss is not invariant to its scale any more."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        hidden = self.net[3](self.net[:3](x))
        logits = self.net[4:](hidden)
        if self.global_step >= 2:
            mix = torch.linspace(-1, 1, 80, dtype=hidden.dtype).view(8, 10)  # differs per logit: not a shift
            logits = logits + hidden.mean((2, 3)) @ mix
        return F.cross_entropy(logits, y)


@pytest.mark.parametrize(("model", "lost", "why"), [(EvalNorm, "net.3", "net.5 (BatchNorm2d) is in eval mode"),
                                                    (Penalty, "net.0", "gradients are radial"),
                                                    (Bypass, "net.3", "gradients are radial")])  # fmt: skip
def test_invariance_lost_later_is_announced_once_and_marked(tmp_path, model, lost, why):
    """Before: no word; the summary still called the module invariant. A new user's trial found the bypass
    silent (|cos| 0.18 on a module whose test is δ/√d = 0.012, under the former 1/√2 trigger); the test is now
    the correction's: most groups above δ/√d."""
    monitor, capture = SphereMonitor(log_every_n_steps=1), Capture()
    with pytest.warns(UserWarning, match="not radially invariant any more") as record:
        fit(model(), tmp_path, [monitor, capture], max_steps=5)
    messages = [str(w.message) for w in record if "not radially invariant any more" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith(f"SphereMonitor: {lost} ") and why in messages[0]
    marked = monitor.summary().split("invariance lost")[1]
    assert f"{lost}: " in marked and why in marked and [g.module_name for g in monitor.groups] == ["net.0", "net.3"]
    # Independently, from the captured steps: net.0's gradient is orthogonal before the penalty, not after.
    if model is Penalty:
        cos = [
            ((s["x0"] * s["grad"]).sum(1).abs() / (s["x0"].norm(dim=1) * s["grad"].norm(dim=1))).max()
            for s in (capture.steps[1]["net.0"], capture.steps[2]["net.0"])
        ]
        assert cos[0] < 1e-3 and cos[1] > 0.71


class Shrunk(Net):
    """From step 2 on, net.0's weights are 1e-3 of what they were (as a long weight decay would leave them): the
    variance net.1 (BatchNorm2d) divides by comes down to its eps."""

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step == 2:
            with torch.no_grad():
                self.net[0].weight.mul_(1e-3)


@pytest.mark.parametrize("eps", [1e-5, 1e-30])
def test_a_gradient_made_radial_by_the_norms_eps_is_told_with_its_cause(tmp_path, eps):
    # A demo run (SGD-M, weight decay 0.01) showed it: block3.conv's BatchNorm input variance fell to 2.5e-4, its
    # eps 1e-5 weighed on it, and max |cos(g, x)| rose to 0.02 (1e-7 with eps 1e-12 on the same weights).
    monitor = SphereMonitor(log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(Shrunk(eps=eps), tmp_path, [monitor], max_steps=4)
    lost = [str(w.message) for w in record if "net.0 is not radially invariant any more" in str(w.message)]
    if eps == 1e-30:  # the same shrunk weights with a negligible eps: still invariant (the ground truth)
        assert lost == [] and abs(monitor.metrics["sphere/grad_cos/all"]) < 1e-6
        return
    assert len(lost) == 1 and "gradients are radial on the step logged at 2" in lost[0]
    assert "the likely cause is its eps (1e-05): it divides by √(variance + eps)" in lost[0]
    assert "net.0: most of its groups' gradients are radial" in monitor.summary()


class EvalForAWhile(Net):
    """net.5 (net.3's BatchNorm) normalizes with running statistics on steps 2 and 3 only."""

    def training_step(self, batch, batch_idx):
        self.net[5].train(not 2 <= self.global_step <= 3)
        return super().training_step(batch, batch_idx)


def test_a_reason_that_held_for_a_while_says_when(tmp_path, caplog):
    """Before: after its BatchNorm was back in training mode the end-of-fit summary still said net.3 "is in eval
    mode". Now the summary gives the steps it was, which the test knows from its own schedule."""
    monitor = SphereMonitor(log_every_n_steps=1)
    with pytest.warns(UserWarning, match="not radially invariant any more") as record, caplog.at_level(logging.INFO):
        fit(EvalForAWhile(), tmp_path, [monitor], max_steps=6)
    lost = [str(w.message) for w in record if "not radially invariant any more" in str(w.message)]
    assert lost == [
        "SphereMonitor: net.3 is not radially invariant any more: net.5 (BatchNorm2d) is in eval mode since step 2: "
        "it normalizes with running statistics. It is still measured, but its metrics no longer describe a step on "
        "the sphere."
    ]
    assert (
        "SphereMonitor: net.3 is radially invariant again: net.5 (BatchNorm2d) is back in training mode (it was "
        "in eval mode on steps 2–3, normalizing with running statistics)" in caplog.text
    )
    summary = monitor.summary()
    assert "is in eval mode" not in summary and "invariance lost (still" not in summary
    assert (
        "invariance lost for a while (measured off the sphere then):\n  net.3: net.5 (BatchNorm2d) was in eval "
        "mode on steps 2–3" in summary
    )


class Checkpointed(nn.Module):
    """A stem, then a block (conv → BN → ReLU) under torch.utils.checkpoint, then a head."""

    def __init__(self, reentrant):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(4, 5, 3, bias=False), nn.BatchNorm2d(5), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(80, 2))
        self.reentrant = reentrant

    def forward(self, x):
        hidden = self.stem(x)
        hidden = (
            self.block(hidden)
            if self.reentrant is None
            else checkpoint(self.block, hidden, use_reentrant=self.reentrant)
        )
        return self.head(hidden)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_in_the_plain_api(reentrant):
    """Before: use_reentrant=True raised RuntimeError (incompatible with .grad()); the same groups as without."""
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = find_invariant_groups(Checkpointed(None), x)
    model = Checkpointed(reentrant)
    found = find_invariant_groups(model, x)
    assert [(g.module_name, g.num_groups) for g in plain] == [("stem.0", 4), ("block.0", 5)]
    assert [(g.module_name, g.num_groups, g.cosine) for g in found] == [
        (g.module_name, g.num_groups, pytest.approx(g.cosine, rel=1e-5)) for g in plain
    ]
    assert layers(model) == {g.module_name for g in found} | set(found.rejected)


class CheckpointedNet(Net):
    """bn_net with its second block (conv → ReLU → BN) under torch.utils.checkpoint."""

    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant

    def training_step(self, batch, batch_idx):
        x, y = batch
        hidden = checkpoint(self.net[3:6], self.net[:3](x), use_reentrant=self.reentrant)
        return F.cross_entropy(self.net[6:](hidden), y)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_in_training(tmp_path, reentrant):
    """Before: net.3 (checkpointed) in neither list under use_reentrant=True; the same groups as without."""
    monitor = SphereMonitor()
    model = CheckpointedNet(reentrant)
    fit(model, tmp_path, [monitor], max_steps=2)
    plain = [("net.0", 6, 9), ("net.3", 8, 55)]  # bn_net's structure: conv → BN per channel, bias joins after ReLU
    got = [(g.module_name, g.num_groups, g.group_size) for g in monitor.groups]
    listed = assert_contract(monitor, model)
    assert got == plain  # reentrant: read off the forward recomputed during the backward pass
    assert "net.7" in listed


def test_a_model_compiled_earlier_is_detected_and_compiles_as_without_the_monitor(tmp_path):
    """Before: 0 groups ("found no radially invariant group"); with hooks traced, split graphs for good."""
    graphs = []

    def backend(gm, example_inputs):  # counts what dynamo compiles, runs it as traced
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    class Compiled(Net):
        def __init__(self):
            super().__init__()
            self.net = torch.compile(self.net, backend=backend)

    baseline = Compiled()
    fit(baseline, tmp_path, [], max_steps=2)  # compiled without the monitor, earlier in the process
    without = list(graphs)
    monitor = SphereMonitor()
    fit(Compiled(), tmp_path, [monitor], max_steps=3)
    assert [(g.module_name, g.num_groups) for g in monitor.groups] == [("net.0", 6), ("net.3", 8)]  # names as written
    graphs.clear()
    torch._dynamo.reset()
    fit(Compiled(), tmp_path, [SphereMonitor()], max_steps=3)
    assert graphs == without  # the same graphs as a run without the monitor: no break at the hooks


class Waiting(Net):
    """A branch never called, and a conv → BN that no optimizer steps: both stay undecided on every step."""

    def __init__(self, optimizer):
        super().__init__(optimizer)
        self.never = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3)).double()
        self.ignored = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.BatchNorm2d(3)).double()

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + self.ignored(batch[0]).mean()

    def configure_optimizers(self):
        return self.make_optimizer([p for n, p in self.named_parameters() if not n.startswith("ignored")])


def test_undecided_layers_cost_no_host_sync(tmp_path, monkeypatch):
    from tests.test_host_sync import OPTIMIZERS, SyncCounter, fit_windowed

    counts = []
    for monitors in ([], [SphereMonitor(log_every_n_steps=1000)]):
        counter = SyncCounter(monkeypatch)
        fit_windowed(tmp_path, counter, OPTIMIZERS["sgd-momentum"], monitors, module=Waiting)
        counts.append(counter.calls)
        monkeypatch.undo()
    assert counts[0] == counts[1]
    listed = assert_contract(monitors[0], Waiting(None))
    assert listed["never.0"] == "not called yet" and listed["ignored.0"] == "not stepped by any optimizer"


class WholeCheckpointed(Net):
    """The whole of bn_net, head included, under torch.utils.checkpoint(use_reentrant=True)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(checkpoint(self.net, x.requires_grad_(), use_reentrant=True), y)


def test_a_layer_whose_output_leaves_a_reentrant_checkpoint_gets_a_true_reason(tmp_path):
    """A new user's trial: the head inside a whole-model reentrant checkpoint ran every step and was listed
    as "not called yet". The recomputed graph ends where the segment does; the reason says so."""
    monitor, model = SphereMonitor(), WholeCheckpointed()
    fit(model, tmp_path, [monitor], max_steps=3)
    listed = assert_contract(monitor, model)
    assert [g.module_name for g in monitor.groups] == ["net.0", "net.3"]
    assert listed["net.7"].startswith("inside torch.utils.checkpoint(use_reentrant=True), and its output leaves")


class SummaryAfterBatch(pl.Callback):
    """``monitor.summary()`` after each batch (placed after the monitor in the callbacks)."""

    def __init__(self, monitor):
        self.monitor, self.seen = monitor, []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.seen.append(assert_contract(self.monitor, pl_module))


class FlipInStep(Net):
    """net.0 frozen by training_step on batch 2, trainable again on batch 4."""

    def training_step(self, batch, batch_idx):
        if batch_idx in (2, 4):
            self.net[0].requires_grad_(batch_idx == 4)
        return super().training_step(batch, batch_idx)


def test_a_flag_flipped_in_training_step_is_in_the_summary_by_the_end_of_that_batch(tmp_path):
    """A new user's trial: one step late, net.0 was still listed as tracked while frozen, then as "not
    stepped by any optimizer" once trainable again. The flags are read again at the end of the batch."""
    monitor = SphereMonitor(log_every_n_steps=1)
    summaries = SummaryAfterBatch(monitor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(FlipInStep(), tmp_path, [monitor, summaries], max_steps=6, limit_train_batches=6)
    assert "net.0" not in summaries.seen[1]  # tracked
    assert summaries.seen[2]["net.0"] == "weight is frozen"  # the batch that froze it
    assert summaries.seen[3]["net.0"] == "weight is frozen"
    assert summaries.seen[4].get("net.0") != "not stepped by any optimizer"  # the batch that unfroze it


def test_a_second_fit_starts_with_a_clean_record(tmp_path):
    """The same monitor fitting another model: the first fit's lost invariance is not the second's (before, its
    normalizations were even checked on the second model until a tracker was built)."""
    monitor = SphereMonitor(log_every_n_steps=1)
    with pytest.warns(UserWarning, match="not radially invariant any more"):
        fit(EvalForAWhile(), tmp_path, [monitor], max_steps=6)
    assert "invariance lost for a while" in monitor.summary()
    fit(Net(), tmp_path, [monitor], max_steps=2)
    assert "invariance lost" not in monitor.summary()
    assert [g.module_name for g in monitor.groups] == ["net.0", "net.3"]
