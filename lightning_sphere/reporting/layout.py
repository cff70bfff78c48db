"""TensorBoard's custom-scalars layout: one multi-line chart per metric, every layer a line."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lightning_sphere.measurement.metrics import METRICS, SKIPPED_GROUPS

#: Every metric a selection may name: the registry's, then the count of groups left out of a step.
LOGGABLE = (*METRICS, SKIPPED_GROUPS)
_EQUILIBRIUM = "angular_update_equilibrium"


def tensorboard_writer(logger: Any) -> Any | None:
    """The ``SummaryWriter`` behind a TensorBoard-like logger, ``None`` for other loggers."""
    experiment = getattr(logger, "experiment", None)
    has = all(callable(getattr(experiment, name, None)) for name in ("add_histogram", "add_custom_scalars"))
    return experiment if has else None


def custom_scalars_layout(metrics: Iterable[str] = LOGGABLE, prefix: str = "") -> dict[str, dict[str, list[Any]]]:
    """One multi-line chart per metric, every layer a line, whatever a run measured: the layout depends on the
    selected ``metrics`` alone, so that runs of any optimizer, with or without the correction, write the same
    charts (TensorBoard shows a chart once per distinct definition). The measured angular update shares its
    chart with the §7 equilibrium it should settle at. ``skipped_groups``, logged only when groups were left out
    of a step, has no chart: its cards appear in the Scalars tab when it happens. ``prefix``: what the logger puts
    before the keys (Hugging Face's Trainer writes its training logs under ``train/``)."""
    metrics = set(metrics)
    charts = {}
    for metric in METRICS:
        if metric == _EQUILIBRIUM and "angular_update" in metrics:
            continue
        if metric in metrics:
            tags = [rf"{prefix}sphere/{metric}/.*"]
            if metric == "angular_update":
                tags.append(rf"{prefix}sphere/{_EQUILIBRIUM}/.*")
            charts[metric] = ["Multiline", tags]
    return {"sphere": charts}
