"""spherical_correction against the references of docs/theory.md §4 and §6."""

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from lightning_sphere import SphereMonitor
from tests import reference
from tests.conftest import bn_net
from tests.lightning_helpers import MemoryLogger, Net, dataset, fit
from tests.spherical_reference import Reference, conv_rows

STEPS = 100


def reference_run(algorithm, optimizer, steps=STEPS):
    """The reference optimizer on the same model, data and order as ``Net`` in a Trainer."""
    model = bn_net()
    groups = [conv_rows(model[0], bias=False), conv_rows(model[3], bias=True)]
    reference = Reference(model, groups, algorithm, optimizer)
    done = 0
    while done < steps:
        for x, y in DataLoader(dataset(), batch_size=16):
            reference.zero_grad()
            F.cross_entropy(model(x), y).backward()
            reference.step()
            done += 1
            if done == steps:
                break
    return model


def assert_same_weights(got, want, rel):
    for (name, a), b in zip(got.named_parameters(), want.parameters(), strict=True):
        scale = b.abs().max()
        assert ((a.cpu() - b).abs().max() / scale).item() < rel, name


ADAM = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam-l2": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0),
    "adamw-decay": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}
SGDM = {
    "sgdm": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "sgdm-decay": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2),
}
CASES = [(mode, name, algo) for mode, algo in (("srt", "AdamSRT"), ("s", "AdamS"), ("rt", "Adam+RT")) for name in ADAM]
CASES += [(mode, name, "SGDMRT") for mode in ("srt", "rt") for name in SGDM]


def assert_follows_reference(mode, name, algorithm, tmp_path, steps=STEPS, rel=1e-8, compile=None, **trainer_options):
    """A Trainer with ``spherical_correction=mode`` ends where the reference ``algorithm`` does (run on the
    CPU in float64); ``trainer_options`` choose the device."""
    optimizer = (ADAM | SGDM)[name]
    monitor = SphereMonitor(spherical_correction=mode, log_every_n_steps=7, compile=compile)
    trainer = fit(Net(optimizer=optimizer), tmp_path, [monitor], max_steps=steps, **trainer_options)
    assert_same_weights(trainer.lightning_module.net, reference_run(algorithm, optimizer, steps), rel=rel)
    assert monitor.summary().split("\n")[2].split()[-1] == algorithm  # the summary names the algorithm


@pytest.mark.parametrize(("mode", "name", "algorithm"), CASES)
def test_trainer_with_the_flag_follows_the_reference(mode, name, algorithm, tmp_path):
    assert_follows_reference(mode, name, algorithm, tmp_path)


def test_without_the_flag_the_run_is_plain_adam_not_the_reference(tmp_path):
    """The comparison above can fail: plain Adam ends far from AdamSRT."""
    optimizer = ADAM["adam"]
    trainer = fit(Net(optimizer=optimizer), tmp_path, [SphereMonitor()], max_steps=20)
    with pytest.raises(AssertionError):
        assert_same_weights(trainer.lightning_module.net, reference_run("AdamSRT", optimizer, steps=20), rel=1e-3)


SGD = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd-decay": lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=5e-3),
}


class UnitRows(pl.Callback):
    """The rows of the tracked groups (filter and bias) after the last training batch."""

    def on_train_batch_end(self, trainer, pl_module, *args):
        net = pl_module.net
        rows = [net[0].weight.flatten(1), torch.cat([net[3].weight.flatten(1), net[3].bias[:, None]], 1)]
        self.rows = [r.detach().clone() for r in rows]  # copies: after fit the model gets its real weights


@pytest.mark.parametrize("name", list(SGD))
def test_sgd_rewrite_reproduces_plain_sgd(name, tmp_path):
    """§4: SGD is AdamG on the sphere. With BatchNorm's eps tiny, invariance is exact and so is the rewrite."""
    plain, corrected = MemoryLogger(), MemoryLogger()
    runs, during = {}, UnitRows()
    for correction, logger in ((False, plain), (True, corrected)):
        monitor = SphereMonitor(spherical_correction=correction, log_every_n_steps=5)
        callbacks = [monitor, during] if correction else [monitor]
        runs[correction] = fit(Net(optimizer=SGD[name], eps=1e-14), tmp_path, callbacks, max_steps=STEPS, logger=logger)
    losses = {
        c: torch.tensor([m["loss"] for _, m in log.history if "loss" in m])
        for c, log in (("p", plain), ("c", corrected))
    }
    assert len(losses["p"]) == STEPS
    torch.testing.assert_close(losses["c"], losses["p"], rtol=1e-10, atol=0)
    for rows in during.rows:  # during training, after the last step: unit rows, the norm is the virtual radius
        torch.testing.assert_close(rows.norm(dim=1), torch.ones(rows.shape[0], dtype=torch.float64), rtol=1e-12, atol=0)
    # After fit the model is plain SGD's: the real weights r̂ u, and BatchNorm's statistics in their scale.
    models = (runs[c].lightning_module.state_dict().values() for c in (True, False))
    for a, b in zip(*models, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)  # 100 steps of round-off
    # The charts compare across runs: norm and effective_lr report the virtual radius, all else the same.
    for step, scalars in plain.sphere().items():
        for key, value in scalars.items():
            assert corrected.sphere()[step][key] == pytest.approx(value, rel=1e-8, abs=1e-12), (step, key)


