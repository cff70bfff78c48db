"""TensorBoard's custom-scalars layout: the training at a glance first, the sphere per layer below, collapsed.

The first category, ``training``, answers "is my training healthy, and what does the optimizer do on the sphere":
the run's own loss(es) and learning rate(s), found among the tags the run actually wrote, then one chart per
selected metric over all groups (``sphere/<metric>/all``: one line per run, so runs compare at a glance; the
angular update drawn with its §7 equilibrium). The second, ``sphere per layer``, closed until opened, has one
chart per metric logged per layer, every layer a line: the place to compare layers, one run at a time.
TensorBoard merges the layouts of the runs it shows by category and chart, so a chart's definition depends only
on what it draws: runs of any optimizer, with or without the correction, share their charts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_sphere.measurement.metrics import METRICS, SKIPPED_GROUPS

#: Every metric a selection may name: the registry's, then the count of groups left out of a step.
LOGGABLE = (*METRICS, SKIPPED_GROUPS)
_EQUILIBRIUM = "angular_update_equilibrium"
#: The categories' titles.
TRAINING, PER_LAYER_CATEGORY = "training", "sphere per layer"
#: The sphere's charts that come first in the training category, the headline ones; the rest follow in the
#: registry's order.
HEADLINE = ("effective_lr", "angular_update", "norm")
#: Learning rates as Lightning's ``LearningRateMonitor`` names them (``lr-<optimizer>[/pg<i>]``, momentum and
#: weight decay under the same name with a suffix): one chart for every run, whatever its optimizer.
LR_MONITOR_TAGS = r"lr-.*(?<!-momentum)(?<!-weight_decay)"
_LR_WORD = re.compile(r"(?:^|[/_.\-])(?:lr|learning_rate)(?:$|[/_.\-])", re.IGNORECASE)
_EVALUATION = re.compile(r"(?:^|[/_.\-])(?:val|valid|validation|eval|test)(?:$|[/_.\-])", re.IGNORECASE)
_NOT_LR = re.compile(r"(?:momentum|weight_decay|beta\d?)$", re.IGNORECASE)


def tensorboard_writer(logger: Any) -> Any | None:
    """The ``SummaryWriter`` behind a TensorBoard-like logger, ``None`` for other loggers."""
    experiment = getattr(logger, "experiment", None)
    has = all(callable(getattr(experiment, name, None)) for name in ("add_histogram", "add_custom_scalars"))
    return experiment if has else None


def training_charts(
    tags: Iterable[str], learning_rates: Iterable[str] = (), prefix: str = ""
) -> list[tuple[str, list[str]]]:
    """The run's own charts, ``(title, tag regexes)``, from the scalar ``tags`` it wrote: one per loss (a tag
    containing "loss", drawn alone), then one for its learning rates (``learning_rates``, tags known to be
    learning rates, and any of ``tags`` named ``lr`` or ``learning_rate`` as a word; Lightning's
    ``LearningRateMonitor`` tags through one pattern, after the logger's ``prefix``), the training losses before
    the validation ones, each set in name order.

    Tags are matched whole (TensorBoard matches a chart's regexes at the start of a tag)."""
    losses, rates, monitor = [], [], False
    known = set(learning_rates)
    for tag in dict.fromkeys([*tags, *learning_rates]):
        by_monitor = tag.startswith(prefix) and re.fullmatch(LR_MONITOR_TAGS, tag[len(prefix) :]) is not None
        if tag in known and not by_monitor:
            rates.append(tag)
        elif "loss" in tag.lower():
            losses.append(tag)
        elif by_monitor:
            monitor = True
        elif _LR_WORD.search(tag) and not _NOT_LR.search(tag):
            rates.append(tag)
    losses.sort(key=lambda tag: (_EVALUATION.search(tag) is not None, tag))
    charts = [(tag, [_exactly(tag)]) for tag in losses]
    patterns = ([re.escape(prefix) + LR_MONITOR_TAGS + "$"] if monitor else []) + [_exactly(tag) for tag in rates]
    if patterns:
        charts.append(("learning rate", patterns))
    return charts


def custom_scalars_layout(
    metrics: Iterable[str] = LOGGABLE,
    per_layer: Iterable[str] = HEADLINE,
    prefix: str = "",
    training_tags: Iterable[str] = (),
    learning_rates: Iterable[str] = (),
) -> layout_pb2.Layout:
    """The layout for the selected ``metrics`` (those in ``per_layer`` also get a chart per layer) and the run's
    ``training_tags`` and ``learning_rates`` (:func:`training_charts`), as TensorBoard's ``Layout`` proto.

    The sphere's charts depend on the selection alone, not on what a run measured. ``skipped_groups``, logged only
    when groups were left out of a step, has no chart: its card appears in the Scalars tab when it happens.
    ``prefix``: what the logger puts before the sphere's keys (Hugging Face's Trainer writes its training logs
    under ``train/``, Lightning's loggers join their ``prefix`` with ``-``); the run's tags are whole tags.
    """
    chosen, layered = set(metrics), set(per_layer)
    sphere = re.escape(prefix) + "sphere"
    overall, by_layer = [], []
    ordered = [m for m in HEADLINE if m in METRICS] + [m for m in METRICS if m not in HEADLINE]
    for metric in ordered:
        if metric not in chosen or (metric == _EQUILIBRIUM and "angular_update" in chosen):
            continue
        tags = [f"{sphere}/{metric}/all$"]
        if metric == "angular_update":
            tags.append(f"{sphere}/{_EQUILIBRIUM}/all$")
        overall.append(_chart(metric, tags))
        if metric in layered:
            tags = [f"{sphere}/{metric}/(?!all$)"]
            if metric == "angular_update":  # the equilibrium: once, or per layer where the layers' differ
                tags.append(f"{sphere}/{_EQUILIBRIUM}/")
            by_layer.append(_chart(f"{metric} per layer", tags))
    first = [_chart(title, tags) for title, tags in training_charts(training_tags, learning_rates, prefix)] + overall
    categories = [layout_pb2.Category(title=TRAINING, chart=first)]
    if by_layer:
        categories.append(layout_pb2.Category(title=PER_LAYER_CATEGORY, chart=by_layer, closed=True))
    return layout_pb2.Layout(category=categories)


def write_layout(writer: Any, layout: layout_pb2.Layout, step: int) -> None:
    """Write ``layout`` to ``writer`` at ``step``. TensorBoard reads the last layout a run wrote, so a run
    rewrites its layout when the tags it has written change. A writer other than torch's ``SummaryWriter``
    (tensorboardX's) gets it through ``add_custom_scalars``, which has no notion of a closed category."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import custom_scalars

    if not isinstance(writer, SummaryWriter):
        charts = [
            (c.title, {chart.title: ["Multiline", list(chart.multiline.tag)] for chart in c.chart})
            for c in layout.category
        ]
        writer.add_custom_scalars(dict(charts))
        return
    summary = custom_scalars({})  # torch's own encoding of a layout, with ours in place of its empty one
    summary.value[0].tensor.string_val[0] = layout.SerializeToString()
    writer._get_file_writer().add_summary(summary, step)


def _chart(title: str, tags: list[str]) -> layout_pb2.Chart:
    return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=tags))


def _exactly(tag: str) -> str:
    return re.escape(tag) + "$"
