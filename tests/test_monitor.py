"""SphereMonitor in a real Trainer: what it logs, when, and that every training mode measures the right step."""

import logging
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins.precision import MixedPrecision
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_sphere import SphereMonitor, find_invariant_groups
from lightning_sphere.measurement.metrics import METRICS
from tests.lightning_helpers import Capture, MemoryLogger, Net, assert_scalars_match, expected, fit
from tests.tensorboard_read import Served

SGD_METRICS = [m for m in METRICS if m not in ("deformation_cos", "momentum_radial", "update_scale")]


def test_logs_every_metric_at_lightning_steps_and_matches_the_reference(tmp_path):
    capture, logger = Capture(), MemoryLogger()
    callbacks = [SphereMonitor(per_layer=True, log_every_n_steps=2), capture]
    trainer = fit(Net(), tmp_path, callbacks, max_steps=6, log_every_n_steps=2, logger=logger)
    records = logger.sphere()
    assert sorted(records) == [1, 3, 5]  # (step + 1) % 2 == 0, at Lightning's own step numbering
    assert {s for s, m in logger.history if "loss" in m} == {1, 3, 5}  # aligned with Lightning's own logs
    for step, scalars in records.items():
        assert_scalars_match(scalars, expected(capture.steps[step]))
        for metric in SGD_METRICS:
            for name in ("net.0", "net.3", "all"):  # one equilibrium, shared by both layers: under all only
                assert (f"sphere/{metric}/{name}" in scalars) == (name == "all" or "equilibrium" not in metric)
        assert "sphere/deformation_cos/all" not in scalars
    monitor = trainer.callbacks[0]
    assert monitor.metrics == records[5]
    assert [(g.module_name, g.num_groups, g.group_size) for g in monitor.groups] == [("net.0", 6, 9), ("net.3", 8, 55)]


def test_log_cadence_follows_the_trainer_by_default(tmp_path):
    logger = MemoryLogger()
    fit(Net(), tmp_path, [SphereMonitor()], max_steps=7, log_every_n_steps=3, logger=logger)
    assert sorted(logger.sphere()) == [2, 5, 6]  # every third step, and the last one


def test_tensorboard_events_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    memory = MemoryLogger()
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    callbacks = [SphereMonitor(per_layer=True, log_every_n_steps=1, histogram_every_n_steps=2)]
    adamw = Net(optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1))
    fit(adamw, tmp_path, callbacks, max_steps=4, logger=[tb, memory])
    events = EventAccumulator(
        str(tmp_path / "tb" / "version_0"), size_guidance={"tensors": 0, "scalars": 0, "histograms": 0}
    ).Reload()
    records = memory.sphere()
    for step, scalars in records.items():
        for key, value in scalars.items():
            logged = {e.step: e.value for e in events.Scalars(key)}
            assert logged[step] == pytest.approx(value, rel=1e-6), key
    assert "sphere/deformation_cos/net.0" in events.Tags()["scalars"]
    for metric in ("effective_lr", "angular_update", "norm"):
        assert [e.step for e in events.Histograms(f"sphere_hist/{metric}/net.3")] == [1, 3]
        assert events.Histograms(f"sphere_hist/{metric}/net.3")[0].histogram_value.num == 8
    # What TensorBoard's Custom Scalars tab shows: the run's loss first, then the sphere over all groups.
    first, per_layer = Served(tmp_path / "tb").layout()
    assert list(first["charts"])[:4] == ["loss", "effective_lr", "angular_update", "norm"]
    served = Served(tmp_path / "tb")
    assert served.lines("version_0", first["charts"]["loss"]) == {"loss"}
    assert served.lines("version_0", first["charts"]["angular_update"]) == {
        "sphere/angular_update/all",
        "sphere/angular_update_equilibrium/all",
    }
    assert per_layer["closed"]
    assert served.lines("version_0", per_layer["charts"]["effective_lr per layer"]) == {
        f"sphere/effective_lr/net.{i}" for i in (0, 3)
    }


