"""What reaches the charts: which keys by default and on request, one layout for every run, the end of fit."""

import re

import pytest
import torch
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_sphere import METRICS, SphereMonitor
from tests.lightning_helpers import Capture, MemoryLogger, Net, assert_scalars_match, expected, fit
from tests.tensorboard_read import Served

#: Net's tracked modules; SGD-M with weight decay defines every metric but Adam's two, update_scale (§8: Muon,
#: Lion, Adafactor) and skipped_groups.
LAYERS = ("net.0", "net.3")
SGD_M = [m for m in METRICS if m not in ("deformation_cos", "momentum_radial", "update_scale")]


def events(path):
    sizes = {"scalars": 0, "histograms": 0, "tensors": 0}
    return EventAccumulator(str(path), size_guidance=sizes).Reload()


def test_default_keys_every_metric_over_all_groups_and_three_per_layer():
    # Written out by hand: what a user of a two-layer SGD-M model sees, 15 cards instead of 30.
    logger = MemoryLogger()
    fit(Net(), None, [SphereMonitor(log_every_n_steps=2)], max_steps=2, logger=logger)
    (scalars,) = logger.sphere().values()
    want = {f"sphere/{m}/all" for m in SGD_M}
    want |= {f"sphere/{m}/{layer}" for m in ("effective_lr", "angular_update", "norm") for layer in LAYERS}
    assert set(scalars) == want


def test_per_layer_true_gives_every_metric_per_layer_with_the_reference_values(tmp_path):
    capture, logger = Capture(), MemoryLogger()
    monitor = SphereMonitor(per_layer=True, log_every_n_steps=2)
    fit(Net(), tmp_path, [monitor, capture], max_steps=2, logger=logger)
    (scalars,) = logger.sphere().values()
    reference = expected(capture.steps[1])
    assert set(scalars) == set(reference) | {"sphere/angular_update_equilibrium/all"}
    assert_scalars_match(scalars, reference)
    # the equilibrium once: both layers share lr 0.1, weight decay 1e-2 and momentum 0.9 (§7)
    assert scalars["sphere/angular_update_equilibrium/all"] == pytest.approx((2 * 0.1 * 1e-2 / 1.9) ** 0.5, rel=1e-12)


def test_chosen_metrics_only(tmp_path):
    logger = MemoryLogger()
    monitor = SphereMonitor(metrics=["effective_lr", "grad_cos"], per_layer=["grad_cos"], log_every_n_steps=1)
    fit(Net(), tmp_path, [monitor], max_steps=1, logger=logger)
    want = {"sphere/effective_lr/all", "sphere/grad_cos/all", *(f"sphere/grad_cos/{layer}" for layer in LAYERS)}
    assert set(logger.sphere()[0]) == want == set(monitor.metrics)


def test_equilibrium_per_layer_when_param_groups_differ(tmp_path):
    # Two weight decays: two equilibria, √(2ηλ/(1 + μ)) each (§7), computed here.
    lr, momentum, decays = 0.1, 0.9, {"net.0": 1e-2, "net.3": 4e-2}

    def two_groups(params):
        params = list(params)
        first = params[:2]  # net.0's weight and bias
        return torch.optim.SGD(
            [
                {"params": first, "weight_decay": decays["net.0"]},
                {"params": [p for p in params if all(p is not q for q in first)], "weight_decay": decays["net.3"]},
            ],
            lr=lr,
            momentum=momentum,
        )

    logger = MemoryLogger()
    fit(Net(optimizer=two_groups), tmp_path, [SphereMonitor()], max_steps=1, logger=logger)
    (scalars,) = logger.sphere().values()
    for layer, decay in decays.items():
        prediction = (2 * lr * decay / (1 + momentum)) ** 0.5
        assert scalars[f"sphere/angular_update_equilibrium/{layer}"] == pytest.approx(prediction, rel=1e-6)


def test_skipped_groups_appear_only_when_groups_were_skipped(tmp_path):
    class Dead(Net):
        def on_train_batch_start(self, batch, batch_idx):
            if batch_idx == 1:
                with torch.no_grad():
                    self.net[0].weight[2].zero_()  # a dead filter: zero norm, left out of the metrics

    logger = MemoryLogger()
    fit(Dead(), tmp_path, [SphereMonitor()], max_steps=2, logger=logger)
    records = logger.sphere()
    assert "sphere/skipped_groups/all" not in records[0]
    assert records[1]["sphere/skipped_groups/all"] == 1


