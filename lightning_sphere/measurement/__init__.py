"""What one step does on the sphere (a stage of the same rank as ``detection`` and ``correction``): the metric registry
(:mod:`~lightning_sphere.measurement.metrics`) and the per-layer reductions
(:mod:`~lightning_sphere.measurement.reduce`), pure functions of per-group inner products."""

from lightning_sphere.measurement.metrics import HISTOGRAMS, METRICS, SKIPPED_GROUPS, GroupStats, Metric, sphere_metrics
from lightning_sphere.measurement.reduce import REDUCTIONS, segment_reduce

__all__ = [
    "HISTOGRAMS",
    "METRICS",
    "REDUCTIONS",
    "SKIPPED_GROUPS",
    "GroupStats",
    "Metric",
    "segment_reduce",
    "sphere_metrics",
]