def test_custom_scalars_layout_can_be_turned_off(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    fit(Net(), tmp_path, [SphereMonitor(custom_scalars=False)], max_steps=2, logger=tb)
    events = EventAccumulator(str(tmp_path / "tb" / "version_0")).Reload()
    assert "sphere/norm/all" in events.Tags()["scalars"]
    assert "custom_scalars__config__" not in events.Tags()["tensors"]


def test_without_a_logger_metrics_are_kept_and_one_warning_is_given(tmp_path):
    monitor = SphereMonitor(log_every_n_steps=1)
    with pytest.warns(UserWarning, match="no logger") as record:
        fit(Net(), tmp_path, [monitor], max_steps=2, logger=False)
    assert sum("no logger" in str(w.message) for w in record) == 1
    assert monitor.metrics["sphere/effective_lr/all"] > 0


@pytest.mark.parametrize("progress_bar", [False, True])
def test_summary_is_printed_once_at_the_first_step(tmp_path, caplog, progress_bar):
    with caplog.at_level(logging.INFO):
        fit(Net(), tmp_path, [SphereMonitor()], max_steps=3, enable_progress_bar=progress_bar)
    summaries = [r.getMessage() for r in caplog.records if "lightning_sphere:" in r.getMessage()]
    assert len(summaries) == 1
    text = summaries[0]
    # below a progress bar, which holds the current line, the table starts on a line of its own
    assert text.startswith("\nlightning_sphere:" if progress_bar else "lightning_sphere:")
    assert "2 modules, 14 radially invariant groups" in text
    assert "net.0" in text and "net.1 (BatchNorm2d)" in text and "net.5 (BatchNorm2d)" in text
    assert "net.7: output reaches LogSoftmax before any normalization" in text  # the classifier, with the reason


def test_reasons_name_the_module_that_consumed_the_output_in_both_apis(tmp_path):
    # Issue 23: "net.1: output reaches Addmm" did not say where; the plain API said "output is not normalized".
    class MLP(Net):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).double()

    module = MLP()
    plain = find_invariant_groups(module.net, torch.randn(4, 1, 8, 8, dtype=torch.float64))
    assert plain.rejected == {
        "1": "output reaches 3 (Linear: Addmm), then the model's output before any normalization",  # past the ReLU
        "3": "output reaches the model's output before any normalization",
    }
    monitor = SphereMonitor(log_every_n_steps=1)
    with pytest.warns(UserWarning, match="no radially invariant group"):
        fit(module, tmp_path, [monitor], max_steps=1)
    reasons = dict(line.strip().split(": ", 1) for line in monitor.summary().splitlines() if line.startswith("  "))
    assert reasons == {
        "net.1": "output reaches net.3 (Linear: Addmm), then LogSoftmax before any normalization",
        "net.3": "output reaches LogSoftmax before any normalization",  # the loss, computed outside the modules
    }


def test_a_model_without_invariant_groups_trains_with_one_warning(tmp_path):
    class Plain(Net):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double()

    monitor = SphereMonitor(log_every_n_steps=1)
    with pytest.warns(UserWarning, match="no radially invariant group") as record:
        trainer = fit(Plain(), tmp_path, [monitor], max_steps=3)
    assert sum("no radially invariant" in str(w.message) for w in record) == 1
    assert trainer.global_step == 3 and monitor.metrics == {}
    assert not any("nothing to rewrite" in str(w.message) for w in record)
    # with a correction asked for, the same one warning says it has nothing to rewrite (issue 23, item 5)
    with pytest.warns(UserWarning, match="no radially invariant group") as record:
        fit(Plain(), tmp_path, [SphereMonitor(log_every_n_steps=1, spherical_correction=True)], max_steps=3)
    (warning,) = [w for w in record if "no radially invariant" in str(w.message)]
    assert "spherical_correction has nothing to rewrite" in str(warning.message)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"log_every_n_steps": 2.5}, "log_every_n_steps"),
        ({"histogram_every_n_steps": -1}, "histogram_every_n_steps"),
        ({"tolerance": 0}, "tolerance"),
    ],
)
def test_invalid_arguments_raise_at_construction(kwargs, message):
    with pytest.raises(MisconfigurationException, match=message):
        SphereMonitor(**kwargs)


def test_histogram_cadence_must_be_a_multiple_of_the_logging_cadence(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"steps=6`\) must be a multiple .*\(4 steps\)"):
        SphereMonitor(log_every_n_steps=4, histogram_every_n_steps=6)  # at construction, both being given
    with pytest.raises(MisconfigurationException, match=r"must be a multiple of the logging cadence \(4 steps\)"):
        fit(Net(), tmp_path, [SphereMonitor(histogram_every_n_steps=6)], log_every_n_steps=4)  # the Trainer's


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_flat_buffer_strategies_are_refused_at_setup(strategy):
    import pytorch_lightning.strategies as strategies

    cls = getattr(strategies, strategy)

    class Trainer:  # these strategies need GPUs or packages this machine lacks: only `isinstance` matters
        log_every_n_steps = 50
        strategy = cls.__new__(cls)

    with pytest.raises(MisconfigurationException, match=f"does not support {strategy}.*DDP.*ModelParallelStrategy"):
        SphereMonitor().setup(Trainer(), None, "fit")


