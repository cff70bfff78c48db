"""Where measurements go: every Lightning logger gets the scalars, TensorBoard also the histograms and a
custom-scalars layout with one multi-line chart per metric across layers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lightning_sphere.geometry import METRICS, SKIPPED_GROUPS
from lightning_sphere.tracker import Measurement


def tensorboard_writer(logger: Any) -> Any | None:
    """The ``SummaryWriter`` behind a TensorBoard-like logger, ``None`` for other loggers."""
    experiment = getattr(logger, "experiment", None)
    has = all(callable(getattr(experiment, name, None)) for name in ("add_histogram", "add_custom_scalars"))
    return experiment if has else None


def custom_scalars_layout(scalars: Iterable[str]) -> dict[str, dict[str, list[Any]]]:
    """One multi-line chart per logged metric, every layer a line; the measured angular update shares its
    chart with the §7 equilibrium it should settle at."""
    logged = {key.split("/")[1] for key in scalars if key.startswith("sphere/")}
    charts = {}
    for metric in (*METRICS, SKIPPED_GROUPS):
        if metric in logged and metric != "angular_update_equilibrium":
            tags = [rf"sphere/{metric}/.*"]
            if metric == "angular_update" and "angular_update_equilibrium" in logged:
                tags.append(r"sphere/angular_update_equilibrium/.*")
            charts[metric] = ["Multiline", tags]
    return {"sphere": charts}


class LoggerSink:
    """Streams measurements to a trainer's loggers, writing the TensorBoard layout once per writer."""

    def __init__(self, custom_scalars: bool = True) -> None:
        self.custom_scalars = custom_scalars
        self._layouts: set[int] = set()

    def write(self, loggers: Iterable[Any], measurement: Measurement, step: int) -> None:
        for logger in loggers:
            logger.log_metrics(measurement.scalars, step=step)
            writer = tensorboard_writer(logger)
            if writer is None:
                continue
            for tag, values in measurement.histograms.items():
                writer.add_histogram(tag, values, global_step=step)
            if self.custom_scalars and id(writer) not in self._layouts:
                writer.add_custom_scalars(custom_scalars_layout(measurement.scalars))
                self._layouts.add(id(writer))
