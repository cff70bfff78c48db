"""Where measurements go: the loggers' scalars, TensorBoard's histograms and its custom-scalars layout."""

import inspect
import re
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_sphere.measurement.metrics import METRICS
from lightning_sphere.reporting.layout import custom_scalars_layout, tensorboard_writer, training_charts
from lightning_sphere.reporting.sinks import LoggerSink, Selection
from lightning_sphere.tracking.tracker import Measurement
from tests.tensorboard_read import Served

SCALARS = {
    "sphere/norm/conv": 1.5,
    "sphere/norm/all": 1.5,
    "sphere/angular_update/conv": 0.25,
    "sphere/angular_update/all": 0.25,
    "sphere/angular_update_equilibrium/conv": 0.125,
    "sphere/effective_lr/conv": 0.5,
    "sphere/skipped_groups/all": 0.0,
}


#: Keys as the tracker logs them for two layers: every metric over all groups and per layer.
EVERY_KEY = [f"sphere/{m}/{name}" for m in (*METRICS, "skipped_groups") for name in ("conv", "block.1", "all")]
LAYOUT_METRICS = ["effective_lr", "skipped_groups", "angular_update_equilibrium", "norm", "angular_update"]


def drawn(regexes, tags):
    """The tags a chart with these regexes draws, matched as TensorBoard matches them (``re.match``)."""
    return {tag for tag in tags if any(re.match(r, tag) for r in regexes)}


def categories(layout):
    return {c.title: {chart.title: list(chart.multiline.tag) for chart in c.chart} for c in layout.category}


# ---------------------------------------------------------------------- the layout


def test_first_category_has_one_chart_per_metric_over_all_groups_headline_first():
    layout = custom_scalars_layout(LAYOUT_METRICS)
    assert [(c.title, c.closed) for c in layout.category] == [("training", False), ("sphere per layer", True)]
    first = categories(layout)["training"]
    assert list(first) == ["effective_lr", "angular_update", "norm"]
    assert {title: drawn(tags, EVERY_KEY) for title, tags in first.items()} == {
        "effective_lr": {"sphere/effective_lr/all"},
        "angular_update": {"sphere/angular_update/all", "sphere/angular_update_equilibrium/all"},
        "norm": {"sphere/norm/all"},
    }


def test_per_layer_category_draws_every_layer_and_never_all():
    per_layer = categories(custom_scalars_layout(LAYOUT_METRICS))["sphere per layer"]
    assert {title: drawn(tags, EVERY_KEY) for title, tags in per_layer.items()} == {
        "effective_lr per layer": {"sphere/effective_lr/conv", "sphere/effective_lr/block.1"},
        # the equilibrium: under all, and per layer when the layers' differ
        "angular_update per layer": {"sphere/angular_update/conv", "sphere/angular_update/block.1"}
        | {f"sphere/angular_update_equilibrium/{n}" for n in ("conv", "block.1", "all")},
        "norm per layer": {"sphere/norm/conv", "sphere/norm/block.1"},
    }


def test_default_layout_charts_every_metric_once_per_category():
    layout = categories(custom_scalars_layout(per_layer=METRICS))
    assert list(layout["training"])[:3] == ["effective_lr", "angular_update", "norm"]
    for title, charts in layout.items():
        for key in EVERY_KEY:
            if key.startswith("sphere/skipped_groups/") or (title == "training") != key.endswith("/all"):
                continue  # skipped_groups has no chart; layers are charted in the second category only
            holders = [chart for chart, tags in charts.items() if drawn(tags, [key])]
            assert len(holders) == 1, (title, key, holders)  # the equilibrium: in the angular update's chart
    assert not drawn([t for charts in layout.values() for tags in charts.values() for t in tags], ["loss", "lr-SGD"])


def test_per_layer_charts_follow_the_selection():
    layout = categories(custom_scalars_layout(["norm", "grad_cos"], per_layer=["grad_cos"]))
    assert list(layout["training"]) == ["norm", "grad_cos"]
    assert list(layout["sphere per layer"]) == ["grad_cos per layer"]
    no_layers = custom_scalars_layout(["norm"], per_layer=[])
    assert [c.title for c in no_layers.category] == ["training"]
    assert categories(custom_scalars_layout([]))["training"] == {}