def test_gradient_accumulation_measures_each_optimizer_step(tmp_path):
    capture, logger = Capture(), MemoryLogger()
    fit(
        Net(batch_size=8),
        tmp_path,
        [SphereMonitor(per_layer=True), capture],
        max_steps=3,
        accumulate_grad_batches=2,
        logger=logger,
    )
    records = logger.sphere()
    assert sorted(records) == [0, 1, 2] and len(capture.steps) == 3
    for step, scalars in records.items():
        assert_scalars_match(scalars, expected(capture.steps[step]))


class Overflowing(Net):
    """Produces an inf loss on step 2: the AMP grad scaler skips that optimizer step."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.global_step == 2 else loss


def test_amp_skipped_steps_record_nothing(tmp_path):
    capture, logger = Capture(), MemoryLogger()
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    amp = MixedPrecision("16-mixed", "cpu", scaler)
    monitor = SphereMonitor(per_layer=True)
    fit(Overflowing(dtype=torch.float32), tmp_path, [monitor, capture], max_steps=5, plugins=[amp], logger=logger)
    records = logger.sphere()
    assert sorted(records) == [0, 1, 3, 4]  # step 2 was skipped: nothing recorded, nothing logged
    assert len(capture.steps) == 4
    for step, record in zip([0, 1, 3, 4], capture.steps, strict=True):
        assert_scalars_match(records[step], expected(record), rel=1e-4, abs=1e-6)  # float32 math


def test_gradient_clipping_reports_the_clipped_gradient(tmp_path):
    capture, logger = Capture(), MemoryLogger()
    fit(Net(), tmp_path, [SphereMonitor(per_layer=True), capture], max_steps=3, gradient_clip_val=1e-3, logger=logger)
    for step, scalars in logger.sphere().items():
        want = expected(capture.steps[step])
        assert_scalars_match(scalars, want)
        grads = torch.cat([r["grad"].flatten() for r in capture.steps[step].values()])
        assert grads.norm() < 1e-3 * (1 + 1e-6)  # the reference really saw clipped gradients


class Scheduled(Net):
    """The lr changes every step, and two param groups have their own lr and weight decay."""

    def configure_optimizers(self):
        first = [p for n, p in self.named_parameters() if n.startswith("net.0")]
        rest = [p for n, p in self.named_parameters() if not n.startswith("net.0")]
        optimizer = torch.optim.SGD(
            [{"params": first, "lr": 0.1, "weight_decay": 1e-2}, {"params": rest, "lr": 0.03, "weight_decay": 1e-3}],
            momentum=0.9,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_schedulers_and_param_groups_use_the_lr_in_force(tmp_path):
    capture, logger = Capture(), MemoryLogger()
    fit(Scheduled(), tmp_path, [SphereMonitor(per_layer=True), capture], max_steps=4, logger=logger)
    records = logger.sphere()
    assert [capture.steps[s]["net.0"]["lr"] for s in records] == pytest.approx([0.1, 0.05, 0.1 / 3, 0.025])
    for step, scalars in records.items():
        assert_scalars_match(scalars, expected(capture.steps[step]))
        lr0, lr3 = capture.steps[step]["net.0"]["lr"], capture.steps[step]["net.3"]["lr"]
        eq0 = math.sqrt(2 * lr0 * 1e-2 / 1.9)
        assert scalars["sphere/angular_update_equilibrium/net.0"] == pytest.approx(eq0, rel=1e-6)
        assert scalars["sphere/angular_update_equilibrium/net.3"] == pytest.approx(
            math.sqrt(2 * lr3 * 1e-3 / 1.9), rel=1e-6
        )


class PartlyTrained(Net):
    """An extra conv → BN branch that is frozen, and one that is not in the optimizer."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3)).double().requires_grad_(False)
        self.ignored = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3)).double()

    def training_step(self, batch, batch_idx):
        x, y = batch
        extra = self.frozen(x).square().mean() + self.ignored(x).square().mean()
        return F.cross_entropy(self.net(x), y) + extra

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1)


def test_frozen_and_unoptimized_parameters_are_left_out(tmp_path):
    capture, logger = Capture(), MemoryLogger()
    trainer = fit(PartlyTrained(), tmp_path, [SphereMonitor(per_layer=True), capture], max_steps=2, logger=logger)
    monitor = trainer.callbacks[0]
    assert [g.module_name for g in monitor.groups] == ["net.0", "net.3"]
    summary = monitor.summary()
    assert "frozen.0: weight is frozen" in summary and "ignored.0: not stepped by any optimizer" in summary
    for step, scalars in logger.sphere().items():
        assert_scalars_match(scalars, expected(capture.steps[step]))
        assert not any("frozen" in k or "ignored" in k for k in scalars)