def test_one_layout_for_every_optimizer_and_correction(tmp_path):
    # The demo's scenario: runs of SGD-M, Adam with L2 decay (no equilibrium) and AdamSRT in one logdir, each with
    # a LearningRateMonitor (whose tags name the optimizer), read as TensorBoard's Custom Scalars tab reads them.
    runs = {
        "sgdm": (Net(), False),
        "adam": (Net(optimizer=lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3)), False),
        "adamsrt": (Net(optimizer=lambda p: torch.optim.Adam(p, lr=1e-2)), True),
    }
    for name, (module, correction) in runs.items():
        tb = TensorBoardLogger(tmp_path, name="cmp", version=name)
        callbacks = [SphereMonitor(spherical_correction=correction), LearningRateMonitor()]
        fit(module, tmp_path, callbacks, max_steps=4, logger=tb, log_every_n_steps=2)
    served = Served(tmp_path / "cmp")
    first, per_layer = served.layout()  # merged over the runs: a chart drawn twice would be listed twice
    # every metric some run logged, the headline ones first; none for update_scale, which no run has (§8: Muon, Lion,
    # Adafactor), so no chart stays empty
    rest = ("effective_lr", "angular_update", "norm", "angular_update_equilibrium", "update_scale")
    sphere = [m for m in METRICS if m not in rest]
    assert list(first["charts"]) == ["loss", "learning rate", "effective_lr", "angular_update", "norm", *sphere]
    assert list(per_layer["charts"]) == [f"{m} per layer" for m in ("effective_lr", "angular_update", "norm")]
    assert per_layer["closed"] and not first["closed"]
    optimizer = {"sgdm": "SGD", "adam": "Adam", "adamsrt": "Adam"}
    for run in served.runs:
        assert served.lines(run, first["charts"]["loss"]) == {"loss"}
        assert served.lines(run, first["charts"]["learning rate"]) == {f"lr-{optimizer[run]}"}
        assert served.lines(run, first["charts"]["effective_lr"]) == {"sphere/effective_lr/all"}  # a line per run
        # Adam with L2 decay and Adam without decay have none (§7)
        equilibrium = {"sphere/angular_update_equilibrium/all"} if run == "sgdm" else set()
        assert served.lines(run, first["charts"]["angular_update"]) == {"sphere/angular_update/all"} | equilibrium
        assert served.lines(run, per_layer["charts"]["norm per layer"]) == {"sphere/norm/net.0", "sphere/norm/net.3"}


def test_the_last_step_of_fit_is_logged_with_its_histograms(tmp_path):
    capture, memory = Capture(), MemoryLogger()
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    monitor = SphereMonitor(log_every_n_steps=3, histogram_every_n_steps=6, per_layer=True)
    fit(Net(), tmp_path, [monitor, capture], max_steps=7, logger=[tb, memory])
    records = memory.sphere()
    assert sorted(records) == [2, 5, 6]  # the cadence, then the last step (Lightning's step numbering)
    assert_scalars_match(records[6], expected(capture.steps[6]))
    assert monitor.metrics == records[6]
    log = events(tmp_path / "tb" / "version_0")
    for metric in ("effective_lr", "angular_update", "norm"):
        assert [h.step for h in log.Histograms(f"sphere_hist/{metric}/net.3")] == [5, 6]
    last = log.Histograms("sphere_hist/norm/net.3")[-1].histogram_value
    assert last.num == 8  # its groups; their RMS is the logged per-layer norm
    assert (last.sum_squares / last.num) ** 0.5 == pytest.approx(records[6]["sphere/norm/net.3"], rel=1e-6)


def test_fewer_steps_than_the_cadence_still_leave_metrics(tmp_path):
    capture, monitor = Capture(), SphereMonitor(per_layer=True)  # logs every 50 steps, the Trainer's default
    fit(Net(), tmp_path, [monitor, capture], max_steps=3, log_every_n_steps=50, logger=False)
    assert_scalars_match(monitor.metrics, expected(capture.steps[2]))


def test_a_fit_stopped_early_gets_the_histograms_of_its_last_logged_step(tmp_path):
    class Stops(Net):
        def training_step(self, batch, batch_idx):
            if self.global_step == 4:  # early stopping, say: the Trainer never reaches max_steps
                self.trainer.should_stop = True
            return super().training_step(batch, batch_idx)

    memory = MemoryLogger()
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    fit(Stops(), tmp_path, [SphereMonitor(log_every_n_steps=2, histogram_every_n_steps=10)], max_steps=100,
        logger=[tb, memory])  # fmt: skip
    records = memory.sphere()
    assert sorted(records) == [1, 3]
    log = events(tmp_path / "tb" / "version_0")
    histogram = log.Histograms("sphere_hist/norm/net.0")
    assert [h.step for h in histogram] == [3]  # none on the cadence (10), the last logged step's at the end
    rms = (histogram[0].histogram_value.sum_squares / histogram[0].histogram_value.num) ** 0.5
    assert rms == pytest.approx(records[3]["sphere/norm/net.0"], rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metrics": ["effective_LR"]}, "'effective_LR' is not a metric (did you mean 'effective_lr'"),
        ({"per_layer": ["norm", "angle"]}, "`per_layer`: 'angle' is not a metric"),
        ({"metrics": 3}, "SphereMonitor(`metrics`) must be a list of metric names or None, got 3 (int)"),
        ({"per_layer": None}, "SphereMonitor(`per_layer`) must be a bool or a list of metric names, got None"),
    ],
)
def test_unknown_metrics_are_refused_at_construction(kwargs, message):
    with pytest.raises(MisconfigurationException, match=re.escape(message)):
        SphereMonitor(**kwargs)


def test_no_histogrammed_metric_selected_means_no_histograms(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    fit(Net(), tmp_path, [SphereMonitor(metrics=["grad_cos"], histogram_every_n_steps=1)], max_steps=2, logger=tb)
    log = events(tmp_path / "tb" / "version_0")
    assert log.Tags()["histograms"] == [] and "sphere/grad_cos/all" in log.Tags()["scalars"]