class Overflowing(Net):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.global_step == 2 else loss


class Watch(pl.Callback):
    """The weights and Adam state around each batch."""

    def __init__(self):
        self.before, self.after = [], []

    def snapshot(self, trainer):
        net = trainer.lightning_module.net
        state = trainer.optimizers[0].state.get(net[0].weight, {})
        return net[0].weight.detach().clone(), {k: v.clone() for k, v in state.items()}

    def on_train_batch_start(self, trainer, *args):
        self.before.append(self.snapshot(trainer))

    def on_train_batch_end(self, trainer, *args):
        self.after.append(self.snapshot(trainer))


def test_skipped_amp_steps_are_not_corrected(tmp_path):
    from pytorch_lightning.plugins.precision import MixedPrecision

    watch = Watch()
    amp = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=1.0))
    module = Overflowing(optimizer=ADAM["adam"], dtype=torch.float32)
    fit(module, tmp_path, [SphereMonitor(spherical_correction=True), watch], max_steps=4, plugins=[amp])
    (w0, s0), (w1, s1) = watch.before[2], watch.after[2]  # the skipped step
    assert torch.equal(w0, w1)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert not torch.equal(*[w for w, _ in (watch.before[3], watch.after[3])])  # the next one ran


@pytest.mark.parametrize(
    ("optimizer", "mode", "message"),
    [
        (lambda p: torch.optim.RMSprop(p, lr=1e-3), True, "RMSprop has no spherical form"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), True, r"nesterov=True"),
        (lambda p: torch.optim.Adam(p, lr=1e-3, maximize=True), True, r"maximize=True"),
        (lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True), "s", r"amsgrad=True"),
        (lambda p: torch.optim.LBFGS(p), True, "LBFGS has no spherical form"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "s", "'s' has no meaning for SGD with momentum"),
        (lambda p: torch.optim.SGD(p, lr=0.1), "rt", "'rt' has no meaning for SGD without momentum"),
    ],
)
def test_unsupported_configurations_are_refused_at_fit_start(optimizer, mode, message, tmp_path):
    class Closure(Net):  # LBFGS needs its closure; the error comes before any step anyway
        pass

    with pytest.raises(MisconfigurationException, match=rf"spherical_correction=\.\.\.\): .*{message}"):
        fit(Closure(optimizer=optimizer), tmp_path, [SphereMonitor(spherical_correction=mode)], max_steps=1)


def test_mixed_hyper_parameters_inside_a_group_are_refused(tmp_path):
    class Split(Net):
        def configure_optimizers(self):
            bias = self.net[3].bias
            rest = [p for p in self.parameters() if p is not bias]
            return torch.optim.SGD(
                [{"params": rest}, {"params": [bias], "weight_decay": 0.0}], lr=0.1, weight_decay=1e-2
            )

    with pytest.raises(
        MisconfigurationException, match=r"net\.3: its parameters sit in param groups with different lr"
    ):
        fit(Split(), tmp_path, [SphereMonitor(spherical_correction=True)], max_steps=1)


@pytest.mark.parametrize("value", ["adams", 1, "SRT"])
def test_invalid_values_are_refused_at_construction(value):
    with pytest.raises(MisconfigurationException, match=r"SphereMonitor\(`spherical_correction`\) must be True, Fa"):
        SphereMonitor(spherical_correction=value)