class Quasi(Net):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=3)


def test_lbfgs_reports_the_whole_step_and_the_measured_effective_lr(tmp_path):
    capture, logger = Capture(), MemoryLogger()
    fit(Quasi(), tmp_path, [SphereMonitor(per_layer=True), capture], max_steps=3, logger=logger)
    records = logger.sphere()
    assert sorted(records) == [0, 1, 2]
    for step, scalars in records.items():
        assert_scalars_match(scalars, expected(capture.steps[step], measured=True))


class TwoOptimizers(Net):
    """Manual optimization: the first conv (and its BN) has its own optimizer."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, rest = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        first.zero_grad()
        rest.zero_grad()
        self.manual_backward(loss)
        first.step()
        rest.step()

    def configure_optimizers(self):
        head = [p for n, p in self.named_parameters() if n.startswith(("net.0", "net.1"))]
        tail = [p for n, p in self.named_parameters() if not n.startswith(("net.0", "net.1"))]
        return torch.optim.SGD(head, lr=0.1, weight_decay=1e-2), torch.optim.Adam(tail, lr=1e-2)


def test_manual_optimization_with_two_optimizers(tmp_path):
    capture, logger = Capture(), MemoryLogger()
    trainer = fit(TwoOptimizers(), tmp_path, [SphereMonitor(per_layer=True), capture], max_steps=6, logger=logger)
    assert trainer.global_step == 6
    records = logger.sphere()
    assert sorted(records) == [0, 1, 2]  # Lightning logs once per batch; each batch steps both optimizers
    for step, scalars in records.items():
        first = capture.steps[2 * step]["net.0"]
        assert scalars["sphere/radial_update/net.0"] == pytest.approx(
            expected({"net.0": first})["sphere/radial_update/net.0"], rel=1e-9
        )
        assert "sphere/deformation_cos/net.3" in scalars and "sphere/deformation_cos/net.0" not in scalars


class ChannelsLast(Net):
    def on_fit_start(self):
        self.net.to(memory_format=torch.channels_last)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x.contiguous(memory_format=torch.channels_last)), y)


def test_channels_last_weights(tmp_path):
    capture, logger = Capture(), MemoryLogger()
    trainer = fit(ChannelsLast(), tmp_path, [SphereMonitor(per_layer=True), capture], max_steps=3, logger=logger)
    assert trainer.lightning_module.net[3].weight.is_contiguous(memory_format=torch.channels_last)
    for step, scalars in logger.sphere().items():
        assert_scalars_match(scalars, expected(capture.steps[step]))


def test_lightning_pytorch_package(tmp_path):
    import lightning.pytorch as L

    from lightning_sphere.lightning import SphereMonitor as LightningSphereMonitor

    class LNet(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.inner = Net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.inner.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return self.inner.train_dataloader()

    monitor = LightningSphereMonitor(log_every_n_steps=1)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, callbacks=[monitor], default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="no logger"):
        trainer.fit(LNet())
    assert {g.module_name for g in monitor.groups} == {"inner.net.0", "inner.net.3"}
    assert monitor.metrics["sphere/effective_lr/inner.net.0"] > 0
    from lightning.pytorch.utilities.exceptions import MisconfigurationException as LightningMisconfiguration

    with pytest.raises(LightningMisconfiguration):
        LightningSphereMonitor(log_every_n_steps=-1)


def test_resuming_from_a_checkpoint_continues_the_same_measurements(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    full = MemoryLogger()
    fit(Net(), tmp_path / "full", [SphereMonitor()], max_steps=8, logger=full)
    # An epoch is 4 batches: resume at its end, where the (non-resumable) data loader restarts anyway.
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    fit(Net(), tmp_path / "first", [SphereMonitor(), checkpoint], max_steps=4, enable_checkpointing=True)
    resumed = MemoryLogger()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=8, logger=resumed, log_every_n_steps=1, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[SphereMonitor()], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(Net(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    after = resumed.sphere()
    assert sorted(after) == [4, 5, 6, 7]
    for step, scalars in after.items():
        assert_scalars_match(scalars, full.sphere()[step], rel=1e-12)


def test_lightning_cli_yaml(tmp_path):
    from pytorch_lightning.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_sphere.SphereMonitor\n"
        "      init_args:\n"
        "        log_every_n_steps: 5\n"
        "        histogram_every_n_steps: 0\n"
    )
    cli = LightningCLI(pl.LightningModule, run=False, args=["--config", str(config)], save_config_callback=None)
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, SphereMonitor)]
    assert len(monitors) == 1
    assert (monitors[0].log_every_n_steps, monitors[0].histogram_every_n_steps) == (5, 0)
