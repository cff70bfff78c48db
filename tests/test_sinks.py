"""Where measurements go: the loggers' scalars, TensorBoard's histograms and its custom-scalars layout."""

import inspect
import re
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_sphere.reporting.layout import custom_scalars_layout, tensorboard_writer
from lightning_sphere.reporting.sinks import LoggerSink, Selection
from lightning_sphere.tracking.tracker import Measurement

SCALARS = {
    "sphere/norm/conv": 1.5,
    "sphere/norm/all": 1.5,
    "sphere/angular_update/conv": 0.25,
    "sphere/angular_update/all": 0.25,
    "sphere/angular_update_equilibrium/conv": 0.125,
    "sphere/effective_lr/conv": 0.5,
    "sphere/skipped_groups/all": 0.0,
}


def chart(*tags):
    return ["Multiline", list(tags)]


#: The layout for the metrics of SCALARS, by hand: no chart of its own for the equilibrium.
LAYOUT = {
    "sphere": {
        "norm": chart(r"sphere/norm/.*"),
        "angular_update": chart(r"sphere/angular_update/.*", r"sphere/angular_update_equilibrium/.*"),
        "effective_lr": chart(r"sphere/effective_lr/.*"),
    }
}
LAYOUT_METRICS = ["effective_lr", "skipped_groups", "angular_update_equilibrium", "norm", "angular_update"]


# ---------------------------------------------------------------------- the layout


def test_layout_has_one_chart_per_selected_metric_in_registry_order():
    layout = custom_scalars_layout(LAYOUT_METRICS)
    assert layout == LAYOUT
    assert list(layout["sphere"]) == list(LAYOUT["sphere"])  # the registry's order, whatever the selection's


def test_default_layout_charts_every_metric_once():
    from lightning_sphere import METRICS

    charts = custom_scalars_layout()["sphere"]
    assert list(charts) == [m for m in METRICS if m != "angular_update_equilibrium"]
    every_key = [f"sphere/{m}/{name}" for m in METRICS for name in ("conv", "all")]
    for key in every_key:
        holders = [title for title, (_, tags) in charts.items() if any(re.fullmatch(t, key) for t in tags)]
        assert len(holders) == 1, (key, holders)
    assert not any(re.fullmatch(t, k) for _, tags in charts.values() for t in tags for k in ("loss", "train/loss"))


def test_angular_update_chart_always_has_the_equilibrium_line():
    # Runs with and without an equilibrium (Adam with L2 decay, SGD-M with decay) must write the same chart.
    assert custom_scalars_layout(["angular_update"]) == {
        "sphere": {"angular_update": LAYOUT["sphere"]["angular_update"]}
    }
    alone = custom_scalars_layout(["angular_update_equilibrium"])
    assert alone == {"sphere": {"angular_update_equilibrium": chart(r"sphere/angular_update_equilibrium/.*")}}


def test_no_metric_no_chart():
    assert custom_scalars_layout([]) == {"sphere": {}}


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
    LoggerSink(metrics=LAYOUT_METRICS).write([logger], m, step=7)
    assert [name for name, _, _ in logger.calls] == ["log_metrics"]
    _, args, kwargs = logger.calls[0]
    assert bound_log_metrics(args, kwargs) == {"metrics": SCALARS, "step": 7}


def test_tensorboard_like_logger_gets_histograms_and_the_layout_once_per_writer():
    writers = [FakeWriter(), FakeWriter()]
    loggers = [TensorBoardLike(writers[0]), PlainLogger(), TensorBoardLike(writers[1])]
    sink = LoggerSink(metrics=LAYOUT_METRICS)
    sink.write(loggers, measurement(), step=3)
    sink.write(loggers, measurement(scale=2.0), step=5)
    for logger, writer in zip(loggers[::2], writers, strict=True):
        assert logger.metrics == [(SCALARS, 3), ({k: 2 * v for k, v in SCALARS.items()}, 5)]
        assert [(tag, step) for tag, _, step in writer.histograms] == [("sphere_hist/norm/conv", s) for s in (3, 5)]
        torch.testing.assert_close(writer.histograms[0][1], torch.tensor([1.0, 2.0, 4.0]))
        torch.testing.assert_close(writer.histograms[1][1], torch.tensor([2.0, 4.0, 8.0]))
        assert writer.layouts == [LAYOUT]
    assert [name for name, _, _ in loggers[1].calls] == ["log_metrics", "log_metrics"]


def test_two_loggers_sharing_a_writer_get_one_layout():
    writer = FakeWriter()
    LoggerSink(metrics=LAYOUT_METRICS).write([TensorBoardLike(writer), TensorBoardLike(writer)], measurement(), step=0)
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
    from tensorboard.plugins.custom_scalar import layout_pb2

    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    sink = LoggerSink(metrics=LAYOUT_METRICS)
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
    layouts = events.Tensors("custom_scalars__config__")
    assert len(layouts) == 1
    config = layout_pb2.Layout.FromString(layouts[0].tensor_proto.string_val[0])
    assert [c.title for c in config.category] == ["sphere"]
    charts = {c.title: list(c.multiline.tag) for c in config.category[0].chart}
    assert charts == {title: tags for title, (_, tags) in LAYOUT["sphere"].items()}


@pytest.mark.parametrize("custom_scalars", [True, False])
def test_tensorboard_layout_written_only_when_asked(tmp_path, custom_scalars):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    LoggerSink(custom_scalars).write([logger], measurement(), step=0)
    logger.finalize("success")
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"tensors": 0}).Reload()
    assert ("custom_scalars__config__" in events.Tags()["tensors"]) == custom_scalars
