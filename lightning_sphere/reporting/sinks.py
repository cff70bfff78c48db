"""Where measurements go, and which of them: every Lightning logger gets the selected scalars, TensorBoard also
the histograms and the custom-scalars layout (:mod:`lightning_sphere.reporting.layout`).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Sequence
from typing import Any

from lightning_sphere.measurement.metrics import HISTOGRAMS, SKIPPED_GROUPS
from lightning_sphere.reporting.layout import (
    _EQUILIBRIUM,
    HEADLINE,
    LOGGABLE,
    custom_scalars_layout,
    tensorboard_writer,
    write_layout,
)
from lightning_sphere.tracking.tracker import Measurement

#: A run's own scalar keys logged so far, and those of them known to be learning rates.
RunTags = tuple[Sequence[str], Sequence[str]]

#: The metrics logged with a line per layer by default, the headline ones; every selected metric is also
#: logged over all groups (``sphere/<metric>/all``).
PER_LAYER = HEADLINE


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which keys of a :class:`~lightning_sphere.tracking.Measurement` reach the loggers.

    Every selected metric is logged over all groups (``sphere/<metric>/all``); those in ``per_layer`` also per
    tracked module (``sphere/<metric>/<module name>``). Two keys are logged only when they say something:
    ``skipped_groups`` when it is not zero, and the equilibrium angular update (§7) per module only when the
    modules' equilibria differ (param groups with different lr or weight decay), else once, under ``all``.
    Histograms (``sphere_hist/…``) follow ``metrics``.

    Args:
        metrics: the metrics to log, names of :data:`LOGGABLE`; ``None``: all.
        per_layer: the metrics also logged per module: names of :data:`LOGGABLE`, ``True`` for all selected
            metrics, ``False`` for none. The equilibrium follows ``angular_update``.

    Raises:
        ValueError: for a name that is not a metric (listing the valid ones).
    """

    metrics: tuple[str, ...] = LOGGABLE
    per_layer: frozenset[str] = frozenset(PER_LAYER)

    @classmethod
    def of(cls, metrics: Sequence[str] | None = None, per_layer: bool | Sequence[str] = PER_LAYER) -> Selection:
        chosen = LOGGABLE if metrics is None else _known(metrics, "metrics")
        layered = set(chosen) if per_layer is True else set() if per_layer is False else _known(per_layer, "per_layer")
        if "angular_update" in layered:
            layered.add(_EQUILIBRIUM)
        return cls(tuple(m for m in LOGGABLE if m in chosen), frozenset(layered) & set(chosen))

    def __call__(self, measurement: Measurement) -> Measurement:
        """The measurement with only the selected keys."""
        wanted = set(self.metrics)
        equilibria = [v for k, v in measurement.scalars.items() if k.startswith(f"sphere/{_EQUILIBRIUM}/")]
        # Equal up to the float32 round-off of reducing identical per-group values: one value, logged once.
        per_module_equilibria = bool(equilibria) and max(equilibria) > min(equilibria) * (1 + 1e-4)
        scalars = {}
        for key, value in measurement.scalars.items():
            _, metric, name = key.split("/", 2)
            if metric not in wanted:
                continue
            if name == "all":
                if metric != SKIPPED_GROUPS or value:
                    scalars[key] = value
            elif metric in self.per_layer and (metric != _EQUILIBRIUM or per_module_equilibria):
                scalars[key] = value
        histograms = {key: v for key, v in measurement.histograms.items() if key.split("/")[1] in wanted}
        return dataclasses.replace(measurement, scalars=scalars, histograms=histograms)

    @property
    def histograms(self) -> bool:
        """Whether any histogrammed metric is selected."""
        return any(m in self.metrics for m in HISTOGRAMS)


def _known(names: Sequence[str], argument: str) -> set[str]:
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in LOGGABLE]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), LOGGABLE, n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"`{argument}`: {unknown[0]!r} is not a metric{hint}; the metrics are {', '.join(LOGGABLE)}")
    return set(names)


class LoggerSink:
    """Streams measurements to a trainer's loggers, and keeps each TensorBoard writer's custom-scalars layout up to
    date with the tags the run has written (:mod:`lightning_sphere.reporting.layout`).

    Args:
        custom_scalars: write the custom-scalars layout.
        selection: the selected metrics: the layout has a chart for each the run has logged, over all groups, and
            one per layer for those logged per layer. A chart's definition depends on its metric alone, so that
            TensorBoard, which merges the runs' layouts chart by chart, shows it once for all runs that have it,
            and no chart stays empty (Adam's two for an SGD run, ``update_scale`` for most optimizers).
    """

    def __init__(self, custom_scalars: bool = True, selection: Selection | None = None) -> None:
        self.custom_scalars = custom_scalars
        self.selection = selection or Selection()
        self._layouts: dict[int, Any] = {}  # writer → the layout it has
        self._measured: set[str] = set()  # the metrics logged so far: only those get charts

    def write(self, loggers: Iterable[Any], measurement: Measurement, step: int, run: RunTags = ((), ())) -> None:
        """``measurement`` to every logger at ``step``; ``run``: the run's own scalar keys logged so far, and
        those known to be learning rates (its losses and learning rates get the layout's first charts)."""
        for logger in loggers:
            if measurement.scalars:
                logger.log_metrics(measurement.scalars, step=step)
        self.write_histograms(loggers, measurement.histograms, step)
        self._measured |= {key.split("/")[1] for key in measurement.scalars if key.startswith("sphere/")}
        self.write_layout(loggers, step, run)

    def write_layout(self, loggers: Iterable[Any], step: int, run: RunTags = ((), ())) -> None:
        """The layout, to each TensorBoard writer among ``loggers`` whose layout it changes."""
        if not self.custom_scalars:
            return
        for logger in loggers:
            writer = tensorboard_writer(logger)
            if writer is None:
                continue
            prefix = _key_prefix(logger)
            tags, rates = ([prefix + key for key in keys] for keys in run)
            metrics = [m for m in self.selection.metrics if m in self._measured]
            layout = custom_scalars_layout(metrics, self.selection.per_layer, prefix, tags, rates)
            if self._layouts.get(id(writer)) != layout:
                write_layout(writer, layout, step)
                self._layouts[id(writer)] = layout

    def write_histograms(self, loggers: Iterable[Any], histograms: dict[str, Any], step: int) -> None:
        """``histograms`` (tag → per-group values) to the TensorBoard writers among ``loggers``."""
        for logger in loggers:
            writer = tensorboard_writer(logger)
            if writer is not None:
                prefix = _key_prefix(logger)  # as the logger puts it before the scalars
                for tag, values in histograms.items():
                    writer.add_histogram(prefix + tag, values, global_step=step)


def _key_prefix(logger: Any) -> str:
    """What a Lightning logger puts before the keys it is given (its ``prefix``, joined with ``-``)."""
    prefix = getattr(logger, "_prefix", "")
    join = getattr(logger, "LOGGER_JOIN_CHAR", "-")
    return f"{prefix}{join}" if isinstance(prefix, str) and prefix else ""