def test_runs_of_any_optimizer_write_the_same_sphere_charts():
    # With and without an equilibrium (Adam with L2 decay, SGD-M with decay): the layout depends on the selection.
    assert custom_scalars_layout(["angular_update"]) == custom_scalars_layout(["angular_update"])
    alone = categories(custom_scalars_layout(["angular_update_equilibrium"], per_layer=[]))["training"]
    assert {t: drawn(tags, EVERY_KEY) for t, tags in alone.items()} == {
        "angular_update_equilibrium": {"sphere/angular_update_equilibrium/all"}
    }


#: Tags a Lightning run wrote: its losses, metrics, and a LearningRateMonitor's learning rates, momenta, decays.
RUN_TAGS = ["train/loss", "val/loss", "val/acc", "epoch", "lr-SGD", "lr-SGD-momentum", "lr-SGD/pg1"]
RUN_TAGS += ["lr-SGD/pg1-weight_decay", "my_lr", "lr_scale_loss", "step_lr/warmup", "optimizer/beta1"]


def test_the_runs_losses_and_learning_rates_come_first():
    charts = training_charts(RUN_TAGS)
    # training losses first, then validation's, each in name order (a run's on_step/on_epoch pair side by side)
    assert [title for title, _ in charts] == ["lr_scale_loss", "train/loss", "val/loss", "learning rate"]
    order = training_charts(["val_loss", "train_loss_step", "eval/loss", "train_loss_epoch", "test_loss"])
    assert [t for t, _ in order] == ["train_loss_epoch", "train_loss_step", "eval/loss", "test_loss", "val_loss"]
    assert {title: drawn(tags, RUN_TAGS + EVERY_KEY) for title, tags in charts} == {
        "train/loss": {"train/loss"},
        "val/loss": {"val/loss"},
        "lr_scale_loss": {"lr_scale_loss"},
        "learning rate": {"lr-SGD", "lr-SGD/pg1", "my_lr", "step_lr/warmup"},
    }
    assert training_charts(["val/acc", "epoch"]) == []  # no chart for what the run did not write


def test_known_learning_rates_are_charted_whatever_their_name():
    # A scheduler named in configure_optimizers: LearningRateMonitor logs it under that name.
    (chart,) = training_charts(["epoch"], learning_rates=["warmup", "lr-Adam"])
    assert chart[0] == "learning rate" and drawn(chart[1], ["warmup", "lr-Adam", "warmup2", "epoch"]) == {
        "warmup",
        "lr-Adam",
    }


def test_learning_rate_chart_is_one_chart_for_runs_of_different_optimizers():
    # TensorBoard merges the runs' layouts chart by chart: one definition, one chart, a line per run.
    def layout(optimizer):
        return custom_scalars_layout(["norm"], training_tags=["train/loss", f"lr-{optimizer}", f"lr-{optimizer}/pg1"])

    assert layout("SGD") == layout("AdamW") == layout("Adam")


def test_the_loggers_prefix_is_in_every_tag(tmp_path):
    tags = ["run1-sphere/norm/all", "run1-sphere/norm/conv", "run1-train/loss", "sphere/norm/all"]
    layout = categories(custom_scalars_layout(["norm"], ["norm"], "run1-", ["run1-train/loss"]))
    assert {t: drawn(c, tags) for t, c in layout["training"].items()} == {
        "run1-train/loss": {"run1-train/loss"},
        "norm": {"run1-sphere/norm/all"},
    }
    assert drawn(layout["sphere per layer"]["norm per layer"], tags) == {"run1-sphere/norm/conv"}

    # a new user's trial: with a prefix, each optimizer's learning rate got a chart of its own
    def with_prefix(optimizer):
        return custom_scalars_layout(["norm"], [], "x-", [f"x-lr-{optimizer}", f"x-lr-{optimizer}-momentum"])

    assert with_prefix("SGD") == with_prefix("AdamW")
    lr = categories(with_prefix("SGD"))["training"]["learning rate"]
    assert drawn(lr, ["x-lr-SGD", "x-lr-SGD-momentum", "lr-SGD", "x-lr-AdamW/pg1"]) == {"x-lr-SGD", "x-lr-AdamW/pg1"}
    logger = TensorBoardLogger(tmp_path, name="tb", version=0, prefix="run1")
    sink = LoggerSink(selection=Selection.of(["norm"]))
    sink.write([logger], Measurement({"sphere/norm/all": 1.0, "sphere/norm/conv": 2.0}, {}), 1, (["train/loss"], []))
    logger.finalize("success")
    served = Served(tmp_path / "tb")
    (run,) = served.runs
    charts = served.layout()[0]["charts"]
    assert served.lines(run, charts["norm"]) == {"run1-sphere/norm/all"}