@pytest.mark.parametrize("optimizer", [ADAM["adamw-decay"], SGD["sgd-decay"], SGDM["sgdm-decay"]])
def test_resuming_reproduces_the_uninterrupted_run(optimizer, tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    whole = fit(Net(optimizer=optimizer), tmp_path / "whole", [SphereMonitor(spherical_correction=True)], max_steps=8)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    callbacks = [SphereMonitor(spherical_correction=True), checkpoint]
    fit(Net(optimizer=optimizer), tmp_path / "first", callbacks, max_steps=4, enable_checkpointing=True)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=8, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=[SphereMonitor(spherical_correction=True)], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(Net(optimizer=optimizer), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    for a, b in zip(trainer.lightning_module.parameters(), whole.lightning_module.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


class Between(pl.Callback):
    """The tracked rows at the start and at the end of each batch: x_k and the corrected x_{k+1}."""

    def __init__(self):
        self.rows = []

    def _rows(self, net):
        return {
            "net.0": net[0].weight.detach().flatten(1).clone(),
            "net.3": torch.cat([net[3].weight.detach().flatten(1), net[3].bias.detach()[:, None]], 1),
        }

    def on_train_batch_start(self, trainer, pl_module, *args):
        self.rows.append({"x0": self._rows(pl_module.net)})

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.rows[-1]["x1"] = self._rows(pl_module.net)
        net, state = pl_module.net, trainer.optimizers[0].state
        _, beta2 = trainer.optimizers[0].defaults["betas"]
        t = state[net[0].weight]["step"].item()
        # AdamS's b for net.0 after the step, before R and T rescale v: recompute it from the moments,
        # which R and T changed by known per-group factors (v ← v r_k²/r_{k+1}²).
        x0, x1 = self.rows[-1]["x0"]["net.0"], self.rows[-1]["x1"]["net.0"]
        v = (
            state[net[0].weight]["exp_avg_sq"].flatten(1)
            * (x1.norm(dim=1, keepdim=True) / x0.norm(dim=1, keepdim=True)) ** 2
        )
        self.rows[-1]["b"] = (v.mean(1) / (1 - beta2**t)).sqrt() + 1e-8


def test_metrics_describe_the_corrected_update(tmp_path):
    from tests import reference

    between, logger = Between(), MemoryLogger()
    monitor = SphereMonitor(per_layer=True, spherical_correction="srt", log_every_n_steps=1)
    fit(Net(optimizer=ADAM["adam"]), tmp_path, [monitor, between], max_steps=5, logger=logger)
    for step, scalars in logger.sphere().items():
        rows = between.rows[step]
        x0, x1 = rows["x0"]["net.0"], rows["x1"]["net.0"]
        theta = 2 * torch.asin((x1 / x1.norm(dim=1, keepdim=True) - x0 / x0.norm(dim=1, keepdim=True)).norm(dim=1) / 2)
        assert scalars["sphere/angular_update/net.0"] == pytest.approx(reference.summarize(theta, "rms"), rel=1e-9)
        assert scalars["sphere/norm/net.0"] == pytest.approx(reference.summarize(x1.norm(dim=1), "rms"), rel=1e-12)
        # S: one b per group, so ⊘b no longer bends the step: deformation_cos = 1, η^e = η/(r_k r_{k+1} b_G).
        assert scalars["sphere/deformation_cos/net.0"] == pytest.approx(1, abs=1e-12)
        elr = 1e-2 / (x0.norm(dim=1) * x1.norm(dim=1) * rows["b"])
        assert scalars["sphere/effective_lr/net.0"] == pytest.approx(reference.summarize(elr, "median"), rel=1e-9)


def test_compiled_kernels_match_the_references(tmp_path):
    """The torch.compile'd kernels (chosen by default for large models and on GPUs) give the same runs
    and the same measurements (the SGD rewrite's included)."""
    for algorithm, mode, optimizer in (("AdamSRT", "srt", ADAM["adamw-decay"]), ("SGDMRT", "rt", SGDM["sgdm-decay"])):
        monitor = SphereMonitor(spherical_correction=mode, log_every_n_steps=3, compile=True)
        trainer = fit(Net(optimizer=optimizer), tmp_path, [monitor], max_steps=12)
        assert monitor._tracker.kernels.compiled  # no fallback to eager happened
        assert_same_weights(trainer.lightning_module.net, reference_run(algorithm, optimizer, steps=12), rel=1e-8)
    logs = {}
    for compiled in (False, True):
        logs[compiled] = MemoryLogger()
        monitor = SphereMonitor(spherical_correction=True, log_every_n_steps=3, compile=compiled)
        fit(Net(optimizer=SGD["sgd-decay"], eps=1e-14), tmp_path, [monitor], max_steps=12, logger=logs[compiled])
    for step, scalars in logs[False].sphere().items():
        for key, value in scalars.items():
            assert logs[True].sphere()[step][key] == pytest.approx(value, rel=1e-9, abs=1e-14), key


def plain_loop(model, optimizer, steps, losses=None):
    """``steps`` optimizer steps over ``dataset()`` in order, as the references take them, no Trainer."""
    done = 0
    while done < steps:
        for x, y in DataLoader(dataset(), batch_size=16):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            if losses is not None:
                losses.append(loss.item())
            done += 1
            if done == steps:
                return


@pytest.mark.parametrize(
    ("mode", "name", "algorithm"),
    [
        ("srt", "adamw-decay", "AdamSRT"),
        ("s", "adam-l2", "AdamS"),
        ("rt", "adam", "Adam+RT"),
        ("srt", "sgdm-decay", "SGDMRT"),
    ],
)
def test_sphere_tracker_corrects_without_lightning(mode, name, algorithm):
    """The framework-free engine alone, in a plain PyTorch loop, follows the same references."""
    from lightning_sphere import SphereTracker, find_invariant_groups

    make = (ADAM | SGDM)[name]
    model = bn_net()
    optimizer = make(model.parameters())
    x, _ = dataset()[:16]
    tracker = SphereTracker(find_invariant_groups(model, x), [optimizer], correction=mode)
    assert tracker.corrections == {"0": algorithm, "3": algorithm}
    plain_loop(model, optimizer, STEPS)
    tracker.close()
    assert_same_weights(model, reference_run(algorithm, make), rel=1e-8)


def test_sphere_tracker_sgd_rewrite_keeps_plain_sgd_losses_and_restores_its_radii():
    from lightning_sphere import SphereTracker, find_invariant_groups

    losses, models = {}, {}
    for correction in (None, "srt"):
        model = models[correction] = bn_net(eps=1e-14)
        optimizer = SGD["sgd-decay"](model.parameters())
        groups = find_invariant_groups(model, dataset()[:16][0])
        tracker = SphereTracker(groups, [optimizer], correction=correction, model=model)
        losses[correction] = []
        plain_loop(model, optimizer, 30, losses=losses[correction])
    torch.testing.assert_close(torch.tensor(losses["srt"]), torch.tensor(losses[None]), rtol=1e-10, atol=0)
    norms = model[0].weight.detach().flatten(1).norm(dim=1)  # the rewrite ran: unit rows, not SGD's norms
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-12, atol=0)
    # The virtual radii carry over: a fresh tracker given them continues the same run.
    saved = {name: r.clone() for name, r in tracker.radii().items()}
    assert set(saved) == {"0", "3"} and all(r.isfinite().all() for r in saved.values())
    tracker.close(release=False)  # the run goes on in another tracker
    fresh = SphereTracker(tracker.groups, [optimizer], correction="srt", model=model)
    fresh.load_radii(saved)
    torch.testing.assert_close(fresh.radii(), saved, rtol=0, atol=0)
    fresh.close()  # releases: the model is plain SGD's
    for a, b in zip(model.state_dict().values(), models[None].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)  # 100 steps of round-off


def test_one_optimizer_with_two_algorithms_corrects_each_module_by_its_own():
    """SGD whose param groups differ in momentum: module "0" follows SGDMRT, module "3" the AdamG rewrite,
    each with its part of the optimizer's row index. Checked against what each rewrite guarantees."""
    from lightning_sphere import SphereTracker, find_invariant_groups

    model = bn_net()
    first = list(model[0].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    optimizer = torch.optim.SGD([{"params": first, "momentum": 0.9}, {"params": rest}], lr=0.1, weight_decay=1e-2)
    tracker = SphereTracker(find_invariant_groups(model, dataset()[:16][0]), [optimizer], correction="srt", model=model)
    assert tracker.corrections == {"0": "SGDMRT", "3": "AdamG (SGD rewrite)"}
    for step, (x, y) in zip(range(3), DataLoader(dataset(), batch_size=16), strict=False):
        tracker.arm()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        rows = lambda t: torch.cat([t(model[3].weight).flatten(1), t(model[3].bias)[:, None]], 1)  # noqa: E731
        plain = rows(lambda p: p.detach() - 0.1 * (p.grad + 1e-2 * p.detach()))  # SGD's x_{k+1} from x_k
        optimizer.step()
        # T leaves SGD's buffer tangent to the new weights, row by row: ⟨buf, x_{k+1}⟩ = 0.
        w, buf = model[0].weight.detach().flatten(1), optimizer.state[model[0].weight]["momentum_buffer"].flatten(1)
        cos = (w * buf).sum(1) / (w.norm(dim=1) * buf.norm(dim=1))
        torch.testing.assert_close(cos, torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-12)
        # The AdamG rewrite keeps its rows (filter and bias) at unit norm, in the direction SGD took.
        now = rows(lambda p: p.detach())
        torch.testing.assert_close(now.norm(dim=1), torch.ones(8, dtype=torch.float64), rtol=1e-12, atol=0)
        scalars = tracker.collect().scalars
        assert scalars["sphere/grad_cos/0"] < 1e-3, step  # measured where SGDMRT put it
        if step == 0:  # SGD's own first step, then the virtual radius is the norm it reached
            torch.testing.assert_close(now, plain / plain.norm(dim=1, keepdim=True), rtol=1e-12, atol=1e-14)
            rms = reference.summarize(plain.norm(dim=1), "rms")
            assert scalars["sphere/norm/3"] == pytest.approx(rms, rel=1e-12)
