"""Where measurements go: the loggers' scalars, TensorBoard's histograms and its custom-scalars layout."""

import inspect
import re
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_sphere.sinks import LoggerSink, custom_scalars_layout, tensorboard_writer
from lightning_sphere.tracker import Measurement

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


#: The layout for SCALARS, by hand: no chart of its own for the equilibrium, none for absent metrics.
LAYOUT = {
    "sphere": {
        "norm": chart(r"sphere/norm/.*"),
        "angular_update": chart(r"sphere/angular_update/.*", r"sphere/angular_update_equilibrium/.*"),
        "effective_lr": chart(r"sphere/effective_lr/.*"),
        "skipped_groups": chart(r"sphere/skipped_groups/.*"),
    }
}


# ---------------------------------------------------------------------- the layout


def test_layout_has_one_chart_per_logged_metric():
    assert custom_scalars_layout([*SCALARS, "loss", "sphere_hist/norm/conv"]) == LAYOUT


def test_each_logged_key_lands_on_exactly_one_chart():
    charts = custom_scalars_layout(SCALARS)["sphere"]
    for key in SCALARS:
        holders = [title for title, (_, tags) in charts.items() if any(re.fullmatch(t, key) for t in tags)]
        assert len(holders) == 1, (key, holders)
    assert not any(re.fullmatch(t, "loss") for _, tags in charts.values() for t in tags)


def test_angular_update_chart_without_an_equilibrium():
    layout = custom_scalars_layout(["sphere/angular_update/conv", "sphere/grad_cos/all"])
    assert layout == {
        "sphere": {
            "angular_update": chart(r"sphere/angular_update/.*"),
            "grad_cos": chart(r"sphere/grad_cos/.*"),
        }
    }


def test_no_sphere_metric_no_chart():
    assert custom_scalars_layout([]) == {"sphere": {}}
    assert custom_scalars_layout(["loss", "lr-SGD", "sphere_hist/norm/conv"]) == {"sphere": {}}


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
    LoggerSink().write([logger], m, step=7)
    assert [name for name, _, _ in logger.calls] == ["log_metrics"]
    _, args, kwargs = logger.calls[0]
    assert bound_log_metrics(args, kwargs) == {"metrics": SCALARS, "step": 7}


def test_tensorboard_like_logger_gets_histograms_and_the_layout_once_per_writer():
    writers = [FakeWriter(), FakeWriter()]
    loggers = [TensorBoardLike(writers[0]), PlainLogger(), TensorBoardLike(writers[1])]
    sink = LoggerSink()
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
    LoggerSink().write([TensorBoardLike(writer), TensorBoardLike(writer)], measurement(), step=0)
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
    sink = LoggerSink()
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