def test_histograms_carry_the_loggers_prefix_as_the_scalars_do(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb", version=0, prefix="run1")
    LoggerSink().write([logger], measurement(), step=1)
    logger.finalize("success")
    tags = EventAccumulator(str(tmp_path / "tb" / "version_0")).Reload().Tags()
    assert tags["histograms"] == ["run1-sphere_hist/norm/conv"]
    assert set(tags["scalars"]) == {f"run1-{key}" for key in SCALARS}


# ---------------------------------------------------------------------- which keys are logged


def full_measurement(equilibria=(0.125, 0.125), skipped=0.0):
    """Every metric over two layers and all, as the tracker gives it."""
    from lightning_sphere import METRICS

    scalars = {}
    for i, metric in enumerate(METRICS):
        values = equilibria if metric == "angular_update_equilibrium" else (i + 0.25, i + 0.5)
        scalars |= {f"sphere/{metric}/a": values[0], f"sphere/{metric}/b.c": values[1]}
        scalars[f"sphere/{metric}/all"] = sum(values) / 2
    scalars["sphere/skipped_groups/all"] = skipped
    hist = {f"sphere_hist/{m}/{layer}": torch.ones(2) for m in ("norm", "effective_lr") for layer in ("a", "b.c")}
    return Measurement(scalars, hist, ["a"])


def test_default_selection_every_metric_over_all_and_headline_metrics_per_layer():
    from lightning_sphere import METRICS

    m = full_measurement()
    kept = Selection.of()(m)
    headline = {"effective_lr", "angular_update", "norm"}
    expected = {f"sphere/{metric}/all" for metric in METRICS}
    expected |= {f"sphere/{metric}/{layer}" for metric in headline for layer in ("a", "b.c")}
    assert set(kept.scalars) == expected  # equal equilibria: once, under all; skipped_groups zero: absent
    assert all(kept.scalars[k] == m.scalars[k] for k in kept.scalars)
    assert kept.histograms.keys() == m.histograms.keys() and kept.radial == ["a"]


def test_equilibrium_per_layer_only_when_layers_differ():
    same_up_to_float32 = full_measurement(equilibria=(0.125, 0.125 * (1 + 2**-23)))
    assert "sphere/angular_update_equilibrium/a" not in Selection.of()(same_up_to_float32).scalars
    differ = Selection.of()(full_measurement(equilibria=(0.125, 0.0625))).scalars
    assert {k for k in differ if "equilibrium" in k} == {
        f"sphere/angular_update_equilibrium/{n}" for n in ("a", "b.c", "all")
    }
    # it follows angular_update's per-layer choice
    no_layers = Selection.of(per_layer=["norm"])(full_measurement(equilibria=(0.125, 0.0625))).scalars
    assert {k for k in no_layers if "equilibrium" in k} == {"sphere/angular_update_equilibrium/all"}


def test_skipped_groups_logged_only_when_not_zero():
    assert "sphere/skipped_groups/all" not in Selection.of()(full_measurement()).scalars
    assert Selection.of()(full_measurement(skipped=3.0)).scalars["sphere/skipped_groups/all"] == 3.0


def test_chosen_metrics_and_layers():
    m = full_measurement(equilibria=(0.125, 0.0625), skipped=1.0)
    kept = Selection.of(metrics=["grad_cos", "norm"], per_layer=True)(m)
    assert set(kept.scalars) == {f"sphere/{metric}/{n}" for metric in ("grad_cos", "norm") for n in ("a", "b.c", "all")}
    assert set(kept.histograms) == {"sphere_hist/norm/a", "sphere_hist/norm/b.c"}
    assert set(Selection.of(per_layer=False)(m).scalars) == {k for k in m.scalars if k.endswith("/all")}
    assert set(Selection.of(metrics="norm", per_layer=False)(m).scalars) == {"sphere/norm/all"}
    assert not Selection.of(metrics=["grad_cos"]).histograms and Selection.of().histograms


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metrics": ["effective_LR"]}, "'effective_LR' is not a metric (did you mean 'effective_lr'"),
        ({"per_layer": ["angle"]}, "`per_layer`: 'angle' is not a metric"),
    ],
)
def test_unknown_metric_names_are_refused_with_the_valid_ones(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        Selection.of(**kwargs)
    assert "the metrics are norm, angular_update" in str(raised.value)


# ---------------------------------------------------------------------- fakes of the two kinds of logger


def bound_log_metrics(args, kwargs):
    """A ``log_metrics`` call's arguments by name, as Lightning's ``Logger.log_metrics(metrics, step)`` takes them."""

    def log_metrics(metrics, step=None):
        pass

    return dict(inspect.signature(log_metrics).bind(*args, **kwargs).arguments)


class PlainLogger:
    """Records every method called on it; has no ``experiment`` (CSV-, MLflow-like)."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        if name == "experiment":
            raise AttributeError(name)

        def record(*args, **kwargs):
            self.calls.append((name, args, kwargs))

        return record


class FakeWriter:
    """A SummaryWriter's two methods the sink needs, recording what they were given."""

    def __init__(self):
        self.histograms = []
        self.layouts = []

    def add_histogram(self, tag, values, global_step=None):
        self.histograms.append((tag, values.clone(), global_step))

    def add_custom_scalars(self, layout):
        self.layouts.append(layout)


class TensorBoardLike:
    def __init__(self, experiment):
        self.experiment = experiment
        self.metrics = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((dict(metrics), step))


def measurement(scale=1.0, histograms=True):
    scalars = {k: v * scale for k, v in SCALARS.items()}
    hist = {"sphere_hist/norm/conv": torch.tensor([1.0, 2.0, 4.0]) * scale} if histograms else {}
    return Measurement(scalars, hist)


def test_tensorboard_writer_is_found_only_behind_a_tensorboard_like_logger():
    writer = FakeWriter()
    assert tensorboard_writer(TensorBoardLike(writer)) is writer
    assert tensorboard_writer(PlainLogger()) is None
    assert tensorboard_writer(TensorBoardLike(SimpleNamespace(add_histogram=writer.add_histogram))) is None
    assert tensorboard_writer(TensorBoardLike(SimpleNamespace(log=print))) is None  # a wandb-like run


def test_plain_logger_gets_only_the_scalars_at_the_step():
    logger = PlainLogger()
    m = measurement()
    LoggerSink(selection=Selection.of(LAYOUT_METRICS)).write([logger], m, step=7)
    assert [name for name, _, _ in logger.calls] == ["log_metrics"]
    _, args, kwargs = logger.calls[0]
    assert bound_log_metrics(args, kwargs) == {"metrics": SCALARS, "step": 7}


def test_tensorboard_like_logger_gets_histograms_and_the_layout_once_per_writer():
    writers = [FakeWriter(), FakeWriter()]
    loggers = [TensorBoardLike(writers[0]), PlainLogger(), TensorBoardLike(writers[1])]
    sink = LoggerSink(selection=Selection.of(LAYOUT_METRICS))
    sink.write(loggers, measurement(), step=3)
    sink.write(loggers, measurement(scale=2.0), step=5)
    for logger, writer in zip(loggers[::2], writers, strict=True):
        assert logger.metrics == [(SCALARS, 3), ({k: 2 * v for k, v in SCALARS.items()}, 5)]
        assert [(tag, step) for tag, _, step in writer.histograms] == [("sphere_hist/norm/conv", s) for s in (3, 5)]
        torch.testing.assert_close(writer.histograms[0][1], torch.tensor([1.0, 2.0, 4.0]))
        torch.testing.assert_close(writer.histograms[1][1], torch.tensor([2.0, 4.0, 8.0]))
        (layout,) = writer.layouts  # a writer other than torch's: through add_custom_scalars, as a dict
        assert list(layout) == ["training", "sphere per layer"]
        assert layout["training"]["angular_update"] == [
            "Multiline",
            ["sphere/angular_update/all$", "sphere/angular_update_equilibrium/all$"],
        ]
    assert [name for name, _, _ in loggers[1].calls] == ["log_metrics", "log_metrics"]


def test_layout_is_written_again_only_when_the_runs_tags_change():
    writer = FakeWriter()
    sink = LoggerSink(selection=Selection.of(LAYOUT_METRICS))
    for step, run in enumerate([((), ()), (["epoch"], []), (["train/loss"], ["lr-SGD"]), (["train/loss"], ["lr-SGD"])]):
        sink.write([TensorBoardLike(writer)], measurement(), step=step, run=run)
    sink.write_layout([TensorBoardLike(writer)], 9, (["train/loss", "val/loss"], ["lr-SGD"]))
    assert [list(layout["training"])[:3] for layout in writer.layouts] == [
        ["effective_lr", "angular_update", "norm"],  # "epoch" is neither a loss nor a learning rate: no change
        ["train/loss", "learning rate", "effective_lr"],
        ["train/loss", "val/loss", "learning rate"],
    ]


def test_only_metrics_the_run_logged_get_charts():
    # Adam's deformation_cos is selected but an SGD run never logs it: no empty chart; charted once it comes.
    writer = FakeWriter()
    sink = LoggerSink(selection=Selection.of(["norm", "deformation_cos"], per_layer=True))
    sink.write([TensorBoardLike(writer)], Measurement({"sphere/norm/all": 1.0}, {}), step=0)
    sink.write([TensorBoardLike(writer)], Measurement({"sphere/norm/all": 1.0}, {}), step=1)
    sink.write([TensorBoardLike(writer)], Measurement({"sphere/deformation_cos/conv": 0.5}, {}), step=2)
    assert [{c: list(charts) for c, charts in layout.items()} for layout in writer.layouts] == [
        {"training": ["norm"], "sphere per layer": ["norm per layer"]},
        {"training": ["norm", "deformation_cos"], "sphere per layer": ["norm per layer", "deformation_cos per layer"]},
    ]


def test_two_loggers_sharing_a_writer_get_one_layout():
    writer = FakeWriter()
    LoggerSink(selection=Selection.of(LAYOUT_METRICS)).write(
        [TensorBoardLike(writer), TensorBoardLike(writer)], measurement(), step=0
    )
    assert len(writer.layouts) == 1
    assert len(writer.histograms) == 2


def test_custom_scalars_off_writes_no_layout_but_still_histograms():
    writer = FakeWriter()
    sink = LoggerSink(custom_scalars=False)
    sink.write([TensorBoardLike(writer)], measurement(), step=1)
    sink.write([TensorBoardLike(writer)], measurement(histograms=False), step=2)
    assert writer.layouts == []
    assert [(tag, step) for tag, _, step in writer.histograms] == [("sphere_hist/norm/conv", 1)]


# ---------------------------------------------------------------------- a real TensorBoard log


def test_tensorboard_events_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    sink = LoggerSink(selection=Selection.of(LAYOUT_METRICS))
    sink.write([logger], measurement(), step=3)
    sink.write([logger], measurement(scale=2.0), step=5)
    logger.finalize("success")
    events = EventAccumulator(
        str(tmp_path / "tb" / "version_0"), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0}
    ).Reload()
    assert set(events.Tags()["scalars"]) == set(SCALARS)
    for key, value in SCALARS.items():  # values exact in float32
        assert [(e.step, e.value) for e in events.Scalars(key)] == [(3, value), (5, 2 * value)], key
    hist = events.Histograms("sphere_hist/norm/conv")
    assert [h.step for h in hist] == [3, 5]
    first, second = (h.histogram_value for h in hist)
    assert (first.num, first.min, first.max, first.sum, first.sum_squares) == (3, 1, 4, 7, 21)
    assert (second.num, second.min, second.max, second.sum, second.sum_squares) == (3, 2, 8, 14, 84)
    served = Served(tmp_path / "tb")
    first, per_layer = served.layout()
    assert (first["title"], first["closed"], per_layer["title"], per_layer["closed"]) == (
        "training",
        False,
        "sphere per layer",
        True,
    )
    lines = {title: served.lines("version_0", tags) for title, tags in first["charts"].items()}
    assert lines == {
        "effective_lr": set(),  # logged for conv only: no line over all groups
        "angular_update": {"sphere/angular_update/all"},
        "norm": {"sphere/norm/all"},
    }
    lines = {title: served.lines("version_0", tags) for title, tags in per_layer["charts"].items()}
    assert lines == {
        "effective_lr per layer": {"sphere/effective_lr/conv"},
        "angular_update per layer": {"sphere/angular_update/conv", "sphere/angular_update_equilibrium/conv"},
        "norm per layer": {"sphere/norm/conv"},
    }


@pytest.mark.parametrize("custom_scalars", [True, False])
def test_tensorboard_layout_written_only_when_asked(tmp_path, custom_scalars):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    LoggerSink(custom_scalars).write([logger], measurement(), step=0)
    logger.finalize("success")
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"tensors": 0}).Reload()
    assert ("custom_scalars__config__" in events.Tags()["tensors"]) == custom_scalars
