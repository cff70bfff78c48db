"""Where measurements go, and which of them: every Lightning logger gets the selected scalars, TensorBoard also
the histograms and the custom-scalars layout (:mod:`lightning_sphere.reporting.layout`).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Sequence
from typing import Any

from lightning_sphere.measurement.metrics import HISTOGRAMS, SKIPPED_GROUPS
from lightning_sphere.reporting.layout import _EQUILIBRIUM, LOGGABLE, custom_scalars_layout, tensorboard_writer
from lightning_sphere.tracking.tracker import Measurement

#: The metrics logged with a line per layer by default, the headline ones; every selected metric is also
#: logged over all groups (``sphere/<metric>/all``).
PER_LAYER = ("effective_lr", "angular_update", "norm")


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
    """Streams measurements to a trainer's loggers, writing the TensorBoard layout once per writer.

    Args:
        custom_scalars: write the custom-scalars layout.
        metrics: the selected metrics: the layout has a chart for each.
    """

    def __init__(self, custom_scalars: bool = True, metrics: Iterable[str] = LOGGABLE) -> None:
        self.custom_scalars = custom_scalars
        self.layout = custom_scalars_layout(metrics)
        self._layouts: set[int] = set()

    def write(self, loggers: Iterable[Any], measurement: Measurement, step: int) -> None:
        for logger in loggers:
            if measurement.scalars:
                logger.log_metrics(measurement.scalars, step=step)
        self.write_histograms(loggers, measurement.histograms, step)
        for logger in loggers:
            writer = tensorboard_writer(logger)
            if writer is not None and self.custom_scalars and id(writer) not in self._layouts:
                writer.add_custom_scalars(self.layout)
                self._layouts.add(id(writer))

    def write_histograms(self, loggers: Iterable[Any], histograms: dict[str, Any], step: int) -> None:
        """``histograms`` (tag → per-group values) to the TensorBoard writers among ``loggers``."""
        for logger in loggers:
            writer = tensorboard_writer(logger)
            if writer is not None:
                for tag, values in histograms.items():
                    writer.add_histogram(tag, values, global_step=step)
